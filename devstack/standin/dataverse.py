"""Dataverse Web API stand-in (listener C): tables, application user, privileges, OData queries."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import odata
from .base import HttpError, Request, Response, Route, format_retry_after, json_response
from .batch import run_batch
from .entra import Directory
from .schema import (
    EDM,
    INCIDENT_STATUS,
    LITERAL_EDM,
    STATE_NAMES,
    Column,
    DvError,
    EntityDef,
    Payload,
    build_entities,
    check_customer,
    default_status,
    is_guid,
    parse_payload,
    payload_error,
    validate_values,
)
from .state import Fault, State

API = "/api/data/v9.2"
CT = "application/json; odata.metadata=minimal"
VERBS = ("Create", "Read", "Write", "Delete", "Append", "AppendTo", "Assign", "Share")
SEED_PRIVILEGES = ("prvCreateIncident", "prvReadIncident", "prvCreateLead", "prvReadLead", "prvCreateContact",
                   "prvReadContact", "prvAppendIncident", "prvAppendToContact", "prvAppendToAccount",
                   "prvReadAccount", "prvWriteIncident", "prvAppendToIncident", "prvAppendToLead", "prvCreateNote",
                   "prvReadNote", "prvAppendNote", "prvCreateActivity", "prvReadActivity", "prvAppendActivity")
MAX_UPLOAD = 5_242_880  # organization.maxuploadfilesize default: bytes of base64 text
# A few of organization.blockedattachments' default extensions (the whole list is longer).
BLOCKED = frozenset({"ade", "adp", "app", "bat", "chm", "cmd", "com", "cpl", "dll", "exe", "hta", "js", "jse", "lnk",
                     "msi", "msp", "pif", "reg", "scr", "vb", "vbe", "vbs", "ws", "wsf", "wsh"})
ALREADY_RESOLVED = ("0x800404cf", "This case has already been resolved. Close and reopen the case record to see "
                                  "the updates.")
THROTTLE = {
    "0x80072322": "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
    "0x80072321": "Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds "
                  "over time window of 300 seconds. Decrease number of concurrent requests or reduce the "
                  "duration of requests and try again later.",
    "0x80072326": "Number of concurrent requests exceeded the limit of 52.",
}
_PRIV_FN = re.compile(r"systemusers\(([^)]*)\)/(?:Microsoft\.Dynamics\.CRM\.)?"
                      r"RetrieveUserPrivilegeByPrivilegeName\((.*)\)")
_SET = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\((.*)\))?")
_QUERY_OPTIONS = {"$select", "$filter", "$top"}
# Table metadata, only what Microsoft's Python SDK (PowerPlatform-Dataverse-Client) reads before a create:
# the entity set of a table, and its choice columns' options (to turn labels into values).
_DEFINITION = re.compile(r"EntityDefinitions\(LogicalName='([a-z_0-9]+)'\)/Attributes/"
                         r"Microsoft\.Dynamics\.CRM\.PicklistAttributeMetadata")
_LOGICAL_EQ = re.compile(r"LogicalName eq '([a-z_0-9]+)'")
_LABELS = {"prioritycode": {1: "High", 2: "Normal", 3: "Low"}, "caseorigincode": {1: "Phone", 2: "Email", 3: "Web"},
           "statecode": {0: "Active", 1: "Resolved", 2: "Cancelled"}}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dv_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, CT)


def dv_fail(status: int, code: str, message: str) -> HttpError:
    return HttpError(dv_response(status, code, message))


@dataclass
class AppUser:
    """The application user of the Dynamics app registration."""

    client_id: str
    systemuserid: str
    present: bool = True
    enabled: bool = True
    privileges: set[str] = field(default_factory=set)


class Org:
    """The environment's data: tables, records, the app user and the recorded filters."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.lock = state.lock
        ids = state.ids
        self.entities = build_entities()
        self._records: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in self.entities}
        self._version = 1000
        self.user = AppUser(ids.dynamics_client_id, ids.systemuserid, privileges=set(SEED_PRIVILEGES))
        self.queries: list[list[tuple[str, Any]]] = []
        self.max_upload = MAX_UPLOAD
        self.add_column("incidents", "new_customfield")
        self.add_column("leads", "new_customfield")
        self.insert("contacts", ids.seed_contact_id, {"firstname": "Ada", "lastname": "Lovelace",
                                                      "emailaddress1": "ada@example.com",
                                                      "telephone1": "+15550100"})
        self.insert("accounts", ids.seed_account_id, {"name": "Contoso"})

    def add_column(self, entity_set: str, logical_name: str, max_length: int = 100) -> None:
        with self.lock:
            self.entities[entity_set].add(Column(logical_name, "string", max_length=max_length))

    def entity(self, entity_set: str) -> EntityDef | None:
        return self.entities.get(entity_set)

    def privilege_id(self, name: str) -> str:
        return str(uuid.uuid5(uuid.UUID(self.state.ids.organization_id), name.lower()))

    def known_privilege(self, name: str) -> bool:
        schemas = {(e.privilege or e.schema).lower() for e in self.entities.values()}
        low = name.lower()
        for verb in sorted(VERBS, key=len, reverse=True):
            prefix = f"prv{verb}".lower()
            if low.startswith(prefix) and low[len(prefix):] in schemas:
                return True
        return name in self.user.privileges

    def get(self, entity_set: str, key: str) -> dict[str, Any] | None:
        with self.lock:
            rec = self._records[entity_set].get(key.lower())
            return dict(rec) if rec else None

    def delete(self, entity_set: str, key: str) -> bool:
        """Remove a record (an operator deleting it in Dynamics); False when it was not there."""
        with self.lock:
            return self._records[entity_set].pop(key.lower(), None) is not None

    def insert(self, entity_set: str, key: str, values: dict[str, Any]) -> bool:
        """Create a record unless the key exists (atomic); False when it exists."""
        ent = self.entities[entity_set]
        with self.lock:
            table = self._records[entity_set]
            if key.lower() in table:
                return False
            self._version += 1
            now = _now()
            rec: dict[str, Any] = {ent.key: key.lower(), "statecode": 0, "createdon": now, "modifiedon": now,
                                   "versionnumber": self._version}
            rec.update(values)
            if "statuscode" in ent.columns:  # statecode is not valid for create: a new case is active
                rec["statecode"], rec["statuscode"] = 0, default_status(0)
            self._derive(ent, rec)
            table[key.lower()] = rec
            return True

    def update(self, entity_set: str, key: str, values: dict[str, Any]) -> bool:
        ent = self.entities[entity_set]
        with self.lock:
            rec = self._records[entity_set].get(key.lower())
            if rec is None:
                return False
            self._version += 1
            rec.update(values, modifiedon=_now(), versionnumber=self._version)
            self._derive(ent, rec)
            return True

    @staticmethod
    def _derive(ent: EntityDef, rec: dict[str, Any]) -> None:
        if "fullname" in ent.columns:
            rec["fullname"] = " ".join(p for p in (rec.get("firstname"), rec.get("lastname")) if p) or None
        if ent.set_name == "annotations":
            body = rec.get("documentbody")
            rec["isdocument"] = bool(body)
            try:
                rec["filesize"] = len(base64.b64decode(body, validate=True)) if body else 0
            except (binascii.Error, ValueError):
                rec["filesize"] = len(body or "")
            rec["objecttypecode"] = rec.get("_objectid_value@Microsoft.Dynamics.CRM.lookuplogicalname")

    def rows(self, entity_set: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self._records[entity_set].values()]


@dataclass
class _Ctx:
    ent: EntityDef
    key: str | None


class DataverseService:
    """Listener C."""

    name = "dataverse"

    def __init__(self, state: State, org: Org, directory: Directory) -> None:
        self.state = state
        self.org = org
        self.directory = directory
        self.control: Any = None

    @property
    def base(self) -> str:
        return self.state.urls["dataverse"]

    # ---- pipeline hooks -----------------------------------------------------------------------------
    def fault_response(self, req: Request, fault: Fault) -> Response:
        if fault.status == 401:
            return self.challenge()
        if fault.status == 429:
            code = str(fault.code or "0x80072322")
            resp = dv_response(429, code, fault.message or THROTTLE.get(code, THROTTLE["0x80072322"]))
            return resp.header("Retry-After", format_retry_after(fault.retry_after or 1))
        resp = dv_response(fault.status, str(fault.code or "0x80040216"), fault.message or
                           "An unexpected error occurred.")
        if fault.retry_after is not None:
            resp.header("Retry-After", format_retry_after(fault.retry_after))
        return resp

    def finalize(self, req: Request, resp: Response) -> None:
        if "ARRAffinity=" in (req.header("Cookie") or ""):
            self.state.affinity_cookies += 1  # a client that keeps the cookie is pinned to one web server
        rid = str(uuid.uuid4())
        resp.headers += [("x-ms-service-request-id", rid), ("REQ_ID", rid), ("OData-Version", "4.0"),
                         ("x-ms-dop-hint", str(self.state.dop_hint)),
                         ("Set-Cookie", f"ARRAffinity={rid[:16]}; Path=/; HttpOnly; Secure"),
                         ("Cache-Control", "no-cache")]

    def challenge(self) -> Response:
        auth = f"{self.state.urls['entra']}/{self.state.ids.tenant_id}/oauth2/authorize"
        return Response(401, b"", [("WWW-Authenticate",
                                    f"Bearer authorization_uri={auth}, resource_id={self.base}/")])

    def route(self, req: Request) -> Route:
        path, m = req.path, req.method
        if not path.startswith(API + "/"):
            seg = path.strip("/").split("/")[0]
            raise dv_fail(404, "0x80060888", f"Resource not found for the segment '{seg}'.")
        rest = path[len(API) + 1:]
        if rest in ("WhoAmI", "WhoAmI()"):
            return "whoami", self._only(m, "GET", self.whoami)
        if _PRIV_FN.fullmatch(rest):
            return "privilege", self._only(m, "GET", self.privilege)
        if rest == "$batch":
            return "batch", self._only(m, "POST", self.batch)
        if rest == "EntityDefinitions" or _DEFINITION.fullmatch(rest):
            return "metadata", self._only(m, "GET", self.metadata)
        if rest in ("CloseIncident", "Microsoft.Dynamics.CRM.CloseIncident"):
            return "closeincident", self._only(m, "POST", self.close_incident)
        sm = _SET.fullmatch(rest)
        if not sm or sm.group(1) not in self.org.entities:
            seg = rest.split("/")[0].split("(")[0]
            raise dv_fail(404, "0x80060888", f"Resource not found for the segment '{seg}'.")
        if sm.group(2) is None:
            return ("query", self.query) if m == "GET" else ("create", self._only(m, "POST", self.create))
        if m == "GET":
            return "get", self.get
        return "patch", self._only(m, "PATCH", self.patch)

    @staticmethod
    def _only(method: str, expected: str, fn: Any) -> Any:
        if method != expected:
            raise dv_fail(405, "0x80060888",
                          f"The requested resource does not support http method '{method}'.")
        return fn

    # ---- helpers ------------------------------------------------------------------------------------
    def _target(self, req: Request) -> _Ctx:
        sm = _SET.fullmatch(req.path[len(API) + 1:])
        assert sm is not None
        ent = self.org.entities[sm.group(1)]
        raw = sm.group(2)
        if raw is None:
            return _Ctx(ent, None)
        key = raw.split("=", 1)[1] if raw.startswith(ent.key + "=") else raw
        if not is_guid(key):
            raise dv_fail(400, "0x80060888", "Bad Request - Error in query syntax.")
        return _Ctx(ent, key.lower())

    def _caller(self, req: Request) -> AppUser:
        scheme, _, token = (req.header("Authorization") or "").partition(" ")
        info = self.directory.check(token.strip(), self.base) if scheme.lower() == "bearer" else None
        if info is None:
            raise HttpError(self.challenge())
        user = self.org.user
        with self.org.lock:
            present, enabled = user.present, user.enabled
        if info.client_id != user.client_id or not present:
            raise dv_fail(403, "0x80072560", "The user is not a member of the organization.")
        if not enabled:
            raise dv_fail(403, "0x80040225",
                          f"The specified user(Id = {user.systemuserid}) is disabled. Consider enabling this "
                          "user. Additional Details: User is disabled.")
        return user

    def _require(self, user: AppUser, verb: str, ent: EntityDef) -> None:
        name = f"prv{verb}{ent.privilege or ent.schema}"
        with self.org.lock:
            held, count = name in user.privileges, len(user.privileges)
        if not held:
            uid, pid = user.systemuserid, self.org.privilege_id(name)
            raise dv_fail(403, "0x80040220",
                          f"Principal user (Id={uid}, type=8, roleCount=1, privilegeCount={count}), is "
                          f"missing {name} privilege (Id={pid}) on OTC={ent.otc} for entity '{ent.logical}'. "
                          f"context.Caller={uid}. Consider assigning a role with the required privilege to "
                          "the user or team.")

    def _select(self, req: Request, ent: EntityDef) -> list[str] | None:
        raw = self._option(req, "$select")
        if raw is None:
            return None
        cols = [c.strip() for c in raw.split(",") if c.strip()]
        for c in cols:
            if c not in ent.readable():
                raise dv_fail(400, "0x80060888", f"Could not find a property named '{c}' on type "
                                                 f"'{ent.type_name}'.")
        return cols

    @staticmethod
    def _option(req: Request, name: str) -> str | None:
        values = req.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise dv_fail(400, "0x80060888", f"Query option '{name}' was specified more than once, but it "
                                             "must be specified at most once.")
        return values[0]

    def _context(self, ent: EntityDef, select: list[str] | None, entity: bool) -> str:
        cols = f"({','.join(select)})" if select else ""
        return f"{self.base}{API}/$metadata#{ent.set_name}{cols}" + ("/$entity" if entity else "")

    def represent(self, ent: EntityDef, rec: dict[str, Any], select: list[str] | None,
                  annotations: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"@odata.etag": f'W/"{rec["versionnumber"]}"'}
        for col in select or [ent.key, *ent.columns]:
            out[col] = rec.get(col)
            ann = f"{col}@Microsoft.Dynamics.CRM.lookuplogicalname"
            if annotations and ann in rec:
                out[ann] = rec[ann]
        out[ent.key] = rec[ent.key]
        return out

    def _body(self, req: Request, ent: EntityDef) -> Payload:
        try:
            body = req.json() if req.body.strip() else None
        except (ValueError, UnicodeDecodeError):
            exc = payload_error(ent, "Invalid JSON. The payload could not be read.")
            raise HttpError(self._err(exc)) from None
        try:
            return parse_payload(ent, body)
        except DvError as exc:
            raise HttpError(self._err(exc)) from None

    @staticmethod
    def _err(exc: DvError) -> Response:
        return dv_response(exc.status, exc.code, exc.message)

    def _resolve_binds(self, user: AppUser, ent: EntityDef, payload: Payload) -> dict[str, Any]:
        """Check privileges and existence for binds; returns the lookup columns to store."""
        out: dict[str, Any] = {}
        for nav, bind in payload.binds.items():
            lookup = ent.lookups[nav]
            value_col = f"_{lookup.attribute}_value"
            if bind is None:
                continue
            target = self.org.entities[bind[0]]
            self._require(user, "Append", ent)
            self._require(user, "AppendTo", target)
            if self.org.get(bind[0], bind[1]) is None:
                raise dv_fail(404, "0x80040217", f"{target.logical} With Id = {bind[1]} Does Not Exist")
            out[value_col] = bind[1]
            out[f"{value_col}@Microsoft.Dynamics.CRM.lookuplogicalname"] = target.logical
        return out

    def _wants_representation(self, req: Request) -> bool:
        return "return=representation" in (req.header("Prefer") or "").replace(" ", "").lower()

    def _created(self, req: Request, ent: EntityDef, key: str) -> Response:
        if self._wants_representation(req):
            rec = self.org.get(ent.set_name, key) or {}
            select = self._select(req, ent)
            body = {"@odata.context": self._context(ent, select, True), **self.represent(ent, rec, select)}
            return json_response(201, body, CT, [("Preference-Applied", "return=representation")])
        return Response(204, b"", [("OData-EntityId", f"{self.base}{API}/{ent.set_name}({key})")])

    def _do_create(self, req: Request, user: AppUser, ent: EntityDef, payload: Payload, key: str) -> Response:
        self._require(user, "Create", ent)
        try:
            validate_values(ent, payload.values)
            check_customer(ent, payload.binds, creating=True)
            if ent.set_name == "annotations":
                self._check_attachment(payload.values)
        except DvError as exc:
            return self._err(exc)
        values = {**payload.values, **self._resolve_binds(user, ent, payload)}
        if not self.org.insert(ent.set_name, key, values):
            return dv_response(412, "0x80040237", "A record with matching key values already exists.")
        return self._created(req, ent, key)

    def _check_attachment(self, values: dict[str, Any]) -> None:
        """organization.maxuploadfilesize (on the base64 text) and blockedattachments, as Dataverse checks them."""
        body, name = values.get("documentbody") or "", values.get("filename") or ""
        if len(body) > self.org.max_upload:
            raise DvError(400, "0x80044a02", "Attachment file size is too big.")
        if "." in name and name.rsplit(".", 1)[1].lower() in BLOCKED:
            raise DvError(400, "0x80043e09", "The attachment is either not a valid type or is too large. It cannot "
                                             "be uploaded or downloaded.")

    @staticmethod
    def _transition(existing: dict[str, Any], values: dict[str, Any], key: str) -> Response | None:
        """An incident's state rules on update: Resolved and Canceled are read-only until reopened (statecode 0),
        Resolved only through CloseIncident, a statuscode must belong to its statecode. Sets the statuscode."""
        state = existing.get("statecode") or 0
        new_state, new_status = values.get("statecode"), values.get("statuscode")
        if new_state is None and new_status is not None:
            new_state = INCIDENT_STATUS.get(new_status, state)
        if new_state == 1:
            return dv_response(400, "0x80040203", "This message can not be used to set the state of incident to "
                                                  "Closed. In order to set state of incident to Closed, use the "
                                                  "CloseIncidentRequest message instead.")
        if state != 0 and new_state != 0:
            return dv_response(400, *ALREADY_RESOLVED)
        if new_state is not None:
            status = new_status if new_status is not None else default_status(new_state)
            if INCIDENT_STATUS.get(status) != new_state:
                return dv_response(400, "0x80048408", f"{status} is not a valid status code for state code "
                                                      f"IncidentState.{STATE_NAMES[new_state]} on incident with "
                                                      f"Id {key}.")
            values["statecode"], values["statuscode"] = new_state, status
        return None

    # ---- endpoints ----------------------------------------------------------------------------------
    def close_incident(self, req: Request) -> Response:
        """The CloseIncident action: creates the incidentresolution and resolves the case, or neither."""
        user = self._caller(req)
        ent, incidents = self.org.entities["incidentresolutions"], self.org.entities["incidents"]
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            raise HttpError(self._err(payload_error(ent, "Invalid JSON. The payload could not be read."))) from None
        if not isinstance(body, dict) or not isinstance(body.get("IncidentResolution"), dict) \
                or not isinstance(body.get("Status"), int) or isinstance(body.get("Status"), bool):
            raise dv_fail(400, "0x80040203", "CloseIncident takes IncidentResolution (an object) and Status (an "
                                             "integer).")
        try:
            payload = parse_payload(ent, body["IncidentResolution"])
            validate_values(ent, payload.values)
        except DvError as exc:
            return self._err(exc)
        bind = payload.binds.get("incidentid")
        if bind is None:
            raise dv_fail(400, "0x80040203", "incidentid is required on the IncidentResolution.")
        self._require(user, "Create", ent)
        self._require(user, "Write", incidents)
        self._require(user, "AppendTo", incidents)
        status = body["Status"]
        with self.org.lock:
            case = self.org.get("incidents", bind[1])
            if case is None:
                return dv_response(404, "0x80040217", f"incident With Id = {bind[1]} Does Not Exist")
            if status != -1 and INCIDENT_STATUS.get(status) != 1:
                return dv_response(400, "0x80048408", f"{status} is not a valid status code for state code "
                                                      f"IncidentState.Resolved on incident with Id {bind[1]}.")
            if case.get("statecode"):
                return dv_response(400, *ALREADY_RESOLVED)
            values = {**payload.values, "_incidentid_value": bind[1],
                      "_incidentid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "incident", "statecode": 1}
            if not self.org.insert(ent.set_name, payload.key or str(uuid.uuid4()), values):
                return dv_response(412, "0x80040237", "A record with matching key values already exists.")
            self.org.update("incidents", bind[1], {"statecode": 1, "statuscode": 5 if status == -1 else status})
        return Response(204, b"")

    def whoami(self, req: Request) -> Response:
        user = self._caller(req)
        ids = self.state.ids
        return json_response(200, {
            "@odata.context": f"{self.base}{API}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": ids.business_unit_id, "UserId": user.systemuserid,
            "OrganizationId": ids.organization_id}, CT)

    def privilege(self, req: Request) -> Response:
        user = self._caller(req)
        m = _PRIV_FN.fullmatch(req.path[len(API) + 1:])
        assert m is not None
        uid = m.group(1).split("=", 1)[-1].strip().lower()
        pm = re.fullmatch(r"\s*PrivilegeName\s*=\s*(?:'((?:[^']|'')*)'|(@\w+))\s*", m.group(2))
        if not pm:
            raise dv_fail(400, "0x80060888", "Bad Request - Error in query syntax.")
        name = pm.group(1)
        if name is None:
            alias = (req.query.get(pm.group(2)) or [""])[-1]
            if not (len(alias) >= 2 and alias[0] == alias[-1] == "'"):
                raise dv_fail(400, "0x80060888", f"The parameter alias '{pm.group(2)}' was not provided.")
            name = alias[1:-1]
        name = name.replace("''", "'")
        if uid != user.systemuserid:
            raise dv_fail(404, "0x80040217", f"systemuser With Id = {uid} Does Not Exist")
        if not self.org.known_privilege(name):
            raise dv_fail(404, "0x80040217", f"privilege With Name = {name} Does Not Exist")
        with self.org.lock:
            held = name in user.privileges
        rows = [{"Depth": "Global", "PrivilegeId": self.org.privilege_id(name),
                 "BusinessUnitId": self.state.ids.business_unit_id, "PrivilegeName": name}] if held else []
        return json_response(200, {
            "@odata.context": f"{self.base}{API}/$metadata#Microsoft.Dynamics.CRM."
                              "RetrieveUserPrivilegeByPrivilegeNameResponse",
            "RolePrivileges": rows}, CT)

    def batch(self, req: Request) -> Response:
        """`$batch` (devstack/standin/batch.py): each part through this service's own routes."""
        self._caller(req)  # the batch as a whole is authenticated: 401 or 403 for all of it
        return run_batch(self, req, API, dv_fail)

    def create(self, req: Request) -> Response:
        ctx = self._target(req)
        user = self._caller(req)
        payload = self._body(req, ctx.ent)
        return self._do_create(req, user, ctx.ent, payload, payload.key or str(uuid.uuid4()))

    def patch(self, req: Request) -> Response:
        ctx = self._target(req)
        assert ctx.key is not None
        ent, key = ctx.ent, ctx.key
        user = self._caller(req)
        payload = self._body(req, ent)
        if payload.key and payload.key != key:
            return dv_response(400, "0x80060891", "The key in the payload does not match the key in the URL.")
        if_none_match = (req.header("If-None-Match") or "").strip()
        if_match = (req.header("If-Match") or "").strip()
        existing = self.org.get(ent.set_name, key)
        if existing is None:
            if if_match:
                return dv_response(404, "0x80040217", f"{ent.logical} With Id = {key} Does Not Exist")
            return self._do_create(req, user, ent, payload, key)
        if if_none_match == "*":
            return dv_response(412, "0x80040237", "A record with matching key values already exists.")
        if if_match not in ("", "*") and if_match != f'W/"{existing["versionnumber"]}"':
            return dv_response(412, "0x80060882", "The version of the existing record doesn't match the "
                                                  "RowVersion property provided.")
        self._require(user, "Write", ent)
        try:
            validate_values(ent, payload.values)
            check_customer(ent, payload.binds, creating=False)
        except DvError as exc:
            return self._err(exc)
        values = {**payload.values, **self._resolve_binds(user, ent, payload)}
        with self.org.lock:  # the state rule and the write see the same row
            current = self.org.get(ent.set_name, key)
            refused = self._transition(current, values, key) if current and "statuscode" in ent.columns else None
            if refused is not None:
                return refused
            if not self.org.update(ent.set_name, key, values):
                return dv_response(404, "0x80040217", f"{ent.logical} With Id = {key} Does Not Exist")
        if self._wants_representation(req):
            rec = self.org.get(ent.set_name, key) or {}
            select = self._select(req, ent)
            body = {"@odata.context": self._context(ent, select, True), **self.represent(ent, rec, select)}
            return json_response(200, body, CT, [("Preference-Applied", "return=representation")])
        return Response(204, b"", [("OData-EntityId", f"{self.base}{API}/{ent.set_name}({key})")])

    def get(self, req: Request) -> Response:
        ctx = self._target(req)
        assert ctx.key is not None
        user = self._caller(req)
        select = self._select(req, ctx.ent)
        self._require(user, "Read", ctx.ent)
        rec = self.org.get(ctx.ent.set_name, ctx.key)
        if rec is None:
            return dv_response(404, "0x80040217", f"{ctx.ent.logical} With Id = {ctx.key} Does Not Exist")
        body = {"@odata.context": self._context(ctx.ent, select, True),
                **self.represent(ctx.ent, rec, select, self._annotations(req))}
        return json_response(200, body, CT)

    @staticmethod
    def _annotations(req: Request) -> bool:
        prefer = req.header("Prefer") or ""
        return "include-annotations" in prefer and ("*" in prefer or "lookuplogicalname" in prefer)

    def query(self, req: Request) -> Response:
        ent = self._target(req).ent
        user = self._caller(req)
        for opt in req.query:
            if opt.startswith("$") and opt not in _QUERY_OPTIONS:
                raise dv_fail(400, "0x80060888",
                              f"The query parameter '{opt}' is not supported by the stand-in.")
        select = self._select(req, ent)
        top_raw = self._option(req, "$top")
        top = None
        if top_raw is not None:
            if not top_raw.isdigit():
                raise dv_fail(400, "0x80060888", f"Invalid value '{top_raw}' for $top query option found.")
            top = int(top_raw)
        node = None
        raw_filter = self._option(req, "$filter")
        if raw_filter is not None:
            try:
                node = odata.parse_filter(raw_filter)
            except odata.FilterError as exc:
                raise dv_fail(400, "0x80060888", str(exc)) from None
            comps = odata.comparisons(node)
            self.org.queries.append([(c.column, c.value) for c in comps])
            for c in comps:
                self._check_comparison(ent, c)
        self._require(user, "Read", ent)
        rows = [r for r in self.org.rows(ent.set_name)
                if node is None or odata.evaluate(node, lambda c, r=r: _matches(ent, r, c))]
        rows = rows[: top if top is not None else 5000]
        anns = self._annotations(req)
        return json_response(200, {"@odata.context": self._context(ent, select, False),
                                   "value": [self.represent(ent, r, select, anns) for r in rows]}, CT)

    def metadata(self, req: Request) -> Response:
        """EntityDefinitions filtered by LogicalName, or one table's choice columns with their options."""
        self._caller(req)
        by_logical = {e.logical: e for e in self.org.entities.values()}
        rest = req.path[len(API) + 1:]
        one = _DEFINITION.fullmatch(rest)
        if one:
            ent = by_logical.get(one.group(1))
            if ent is None:
                raise dv_fail(404, "0x80040217", f"Could not find entity with name '{one.group(1)}'.")
            value: list[dict[str, Any]] = [
                {"LogicalName": c.name, "OptionSet": {"Options": [
                    {"Value": v, "Label": {"LocalizedLabels": [
                        {"Label": _LABELS.get(c.name, {}).get(v, str(v)), "LanguageCode": 1033}]}}
                    for v in c.options]}}
                for c in ent.columns.values() if c.kind == "option"]
            return json_response(200, {"@odata.context": f"{self.base}{API}/$metadata#EntityDefinitions('"
                                                         f"{ent.logical}')/Attributes", "value": value}, CT)
        wanted = _LOGICAL_EQ.fullmatch(self._option(req, "$filter") or "")
        ents = [by_logical[wanted.group(1)]] if wanted and wanted.group(1) in by_logical else []
        if not wanted and self._option(req, "$filter") is not None:
            raise dv_fail(400, "0x80060888", "The stand-in filters EntityDefinitions only by LogicalName eq '...'.")
        value = [{"LogicalName": e.logical, "EntitySetName": e.set_name, "SchemaName": e.schema,
                  "PrimaryIdAttribute": e.key, "ObjectTypeCode": e.otc}
                 for e in (ents if wanted else self.org.entities.values())]
        return json_response(200, {"@odata.context": f"{self.base}{API}/$metadata#EntityDefinitions",
                                   "value": value}, CT)

    @staticmethod
    def _check_comparison(ent: EntityDef, c: odata.Comparison) -> None:
        if c.column == ent.key:
            kind = "guid"
        elif c.column in ent.columns:
            kind = ent.columns[c.column].kind
        else:
            raise dv_fail(400, "0x80060888", f"Could not find a property named '{c.column}' on type "
                                             f"'{ent.type_name}'.")
        allowed = {"string": {"string"}, "guid": {"guid"}, "lookup": {"guid"}, "option": {"number"},
                   "int": {"number"}, "bool": {"bool"}, "datetime": set()}[kind]
        if c.kind != "null" and c.kind not in allowed:
            raise dv_fail(400, "0x80060888", "A binary operator with incompatible types was detected. Found "
                                             f"operand types '{EDM[kind]}' and '{LITERAL_EDM[c.kind]}' for "
                                             "operator kind 'Equal'.")


def _matches(ent: EntityDef, rec: dict[str, Any], c: odata.Comparison) -> bool:
    value = rec.get(c.column)
    if c.kind == "null":
        return value is None
    if value is None:
        return False
    if c.kind == "string":
        return isinstance(value, str) and value.lower() == str(c.value).lower()
    if c.kind == "guid":
        return str(value).lower() == c.value
    return bool(value == c.value)
