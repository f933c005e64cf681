"""Intake: turn a validated event into exactly one Dataverse row, whatever is retried or redelivered.

Every row is created by id with If-None-Match: *, so no retry inside a call can make a second row.
An event with a key (externalId, an Idempotency-Key header, or a queue message id) gets an id derived
from the key, so a repeat finds the row instead of making a second one; a repeat whose event differs
from the row is a conflict, never a silent success. A customer given by email or phone is looked up,
or created with an id derived from the normalised value, so two first calls from one caller cannot
make two contacts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from shared.dataverse import Created, DataverseClient, odata_literal
from shared.deadline import Deadline
from shared.errors import IntakeError
from shared.singleflight import Flights
from shared.validation import Customer, Event

log = logging.getLogger(__name__)

# Fixed for the life of the project: changing it would change every derived id.
NAMESPACE = uuid.UUID("5d1e3c55-6b1f-4c2e-9a44-1d3f0c8e7a21")
ENTITY_SETS = {"incident": "incidents", "lead": "leads"}
# Key namespaces beside an externalId's `source` (which can hold no space, so these never collide).
HEADER_KEY_SOURCE = "Idempotency-Key "

# The columns that decide whether a repeated key carries the same event: ones agents rarely edit after
# the row was created (a case's title and customer; a lead's name and email). Priority, description and
# status are edited all the time, so a difference there is not a conflict.
IDENTITY_COLUMNS = {"incident": ("title", "_customerid_value"), "lead": ("lastname", "firstname", "emailaddress1")}


def caller_namespace(caller: str | None, source: str | None) -> str | None:
    """A key's namespace: the source alone, or under a caller's application id its own (a source holds no space,
    so the two kinds never meet)."""
    return source if caller is None else f"app:{caller} {source or ''}"


def record_id(entity: str, source: str | None, key: str) -> str:
    """The id a keyed event's row gets: the same event always maps to the same id."""
    return str(uuid.uuid5(NAMESPACE, f"{entity}\n{source or ''}\n{key}"))


@dataclass(frozen=True)
class Outcome:
    id: str
    entity: str
    created: bool
    request_id: str | None


class ContactCache:
    """email/phone -> contactid for a bounded time and size: repeat callers cost no lookup."""

    def __init__(self, ttl: float = 600.0, size: int = 10_000) -> None:
        self._ttl = ttl
        self._size = size
        self._data: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None or hit[1] < time.monotonic():
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: str, contact_id: str) -> None:
        with self._lock:
            self._data[key] = (contact_id, time.monotonic() + self._ttl)
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)


def same(a: Any, b: Any) -> bool:
    """Equal as an agent would see it: case and runs of whitespace do not make two events different."""
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()
    return a == b


def _bound_customer(columns: dict[str, Any]) -> str | None:
    for name in ("customerid_contact@odata.bind", "customerid_account@odata.bind"):
        if name in columns:
            return str(columns[name]).rsplit("(", 1)[-1].rstrip(")").lower()
    return None


class Intake:
    def __init__(self, client: DataverseClient, contacts: ContactCache | None = None) -> None:
        self.client = client
        self.contacts = contacts or ContactCache()
        # Concurrent first calls from one caller share one lookup; other callers never wait for it.
        self._resolving: Flights[str] = Flights("contact")

    def _resolve_contact(self, customer: Customer, deadline: Deadline) -> tuple[str, str]:
        """(cache key, contact id) for a customer given by email or phone: found, or created by key."""
        if customer.email:
            cache_key = "email:" + customer.email
            filter_ = f"emailaddress1 eq {odata_literal(customer.email)}"
        else:
            phone = customer.phone or ""
            cache_key = "phone:" + phone
            forms = dict.fromkeys((phone, customer.phone_as_typed or phone))  # older contacts may hold it as typed
            filter_ = " or ".join(f"{column} eq {odata_literal(form)}" for form in forms
                                  for column in ("telephone1", "mobilephone"))
        hit = self.contacts.get(cache_key)
        if hit:
            return cache_key, hit

        def late() -> IntakeError:
            return IntakeError("dynamics_unavailable", "The customer lookup did not finish within the call's "
                               "deadline.", retry_after=5.0, fix_args=self.client.settings.fix_args())

        found = self._resolving.run(cache_key, lambda: self._find_or_create(customer, cache_key, filter_, deadline),
                                    deadline, late)
        return cache_key, found

    def _find_or_create(self, customer: Customer, cache_key: str, filter_: str, deadline: Deadline) -> str:
        hit = self.contacts.get(cache_key)
        if hit:
            return hit
        found = self.client.find_id("contacts", "contactid", filter_, budget=deadline)
        if found is None:
            row: dict[str, str] = {}
            if customer.email:
                row["emailaddress1"] = customer.email
            if customer.phone:
                row["telephone1"] = customer.phone  # stored normalised: the next lookup finds it
            if customer.first_name:
                row["firstname"] = customer.first_name
            row["lastname"] = customer.last_name or (customer.email or "").split("@")[0][:50] or "Caller"
            contact_id = str(uuid.uuid5(NAMESPACE, f"contact\n{cache_key}"))
            found = self.client.create("contacts", row, record_id=contact_id, keyed=True, budget=deadline).id
            log.info("contact resolved by creation: contactid=%s", found)
        self.contacts.put(cache_key, found)
        return found

    def _check_same_event(self, event: Event, entity_set: str, rid: str, columns: dict[str, Any],
                          deadline: Deadline) -> None:
        """A repeated key must carry the same event: compare the row's identity columns with this event's."""
        wanted = dict(columns)
        bound = _bound_customer(columns)
        if bound:
            wanted["_customerid_value"] = bound
        names = tuple(c for c in IDENTITY_COLUMNS[event.entity] if wanted.get(c) is not None)
        row = self.client.read(entity_set, rid, names, budget=deadline)
        differ = [c for c in names if not same(wanted[c], row.get(c))]
        if differ:
            raise IntakeError("idempotency_conflict",
                              f"The key of this event already created {entity_set}({rid}), whose "
                              f"{', '.join(c.lstrip('_').removesuffix('_value') for c in differ)} differ from "
                              "this event's.", record_id=rid)

    def submit(self, event: Event, *, key: str | None = None, key_source: str | None = None,
               budget: float | Deadline = 20.0, caller: str | None = None) -> Outcome:
        """Create the event's row. `key` (in the namespace `key_source`) stands in when it has no externalId;
        `caller` (an application id, INTAKE_CALLER_AUTH=entra) puts both kinds of key in its own namespace."""
        deadline = Deadline.of(budget)
        entity_set = ENTITY_SETS[event.entity]
        if event.external_id:
            rid, keyed = record_id(event.entity, caller_namespace(caller, event.source), event.external_id), True
        elif key:
            rid, keyed = record_id(event.entity, caller_namespace(caller, key_source), key), True
        else:
            rid, keyed = str(uuid.uuid4()), False  # still created by id: retries inside this call stay safe
        columns = event.columns  # the event is this request's own: bind the customer in place
        customer = event.customer
        cache_key = None
        if customer is not None:
            if customer.contact_id:
                columns["customerid_contact@odata.bind"] = f"/contacts({customer.contact_id})"
            elif customer.account_id:
                columns["customerid_account@odata.bind"] = f"/accounts({customer.account_id})"
            else:
                cache_key, contact_id = self._resolve_contact(customer, deadline)
                columns["customerid_contact@odata.bind"] = f"/contacts({contact_id})"
        try:
            created: Created = self.client.create(entity_set, columns, record_id=rid, keyed=keyed, budget=deadline)
        except IntakeError as err:
            if cache_key is None or err.upstream_code != "0x80040217":
                raise
            # The cached contact was deleted since: forget it and resolve once more.
            self.contacts.drop(cache_key)
            _, contact_id = self._resolve_contact(customer, deadline)  # type: ignore[arg-type]
            columns["customerid_contact@odata.bind"] = f"/contacts({contact_id})"
            created = self.client.create(entity_set, columns, record_id=rid, keyed=keyed, budget=deadline)
        if not created.created:
            self._check_same_event(event, entity_set, rid, columns, deadline)
        return Outcome(created.id, event.entity, created.created, created.request_id)
