"""Azure Monitor's common alert schema as intake events: one case per alert instance, resolved exactly once.

`Fired` is a case keyed by `essentials.alertId` (source `azure-monitor`): the same alert fired again finds
the same case. `Resolved` carries the same alertId: it creates the case from its own payload when it
overtook its `Fired` (action groups do not retry a 404, so refusing would lose the resolution), then
resolves it. The title holds only what both payloads share (rule and severity), so either may come first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import IntakeError
from shared.validation import is_key

SCHEMA_ID = "azureMonitorCommonAlertSchema"
SOURCE = "azure-monitor"
PRIORITY = {"sev0": "high", "sev1": "high", "sev2": "normal", "sev3": "low", "sev4": "low"}
CONDITIONS = ("Fired", "Resolved")
MAX_BODY = 256 * 1024 + 4096  # a common-schema alert is at most 256 KB


@dataclass(frozen=True)
class Alert:
    condition: str  # Fired | Resolved
    case: dict[str, Any]  # a case event of the contract (POST /api/cases body)
    resolution: dict[str, str]  # the resolution of a Resolved alert


def _bad(field: str, problem: str) -> IntakeError:
    return IntakeError("invalid_request", f"{field}: {problem}", details=[{"field": field, "problem": problem}])


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def alert_key(alert_id: str) -> str | None:
    """The case's externalId: the alertId itself; one that breaks the key rule (Microsoft's own sample holds
    "<subscription ID>") falls back to its last segment, the alert instance's GUID. None: neither is a key."""
    if is_key(alert_id):
        return alert_id
    last = alert_id.rstrip("/").rsplit("/", 1)[-1]
    return f"alert:{last}" if is_key(f"alert:{last}") else None


def parse(data: dict, account_id: str | None) -> Alert:
    """The case (and resolution) an alert stands for; 400 naming the schema of anything else."""
    schema = data.get("schemaId")
    if schema != SCHEMA_ID:
        raise _bad("schemaId", f"is {str(schema)[:100]!r}; /api/alerts takes Azure Monitor's common alert schema "
                               f"({SCHEMA_ID}): turn on 'Enable the common alert schema' on the action group's webhook")
    essentials = (data.get("data") or {}).get("essentials") if isinstance(data.get("data"), dict) else None
    if not isinstance(essentials, dict):
        raise _bad("data.essentials", "required: an object")
    alert_id, rule = _text(essentials.get("alertId")), _text(essentials.get("alertRule"))
    condition = essentials.get("monitorCondition")
    problems = []
    key = alert_key(alert_id)
    if key is None:
        problems.append({"field": "data.essentials.alertId", "problem": "required: the alert instance's id" if not
                         alert_id else "must end in the alert's id (printable ASCII without spaces)"})
    if not rule:
        problems.append({"field": "data.essentials.alertRule", "problem": "required"})
    if condition not in CONDITIONS:
        problems.append({"field": "data.essentials.monitorCondition", "problem": "must be Fired or Resolved"})
    if problems:
        raise IntakeError("invalid_request", f"{problems[0]['field']}: {problems[0]['problem']}", details=problems)
    if account_id is None:
        raise IntakeError("config_invalid", "INTAKE_ALERT_ACCOUNT_ID (or INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID) is not "
                          "set: the cases of /api/alerts need an account to be filed under.",
                          details=[{"field": "INTAKE_ALERT_ACCOUNT_ID", "problem": "required for /api/alerts"}])
    severity = _text(essentials.get("severity")) or "Sev?"
    targets = [t for t in essentials.get("alertTargetIDs") or [] if isinstance(t, str)]
    lines = [f"Azure Monitor alert '{rule}' ({severity}, {_text(essentials.get('signalType')) or 'signal'}) fired at "
             f"{_text(essentials.get('firedDateTime')) or 'an unknown time'} by "
             f"{_text(essentials.get('monitoringService')) or 'Azure Monitor'}.",
             "Targets: " + (", ".join(targets) or "none given")]
    if _text(essentials.get("description")):
        lines.append(_text(essentials.get("description")))
    lines.append(f"Alert: {alert_id}")
    description = "\n".join(lines)
    if len(description) > 2000:
        description = description[:1997] + "..."
    case = {"title": f"[{severity}] {rule}"[:200], "description": description,
            "priority": PRIORITY.get(severity.lower(), "normal"), "externalId": key, "source": SOURCE,
            "customer": {"accountId": account_id}}
    resolved_at = _text(essentials.get("resolvedDateTime")) or "an unknown time"
    resolution = {"subject": f"Alert resolved: {rule}"[:200],
                  "description": f"Azure Monitor reported the alert's condition Resolved at {resolved_at}."}
    return Alert(str(condition), case, resolution)
