"""The `followups` Storage queue: the follow-up routes' bodies plus "op" (note | resolve | cancel | update) and
"entity" (case | lead), applied exactly once with the rules of every queue (triggers/queue_intake.py).

A follow-up whose record does not exist yet (it overtook its create) is `record_not_found`, a cause outside
the message: deferred, and applied once the record exists, within INTAKE_DEFERRAL_MAX_HOURS (then poisoned,
kept for replay). A refusal in the follow-up itself (a bad body, a resolved or cancelled case, a rule,
another note under the same noteId) goes to followups-rejected. A note's attachment travels inside the
message (base64 in the body, so at most about 48 KiB of text in all); larger files go through
POST /api/cases/notes, which takes up to INTAKE_NOTE_MAX_BYTES.
"""

from __future__ import annotations

import azure.functions as func

from shared import followups, instance
from shared.telemetry import Invocation
from shared.validation import parse_followup_message, parse_json
from triggers import queue_intake
from triggers.queue_intake import Applied

followups_queue_bp = func.Blueprint()
QUEUE = "followups"


def apply(body: bytes, key: str, inv: Invocation) -> Applied:
    """One follow-up message; the work is keyed by the follow-up itself (record, noteId), not the message."""
    fu = parse_followup_message(parse_json(body), instance.settings().note_max_bytes)
    inv.entity = f"{fu.entity}.{fu.op}"
    done = followups.apply(instance.intake().client, fu, queue_intake.QUEUE_BUDGET)
    return Applied(done.id, done.entity, done.changed)


@followups_queue_bp.queue_trigger(arg_name="msg", queue_name=QUEUE, connection="AzureWebJobsStorage")
@followups_queue_bp.queue_output(arg_name="rejected", queue_name=f"{QUEUE}-rejected", connection="AzureWebJobsStorage")
def followups_queue(msg: func.QueueMessage, rejected: func.Out[str], context: func.Context) -> None:
    queue_intake.process(msg, rejected, context, QUEUE, "followup", apply)
