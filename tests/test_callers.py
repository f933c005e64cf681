"""INTAKE_CALLER_AUTH=entra: callers prove who they are with Entra ID access tokens (issue 21).

Real tokens from the stand-in's Entra ID (client credentials over HTTPS), checked by the app against the
signing keys it fetches from the stand-in, through the functions' entry points.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from shared import caller_tokens, callers, instance, telemetry
from tests.test_http import a_case, assert_error
from triggers import http_intake, ops

ROOT = Path(__file__).resolve().parent.parent
CASE, LEAD, DIAG = http_intake.create_case, http_intake.create_lead, ops.diagnostics


def use_entra(stack, monkeypatch) -> str:
    """Put the app in entra caller mode (as if imported with INTAKE_CALLER_AUTH=entra) against the stack's
    stand-in; returns a token of the local caller (every app role), fetched over the socket."""
    for name, value in stack.si.caller_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(callers, "MODE", "entra")
    caller_tokens.reset()
    return token_for(stack.si, stack.si.local_caller)


def with_token(stack, token: str) -> None:
    """Every later stack.call sends the token, unless the test sends an Authorization header itself."""
    plain = stack.call

    def call(fn, method="POST", route="api/cases", body=None, headers=None, raw=None):
        return plain(fn, method, route, body, {"Authorization": f"Bearer {token}", **(headers or {})}, raw)

    stack.call = call


@pytest.fixture
def entra(stack, monkeypatch):
    """The stack with the app in entra caller mode."""
    use_entra(stack, monkeypatch)
    yield stack
    caller_tokens.reset()


def token_for(si, caller: dict, scope: str | None = None) -> str:
    """A token from the stand-in's token endpoint, over its socket, as a caller's client credentials get it."""
    resp = requests.post(f"{si.entra_url}/{si.tenant_id}/oauth2/v2.0/token", verify=si.ca_path, timeout=10,
                         data={"grant_type": "client_credentials", "client_id": caller["client_id"],
                               "client_secret": caller["secret"],
                               "scope": scope or f"api://{si.api_client_id}/.default"})
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def keys_fetches(si) -> tuple[int, int]:
    counts = si.counts["entra"]
    return counts.get(("GET", "keys"), 0), counts.get(("GET", "openid"), 0)


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


# ---- the answers ------------------------------------------------------------------------------------------
def test_valid_v2_token_creates_and_the_caller_is_on_span_and_log_fields(entra, monkeypatch):
    si = entra.si
    seen: list[telemetry.Invocation] = []
    real = telemetry.get()

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        @contextmanager
        def invocation(self, trigger, entity, context=None):
            with real.invocation(trigger, entity, context) as inv:
                seen.append(inv)
                yield inv

    monkeypatch.setattr(telemetry, "get", Recording)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("intake.http").addHandler(handler)
    try:
        status, body, _ = entra.call(CASE, body=a_case(si), headers=bearer(token_for(si, si.local_caller)))
    finally:
        logging.getLogger("intake.http").removeHandler(handler)
    assert status == 201, body
    app_id = si.local_caller["client_id"]
    assert seen[0].attributes()["intake.caller_app_id"] == app_id
    assert [getattr(r, "intake.caller_app_id", None) for r in records] == [app_id]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwdw==", "token abc"])
def test_no_bearer_credentials_is_401_missing_without_error_param(entra, header):
    headers = {} if header is None else {"Authorization": header}
    status, body, resp = entra.call(CASE, body=a_case(entra.si), headers=headers)
    assert_error(status, body, 401, "caller_token_missing")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert entra.si.counts["dataverse"]["total"] == 0


def test_easy_auth_principal_headers_are_never_trusted(entra):
    principal = base64.b64encode(json.dumps({"auth_typ": "aad", "claims": [
        {"typ": "roles", "val": "Cases.Create"}]}).encode()).decode()
    headers = {"X-MS-CLIENT-PRINCIPAL": principal, "X-MS-CLIENT-PRINCIPAL-ID": str(uuid.uuid4()),
               "X-MS-CLIENT-PRINCIPAL-NAME": "someone"}
    status, body, _ = entra.call(CASE, body=a_case(entra.si), headers=headers)
    assert_error(status, body, 401, "caller_token_missing")


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize(("change", "check"), [
    ({"exp": lambda: _now() - 400}, "expiry"),
    ({"nbf": lambda: _now() + 400}, "not yet valid"),
    ({"iss": lambda: "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"}, "issuer"),
    ({"aud": lambda: "https://graph.microsoft.com"}, "audience"),
    ({"tid": lambda: "72f988bf-86f1-41af-91ab-2d7cd011db47"}, "tenant"),
    ({"scp": lambda: "user_impersonation"}, "delegated"),
    ({"idtyp": lambda: "user"}, "idtyp"),
    ({"drop": ("idtyp",)}, "idtyp"),
    ({"drop": ("azp",)}, "azp"),
    ({"drop": ("exp",)}, "claim exp missing"),
    ({"sign": {"unpublished": True}}, "kid"),
    ({"sign": {"alg": "PS256"}}, "algorithm"),
])
def test_a_token_failing_a_check_is_401_invalid_naming_it(entra, change, check):
    si = entra.si
    token_for(si, si.local_caller)  # the keys are known: a kid the tenant does not publish is then plainly wrong
    entra.call(CASE, body=a_case(si), headers=bearer(token_for(si, si.local_caller)))
    drop = change.pop("drop", ())
    sign = change.pop("sign", None)
    token = si.mint_caller_token(drop=drop, sign=sign, **{k: v() for k, v in change.items()})
    status, body, resp = entra.call(CASE, body=a_case(si), headers=bearer(token))
    err = assert_error(status, body, 401, "caller_token_invalid")
    assert check in err["message"]
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert len(si.records("incidents")) == 1


def test_skew_of_up_to_5_minutes_is_allowed(entra):
    si = entra.si
    token = si.mint_caller_token(exp=_now() - 200, nbf=_now() + 200)
    assert entra.call(CASE, body=a_case(si), headers=bearer(token))[0] == 201


@pytest.mark.parametrize("forge", ["none", "hs256", "signature", "garbage"])
def test_forged_tokens_are_refused(entra, forge):
    si = entra.si
    good = si.mint_caller_token()
    head, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    kid = si.directory.callers.signing_kid
    if forge == "none":
        token = f"{_b64({'alg': 'none', 'kid': kid})}.{payload}."
    elif forge == "hs256":
        import hashlib
        import hmac

        from cryptography.hazmat.primitives import serialization

        # Algorithm confusion: an HMAC keyed with the published public key, which anyone can read.
        signer = next(k for k in si.directory.callers._keys if k.kid == kid)
        public = signer.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{payload}"
        mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    elif forge == "signature":
        claims["roles"] = ["Cases.Create", "Leads.Create", "Intake.Admin", "Everything"]
        token = f"{head}.{_b64(claims)}.{sig}"
    else:
        token = "not-a-jwt"
    si.directory.record(token, "forged", "forged", 60)  # the leak check covers it
    status, body, _ = entra.call(CASE, body=a_case(si), headers=bearer(token))
    err = assert_error(status, body, 401, "caller_token_invalid")
    assert token not in json.dumps(body)
    assert si.records("incidents") == []
    assert err["message"]


def test_valid_token_without_the_route_s_role_is_403_naming_it(entra):
    si = entra.si
    leads_only = si.add_caller(["Leads.Create"])
    token = token_for(si, leads_only)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("intake.http").addHandler(handler)
    try:
        status, body, resp = entra.call(CASE, body=a_case(si), headers=bearer(token))
    finally:
        logging.getLogger("intake.http").removeHandler(handler)
    assert [getattr(r, "intake.caller_app_id", None) for r in records] == [leads_only["client_id"]]
    err = assert_error(status, body, 403, "caller_role_missing")
    assert "Cases.Create" in err["message"]
    assert "WWW-Authenticate" not in resp.headers
    status, body, _ = entra.call(LEAD, route="api/leads", body={"lastName": "Doe"}, headers=bearer(token))
    assert status == 201, body
    status, body, _ = entra.call(DIAG, method="GET", route="api/diagnostics", headers=bearer(token))
    assert "Intake.Admin" in assert_error(status, body, 403, "caller_role_missing")["message"]


def test_diagnostics_open_to_the_admin_role_only_with_a_token(entra):
    si = entra.si
    status, body, _ = entra.call(DIAG, method="GET", route="api/diagnostics")
    assert_error(status, body, 401, "caller_token_missing")
    status, body, _ = entra.call(DIAG, method="GET", route="api/diagnostics",
                                 headers=bearer(token_for(si, si.local_caller)))
    assert status in (200, 503) and "steps" in body, body


def test_diagnostics_in_entra_mode_show_the_key_set_and_the_audience(entra):
    si = entra.si
    token = token_for(si, si.local_caller)
    status, body, _ = entra.call(DIAG, method="GET", route="api/diagnostics", headers=bearer(token))
    assert body["callers"]["status"] == "ok", body["callers"]
    assert "1 signing keys" in body["callers"]["detail"] and "INTAKE_API_CLIENT_ID" in body["callers"]["detail"]
    from shared import diagnostics

    diagnostics.forget()
    si.fail_next("entra", 3, 503, path_contains="/discovery/v2.0/keys")
    status, body, _ = entra.call(DIAG, method="GET", route="api/diagnostics", headers=bearer(token))
    assert status == 503 and body["status"] == "failed"
    assert (body["callers"]["status"], body["callers"]["code"]) == ("failed", "caller_keys_unavailable")


def test_diagnostics_name_a_missing_caller_setting(entra, monkeypatch):
    from shared import diagnostics

    monkeypatch.delenv("INTAKE_API_TENANT_ID")
    found = diagnostics.callers_check()
    assert (found["status"], found["code"]) == ("failed", "config_invalid")
    assert [d["field"] for d in found["details"]] == ["INTAKE_API_TENANT_ID"]


def test_missing_api_setting_is_config_invalid_naming_it(entra, monkeypatch):
    monkeypatch.delenv("INTAKE_API_CLIENT_ID")
    status, body, _ = entra.call(CASE, body=a_case(entra.si), headers=bearer(entra.si.mint_caller_token()))
    err = assert_error(status, body, 503, "config_invalid")
    assert "INTAKE_API_CLIENT_ID is required" in err["message"]


def test_a_mode_that_is_no_mode_answers_config_invalid(entra, monkeypatch):
    monkeypatch.setattr(callers, "MODE", "entraid")
    status, body, _ = entra.call(CASE, body=a_case(entra.si), headers=bearer(entra.si.mint_caller_token()))
    assert "INTAKE_CALLER_AUTH must be one of" in assert_error(status, body, 503, "config_invalid")["message"]
    assert entra.si.records("incidents") == []


# ---- keys: unreachable, rollover, flood -------------------------------------------------------------------
def test_keys_unreachable_for_an_unknown_kid_is_503_then_backs_off_then_recovers(entra):
    si = entra.si
    caller_tokens.reset(backoff=0.5)
    si.fail_next("entra", 5, 503, path_contains="/discovery/v2.0/keys")
    token = token_for(si, si.local_caller)
    status, body, resp = entra.call(CASE, body=a_case(si), headers=bearer(token))
    assert_error(status, body, 503, "caller_keys_unavailable")
    assert int(resp.headers["Retry-After"]) >= 1
    before = keys_fetches(si)
    status, body, _ = entra.call(CASE, body=a_case(si), headers=bearer(token))
    assert_error(status, body, 503, "caller_keys_unavailable")
    assert keys_fetches(si) == before, "no second fetch within the backoff"
    si.clear_faults()
    time.sleep(0.6)
    assert entra.call(CASE, body=a_case(si), headers=bearer(token))[0] == 201


def test_key_rollover_new_key_accepted_after_the_cooldown_without_restart(entra):
    si = entra.si
    caller_tokens.reset(cooldown=1.0)
    old = token_for(si, si.local_caller)
    assert entra.call(CASE, body=a_case(si), headers=bearer(old))[0] == 201
    si.rotate_signing_key()  # emergency rollover: published and signing at once
    new = token_for(si, si.local_caller)
    status, body, _ = entra.call(CASE, body=a_case(si), headers=bearer(new))
    assert "kid" in assert_error(status, body, 401, "caller_token_invalid")["message"], "within the cooldown"
    time.sleep(1.1)
    assert entra.call(CASE, body=a_case(si), headers=bearer(new))[0] == 201
    assert entra.call(CASE, body=a_case(si), headers=bearer(old))[0] == 201, "the old key is still published"
    assert keys_fetches(si)[0] == 2


def test_kid_flood_costs_one_fetch_of_keys_and_configuration(entra):
    si = entra.si
    tokens = [si.mint_caller_token(sign={"header_kid": f"made-up-{i}"}) for i in range(40)]
    results: list[int] = []

    def call(token: str) -> None:
        results.append(entra.call(CASE, body=a_case(si), headers=bearer(token))[0])

    threads = [threading.Thread(target=call, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [401] * 40
    assert keys_fetches(si) == (1, 1)
    assert entra.call(CASE, body=a_case(si), headers=bearer(token_for(si, si.local_caller)))[0] == 201
    assert keys_fetches(si)[0] == 1  # (the openid-configuration is read again by MSAL, for the Dataverse token)


# ---- token versions and per-caller namespaces -------------------------------------------------------------
def test_v1_tokens_are_accepted_and_share_the_app_s_namespace_with_v2(entra):
    si = entra.si
    v2 = token_for(si, si.local_caller)
    si.set_api_token_version(1)
    v1 = token_for(si, si.local_caller)
    claims = json.loads(base64.urlsafe_b64decode(v1.split(".")[1] + "=="))
    assert (claims["ver"], claims["iss"], claims["aud"]) == (
        "1.0", f"https://sts.windows.net/{si.tenant_id}/", f"api://{si.api_client_id}")
    s1, b1, _ = entra.call(CASE, body=a_case(si, externalId="x-1", source="genesys"), headers=bearer(v1))
    s2, b2, _ = entra.call(CASE, body=a_case(si, externalId="x-1", source="genesys"), headers=bearer(v2))
    assert (s1, s2, b1["id"]) == (201, 200, b2["id"])


def test_two_callers_same_key_make_two_records_and_a_repeat_is_200(entra):
    si = entra.si
    other = si.add_caller(["Cases.Create"])
    mine, theirs = token_for(si, si.local_caller), token_for(si, other)
    event = a_case(si, externalId="call-8812", source="genesys")
    s1, b1, _ = entra.call(CASE, body=event, headers=bearer(mine))
    s2, b2, _ = entra.call(CASE, body=event, headers=bearer(theirs))
    s3, b3, _ = entra.call(CASE, body=event, headers=bearer(mine))
    assert (s1, s2, s3) == (201, 201, 200)
    assert b1["id"] != b2["id"] and b3["id"] == b1["id"]
    assert len(si.records("incidents")) == 2
    h1 = entra.call(CASE, body=a_case(si), headers={**bearer(mine), "Idempotency-Key": "req-1"})
    h2 = entra.call(CASE, body=a_case(si), headers={**bearer(theirs), "Idempotency-Key": "req-1"})
    assert (h1[0], h2[0]) == (201, 201) and h1[1]["id"] != h2[1]["id"]


# ---- the host's view: auth levels in both modes -----------------------------------------------------------
_LEVELS = ("import json, sys, function_app; "
           "out = {f.get_function_name(): str(b.get_dict_repr().get('authLevel')) "
           "for f in function_app.app.get_functions() "
           "for b in f.get_bindings() if b.get_dict_repr()['type'] == 'httpTrigger'}; "
           "print(json.dumps({'levels': out, 'jwt': 'jwt' in sys.modules}))")


@pytest.mark.parametrize(("mode", "keyed"), [(None, True), ("function_key", True), ("entra", False),
                                             ("Entra", False), ("jwt", True)])
def test_auth_level_of_each_route_as_indexed(mode, keyed):
    import os

    env = {k: v for k, v in os.environ.items() if k != "INTAKE_CALLER_AUTH"}
    if mode is not None:
        env["INTAKE_CALLER_AUTH"] = mode
    out = subprocess.run([sys.executable, "-c", _LEVELS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    levels = {k: v.split(".")[-1].upper() for k, v in found["levels"].items()}
    protected = {"create_case": "FUNCTION", "create_lead": "FUNCTION", "diagnostics": "ADMIN"}
    for name, level in protected.items():
        assert levels[name] == (level if keyed else "ANONYMOUS"), (name, levels)
    assert levels["health"] == levels["openapi"] == "ANONYMOUS"
    assert found["jwt"] is False, "PyJWT is imported on the first checked request, never at import"


def test_follow_ups_need_the_entity_s_create_role_and_alerts_their_own(entra, monkeypatch):
    """Issue 22's routes under entra: a note, a resolve need the entity's create role; /api/alerts needs
    Alerts.Send (Azure Monitor's secure webhook), and a create role does not open it."""
    from tests.test_alerts import SAMPLE
    from triggers import alerts_http, followups_http

    si = entra.si
    monkeypatch.setenv("INTAKE_ALERT_ACCOUNT_ID", si.seed_account_id)
    instance.reset(read_timeout=1.0, backoff=0.05)
    cases = token_for(si, si.add_caller(["Cases.Create"]))
    leads = token_for(si, si.add_caller(["Leads.Create"]))
    monitor = token_for(si, si.add_caller(["Alerts.Send"]))
    status, body, _ = entra.call(CASE, body=a_case(si, externalId="fu-1"), headers=bearer(cases))
    assert status == 201, body
    note = {"case": {"externalId": "fu-1"}, "noteId": "n-1", "subject": "Wrap-up", "text": "Called back"}
    status, body, _ = entra.call(followups_http.case_note, route="api/cases/notes", body=note)
    assert_error(status, body, 401, "caller_token_missing")
    status, body, _ = entra.call(followups_http.case_note, route="api/cases/notes", body=note, headers=bearer(leads))
    assert "Cases.Create" in assert_error(status, body, 403, "caller_role_missing")["message"]
    status, body, _ = entra.call(followups_http.case_note, route="api/cases/notes", body=note, headers=bearer(cases))
    assert status == 201, body
    resolve = {"case": {"externalId": "fu-1"}, "resolution": {"subject": "Done", "description": "Fixed"}}
    status, body, _ = entra.call(followups_http.resolve_case, route="api/cases/resolve", body=resolve,
                                 headers=bearer(cases))
    assert status == 200, body
    status, body, _ = entra.call(alerts_http.alert, route="api/alerts", body=SAMPLE, headers=bearer(cases))
    assert "Alerts.Send" in assert_error(status, body, 403, "caller_role_missing")["message"]
    status, body, _ = entra.call(alerts_http.alert, route="api/alerts", body=SAMPLE, headers=bearer(monitor))
    assert status in (200, 201), body
