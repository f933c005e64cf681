"""The records, the three contenders and the thread pool that drives them.

Contenders, each a `call(record) -> error or None`:
  ours-http   the real `create_case` through `func.HttpRequest`, as the host invokes it;
  ours-queue  the real `cases_queue` through `func.QueueMessage` (every message is keyed by its id);
  raw         the floor: one `requests.Session` (pool = threads), a fixed token, prepared incident bodies;
  naive       what the guides do: a token request and a new connection per call, same bodies as raw;
  sdk         Microsoft's Python SDK (PowerPlatform-Dataverse-Client) in the plain function a user writes
              with it: one client per process (a ClientSecretCredential, the SDK's pooled session), one
              `records.create("incident", row)` per record, the same rows as raw.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from devstack.invocation import Context, Out

BENCH_NS = uuid.UUID("0b6c3f0e-5a7d-4a53-8d0e-3b1e2c9a7f10")
ODATA = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
         "Content-Type": "application/json; charset=utf-8"}
TIMEOUT = (3.05, 30.0)
Call = Callable[["Record"], "str | None"]


@dataclass(frozen=True)
class Mix:
    keyed: float = 0.5  # share of events with an externalId
    by_id: float = 0.4  # share of customers given as contactId/accountId (half each); the rest by email
    new_callers: float = 0.1  # share of the by-email events from a caller never seen before
    callers: int = 200  # distinct repeat callers (existing contacts)


@dataclass(frozen=True)
class Record:
    case: bytes  # the case event, as a caller sends it to POST /api/cases or the cases queue
    incident: bytes  # the incident row the baselines POST (customer bound by id, nothing to resolve)
    keyed: bool
    way: str  # contact | account | email-repeat | email-new

    @property
    def case_email(self) -> str | None:
        return json.loads(self.case)["customer"].get("email")


def caller(i: int) -> tuple[str, str]:
    """(email, contactid) of repeat caller i: the same in every run, seeded in the stand-in."""
    email = f"caller{i:04d}@bench.example.com"
    return email, str(uuid.uuid5(BENCH_NS, email))


def records(n: int, tag: str, mix: Mix, contact_id: str, account_id: str, seed: int = 7) -> list[Record]:
    """N events, the same shape for every run (same seed); keys and new callers are unique to `tag`."""
    rng = random.Random(seed)
    out: list[Record] = []
    for i in range(n):
        case: dict[str, Any] = {"title": f"Bench case {i}", "description": "Line down since morning, " * 3,
                                "priority": rng.choice(["high", "normal", "low"]), "origin": "web"}
        keyed = rng.random() < mix.keyed
        if keyed:
            case["externalId"], case["source"] = f"bench-{tag}-{i}", "bench"
        if rng.random() < mix.by_id:
            if rng.random() < 0.5:
                way, bind = "contact", ("customerid_contact@odata.bind", f"/contacts({contact_id})")
                case["customer"] = {"contactId": contact_id}
            else:
                way, bind = "account", ("customerid_account@odata.bind", f"/accounts({account_id})")
                case["customer"] = {"accountId": account_id}
        elif rng.random() < mix.new_callers:
            way, bind = "email-new", ("customerid_contact@odata.bind", f"/contacts({contact_id})")
            case["customer"] = {"email": f"new-{tag}-{i}@bench.example.com", "lastName": "Newcaller"}
        else:
            email, cid = caller(rng.randrange(mix.callers))
            way, bind = "email-repeat", ("customerid_contact@odata.bind", f"/contacts({cid})")
            case["customer"] = {"email": email}
        incident = {"title": case["title"], "description": case["description"].strip(),
                    "prioritycode": {"high": 1, "normal": 2, "low": 3}[case["priority"]], "caseorigincode": 3,
                    bind[0]: bind[1]}
        out.append(Record(json.dumps(case).encode(), json.dumps(incident, separators=(",", ":")).encode(),
                          keyed, way))
    return out


# ---- the contenders ----------------------------------------------------------------------------------
def ours_http() -> Call:
    import azure.functions as func

    from triggers import http_intake

    fn = http_intake.create_case.build().get_user_function()

    def call(rec: Record) -> str | None:
        req = func.HttpRequest(method="POST", url="http://localhost/api/cases",
                               headers={"Content-Type": "application/json"}, body=rec.case)
        resp = fn(req, Context())
        if resp.status_code in (200, 201):
            return None
        return f"http {resp.status_code} {json.loads(resp.get_body()).get('error', {}).get('code')}"

    return call


def ours_queue() -> Call:
    from azure.functions.queue import QueueMessage

    from triggers import queue_intake

    fn = queue_intake.cases_queue.build().get_user_function()

    def call(rec: Record) -> str | None:
        out = Out()
        fn(QueueMessage(id=str(uuid.uuid4()), body=rec.case, dequeue_count=1), out, Context())
        return None if out.value is None else "rejected " + json.loads(out.value)["reason"]["code"]

    return call


def fetch_token(info: dict[str, Any], session: Any = requests) -> str:
    """One client-credentials token for the Dataverse scope, the way the guides get it."""
    resp = session.post(f"{info['entra_url']}/{info['tenant_id']}/oauth2/v2.0/token",
                        data={"grant_type": "client_credentials", "client_id": info["client_id"],
                              "client_secret": info["client_secret"],
                              "scope": info["env"]["DYNAMICS_URL"] + "/.default"},
                        verify=info["ca_path"], timeout=TIMEOUT)
    resp.raise_for_status()
    return resp.json()["access_token"]


def raw(info: dict[str, Any], threads: int, token: str) -> tuple[Call, requests.Session]:
    session = requests.Session()
    session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=threads, max_retries=0))
    session.verify = info["ca_path"]
    headers = {**ODATA, "Authorization": "Bearer " + token}
    url = info["api_url"] + "/incidents"

    def call(rec: Record) -> str | None:
        resp = session.post(url, data=rec.incident, headers=headers, timeout=TIMEOUT)
        return None if resp.status_code in (201, 204) else f"http {resp.status_code}"

    return call, session


def naive(info: dict[str, Any]) -> Call:
    url = info["api_url"] + "/incidents"

    def call(rec: Record) -> str | None:
        token = fetch_token(info)
        resp = requests.post(url, data=rec.incident, headers={**ODATA, "Authorization": "Bearer " + token},
                             verify=info["ca_path"], timeout=TIMEOUT)
        return None if resp.status_code in (201, 204) else f"http {resp.status_code}"

    return call


def sdk(info: dict[str, Any]) -> tuple[Call, Any]:
    """The SDK as its README shows it, built once per process; the row is the same incident raw POSTs.

    The SDK resolves the table's entity set and its choice labels once (cached), then POSTs each row. Its
    credential is azure-identity's ClientSecretCredential against the stand-in's Entra ID (the CA bundle comes
    from REQUESTS_CA_BUNDLE, as for every contender).
    """
    from azure.identity import ClientSecretCredential
    from PowerPlatform.Dataverse.client import DataverseClient

    credential = ClientSecretCredential(info["tenant_id"], info["client_id"], info["client_secret"],
                                        authority=info["entra_url"], disable_instance_discovery=True)
    client = DataverseClient(info["env"]["DYNAMICS_URL"], credential)
    client.__enter__()  # the README's pooled form (`with DataverseClient(...) as client:`), held for the process

    def call(rec: Record) -> str | None:
        client.records.create("incident", json.loads(rec.incident))
        return None

    return call, client


# ---- the pool -----------------------------------------------------------------------------------------
@dataclass
class PoolRun:
    latencies: list[float]  # seconds, of the calls that succeeded
    by_way: dict[str, list[float]]  # the same, per kind of customer
    errors: Counter[str]
    wall: float
    cpu: float  # this process's CPU seconds during the run (all threads)
    unfinished: int


def drive(call: Call, recs: list[Record], threads: int, timeout: float) -> PoolRun:
    """Every record once, from `threads` workers; stops waiting after `timeout` seconds."""

    def one(rec: Record) -> tuple[float, str | None, str]:
        t = time.perf_counter()
        try:
            err = call(rec)
        except Exception as exc:  # a crash is counted, not raised: the run goes on
            err = type(exc).__name__
        return time.perf_counter() - t, err, rec.way

    latencies: list[float] = []
    by_way: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    cpu0, t0 = time.process_time(), time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench")
    try:
        futures = [pool.submit(one, rec) for rec in recs]
        done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for f in done:
        dt, err, way = f.result()
        if err is None:
            latencies.append(dt)
            by_way.setdefault(way, []).append(dt)
        else:
            errors[err] += 1
    return PoolRun(latencies, by_way, errors, wall, cpu, len(pending))
