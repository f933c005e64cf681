"""Follow-ups on the record an event made: a note, resolve, cancel or update, each exactly once by construction.

A note's id derives from the record's id and the producer's noteId, and it is created by id with
If-None-Match: *, so a retry finds it (same content: the same note; other content: a conflict). A case's
resolution id derives from the case's id, so a repeated CloseIncident can never make a second one. Resolve,
cancel and update read the case's `statecode` first and decide on it, never on Dataverse's error code (which
is the same for a resolved and a cancelled case); a refusal is read again against the state before it is
named. An update is update-only (If-Match: *): a missing case is `record_not_found`, never created.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from shared.dataverse import DataverseClient
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.intake import ENTITY_SETS, NAMESPACE, caller_namespace, record_id, same
from shared.validation import FollowUp

STATES = {0: "active", 1: "resolved", 2: "cancelled"}
RESOLVED_STATUS = 5  # Problem Solved
CANCELLED = {"statecode": 2, "statuscode": 6}
_MISSING = "0x80040217"
# Refusals of a resolve or cancel for a rule of the organization (platform-facts, "Case state"): never retried.
_RULES = {"0x8003f452": "CloseActiveChildCaseFirst: close the case's active child cases first",
          "0x8004440e": "IncidentCannotCancel: the case has open activities",
          "0x80040237": "this resolution was applied before and the case was reopened since",
          "0x80048408": "the status is not valid for the state (status transition rules)"}
_ATTACHMENT = {"0x80044a02": "dynamics_attachment_too_large", "0x80043e09": "dynamics_attachment_blocked"}


@dataclass(frozen=True)
class Done:
    id: str  # the note's id, or the case's
    entity: str  # "annotation" | "incident"
    changed: bool  # created or changed now; False: a repeat that found it done
    record_id: str  # the record the follow-up is about
    state: str | None = None  # resolve/cancel/update: the case's state after it


def target_id(fu: FollowUp, caller: str | None = None) -> str:
    """The record's id: given, or derived from the create's key as intake derived it (under entra callers, in
    the caller's own namespace: a caller names only the records its own events made)."""
    if fu.ref.id:
        return fu.ref.id
    return record_id(fu.entity, caller_namespace(caller, fu.ref.source), fu.ref.external_id or "")


def note_id(record: str, producer_note_id: str) -> str:
    """A note's id: the same noteId on the same record always maps to the same note."""
    return str(uuid.uuid5(NAMESPACE, f"annotation\n{record}\n{producer_note_id}"))


def resolution_id(case: str) -> str:
    """The one case resolution this app ever makes for a case."""
    return str(uuid.uuid5(NAMESPACE, f"incidentresolution\n{case}"))


def _state(client: DataverseClient, entity_set: str, rid: str, deadline: Deadline) -> int:
    """The row's statecode; record_not_found when there is no row."""
    reply = client.transport.request("GET", f"{entity_set}({rid})", deadline=deadline, ok=(200, 404),
                                     params={"$select": "statecode"})
    if reply.status == 404:
        raise IntakeError("record_not_found", f"{entity_set}({rid}) does not exist.", request_id=reply.request_id,
                          record_id=rid)
    return int(reply.data.get("statecode") or 0)


def _conflict(rid: str, why: str, err: IntakeError | None = None) -> IntakeError:
    return IntakeError("record_state_conflict", f"incidents({rid}): {why}.", record_id=rid,
                       request_id=err.request_id if err else None, upstream_code=err.upstream_code if err else None)


def _refusal(err: IntakeError) -> bool:
    """Dataverse answered and refused (a 4xx), as opposed to an outage or a throttle."""
    return err.code in ("dynamics_payload_rejected", "dynamics_error")


def _rule(err: IntakeError, rid: str, op: str) -> IntakeError:
    code = (err.upstream_code or "").lower()
    if code in _RULES:
        return _conflict(rid, f"Dataverse refused to {op} it: {_RULES[code]} ({err.detail})", err)
    if "transition" in err.detail.lower():
        return _conflict(rid, f"Dataverse refused to {op} it: CaseStateChangeInvalid, status transition rules "
                              f"({err.detail})", err)
    err.record_id = rid
    return err


def apply(client: DataverseClient, fu: FollowUp, budget: float | Deadline = 20.0, caller: str | None = None) -> Done:
    deadline = Deadline.of(budget)
    rid = target_id(fu, caller)
    if fu.op == "note":
        return _note(client, fu, rid, deadline)
    state = _state(client, "incidents", rid, deadline)
    if fu.op == "resolve":
        return _resolve(client, fu, rid, state, deadline)
    if fu.op == "cancel":
        return _cancel(client, rid, state, deadline)
    return _update(client, fu, rid, state, deadline)


def _note(client: DataverseClient, fu: FollowUp, rid: str, deadline: Deadline) -> Done:
    entity_set = ENTITY_SETS[fu.entity]
    nid = note_id(rid, fu.note_id or "")
    att = fu.attachment
    row: dict = {"subject": fu.subject or "Note", f"objectid_{fu.entity}@odata.bind": f"/{entity_set}({rid})"}
    if fu.text is not None:
        row["notetext"] = fu.text
    if att is not None:
        row.update(filename=att.file_name, mimetype=att.mime_type, documentbody=att.content_base64, isdocument=True)
    for attempt in range(2):
        try:
            created = client.create("annotations", row, record_id=nid, keyed=True, budget=deadline)
            break
        except IntakeError as err:
            code = (err.upstream_code or "").lower()
            if code in _ATTACHMENT:
                raise IntakeError(_ATTACHMENT[code], err.detail, request_id=err.request_id, upstream_code=code,
                                  record_id=rid) from None
            if code != _MISSING or attempt:
                raise
            _state(client, entity_set, rid, deadline)  # record_not_found when the record is still missing
            # It exists now: its create ran between the two requests. Once more, by the same id.
    if not created.created:
        have = client.read("annotations", nid, ("subject", "notetext", "filename", "mimetype", "filesize",
                                                "_objectid_value"), budget=deadline)
        wanted = {"subject": row["subject"], "notetext": fu.text, "filename": att.file_name if att else None,
                  "mimetype": (att.mime_type.lower() if att else None), "filesize": att.size if att else 0}
        got = {**have, "mimetype": (have.get("mimetype") or "").lower() or None, "filesize": have.get("filesize") or 0}
        differ = [k for k in wanted if not same(wanted[k], got.get(k))]
        if differ or str(have.get("_objectid_value") or rid).lower() != rid:
            raise IntakeError("idempotency_conflict", f"The noteId {fu.note_id} already made annotations({nid}), "
                              f"whose {', '.join(differ) or 'record'} differ from this note's.", record_id=nid)
    return Done(nid, "annotation", created.created, rid)


def _resolve(client: DataverseClient, fu: FollowUp, rid: str, state: int, deadline: Deadline) -> Done:
    if state == 1:
        return Done(rid, "incident", False, rid, "resolved")
    if state == 2:
        raise _conflict(rid, "the case is cancelled; reopen it in Dynamics to resolve it")
    resolution = {"activityid": resolution_id(rid), "subject": fu.subject,
                  "incidentid@odata.bind": f"/incidents({rid})",
                  "@odata.type": "Microsoft.Dynamics.CRM.incidentresolution"}
    if fu.text:
        resolution["description"] = fu.text
    try:
        client.action("CloseIncident", {"IncidentResolution": resolution, "Status": RESOLVED_STATUS}, budget=deadline)
    except IntakeError as err:
        if not _refusal(err):
            raise
        state = _state(client, "incidents", rid, deadline)  # an earlier attempt, or someone else, may have done it
        if state == 1:
            return Done(rid, "incident", True, rid, "resolved")
        if state == 2:
            raise _conflict(rid, "the case is cancelled; reopen it in Dynamics to resolve it", err) from None
        raise _rule(err, rid, "resolve") from None
    return Done(rid, "incident", True, rid, "resolved")


def _cancel(client: DataverseClient, rid: str, state: int, deadline: Deadline) -> Done:
    if state == 2:
        return Done(rid, "incident", False, rid, "cancelled")
    if state == 1:
        raise _conflict(rid, "the case is resolved; reopen it in Dynamics to cancel it")
    try:
        client.update("incidents", rid, CANCELLED, budget=deadline)
    except IntakeError as err:
        if not _refusal(err):
            raise
        state = _state(client, "incidents", rid, deadline)
        if state == 2:
            return Done(rid, "incident", True, rid, "cancelled")
        if state == 1:
            raise _conflict(rid, "the case is resolved; reopen it in Dynamics to cancel it", err) from None
        raise _rule(err, rid, "cancel") from None
    return Done(rid, "incident", True, rid, "cancelled")


def _update(client: DataverseClient, fu: FollowUp, rid: str, state: int, deadline: Deadline) -> Done:
    if state != 0:
        raise _conflict(rid, f"the case is {STATES.get(state, str(state))} (read-only until reopened in Dynamics)")
    try:
        client.update("incidents", rid, fu.columns, budget=deadline)
    except IntakeError as err:
        if not _refusal(err):
            raise
        state = _state(client, "incidents", rid, deadline)  # record_not_found when it was deleted meanwhile
        if state != 0:
            raise _conflict(rid, f"the case is {STATES.get(state, str(state))} (read-only until reopened in "
                                 "Dynamics)", err) from None
        err.record_id = rid
        raise
    return Done(rid, "incident", True, rid, "active")
