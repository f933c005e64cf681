"""Intake: turn a validated event into exactly one Dataverse row, whatever is retried or redelivered.

An event with a key (externalId, an Idempotency-Key header, or a queue message id) becomes a row
whose id is derived from the key, created with If-None-Match: * so a repeat finds the row instead of
making a second one. A customer given by email or phone is looked up, or created with an id derived
from the normalised value, so two first calls from one caller cannot make two contacts.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from shared.dataverse import Created, DataverseClient, odata_literal
from shared.errors import IntakeError
from shared.validation import Customer, Event

log = logging.getLogger(__name__)

# Fixed for the life of the project: changing it would change every derived id.
NAMESPACE = uuid.UUID("5d1e3c55-6b1f-4c2e-9a44-1d3f0c8e7a21")
ENTITY_SETS = {"incident": "incidents", "lead": "leads"}


def record_id(entity: str, source: str | None, key: str) -> str:
    """The id a keyed event's row gets: the same event always maps to the same id."""
    return str(uuid.uuid5(NAMESPACE, f"{entity}\n{source or ''}\n{key}"))


def _phone_key(phone: str) -> str:
    return ("+" if phone.startswith("+") else "") + re.sub(r"\D", "", phone)


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


class Intake:
    def __init__(self, client: DataverseClient, contacts: ContactCache | None = None) -> None:
        self.client = client
        self.contacts = contacts or ContactCache()
        # Striped locks: concurrent first calls from one caller make one lookup, not one each.
        self._resolving = [threading.Lock() for _ in range(64)]

    def _resolve_contact(self, customer: Customer, budget: float) -> tuple[str, str]:
        """(cache key, contact id) for a customer given by email or phone: found, or created by key."""
        if customer.email:
            cache_key, column, value = "email:" + customer.email, "emailaddress1", customer.email
            filter_ = f"emailaddress1 eq {odata_literal(customer.email)}"
        else:
            phone = customer.phone or ""
            cache_key, column, value = "phone:" + _phone_key(phone), "telephone1", phone
            filter_ = f"telephone1 eq {odata_literal(phone)} or mobilephone eq {odata_literal(phone)}"
        hit = self.contacts.get(cache_key)
        if hit:
            return cache_key, hit
        with self._resolving[hash(cache_key) % len(self._resolving)]:
            hit = self.contacts.get(cache_key)
            if hit:
                return cache_key, hit
            return cache_key, self._find_or_create(customer, cache_key, column, value, filter_, budget)

    def _find_or_create(self, customer: Customer, cache_key: str, column: str, value: str, filter_: str,
                        budget: float) -> str:
        found = self.client.find_id("contacts", "contactid", filter_, budget=budget)
        if found is None:
            row: dict[str, str] = {column: value}
            if customer.email and customer.phone:
                row["telephone1"] = customer.phone
            if customer.first_name:
                row["firstname"] = customer.first_name
            row["lastname"] = customer.last_name or (customer.email or value).split("@")[0][:50]
            contact_id = str(uuid.uuid5(NAMESPACE, f"contact\n{cache_key}"))
            found = self.client.create("contacts", row, record_id=contact_id, budget=budget).id
            log.info("contact resolved by creation: contactid=%s", found)
        self.contacts.put(cache_key, found)
        return found

    def submit(self, event: Event, *, key: str | None = None, key_source: str | None = None,
               budget: float = 20.0) -> Outcome:
        """Create the event's row. `key`/`key_source` stand in when the event carries no externalId."""
        entity_set = ENTITY_SETS[event.entity]
        if event.external_id:
            rid: str | None = record_id(event.entity, event.source, event.external_id)
        elif key:
            rid = record_id(event.entity, key_source if key_source is not None else event.source, key)
        else:
            rid = None
        columns = event.columns  # the event is this request's own: bind the customer in place
        customer = event.customer
        cache_key = None
        if customer is not None:
            if customer.contact_id:
                columns["customerid_contact@odata.bind"] = f"/contacts({customer.contact_id})"
            elif customer.account_id:
                columns["customerid_account@odata.bind"] = f"/accounts({customer.account_id})"
            else:
                cache_key, contact_id = self._resolve_contact(customer, budget)
                columns["customerid_contact@odata.bind"] = f"/contacts({contact_id})"
        try:
            created: Created = self.client.create(entity_set, columns, record_id=rid, budget=budget)
        except IntakeError as err:
            if cache_key is None or err.upstream_code != "0x80040217":
                raise
            # The cached contact was deleted since: forget it and resolve once more.
            self.contacts.drop(cache_key)
            _, contact_id = self._resolve_contact(customer, budget)  # type: ignore[arg-type]
            columns["customerid_contact@odata.bind"] = f"/contacts({contact_id})"
            created = self.client.create(entity_set, columns, record_id=rid, budget=budget)
        return Outcome(created.id, event.entity, created.created, created.request_id)
