"""Queue clients on the storage account the triggers use, built from the same app settings as the host.

Locally `AzureWebJobsStorage` holds a connection string (Azurite); in Azure the identity-based
`AzureWebJobsStorage__queueServiceUri` (+ `__credential` managedidentity, `__clientId`) is used, with
the roles the template grants. Messages are base64 (host.json `messageEncoding`), as the host reads.
azure-storage-queue is imported on first use.
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


def service(environ: Mapping[str, str] | None = None, **options: Any) -> Any:
    """A QueueServiceClient for the host's storage (raises KeyError/ValueError when none is configured)."""
    from azure.storage.queue import QueueServiceClient

    env = os.environ if environ is None else environ
    conn = (env.get("AzureWebJobsStorage") or "").strip()
    if conn:
        return QueueServiceClient.from_connection_string(conn, **options)
    from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

    credential = (ManagedIdentityCredential(client_id=env.get("AzureWebJobsStorage__clientId"))
                  if env.get("AzureWebJobsStorage__credential") == "managedidentity" else DefaultAzureCredential())
    return QueueServiceClient(env["AzureWebJobsStorage__queueServiceUri"], credential=credential, **options)


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
