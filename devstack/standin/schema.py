"""Dataverse table definitions and payload validation for the stand-in."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

EDM = {"string": "Edm.String", "option": "Edm.Int32", "int": "Edm.Int64", "guid": "Edm.Guid",
       "datetime": "Edm.DateTimeOffset", "lookup": "Edm.Guid", "bool": "Edm.Boolean"}
LITERAL_EDM = {"string": "Edm.String", "guid": "Edm.Guid", "number": "Edm.Int32", "bool": "Edm.Boolean"}
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_BIND = re.compile(r"^(?:.*/)?([A-Za-z_]+)\(([0-9a-fA-F-]{36})\)$")
PAYLOAD_HELP = "https://go.microsoft.com/fwlink/?linkid=2195293"


class DvError(Exception):
    """A Dataverse error answer: status, hex code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Column:
    """A column: ``kind`` is string, option, int, bool, guid, datetime or lookup (read-only ``_x_value``)."""

    name: str
    kind: str = "string"
    max_length: int = 0
    options: tuple[int, ...] = ()
    writable: bool = True


@dataclass(frozen=True)
class Lookup:
    """A single-valued navigation property set with ``<nav>@odata.bind``."""

    nav: str
    target: str
    attribute: str


@dataclass
class EntityDef:
    """One table: entity set, logical/schema name, key, object type code, columns and lookups."""

    set_name: str
    logical: str
    schema: str
    key: str
    otc: int
    columns: dict[str, Column] = field(default_factory=dict)
    lookups: dict[str, Lookup] = field(default_factory=dict)
    required_lookup: str | None = None
    privilege: str = ""  # the name in prv<Verb><name> when it is not the schema name (annotation: Note)

    @property
    def type_name(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical}"

    def add(self, *cols: Column) -> EntityDef:
        for c in cols:
            self.columns[c.name] = c
        return self

    def readable(self) -> set[str]:
        return {self.key, *self.columns}


def _s(name: str, n: int) -> Column:
    return Column(name, "string", max_length=n)


def build_entities() -> dict[str, EntityDef]:
    """Fresh table definitions (the caller may add columns)."""
    common = (Column("createdon", "datetime", writable=False),
              Column("modifiedon", "datetime", writable=False),
              Column("versionnumber", "int", writable=False))
    incident = EntityDef("incidents", "incident", "Incident", "incidentid", 112, required_lookup="customerid")
    incident.add(_s("title", 200), _s("description", 2000),
                 Column("prioritycode", "option", options=(1, 2, 3)),
                 Column("caseorigincode", "option", options=(1, 2, 3)),
                 Column("statecode", "option", options=(0, 1, 2)),
                 Column("statuscode", "option", options=tuple(INCIDENT_STATUS)),
                 Column("_customerid_value", "lookup", writable=False), *common)
    incident.lookups = {"customerid_contact": Lookup("customerid_contact", "contacts", "customerid"),
                        "customerid_account": Lookup("customerid_account", "accounts", "customerid")}
    lead = EntityDef("leads", "lead", "Lead", "leadid", 4)
    lead.add(_s("lastname", 50), _s("firstname", 50), _s("subject", 300), _s("emailaddress1", 100),
             _s("companyname", 100), _s("telephone1", 50), _s("mobilephone", 50), _s("description", 2000),
             Column("statecode", "option", options=(0, 1, 2)),
             Column("fullname", "string", 160, writable=False), *common)
    contact = EntityDef("contacts", "contact", "Contact", "contactid", 2)
    contact.add(_s("firstname", 50), _s("lastname", 50), _s("emailaddress1", 100), _s("telephone1", 50),
                _s("mobilephone", 50), Column("statecode", "option", options=(0, 1)),
                Column("fullname", "string", 160, writable=False), *common)
    account = EntityDef("accounts", "account", "Account", "accountid", 1)
    account.add(_s("name", 160), Column("statecode", "option", options=(0, 1)), *common)
    # Notes: the polymorphic regarding lookup `objectid`, written as objectid_<table>@odata.bind.
    annotation = EntityDef("annotations", "annotation", "Annotation", "annotationid", 5, privilege="Note")
    annotation.add(_s("subject", 500), _s("notetext", 100_000), _s("filename", 255), _s("mimetype", 256),
                   _s("documentbody", 200_000_000), Column("isdocument", "bool"),
                   Column("filesize", "int", writable=False), Column("objecttypecode", "string", writable=False),
                   Column("_objectid_value", "lookup", writable=False), *common)
    annotation.lookups = {"objectid_incident": Lookup("objectid_incident", "incidents", "objectid"),
                          "objectid_lead": Lookup("objectid_lead", "leads", "objectid")}
    # Case resolution: an activity (privileges prv<Verb>Activity), created by the CloseIncident action.
    resolution = EntityDef("incidentresolutions", "incidentresolution", "IncidentResolution", "activityid", 4206,
                           privilege="Activity")
    resolution.add(_s("subject", 200), _s("description", 2000), Column("timespent", "int"),
                   Column("statecode", "option", options=(0, 1, 2)),
                   Column("_incidentid_value", "lookup", writable=False), *common)
    resolution.lookups = {"incidentid": Lookup("incidentid", "incidents", "incidentid")}
    return {e.set_name: e for e in (incident, lead, contact, account, annotation, resolution)}


# incident statuscode -> its statecode (0 Active, 1 Resolved, 2 Canceled); the first of each state is its default.
INCIDENT_STATUS = {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 1000: 1, 6: 2, 2000: 2}
STATE_NAMES = {0: "Active", 1: "Resolved", 2: "Canceled"}


def default_status(state: int) -> int:
    return next(s for s, st in INCIDENT_STATUS.items() if st == state)


def is_guid(value: Any) -> bool:
    return isinstance(value, str) and bool(_GUID.match(value))


def payload_error(ent: EntityDef, inner: str) -> DvError:
    return DvError(400, "0x80048d19",
                   f"Error identified in Payload provided by the user for Entity :'{ent.set_name}', For more "
                   f"information on this error please follow this help link {PAYLOAD_HELP}  ---->  "
                   f"InnerException : Microsoft.OData.ODataException: {inner}")


def unknown_property(ent: EntityDef, name: str) -> DvError:
    return payload_error(ent, f"The property '{name}' does not exist on type '{ent.type_name}'. Make sure to "
                              "only use property names that are defined by the type or mark the type as open "
                              "type.")


@dataclass
class Payload:
    """A parsed write body: plain column values, binds (nav -> (set, id) or None) and an optional key."""

    values: dict[str, Any]
    binds: dict[str, tuple[str, str] | None]
    key: str | None


def parse_payload(ent: EntityDef, body: Any) -> Payload:
    """Structural checks done while reading the payload (unknown properties, JSON types)."""
    if not isinstance(body, dict):
        raise payload_error(ent, "A node of type 'PrimitiveValue' was read from the JSON reader when trying "
                                 "to read the start of an entry. A 'StartObject' node was expected.")
    out = Payload({}, {}, None)
    for name, value in body.items():
        if name.startswith("@"):
            continue  # instance annotations such as @odata.type
        if name.endswith("@odata.bind"):
            nav = name[: -len("@odata.bind")]
            lookup = ent.lookups.get(nav)
            if lookup is None:
                raise unknown_property(ent, nav)
            out.binds[nav] = None if value is None else _parse_bind(ent, lookup, value)
            continue
        if "@" in name:
            continue  # property annotations
        if name == ent.key:
            if value is not None and not is_guid(value):
                raise payload_error(ent, f"Cannot convert the literal '{value}' to the expected type "
                                         "'Edm.Guid'.")
            out.key = value.lower() if value else None
            continue
        col = ent.columns.get(name)
        if col is None or name in ent.lookups:
            raise unknown_property(ent, name)
        if col.kind == "lookup":
            raise payload_error(ent, "CRM do not support direct update of Entity Reference properties, Use "
                                     "Navigation properties instead.")
        if not col.writable:
            continue  # read-only columns are ignored on write
        if value is not None:
            ok = isinstance(value, str) if col.kind == "string" else isinstance(value, bool) if col.kind == "bool" \
                else (isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise payload_error(ent, f"Cannot convert a primitive value to the expected type "
                                         f"'{EDM[col.kind]}'. See the inner exception for more details.")
        out.values[name] = value
    return out


def _parse_bind(ent: EntityDef, lookup: Lookup, value: Any) -> tuple[str, str]:
    m = _BIND.match(value) if isinstance(value, str) else None
    if not m or not is_guid(m.group(2)):
        raise payload_error(ent, f"An undeclared property '{lookup.nav}' which only has property annotations "
                                 "in the payload but no property value was found in the payload.")
    if m.group(1) != lookup.target:
        raise payload_error(ent, f"The entity set '{m.group(1)}' is not valid for navigation property "
                                 f"'{lookup.nav}'.")
    return m.group(1), m.group(2).lower()


def validate_values(ent: EntityDef, values: dict[str, Any]) -> None:
    """Business validation: string lengths and option set values."""
    for name, value in values.items():
        col = ent.columns[name]
        if value is None:
            continue
        if col.kind == "string" and col.max_length and len(value) > col.max_length:
            raise DvError(400, "0x80044331",
                          f"A validation error occurred. The length of the '{name}' attribute of the "
                          f"'{ent.logical}' entity exceeded the maximum allowed length of "
                          f"'{col.max_length}'.")
        if col.kind == "option" and value not in col.options:
            accepted = ",".join(str(o) for o in col.options)
            raise DvError(400, "0x8004431a",
                          f"A validation error occurred. The value {value} of '{name}' on record of type "
                          f"'{ent.logical}' is outside the valid range. Accepted Values: {accepted}")


def check_customer(ent: EntityDef, binds: dict[str, tuple[str, str] | None], creating: bool) -> None:
    """The system-required customer on incidents: exactly one of contact/account."""
    if not ent.required_lookup:
        return
    given = [nav for nav, lk in ent.lookups.items() if lk.attribute == ent.required_lookup
             and binds.get(nav) is not None]
    if len(given) > 1:
        raise DvError(400, "0x8004440f", "A case can have either a parent contact or a parent account as its "
                                         "customer, not both.")
    if creating and not given:
        raise DvError(400, "0x80044410", "You should specify a parent contact or account.")
