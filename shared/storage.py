"""Queue and blob clients on the storage account the triggers use, built from the same app settings as the host.

Locally `AzureWebJobsStorage` holds a connection string (Azurite); in Azure the identity-based
`AzureWebJobsStorage__queueServiceUri` / `__blobServiceUri` (+ `__credential` managedidentity,
`__clientId`) are used, with the roles the template grants. Messages are base64 (host.json
`messageEncoding`), as the host reads. What the function sets aside is sent with `time_to_live=-1`
(`keep`): Storage's default lifetime is 7 days. The SDKs are imported on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

_clients: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def configured(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool((env.get("AzureWebJobsStorage") or "").strip() or env.get("AzureWebJobsStorage__queueServiceUri"))


def _credential(env: Mapping[str, str]) -> Any:
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    return (ManagedIdentityCredential(client_id=env.get("AzureWebJobsStorage__clientId"))
            if env.get("AzureWebJobsStorage__credential") == "managedidentity" else DefaultAzureCredential())


def service(environ: Mapping[str, str] | None = None, **options: Any) -> Any:
    """A QueueServiceClient for the host's storage (raises KeyError/ValueError when none is configured)."""
    from azure.storage.queue import QueueServiceClient

    env = os.environ if environ is None else environ
    conn = (env.get("AzureWebJobsStorage") or "").strip()
    if conn:
        return QueueServiceClient.from_connection_string(conn, **options)
    return QueueServiceClient(env["AzureWebJobsStorage__queueServiceUri"], credential=_credential(env), **options)


def queue(name: str) -> Any:
    """The process's client for queue `name` (clients are thread-safe; built once per process)."""
    key = (os.environ.get("AzureWebJobsStorage") or os.environ.get("AzureWebJobsStorage__queueServiceUri") or "", name)
    with _lock:
        client = _clients.get(key)
        if client is None:
            from azure.storage.queue import ExponentialRetry, TextBase64DecodePolicy, TextBase64EncodePolicy

            # The host reads base64 (host.json messageEncoding); a service client's queues do not inherit it.
            # Retries within an invocation's time: the SDK's default first waits 15 s.
            retry = ExponentialRetry(initial_backoff=0.5, increment_base=2, retry_total=3)
            account = service(retry_policy=retry, connection_timeout=5, read_timeout=10)
            client = _clients[key] = account.get_queue_client(
                name, message_encode_policy=TextBase64EncodePolicy(), message_decode_policy=TextBase64DecodePolicy())
        return client


def keep(name: str, text: str, *, visibility_timeout: int | None = None) -> None:
    """Send `text` to queue `name` so that it never expires (`time_to_live=-1`), creating the queue if needed.

    For everything the function sets aside or defers: a message must outlive an operator's week off."""
    from azure.core.exceptions import ResourceNotFoundError

    client = queue(name)
    try:
        client.send_message(text, visibility_timeout=visibility_timeout, time_to_live=-1)
    except ResourceNotFoundError:  # the host creates -poison on first use; here it may not exist yet
        client.create_queue()
        client.send_message(text, visibility_timeout=visibility_timeout, time_to_live=-1)


def container(name: str) -> Any:
    """The process's client for blob container `name` (claim checks), on the same account as the queues."""
    env = os.environ
    key = (env.get("AzureWebJobsStorage") or env.get("AzureWebJobsStorage__blobServiceUri") or "", "blob:" + name)
    with _lock:
        client = _clients.get(key)
        if client is None:
            from azure.storage.blob import BlobServiceClient, ExponentialRetry

            options: dict[str, Any] = {"retry_policy": ExponentialRetry(initial_backoff=0.5, increment_base=2,
                                                                        retry_total=3),
                                       "connection_timeout": 5, "read_timeout": 10}
            conn = (env.get("AzureWebJobsStorage") or "").strip()
            account = (BlobServiceClient.from_connection_string(conn, **options) if conn else
                       BlobServiceClient(env["AzureWebJobsStorage__blobServiceUri"], credential=_credential(env),
                                         **options))
            client = _clients[key] = account.get_container_client(name)
        return client
