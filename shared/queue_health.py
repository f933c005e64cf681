"""Queue health for diagnostics: how many events wait, were set aside, or were poisoned, and since when.

Reads the storage account the triggers use: the AzureWebJobsStorage connection string locally, or the
identity-based AzureWebJobsStorage__queueServiceUri (+ __credential/__clientId) in Azure. Approximate
counts include invisible (deferred) messages. A storage failure is named like any other and never makes
diagnostics itself fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared import storage

INTAKE_QUEUES = ("cases", "leads")
_FIXES = {
    "queue_poisoned": "Find the cause in the logs (outcome failed, its code) and fix it; then move the messages back, "
                      "each is created once: python -m tools.queues replay {queue}{where}",
    "queue_storage_unreachable": "Check AzureWebJobsStorage (locally: is Azurite running?) and the app's outbound "
                                 "network; the queue triggers cannot run either.",
    "queue_storage_forbidden": "Give the app's identity 'Storage Queue Data Contributor' on the storage account.",
    "queue_storage_error": "Read the storage error in detail.",
}


def _count(service: Any, name: str) -> tuple[int, float | None]:
    """(approximate count, age in seconds of the oldest visible message); a missing queue holds nothing."""
    from azure.core.exceptions import ResourceNotFoundError

    queue = service.get_queue_client(name)
    try:
        count = queue.get_queue_properties().approximate_message_count or 0
        oldest = None
        if count and name.endswith("-poison"):
            peeked = list(queue.peek_messages(max_messages=1))
            if peeked and peeked[0].inserted_on is not None:
                oldest = (datetime.now(UTC) - peeked[0].inserted_on).total_seconds()
        return count, oldest
    except ResourceNotFoundError:
        return 0, None


def check(environ: Mapping[str, str]) -> dict[str, Any]:
    """{"status": ok|warning|failed|skipped, "queues": [...], and code/detail/fix when not ok}."""
    if not storage.configured(environ):
        return {"status": "skipped", "detail": "AzureWebJobsStorage is not set here: no queues to read."}
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    try:
        service = storage.service(environ, retry_total=0, connection_timeout=3, read_timeout=5)
        rows = []
        for name in INTAKE_QUEUES:
            depth, _ = _count(service, name)
            poison, oldest = _count(service, f"{name}-poison")
            rejected, _ = _count(service, f"{name}-rejected")
            rows.append({"queue": name, "depth": depth, "poison": poison, "rejected": rejected,
                         "oldestPoisonAgeSeconds": None if oldest is None else round(oldest)})
    except ServiceRequestError:
        return _failed("queue_storage_unreachable", "Queue storage did not answer.")
    except ClientAuthenticationError:
        return _failed("queue_storage_forbidden", "Queue storage refused the app's credentials.")
    except HttpResponseError as exc:
        code = "queue_storage_forbidden" if exc.status_code == 403 else "queue_storage_error"
        return _failed(code, f"Queue storage answered {exc.status_code} {getattr(exc, 'error_code', '') or ''}".strip())
    except ValueError as exc:  # a malformed connection string
        return _failed("queue_storage_error", f"AzureWebJobsStorage is not usable: {exc}")
    poisoned = [r for r in rows if r["poison"]]
    if poisoned:
        names = ", ".join(f"{r['queue']}-poison ({r['poison']})" for r in poisoned)
        fix = _FIXES["queue_poisoned"].format(queue=poisoned[0]["queue"], where=_replay_from(environ))
        return {"status": "warning", "code": "queue_poisoned", "detail": f"Poisoned messages wait in {names}.",
                "fix": fix, "queues": rows}
    return {"status": "ok", "queues": rows}


def _replay_from(environ: Mapping[str, str]) -> str:
    """The replay command's way into this storage: in Azure the account refuses keys (shared keys are off),
    so the operator names the queue endpoint and signs in with Entra ID; locally the connection string."""
    url = (environ.get("AzureWebJobsStorage__queueServiceUri") or "").rstrip("/")
    if (environ.get("AzureWebJobsStorage") or "").strip() or not url:
        return ""
    return (f" --account-url {url} (after az login, as a user holding Storage Queue Data Contributor on the "
            "account: azd provision grants it to AZURE_PRINCIPAL_ID)")


def _failed(code: str, detail: str) -> dict[str, Any]:
    return {"status": "failed", "code": code, "detail": detail, "fix": _FIXES[code], "queues": []}
