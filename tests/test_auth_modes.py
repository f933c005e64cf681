"""No shared secret (issue 12): DYNAMICS_AUTH certificate, federated and managed_identity, end to end.

Real azure-identity credentials (CertificateCredential, ClientAssertionCredential,
ManagedIdentityCredential) over real sockets against the stand-in, which checks what Entra ID checks:
the assertion's signature against the certificates registered on the app, its audience, issuer,
subject and lifetime; a federated assertion against the app's federated credentials; the managed
identity endpoint's header and identity. Certificates are made here, with `cryptography`.
"""

from __future__ import annotations

import time

import pytest

from devstack.standin.certs import make_certificate
from shared import instance
from triggers import http_intake, ops

CASE = http_intake.create_case
CERT_NAME = "dynamics-client-certificate"
VAULT_ONLY = ("KEY_VAULT_URL", "DYNAMICS_CLIENT_SECRET_NAME")


def a_case(si, **extra) -> dict:
    return {"title": "Caller reports outage", "customer": {"contactId": si.seed_contact_id}, **extra}


def count(si, service: str, method: str, kind: str) -> int:
    return si.counts[service].get((method, kind), 0)


def vault_reads(si) -> int:
    return sum(1 for svc, method, path, status in si.request_log
               if svc == "vault" and method == "GET" and "/secrets/" in path and status == 200)


def use(monkeypatch, mode: str, *, drop: tuple[str, ...] = (), **env: str) -> None:
    monkeypatch.setenv("DYNAMICS_AUTH", mode)
    for name in drop:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    instance.reset(read_timeout=1.0, backoff=0.05)


@pytest.fixture
def certificate(stack, monkeypatch):
    cert = make_certificate()
    stack.si.register_certificate(cert.cert_pem)
    stack.si.store_certificate(CERT_NAME, cert.pfx_base64)
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    return cert


@pytest.fixture
def federated(stack, monkeypatch):
    mi = stack.si.add_managed_identity()
    stack.si.add_federated_credential(mi["principal_id"])
    use(monkeypatch, "federated", drop=VAULT_ONLY, AZURE_CLIENT_ID=mi["client_id"], **stack.si.identity_env())
    return mi


@pytest.fixture
def managed_identity(stack, monkeypatch):
    mi = stack.si.add_managed_identity()
    stack.si.set_app_user(mi["client_id"])
    use(monkeypatch, "managed_identity", drop=(*VAULT_ONLY, "DYNAMICS_TENANT_ID", "DYNAMICS_CLIENT_ID"),
        AZURE_CLIENT_ID=mi["client_id"], **stack.si.identity_env())
    return mi


def token_requests(si, mode: str) -> int:
    """Dataverse-scope tokens issued: by the token endpoint, or (managed identity) by the identity endpoint."""
    return si.directory.issued_to(si.dataverse_url)


# ---- each mode creates a case end to end, and survives a revoked token with one refresh and one retry ---------

@pytest.mark.parametrize("mode", ["certificate", "federated", "managed_identity"])
def test_mode_creates_and_survives_revocation_with_one_refresh_and_one_retry(stack, request, mode):
    request.getfixturevalue(mode)
    si = stack.si
    status, body, _ = stack.call(CASE, body=a_case(si))
    assert status == 201, body
    for _ in range(4):
        assert stack.call(CASE, body=a_case(si))[0] == 201
    assert vault_reads(si) == (1 if mode == "certificate" else 0)
    before = token_requests(si, mode)
    assert before == 1  # one token for five cases
    si.revoke_tokens()
    assert stack.call(CASE, body=a_case(si))[0] == 201
    assert token_requests(si, mode) == before + 1
    patches = [s for svc, m, p, s in si.request_log if svc == "dataverse" and m == "PATCH"]
    assert patches[-2:] == [401, 204]
    assert len(si.records("incidents")) == 6


def test_federated_assertion_is_the_identity_s_exchange_token(stack, federated):
    si = stack.si
    assert stack.call(CASE, body=a_case(si))[0] == 201
    assert count(si, "entra", "GET", "msi") == 1  # the identity's token for api://AzureADTokenExchange
    assert count(si, "entra", "POST", "token") == 1  # exchanged for the app's Dataverse token
    assert si.counts["vault"].get("total", 0) == 0


def test_certificate_as_pem_with_key_works_too(stack, monkeypatch):
    cert = make_certificate()
    stack.si.register_certificate(cert.cert_pem)
    stack.si.store_certificate(CERT_NAME, cert.pem_with_key, "application/x-pem-file")
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    assert stack.call(CASE, body=a_case(stack.si))[0] == 201


def test_certificate_rotation_is_picked_up_without_restart(stack, certificate):
    si = stack.si
    assert stack.call(CASE, body=a_case(si))[0] == 201
    new = make_certificate("dynamics-intake-2")
    si.register_certificate(new.cert_pem)
    si.store_certificate(CERT_NAME, new.pfx_base64)  # a new version in the vault
    si.remove_certificate(certificate.sha1)  # the old one removed from the app registration
    si.revoke_tokens()  # so the app must sign in again, still holding the old certificate
    status, body, _ = stack.call(CASE, body=a_case(si))
    assert status == 201, body
    assert vault_reads(si) == 2  # the rejection (AADSTS700027) made it read the vault once more
    statuses = [s for svc, m, p, s in si.request_log if svc == "entra" and m == "POST"]
    assert statuses[-2:] == [401, 200]


# ---- every new failure code, produced -------------------------------------------------------------------------

def error_of(stack, si) -> tuple[int, dict]:
    status, body, _ = stack.call(CASE, body=a_case(si))
    return status, body.get("error", {})


def test_certificate_not_registered_on_the_app(stack, monkeypatch):
    stack.si.store_certificate(CERT_NAME, make_certificate().pfx_base64)
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    status, err = error_of(stack, stack.si)
    assert (status, err["code"], err["upstreamCode"]) == (502, "entra_certificate_not_registered", "AADSTS700027")
    assert stack.si.dynamics_client_id in err["fix"]
    assert vault_reads(stack.si) == 2  # read again once, in case it was rotated: still not registered


def test_expired_certificate(stack, monkeypatch):
    old = make_certificate(days=-1, valid_from_days=-30)
    stack.si.register_certificate(old.cert_pem)
    stack.si.store_certificate(CERT_NAME, old.pfx_base64)
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (502, "entra_certificate_expired")
    assert "expired on" in err["message"]


def test_certificate_missing_or_unusable_in_the_vault(stack, monkeypatch):
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (502, "keyvault_certificate_missing")
    assert CERT_NAME in err["fix"]
    stack.si.store_certificate(CERT_NAME, make_certificate().cert_pem, "application/x-pem-file")  # no key
    instance.reset(read_timeout=1.0, backoff=0.05)
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (502, "keyvault_certificate_unusable")


FEDERATION_PARTS = {"issuer": "AADSTS700211", "audience": "AADSTS700212", "subject": "AADSTS700213"}


def mismatching_federation(stack, monkeypatch, part: str) -> None:
    """The app trusts a federated credential that differs from the managed identity's token in `part` only."""
    si = stack.si
    mi = si.add_managed_identity()
    right = {"subject": mi["principal_id"], "issuer": None, "audience": "api://AzureADTokenExchange"}
    wrong = {"subject": "00000000-0000-0000-0000-00000000abcd",  # another identity's object id
             "issuer": "https://token.actions.githubusercontent.com", "audience": "api://SomeOtherExchange"}
    si.add_federated_credential(**{**right, part: wrong[part]})
    use(monkeypatch, "federated", drop=VAULT_ONLY, AZURE_CLIENT_ID=mi["client_id"], **si.identity_env())


@pytest.mark.parametrize("part", FEDERATION_PARTS)
def test_federated_credential_mismatch_names_the_part(stack, monkeypatch, part):
    mismatching_federation(stack, monkeypatch, part)
    status, err = error_of(stack, stack.si)
    assert (status, err["code"], err["upstreamCode"]) == (502, "entra_federation_mismatch", FEDERATION_PARTS[part])
    assert f"the {part} of the managed identity's token" in err["message"], err


@pytest.mark.parametrize("mode", ["federated", "managed_identity"])
def test_managed_identity_endpoint_unreachable(stack, request, monkeypatch, mode):
    from tests.azurite import free_port

    request.getfixturevalue(mode)
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"https://127.0.0.1:{free_port()}/msi/token")
    started = time.monotonic()
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (503, "managed_identity_unavailable")
    assert time.monotonic() - started < http_intake.HTTP_BUDGET


def test_unknown_user_assigned_identity(stack, managed_identity, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-00000000beef")
    instance.reset(read_timeout=1.0, backoff=0.05)
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (503, "managed_identity_unavailable")


def test_managed_identity_that_is_not_an_application_user(stack, monkeypatch):
    si = stack.si
    mi = si.add_managed_identity()  # the environment's app user is still the app registration
    use(monkeypatch, "managed_identity", drop=(*VAULT_ONLY, "DYNAMICS_TENANT_ID", "DYNAMICS_CLIENT_ID"),
        AZURE_CLIENT_ID=mi["client_id"], **si.identity_env())
    status, err = error_of(stack, si)
    assert (status, err["code"], err["upstreamCode"]) == (502, "managed_identity_not_app_user", "0x80072560")
    assert mi["client_id"] in err["fix"]


@pytest.mark.parametrize(("mode", "extra", "drop", "field"), [
    ("certificate", {}, (), "DYNAMICS_CLIENT_SECRET_NAME"),  # a secret name where a certificate is used
    ("federated", {}, ("DYNAMICS_CLIENT_SECRET_NAME",), "KEY_VAULT_URL"),  # a vault where none is used
    ("federated", {}, (*VAULT_ONLY, "AZURE_CLIENT_ID"), "AZURE_CLIENT_ID"),  # no identity to federate
    ("managed_identity", {}, VAULT_ONLY, "DYNAMICS_CLIENT_ID"),  # the identity is the user: no app registration
    ("secret", {"DYNAMICS_CLIENT_CERTIFICATE_NAME": "c"}, (), "DYNAMICS_CLIENT_CERTIFICATE_NAME"),
    ("passwordless", {}, (), "DYNAMICS_AUTH"),
])
def test_wrong_combination_is_config_invalid_naming_it(stack, monkeypatch, mode, extra, drop, field):
    use(monkeypatch, mode, drop=drop, **extra)
    status, err = error_of(stack, stack.si)
    assert (status, err["code"]) == (503, "config_invalid")
    assert field in {d["field"] for d in err["details"]}, err
    assert stack.si.counts["entra"].get("total", 0) == 0


# ---- diagnostics adapt to the mode ----------------------------------------------------------------------------

def diagnose(stack) -> tuple[int, dict]:
    status, body, _ = stack.call(ops.diagnostics, method="GET", route="api/diagnostics")
    return status, body


@pytest.mark.parametrize("mode", ["federated", "managed_identity"])
def test_diagnostics_without_a_vault_have_no_vault_step(stack, request, mode):
    request.getfixturevalue(mode)
    status, body = diagnose(stack)
    assert (status, body["status"]) == (200, "ok"), body
    assert [s["name"] for s in body["steps"]] == ["settings", "token", "whoami", "privileges"]
    assert stack.si.counts["vault"].get("total", 0) == 0


@pytest.mark.parametrize("part", FEDERATION_PARTS)
def test_diagnostics_name_the_federated_credential_part_that_did_not_match(stack, monkeypatch, part):
    mismatching_federation(stack, monkeypatch, part)
    status, body = diagnose(stack)
    assert (status, body["status"]) == (503, "failed"), body
    token = {s["name"]: s for s in body["steps"]}["token"]
    assert (token["status"], token["code"]) == ("failed", "entra_federation_mismatch")
    assert f"the {part} of the managed identity's token" in token["detail"], token
    assert all(f"the {other} of" not in token["detail"] for other in FEDERATION_PARTS if other != part)


def test_diagnostics_certificate_expiring_soon_is_degraded(stack, monkeypatch):
    cert = make_certificate(days=10)
    stack.si.register_certificate(cert.cert_pem)
    stack.si.store_certificate(CERT_NAME, cert.pfx_base64)
    use(monkeypatch, "certificate", drop=("DYNAMICS_CLIENT_SECRET_NAME",))
    status, body = diagnose(stack)
    assert (status, body["status"]) == (503, "degraded"), body
    kv = body["steps"][1]
    assert (kv["name"], kv["status"], kv["code"]) == ("keyvault", "warning", "keyvault_certificate_expiring")
    assert all(s["ok"] for s in body["steps"])


def test_diagnostics_name_the_managed_identity_that_is_no_app_user(stack, monkeypatch):
    si = stack.si
    mi = si.add_managed_identity()
    use(monkeypatch, "managed_identity", drop=(*VAULT_ONLY, "DYNAMICS_TENANT_ID", "DYNAMICS_CLIENT_ID"),
        AZURE_CLIENT_ID=mi["client_id"], **si.identity_env())
    _, body = diagnose(stack)
    steps = {s["name"]: s for s in body["steps"]}
    assert (steps["whoami"]["status"], steps["whoami"]["code"]) == ("failed", "managed_identity_not_app_user")
