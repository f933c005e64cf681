"""The intake contract, written once for HTTP and queues: parse, check every field, map to columns.

Every problem is reported at once as {"field", "problem"}; nothing is half-accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared.errors import IntakeError

MAX_BODY = 64 * 1024
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^\+?[0-9 ()./-]{3,40}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters other than tab, CR and LF
PHONE_DIGITS = (6, 17)  # E.164 allows 15 digits; an international "00" prefix makes 17. Fewer than 6 is no number.
_LOGICAL = re.compile(r"^[a-z][a-z0-9_]*(@odata\.bind)?\Z")
# The one rule for keys (externalId and the Idempotency-Key header alike; docs/contract.schema.json
# $defs/key states it): printable ASCII, no spaces, 1-200 characters.
_KEY = re.compile(r"^[\x21-\x7e]{1,200}\Z")

PRIORITY = {"high": 1, "normal": 2, "low": 3}
ORIGIN = {"phone": 1, "email": 2, "web": 3}


def normalise_phone(phone: str) -> str:
    """The one normal form of a phone number, for validation, lookup and the derived contact id alike.

    An international number (leading +) that `phonenumbers` finds possible becomes E.164, which also
    drops a national trunk prefix written as "(0)" (+44 (0)20 ... is +4420...). Anything else becomes its
    digits, with a leading + kept: without a region, a national number has no E.164 form, and guessing a
    region could bind a caller to another person's contact. phonenumbers is imported on the first phone
    only (about 20 ms), never at start-up.
    """
    digits = re.sub(r"[^0-9]", "", phone)
    if not phone.lstrip().startswith("+"):
        return digits
    import phonenumbers

    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return "+" + digits
    if phonenumbers.is_possible_number(number):
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return "+" + digits


@dataclass(frozen=True)
class Customer:
    contact_id: str | None = None
    account_id: str | None = None
    email: str | None = None  # normalised: stripped, lower case
    phone: str | None = None  # normalised (normalise_phone)
    phone_as_typed: str | None = None  # stripped, as the caller wrote it: older contacts may hold this form
    first_name: str | None = None
    last_name: str | None = None


@dataclass
class Event:
    """A validated event: the Dataverse columns it maps to, plus what intake still has to resolve."""

    entity: str  # "incident" | "lead"
    columns: dict[str, Any]
    external_id: str | None = None
    source: str | None = None
    customer: Customer | None = None
    problems: list[dict] = field(default_factory=list)


def _no_constant(name: str) -> None:
    """NaN and Infinity are not JSON: Dataverse would refuse them, so refuse them here."""
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes, limit: int = MAX_BODY) -> dict:
    """The body as a JSON object, or the error that says why not."""
    if len(body) > limit:
        raise IntakeError("payload_too_large", f"The body is {len(body)} bytes; the limit is {limit}.")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting too deep
        raise IntakeError("unsupported_media_type", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise IntakeError("unsupported_media_type", "The body must be a JSON object.")
    return data


class _Checker:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.problems: list[dict] = []

    def add(self, name: str, problem: str) -> None:
        self.problems.append({"field": name, "problem": problem})

    def text(self, name: str, *, max_len: int, required: bool = False, obj: dict | None = None,
             prefix: str = "") -> str | None:
        src = self.data if obj is None else obj
        value = src.get(name)
        label = prefix + name
        if value is None:
            if required:
                self.add(label, "required")
            return None
        if not isinstance(value, str):
            self.add(label, "must be a string")
            return None
        value = value.strip()
        if not value:
            if required:
                self.add(label, "required")
            return None
        if len(value) > max_len:
            self.add(label, f"must be at most {max_len} characters")
            return None
        if _CONTROL.search(value):
            self.add(label, "must not contain control characters")
            return None
        return value

    def choice(self, name: str, options: dict[str, int]) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in options:
            self.add(name, f"must be one of {', '.join(options)}")
            return None
        return options[value.lower()]

    def keys(self) -> tuple[str | None, str | None]:
        ext = self.text("externalId", max_len=200)
        if ext is not None and not _KEY.match(ext):
            self.add("externalId", "must be printable ASCII without spaces")
            ext = None
        src = self.text("source", max_len=100)
        if src is not None and not _KEY.match(src):
            self.add("source", "must be printable ASCII without spaces")
            src = None
        return ext, src

    def email(self, obj: dict | None = None, prefix: str = "", name: str = "email") -> str | None:
        value = self.text(name, max_len=100, obj=obj, prefix=prefix)
        if value is not None and not _EMAIL.match(value):
            self.add(prefix + name, "must be an email address")
            return None
        return value.lower() if value else None

    def phone(self, obj: dict | None = None, prefix: str = "", name: str = "phone") -> str | None:
        value = self.text(name, max_len=50, obj=obj, prefix=prefix)
        if value is not None and not _PHONE.match(value):
            self.add(prefix + name, "must be a phone number: digits, spaces, + ( ) . / -")
            return None
        if value is not None:
            digits = len(normalise_phone(value).lstrip("+"))
            if not PHONE_DIGITS[0] <= digits <= PHONE_DIGITS[1]:
                self.add(prefix + name, f"must hold {PHONE_DIGITS[0]} to {PHONE_DIGITS[1]} digits")
                return None
        return value

    def attributes(self, reserved: frozenset[str]) -> dict[str, Any]:
        attrs = self.data.get("attributes")
        if attrs is None:
            return {}
        if not isinstance(attrs, dict):
            self.add("attributes", "must be an object")
            return {}
        out: dict[str, Any] = {}
        for key, value in attrs.items():
            label = f"attributes.{key}"
            if not isinstance(key, str) or not _LOGICAL.match(key) or len(key) > 100:
                self.add(label, "must be a Dataverse logical name (^[a-z][a-z0-9_]*$, optionally @odata.bind)")
            elif key in reserved or key.split("@")[0] in reserved:
                self.add(label, "is set by the contract and may not be overridden")
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                self.add(label, "must be a string, number, boolean or null")
            else:
                out[key] = value
        return out

    def unknown(self, allowed: frozenset[str]) -> None:
        for key in self.data:
            if key not in allowed:
                self.add(str(key)[:100], "is not a field of this contract")


_CASE_FIELDS = frozenset({"title", "description", "priority", "origin", "customer", "externalId", "source",
                          "attributes"})
_CASE_RESERVED = frozenset({"incidentid", "title", "description", "prioritycode", "caseorigincode", "customerid",
                            "customerid_contact", "customerid_account"})
_LEAD_FIELDS = frozenset({"lastName", "firstName", "email", "company", "phone", "subject", "description",
                          "externalId", "source", "attributes"})
_LEAD_RESERVED = frozenset({"leadid", "lastname", "firstname", "emailaddress1", "companyname", "telephone1",
                            "subject", "description", "fullname"})
_CUSTOMER_WAYS = ("contactId", "accountId", "email", "phone")


def _customer(c: _Checker, default_account: str | None = None) -> Customer | None:
    raw = c.data.get("customer")
    if raw is None:
        if default_account:  # INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID: an anonymous caller's case
            return Customer(account_id=default_account)
        c.add("customer", "required")
        return None
    if not isinstance(raw, dict):
        c.add("customer", "must be an object")
        return None
    # A blank value is no way at all: "email": "  " must not pass as a customer.
    ways = [w for w in _CUSTOMER_WAYS if raw.get(w) is not None and (not isinstance(raw[w], str) or raw[w].strip())]
    if "contactId" in ways or "accountId" in ways:
        if len(ways) != 1 or set(raw) - {"contactId", "accountId"}:
            c.add("customer", "give exactly one of contactId, accountId, or contact details (email or phone)")
            return None
        way = ways[0]
        value = raw[way]
        if not isinstance(value, str) or not _GUID.match(value):
            c.add(f"customer.{way}", "must be a GUID")
            return None
        return Customer(contact_id=value.lower()) if way == "contactId" else Customer(account_id=value.lower())
    extra = set(raw) - {"email", "phone", "firstName", "lastName"}
    for key in sorted(extra):
        c.add(f"customer.{str(key)[:100]}", "is not a field of customer")
    if not ways:
        c.add("customer", "give one of contactId, accountId, email or phone")
        return None
    email = c.email(raw, "customer.")
    phone = c.phone(raw, "customer.")
    first = c.text("firstName", max_len=50, obj=raw, prefix="customer.")
    last = c.text("lastName", max_len=50, obj=raw, prefix="customer.")
    if email is None and phone is None:
        return None
    if email is None and last is None and "customer.lastName" not in {p["field"] for p in c.problems}:
        c.add("customer.lastName", "required when the customer is given by phone")
    return Customer(email=email, phone=normalise_phone(phone) if phone else None, phone_as_typed=phone,
                    first_name=first, last_name=last)


def parse_case(data: dict, default_account: str | None = None) -> Event:
    """Check a case event and map it to incident columns (all problems at once).

    `default_account`: the account a case that names no customer is filed under (None: it is refused)."""
    c = _Checker(data)
    c.unknown(_CASE_FIELDS)
    columns: dict[str, Any] = {}
    title = c.text("title", max_len=200, required=True)
    description = c.text("description", max_len=2000)
    priority = c.choice("priority", PRIORITY)
    origin = c.choice("origin", ORIGIN)
    customer = _customer(c, default_account)
    ext, src = c.keys()
    attrs = c.attributes(_CASE_RESERVED)
    if c.problems:
        raise IntakeError("invalid_request", _summary(c.problems), details=c.problems)
    columns.update(attrs)
    columns["title"] = title
    if description is not None:
        columns["description"] = description
    columns["prioritycode"] = priority or PRIORITY["normal"]
    if origin is not None:
        columns["caseorigincode"] = origin
    return Event("incident", columns, ext, src, customer)


def parse_lead(data: dict) -> Event:
    """Check a lead event and map it to lead columns (all problems at once)."""
    c = _Checker(data)
    c.unknown(_LEAD_FIELDS)
    last = c.text("lastName", max_len=50, required=True)
    first = c.text("firstName", max_len=50)
    email = c.email()
    company = c.text("company", max_len=100)
    phone = c.phone()
    subject = c.text("subject", max_len=300)
    description = c.text("description", max_len=2000)
    ext, src = c.keys()
    attrs = c.attributes(_LEAD_RESERVED)
    if c.problems:
        raise IntakeError("invalid_request", _summary(c.problems), details=c.problems)
    columns: dict[str, Any] = dict(attrs)
    columns["lastname"] = last
    name = f"{first} {last}" if first else last
    columns["subject"] = subject or (f"{name} ({company})" if company else name)[:300]
    for column, value in (("firstname", first), ("emailaddress1", email), ("companyname", company),
                          ("telephone1", phone), ("description", description)):
        if value is not None:
            columns[column] = value
    return Event("lead", columns, ext, src)


# ---- follow-ups: a note, resolve, cancel or update on the record an event made ---------------------------
FOLLOWUP_OPS = ("note", "resolve", "cancel", "update")
FOLLOWUP_ENTITIES = {"case": "incident", "lead": "lead"}
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}\Z")
_MIME = re.compile(r"^[\w.+-]+/[\w.+-]+\Z")


@dataclass(frozen=True)
class Ref:
    """How a follow-up names its record: the create's externalId (and source), or the record's id."""

    id: str | None = None
    external_id: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Attachment:
    file_name: str
    mime_type: str
    content_base64: str

    @property
    def size(self) -> int:
        """Bytes of the file (Dataverse's filesize), from the base64 text without decoding it."""
        text = self.content_base64
        return len(text) * 3 // 4 - text[-2:].count("=")


@dataclass
class FollowUp:
    op: str  # note | resolve | cancel | update
    entity: str  # incident | lead
    ref: Ref
    note_id: str | None = None
    subject: str | None = None
    text: str | None = None
    attachment: Attachment | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # update: the changed columns


def _ref(c: _Checker, name: str) -> Ref | None:
    raw = c.data.get(name)
    if not isinstance(raw, dict):
        c.add(name, "required: an object {externalId, source} or {id}" if raw is None else "must be an object")
        return None
    for key in sorted(set(raw) - {"id", "externalId", "source"}):
        c.add(f"{name}.{str(key)[:100]}", "is not a field of a record reference")
    if raw.get("id") is not None:
        if raw.get("externalId") is not None or raw.get("source") is not None:
            c.add(name, "give either id or externalId (and source), not both")
            return None
        if not isinstance(raw["id"], str) or not _GUID.match(raw["id"].strip()):
            c.add(f"{name}.id", "must be a GUID")
            return None
        return Ref(id=raw["id"].strip().lower())
    sub = _Checker(raw)
    ext, src = sub.keys()
    for p in sub.problems:
        c.add(f"{name}.{p['field']}", p["problem"])
    if ext is None:
        if not sub.problems:
            c.add(name, "give id, or externalId (and source) as sent on the create")
        return None
    return Ref(external_id=ext, source=src)


def _attachment(c: _Checker, max_bytes: int) -> Attachment | None:
    raw = c.data.get("attachment")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        c.add("attachment", "must be an object {fileName, mimeType, contentBase64}")
        return None
    for key in sorted(set(raw) - {"fileName", "mimeType", "contentBase64"}):
        c.add(f"attachment.{str(key)[:100]}", "is not a field of attachment")
    name = c.text("fileName", max_len=255, required=True, obj=raw, prefix="attachment.")
    if name is not None and any(ch in name for ch in '/\\:*?"<>|'):
        c.add("attachment.fileName", "must be a file name without a path or any of / \\ : * ? \" < > |")
    mime = c.text("mimeType", max_len=256, required=True, obj=raw, prefix="attachment.")
    if mime is not None and not _MIME.match(mime):
        c.add("attachment.mimeType", "must be a media type such as application/pdf")
    content = raw.get("contentBase64")
    if not isinstance(content, str) or not content:
        c.add("attachment.contentBase64", "required: the file as base64 text")
        return None
    if len(content) > max_bytes:
        raise IntakeError("attachment_too_large", f"The attachment is {len(content)} bytes of base64 text; the "
                                                  f"limit is {max_bytes}.")
    if len(content) % 4 or not _BASE64.match(content):
        c.add("attachment.contentBase64", "must be base64 (A-Z a-z 0-9 + /, padded with =, no line breaks)")
        return None
    if name is None or mime is None or not _MIME.match(mime):
        return None
    return Attachment(name, mime, content)


def parse_followup(data: dict, op: str, entity: str, note_max_bytes: int = 5_242_880) -> FollowUp:
    """Check a follow-up of `op` on a record of `entity` ("incident" or "lead"); all problems at once.

    An attachment over `note_max_bytes` (its base64 text) is refused first, with a code of its own."""
    c = _Checker(data)
    name = "case" if entity == "incident" else "lead"
    fields = {"note": {name, "noteId", "subject", "text", "attachment"}, "resolve": {name, "resolution"},
              "cancel": {name}, "update": {name, "changes"}}[op]
    c.unknown(frozenset(fields | {"op", "entity"}))
    ref = _ref(c, name)
    out = FollowUp(op, entity, ref or Ref())
    if op == "note":
        note_id = c.text("noteId", max_len=200, required=True)
        if note_id is not None and not _KEY.match(note_id):
            c.add("noteId", "must be printable ASCII without spaces")
        out.note_id = note_id
        out.subject = c.text("subject", max_len=500)
        out.text = c.text("text", max_len=100_000)
        out.attachment = _attachment(c, note_max_bytes)
        if out.text is None and out.attachment is None and "attachment" not in data and "text" not in data:
            c.add("text", "required unless the note carries an attachment")
    elif op == "resolve":
        raw = data.get("resolution")
        if not isinstance(raw, dict):
            c.add("resolution", "required: an object {subject, description}" if raw is None else "must be an object")
        else:
            for key in sorted(set(raw) - {"subject", "description"}):
                c.add(f"resolution.{str(key)[:100]}", "is not a field of resolution")
            out.subject = c.text("subject", max_len=200, required=True, obj=raw, prefix="resolution.")
            out.text = c.text("description", max_len=2000, obj=raw, prefix="resolution.")
    elif op == "update":
        raw = data.get("changes")
        if not isinstance(raw, dict) or not raw:
            c.add("changes", "required: an object with description and/or priority")
        else:
            for key in sorted(set(raw) - {"description", "priority"}):
                problem = ("may not be changed: it decides whether a repeated create is the same event"
                           if key == "title" else "is not a field of changes (description, priority)")
                c.add(f"changes.{str(key)[:100]}", problem)
            sub = _Checker(raw)
            description = sub.text("description", max_len=2000)
            priority = sub.choice("priority", PRIORITY)
            for p in sub.problems:
                c.add(f"changes.{p['field']}", p["problem"])
            if "description" in raw:
                out.columns["description"] = description
            if priority is not None:
                out.columns["prioritycode"] = priority
    if c.problems:
        raise IntakeError("invalid_request", _summary(c.problems), details=c.problems)
    return out


def parse_followup_message(data: dict, note_max_bytes: int = 5_242_880) -> FollowUp:
    """A follow-up from the followups queue: the HTTP body plus "op" and "entity" (case | lead)."""
    op, entity = data.get("op"), data.get("entity")
    problems = []
    if op not in FOLLOWUP_OPS:
        problems.append({"field": "op", "problem": f"must be one of {', '.join(FOLLOWUP_OPS)}"})
    if entity not in FOLLOWUP_ENTITIES:
        problems.append({"field": "entity", "problem": "must be case or lead"})
    elif op in ("resolve", "cancel", "update") and entity != "case":
        problems.append({"field": "entity", "problem": f"{op} applies to cases only"})
    if problems:
        raise IntakeError("invalid_request", _summary(problems), details=problems)
    return parse_followup(data, str(op), FOLLOWUP_ENTITIES[str(entity)], note_max_bytes)


def is_key(value: object) -> bool:
    """The one rule for keys, for callers that hold a key from elsewhere (a deferral envelope's)."""
    return isinstance(value, str) and bool(_KEY.match(value))


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header, checked by the same rule as externalId, or absent."""
    if header is None:
        return None
    value = header.strip()
    if _KEY.match(value):
        return value
    problem = "must be printable ASCII without spaces, 1-200 characters (the rule of externalId)"
    raise IntakeError("invalid_request", f"Idempotency-Key {problem}.",
                      details=[{"field": "Idempotency-Key", "problem": problem}])


def _summary(problems: list[dict]) -> str:
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first['field']}: {first['problem']}{more}"
