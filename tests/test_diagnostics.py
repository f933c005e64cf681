"""Diagnostics name the exact cause of each fault the stand-in can be set into, and skip what follows."""

from __future__ import annotations

import time
import uuid

import pytest

from triggers import ops

DIAG = ops.diagnostics
ORDER = ["settings", "keyvault", "token", "whoami", "privileges"]


def run(stack) -> tuple[int, dict]:
    status, body, _ = stack.call(DIAG, method="GET", route="api/diagnostics")
    assert [s["name"] for s in body["steps"]] == ORDER
    assert body["correlationId"]
    return status, body


def failed_at(body: dict, step: str, code: str) -> dict:
    steps = {s["name"]: s for s in body["steps"]}
    at = ORDER.index(step)
    assert all(steps[n]["status"] == "ok" for n in ORDER[:at]), body
    assert (steps[step]["status"], steps[step]["ok"], steps[step]["code"]) == ("failed", False, code), body
    assert steps[step]["fix"] and steps[step]["detail"]
    assert all(steps[n]["status"] == "skipped" and steps[n]["code"] == "skipped" for n in ORDER[at + 1:]), body
    assert body["status"] == "failed"
    return steps[step]


def test_all_ok(stack):
    status, body = run(stack)
    assert (status, body["status"]) == (200, "ok")
    assert all(s["ok"] and s["code"] is None and s["ms"] >= 0 for s in body["steps"])


def test_wrong_secret(stack):
    si = stack.si
    si.set_secret("dynamics-client-secret", "not-the-value~" + uuid.uuid4().hex)
    status, body = run(stack)
    assert status == 503
    step = failed_at(body, "token", "entra_invalid_secret")
    assert "Value, not its Secret ID" in step["fix"]


def test_secret_id_pasted_instead_of_value(stack):
    stack.si.set_secret("dynamics-client-secret", str(uuid.uuid4()))
    _, body = run(stack)
    assert "that is the secret's ID, not its Value" in failed_at(body, "token", "entra_invalid_secret")["detail"]


def test_expired_secret(stack):
    si = stack.si
    si.expire_secret(si.dynamics_client_id, si.dynamics_secret)
    _, body = run(stack)
    failed_at(body, "token", "entra_secret_expired")


def test_unknown_client(stack, monkeypatch):
    monkeypatch.setenv("DYNAMICS_CLIENT_ID", str(uuid.uuid4()))
    _, body = run(stack)
    assert "DYNAMICS_CLIENT_ID" in failed_at(body, "token", "entra_unknown_client")["fix"]


def test_unknown_tenant(stack, monkeypatch):
    monkeypatch.setenv("DYNAMICS_TENANT_ID", str(uuid.uuid4()))
    _, body = run(stack)
    assert "Directory (tenant) ID" in failed_at(body, "token", "entra_unknown_tenant")["fix"]


def test_wrong_dynamics_url_scope(stack, monkeypatch):
    monkeypatch.setenv("DYNAMICS_URL", "https://contoso.crm4.dynamics.example")
    _, body = run(stack)
    assert "environment URL" in failed_at(body, "token", "dynamics_url_wrong_scope")["fix"]


def test_key_vault_forbidden(stack):
    stack.si.deny_vault_access(True)
    _, body = run(stack)
    assert "Key Vault Secrets User" in failed_at(body, "keyvault", "keyvault_forbidden")["fix"]


def test_secret_missing(stack):
    stack.si.delete_secret("dynamics-client-secret")
    _, body = run(stack)
    assert "dynamics-client-secret" in failed_at(body, "keyvault", "keyvault_secret_missing")["fix"]


def test_secret_disabled(stack):
    stack.si.disable_secret("dynamics-client-secret")
    _, body = run(stack)
    failed_at(body, "keyvault", "keyvault_secret_disabled")


def test_application_user_missing(stack):
    stack.si.remove_app_user()
    _, body = run(stack)
    step = failed_at(body, "whoami", "dynamics_app_user_missing")
    assert "Application users" in step["fix"] and stack.si.dynamics_client_id in step["fix"]
    assert step["requestId"]


def test_privilege_missing(stack):
    stack.si.revoke_privilege("prvReadLead")
    stack.si.revoke_privilege("prvAppendToAccount")
    _, body = run(stack)
    step = failed_at(body, "privileges", "dynamics_privilege_missing")
    assert "prvReadLead" in step["detail"] and "prvAppendToAccount" in step["detail"]
    assert "prvCreateLead" not in step["detail"]


def test_follow_up_privileges_are_checked(stack):
    stack.si.revoke_privilege("prvCreateNote")
    stack.si.revoke_privilege("prvWriteIncident")
    _, body = run(stack)
    step = failed_at(body, "privileges", "dynamics_privilege_missing")
    assert "prvCreateNote" in step["detail"] and "prvWriteIncident" in step["detail"]


def test_throttled(stack):
    stack.si.fail_next("dataverse", 1, 429, retry_after=60, path_contains="WhoAmI")
    _, body = run(stack)
    assert "Retry-After" in failed_at(body, "whoami", "dynamics_throttled")["fix"]


def test_settings_problem_names_the_setting(stack, monkeypatch):
    monkeypatch.setenv("DYNAMICS_TENANT_ID", "contoso.onmicrosoft.com")
    _, body = run(stack)
    assert "DYNAMICS_TENANT_ID must be a GUID" in failed_at(body, "settings", "config_invalid")["detail"]
    assert stack.si.counts["vault"]["total"] == 0


def test_secret_expiring_soon_is_degraded(stack):
    stack.si.set_secret_expiry("dynamics-client-secret", int(time.time()) + 10 * 86400)
    status, body = run(stack)
    assert (status, body["status"]) == (503, "degraded")
    kv = body["steps"][1]
    assert (kv["status"], kv["ok"], kv["code"]) == ("warning", True, "keyvault_secret_expiring")
    assert all(s["ok"] for s in body["steps"])


@pytest.mark.parametrize("fault", ["set_secret", "deny_vault_access"])
def test_diagnostics_never_echo_the_secret(stack, fault):
    si = stack.si
    if fault == "set_secret":
        si.set_secret("dynamics-client-secret", "leaky-" + uuid.uuid4().hex)
        value = "leaky-"
    else:
        si.deny_vault_access(True)
        value = si.dynamics_secret
    _, body = run(stack)
    assert value not in str(body)


def test_queue_health_reads_the_depths_from_azurite_and_poison_degrades(stack, azurite, monkeypatch):
    from tools.queues import ensure, queue_client

    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    for q in ("cases", "cases-poison", "leads-poison", "leads-rejected"):  # fresh counts for this test
        try:
            queue_client(azurite.connection_string, q).clear_messages()
        except Exception:  # the queue does not exist yet
            pass
    poison = ensure(queue_client(azurite.connection_string, "cases-poison"))
    for i in range(2):
        poison.send_message(f'{{"title": "p{i}"}}')
    ensure(queue_client(azurite.connection_string, "leads-rejected")).send_message('{"reason": {}}')
    ensure(queue_client(azurite.connection_string, "cases")).send_message('{"title": "waiting"}')
    status, body, _ = stack.call(DIAG, method="GET", route="api/diagnostics")
    assert (status, body["status"]) == (503, "degraded")
    assert all(s["status"] == "ok" for s in body["steps"])  # the sign-in chain itself is fine
    q = body["queues"]
    assert (q["status"], q["code"]) == ("warning", "queue_poisoned")
    assert "tools.queues replay cases" in q["fix"]
    rows = {r["queue"]: r for r in q["queues"]}
    assert (rows["cases"]["depth"], rows["cases"]["poison"], rows["leads"]["rejected"]) == (1, 2, 1)
    assert rows["cases"]["oldestPoisonAgeSeconds"] >= 0
    for queue in ("cases", "cases-poison", "leads-rejected"):
        queue_client(azurite.connection_string, queue).clear_messages()


def test_unreachable_queue_storage_is_named_and_diagnostics_still_answers(stack, monkeypatch):
    from tests.azurite import free_port
    from tools.queues import azurite_connection_string

    monkeypatch.setenv("AzureWebJobsStorage", azurite_connection_string(queue_port=free_port()))
    started = time.monotonic()
    status, body, _ = stack.call(DIAG, method="GET", route="api/diagnostics")
    assert time.monotonic() - started < 10
    assert (status, body["status"]) == (503, "degraded")
    assert (body["queues"]["status"], body["queues"]["code"]) == ("failed", "queue_storage_unreachable")
    assert body["queues"]["fix"]


def test_without_storage_settings_queue_health_is_skipped_not_failed(stack):
    status, body, _ = stack.call(DIAG, method="GET", route="api/diagnostics")
    assert (status, body["status"], body["queues"]["status"]) == (200, "ok", "skipped")


def test_a_hung_vault_is_named_within_the_deadline_and_blocks_no_other_probe(stack):
    from concurrent.futures import ThreadPoolExecutor

    from shared import diagnostics

    si = stack.si
    si.set_hold_seconds(40)  # the vault takes each read and never answers (three tries, 10 s read timeout each)
    si.fail_next("vault", 6, "timeout_after_apply")
    limit = diagnostics.DEADLINE_SECONDS + 2.5

    def probe() -> tuple[float, int, dict]:
        started = time.monotonic()
        status, body = run(stack)
        return time.monotonic() - started, status, body

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(probe)
        time.sleep(1.0)
        second = pool.submit(probe)  # arrives while the first walk hangs
        (took_1, status_1, body_1), (took_2, status_2, body_2) = first.result(60), second.result(60)
    assert took_1 < limit and took_2 < limit, (took_1, took_2)  # neither waits out the vault's hold
    for status, body in ((status_1, body_1), (status_2, body_2)):
        assert status == 503
        step = failed_at(body, "keyvault", "keyvault_unreachable")
        assert "deadline" in step["detail"]
    assert 1 <= si.counts["vault"].get(("GET", "secret_get"), 0) <= 2  # one walk for both: its try and its retry
    si.set_hold_seconds(0)


def test_in_azure_the_poison_fix_is_a_replay_command_that_works_there(stack, oauth_azurite, monkeypatch):
    """Identity-based host storage (as the template sets it) on a keyless account: the fix names
    `--account-url` with the account's queue endpoint, and that very command moves the messages back."""
    import shlex

    from tests.azurite import cli_as, signed_in, token_account
    from tools.queues import ensure, queue_client

    si = stack.si
    mi = si.add_managed_identity()
    monkeypatch.delenv("AzureWebJobsStorage", raising=False)
    for name, value in {"AzureWebJobsStorage__queueServiceUri": oauth_azurite.queue_url,
                        "AzureWebJobsStorage__credential": "managedidentity",
                        "AzureWebJobsStorage__clientId": mi["client_id"], **si.identity_env()}.items():
        monkeypatch.setenv(name, value)
    poison = ensure(queue_client(token_account(si, oauth_azurite.queue_url), "cases-poison",
                                 connection_verify=si.ca_path))
    poison.send_message('{"title": "poisoned in Azure"}')

    status, body, _ = stack.call(DIAG, method="GET", route="api/diagnostics")
    assert (status, body["queues"]["status"], body["queues"]["code"]) == (503, "warning", "queue_poisoned"), body
    fix = body["queues"]["fix"]
    command = f"python -m tools.queues replay cases --account-url {oauth_azurite.queue_url}"
    assert command in fix and "az login" in fix and "Storage Queue Data Contributor" in fix, fix
    code, out, err, _ = cli_as(signed_in(si), *shlex.split(command)[3:])
    assert (code, out.strip()) == (0, "moved 1 message(s)"), err
    assert poison.get_queue_properties().approximate_message_count == 0
