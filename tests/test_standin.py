"""The stand-in against real clients (azure-identity, azure-keyvault-secrets, requests) over real sockets."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import ClientSecretCredential
from azure.keyvault.secrets import SecretClient

from devstack.standin import StandIn
from devstack.standin.odata import FilterError, comparisons, parse_filter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn(hold_seconds=2.0) as s:
        yield s
        assert s.errors == []


@pytest.fixture
def session(standin: StandIn) -> Iterator[requests.Session]:
    """A Session trusting only the stand-in's CA; trust_env off so REQUESTS_CA_BUNDLE cannot override it."""
    with requests.Session() as sess:
        sess.trust_env = False
        sess.verify = standin.ca_path
        yield sess


def credential(s: StandIn, client_id: str, secret: str) -> ClientSecretCredential:
    return ClientSecretCredential(s.tenant_id, client_id, secret, authority=s.entra_url,
                                  disable_instance_discovery=True, connection_verify=s.ca_path, retry_total=0)


def dv_token(s: StandIn, sess: requests.Session) -> str:
    r = sess.post(f"{s.entra_url}/{s.tenant_id}/oauth2/v2.0/token", timeout=5, data={
        "grant_type": "client_credentials", "client_id": s.dynamics_client_id,
        "client_secret": s.dynamics_secret, "scope": f"{s.dataverse_url}/.default"})
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def dv_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/json", "OData-MaxVersion": "4.0",
            "OData-Version": "4.0"}


def test_identity_gets_dataverse_token(standin: StandIn, session: requests.Session) -> None:
    cred = credential(standin, standin.dynamics_client_id, standin.dynamics_secret)
    token = cred.get_token(f"{standin.dataverse_url}/.default")
    assert token.expires_on > time.time() + 3000
    assert token.token in standin.issued_tokens
    r = session.get(f"{standin.api_url}/WhoAmI", headers=dv_headers(token.token), timeout=5)
    assert r.status_code == 200
    assert r.json()["UserId"] == standin.systemuserid
    assert r.headers["x-ms-service-request-id"] == r.headers["REQ_ID"]
    assert standin.counts["entra"][("GET", "openid")] == 1


@pytest.mark.parametrize(("expire", "code"), [(False, 7000215), (True, 7000222)])
def test_identity_bad_secret_codes(standin: StandIn, expire: bool, code: int) -> None:
    secret = "not-the-secret"
    if expire:
        secret = standin.dynamics_secret
        standin.expire_secret(standin.dynamics_client_id, secret)
    cred = credential(standin, standin.dynamics_client_id, secret)
    with pytest.raises(ClientAuthenticationError) as info:
        cred.get_token(f"{standin.dataverse_url}/.default")
    # azure-identity 1.27's ClientSecretCredential raises without .response: the code is only in the message.
    assert f"AADSTS{code}:" in info.value.message
    assert [st for svc, _, path, st in standin.request_log if svc == "entra" and "token" in path] == [401]

    corr = str(uuid.uuid4())
    with requests.Session() as sess:
        sess.trust_env = False
        r = sess.post(f"{standin.entra_url}/{standin.tenant_id}/oauth2/v2.0/token", verify=standin.ca_path,
                      headers={"client-request-id": corr}, timeout=5,
                      data={"grant_type": "client_credentials", "client_id": standin.dynamics_client_id,
                            "client_secret": secret, "scope": f"{standin.dataverse_url}/.default"})
    body = r.json()
    assert (r.status_code, body["error"], body["error_codes"]) == (401, "invalid_client", [code])
    assert body["correlation_id"] == corr
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert "\r\nTrace ID: " in body["error_description"]


def test_keyvault_reads_seeded_secret_after_challenge(standin: StandIn) -> None:
    cred = credential(standin, standin.kv_client_id, standin.kv_secret)
    client = SecretClient(standin.vault_url, cred, verify_challenge_resource=False,
                          connection_verify=standin.ca_path, retry_total=0)
    secret = client.get_secret("dynamics-client-secret")
    assert secret.value == standin.dynamics_secret
    vault_statuses = [st for svc, _, _, st in standin.request_log if svc == "vault"]
    assert vault_statuses == [401, 200]

    new = standin.rotate_dynamics_secret()
    assert client.get_secret("dynamics-client-secret").value == new
    standin.disable_secret("dynamics-client-secret")
    with pytest.raises(Exception) as info:
        client.get_secret("dynamics-client-secret")
    assert getattr(info.value, "status_code", None) == 403


def test_create_then_create_only(standin: StandIn, session: requests.Session) -> None:
    h = dv_headers(dv_token(standin, session))
    body = {"title": "Printer on fire", "prioritycode": 1,
            "customerid_contact@odata.bind": f"/contacts({standin.seed_contact_id})"}
    r = session.post(f"{standin.api_url}/incidents", json=body, headers=h, timeout=5)
    assert r.status_code == 204
    assert r.headers["OData-EntityId"].startswith(f"{standin.api_url}/incidents(")

    key = str(uuid.uuid4())
    url = f"{standin.api_url}/incidents({key})"
    first = session.patch(url, json=body, headers={**h, "If-None-Match": "*"}, timeout=5)
    again = session.patch(url, json=body, headers={**h, "If-None-Match": "*"}, timeout=5)
    assert (first.status_code, again.status_code) == (204, 412)
    assert again.json()["error"]["code"] == "0x80040237"
    assert len(standin.records("incidents")) == 2

    bad = session.post(f"{standin.api_url}/incidents", json={"title": "x", "nope": 1}, headers=h, timeout=5)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "0x80048d19")
    standin.revoke_privilege("prvCreateIncident")
    denied = session.post(f"{standin.api_url}/incidents", json=body, headers=h, timeout=5)
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "0x80040220")


def test_filter_quotes_stay_literals(standin: StandIn, session: requests.Session) -> None:
    assert [(c.column, c.value) for c in comparisons(parse_filter("lastname eq 'O''Brien'"))] == [
        ("lastname", "O'Brien")]
    with pytest.raises(FilterError):
        parse_filter("emailaddress1 eq 'x' or 1 eq 1")

    h = dv_headers(dv_token(standin, session))
    injected = "x' or 1 eq 1"
    literal = injected.replace("'", "''")
    for flt in ("lastname eq 'O''Brien'", f"emailaddress1 eq '{literal}'"):
        r = session.get(f"{standin.api_url}/contacts", headers=h, timeout=5,
                        params={"$select": "contactid", "$filter": flt})
        assert r.status_code == 200
        assert r.json()["value"] == []
    assert standin.queries == [[("lastname", "O'Brien")], [("emailaddress1", injected)]]

    raw = session.get(f"{standin.api_url}/contacts", headers=h, timeout=5,
                      params={"$filter": f"emailaddress1 eq '{injected}'"})
    assert (raw.status_code, raw.json()["error"]["code"]) == (400, "0x80060888")
    assert raw.json()["error"]["message"].startswith("Syntax error at position")


def test_revoked_token_gets_401_challenge(standin: StandIn, session: requests.Session) -> None:
    token = dv_token(standin, session)
    assert session.get(f"{standin.api_url}/WhoAmI", headers=dv_headers(token), timeout=5).status_code == 200
    standin.revoke_tokens()
    r = session.get(f"{standin.api_url}/WhoAmI", headers=dv_headers(token), timeout=5)
    assert r.status_code == 401
    assert r.content == b""
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith(f"Bearer authorization_uri={standin.entra_url}/{standin.tenant_id}/")
    assert f"resource_id={standin.dataverse_url}/" in challenge
    fresh = dv_token(standin, session)
    assert session.get(f"{standin.api_url}/WhoAmI", headers=dv_headers(fresh), timeout=5).status_code == 200


def test_injected_429_has_retry_after(standin: StandIn, session: requests.Session) -> None:
    h = dv_headers(dv_token(standin, session))
    standin.fail_next("dataverse", 1, 429, retry_after=3, method="GET", path_contains="/contacts")
    r = session.get(f"{standin.api_url}/contacts", headers=h, timeout=5)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] == "0x80072322"
    assert session.get(f"{standin.api_url}/contacts", headers=h, timeout=5).status_code == 200


def test_timeout_after_apply_creates_record(standin: StandIn, session: requests.Session) -> None:
    h = dv_headers(dv_token(standin, session))
    standin.fault_rates("dataverse", rate_timeout_after_apply=1.0)
    key = str(uuid.uuid4())
    body = {"title": "slow", "customerid_account@odata.bind": f"/accounts({standin.seed_account_id})"}
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        session.patch(f"{standin.api_url}/incidents({key})", json=body,
                      headers={**h, "If-None-Match": "*"}, timeout=(2, 0.5))
    assert time.monotonic() - started < 2
    assert [r["incidentid"] for r in standin.records("incidents")] == [key]
    standin.clear_faults()
    retry = session.patch(f"{standin.api_url}/incidents({key})", json=body,
                          headers={**h, "If-None-Match": "*"}, timeout=5)
    assert retry.status_code == 412


def test_keep_alive_reuses_one_connection(standin: StandIn, session: requests.Session) -> None:
    h = dv_headers(dv_token(standin, session))
    standin.reset_counters()
    for _ in range(20):
        assert session.get(f"{standin.api_url}/WhoAmI", headers=h, timeout=5).status_code == 200
    assert standin.connections["dataverse"] == 1
    assert standin.counts["dataverse"][("GET", "whoami")] == 20


def test_http_control_and_cli(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "devstack.standin", "--state-dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else "<no output in 20 s>"
        assert line.startswith("stand-in ready:"), line
        info = json.loads((tmp_path / "standin.json").read_text())
        env = info["settings_env"]
        assert env["REQUESTS_CA_BUNDLE"] == info["ca_path"] and Path(info["ca_path"]).is_file()
        with requests.Session() as sess:
            sess.trust_env = False
            sess.verify = info["ca_path"]
            base = info["dataverse_url"]
            r = sess.post(f"{base}/_standin/control", json={"op": "disable_app_user", "args": {}}, timeout=5)
            assert r.json() == {"ok": True, "result": None}
            assert sess.post(f"{base}/_standin/control", json={"op": "stop"}, timeout=5).status_code == 400
            token = sess.post(f"{info['entra_url']}/{info['tenant_id']}/oauth2/v2.0/token", timeout=5, data={
                "grant_type": "client_credentials", "client_id": env["DYNAMICS_CLIENT_ID"],
                "client_secret": info["dynamics_secret"], "scope": f"{base}/.default"}).json()["access_token"]
            r = sess.get(f"{base}/api/data/v9.2/WhoAmI", headers=dv_headers(token), timeout=5)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "0x80040225")
            counts = sess.get(f"{base}/_standin/counts", timeout=5).json()
            assert counts["dataverse"] == {"total": 1, "GET whoami": 1}
            assert len(sess.get(f"{base}/_standin/records/contacts", timeout=5).json()["value"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
    assert code == 0


def test_microsofts_sdk_creates_through_the_table_metadata(standin: StandIn,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's peer: the SDK reads EntityDefinitions (entity set, choice labels) before it creates."""
    from PowerPlatform.Dataverse.client import DataverseClient

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", standin.ca_path)  # the SDK's own session trusts the environment
    cred = credential(standin, standin.dynamics_client_id, standin.dynamics_secret)
    with DataverseClient(standin.dataverse_url, cred) as client:
        rid = client.records.create("incident", {
            "title": "From the SDK", "prioritycode": "High", "caseorigincode": "Web",
            "customerid_contact@odata.bind": f"/contacts({standin.seed_contact_id})"})
    [row] = [r for r in standin.records("incidents") if r["incidentid"] == rid]
    assert (row["title"], row["prioritycode"], row["caseorigincode"]) == ("From the SDK", 1, 3)
    kinds = {k for k in standin.counts["dataverse"] if k != "total"}
    assert {("GET", "metadata"), ("POST", "create")} <= kinds
