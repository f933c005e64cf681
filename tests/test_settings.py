"""Settings: read on first use, every problem named with its setting."""

import pytest

from shared import settings
from shared.errors import IntakeError

GOOD = {
    "DYNAMICS_URL": "https://contoso.crm.dynamics.com/",
    "DYNAMICS_TENANT_ID": "72F988BF-86F1-41AF-91AB-2D7CD011DB47",
    "DYNAMICS_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
    "KEY_VAULT_URL": "https://contoso-kv.vault.azure.net/",
}


def test_good_settings_are_normalised_and_defaulted():
    s = settings.load(GOOD)
    assert s.dynamics_url == "https://contoso.crm.dynamics.com"
    assert s.key_vault_url == "https://contoso-kv.vault.azure.net"
    assert s.tenant_id == "72f988bf-86f1-41af-91ab-2d7cd011db47"
    assert s.secret_name == "dynamics-client-secret"
    assert s.api_version == "v9.2"
    assert s.api_base == "https://contoso.crm.dynamics.com/api/data/v9.2/"
    assert s.scope == "https://contoso.crm.dynamics.com/.default"
    assert s.is_public_authority


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DYNAMICS_URL", "http://contoso.crm.dynamics.com", "DYNAMICS_URL must be an https origin"),
    ("DYNAMICS_URL", "https://contoso.crm.dynamics.com/api/data/v9.2", "DYNAMICS_URL must be an https origin"),
    ("DYNAMICS_URL", "contoso.crm.dynamics.com", "DYNAMICS_URL must be an https origin"),
    ("DYNAMICS_TENANT_ID", "contoso.onmicrosoft.com", "DYNAMICS_TENANT_ID must be a GUID"),
    ("DYNAMICS_CLIENT_ID", "1234", "DYNAMICS_CLIENT_ID must be a GUID"),
    ("KEY_VAULT_URL", "https://user:pw@kv.vault.azure.net", "KEY_VAULT_URL must be an https origin"),
    ("DYNAMICS_CLIENT_SECRET_NAME", "bad name!", "DYNAMICS_CLIENT_SECRET_NAME must be"),
    ("DYNAMICS_API_VERSION", "9.2", "DYNAMICS_API_VERSION must look like v9.2"),
    ("AZURE_AUTHORITY_HOST", "http://login.example", "AZURE_AUTHORITY_HOST must be an https origin"),
])
def test_bad_setting_is_named(name, value, message):
    with pytest.raises(IntakeError) as caught:
        settings.load({**GOOD, name: value})
    err = caught.value
    assert err.code == "config_invalid"
    assert message in err.detail
    assert [d["field"] for d in err.details] == [name]


def test_every_missing_setting_is_reported_at_once():
    with pytest.raises(IntakeError) as caught:
        settings.load({})
    assert {d["field"] for d in caught.value.details} == {s.name for s in settings.SETTINGS
                                                          if s.required and "secret" in s.modes}


def test_stand_in_authority_is_not_public():
    s = settings.load({**GOOD, "AZURE_AUTHORITY_HOST": "https://127.0.0.1:8443"})
    assert not s.is_public_authority
    assert settings.load({**GOOD, "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.us"}).is_public_authority


def test_import_reads_no_setting(monkeypatch):
    """Indexing must work with no setting at all: importing the app reads none."""
    import importlib

    for s in settings.SETTINGS:
        monkeypatch.delenv(s.name, raising=False)
    import function_app

    importlib.reload(function_app)
    assert len(function_app.app.get_functions()) == 14


def test_caller_settings_are_named_and_the_authority_normalised():
    api, tenant = "11111111-2222-3333-4444-555555555555", "72F988BF-86F1-41AF-91AB-2D7CD011DB47"
    s = settings.load_callers({"INTAKE_CALLER_AUTH": "entra", "INTAKE_API_CLIENT_ID": api,
                               "INTAKE_API_TENANT_ID": tenant})
    assert s.authority == "https://login.microsoftonline.com" and s.tenant_id == tenant.lower()
    assert s.v1_issuer == f"https://sts.windows.net/{tenant.lower()}/"
    assert s.audiences == [api, f"api://{api}", f"api://{api}/"]
    s = settings.load_callers({"INTAKE_API_CLIENT_ID": api, "INTAKE_API_TENANT_ID": tenant,
                               "AZURE_AUTHORITY_HOST": "https://login.partner.microsoftonline.cn/"})
    assert s.openid_configuration.startswith("https://login.partner.microsoftonline.cn/72f988bf")
    assert s.v1_issuer.startswith("https://sts.chinacloudapi.cn/")
    with pytest.raises(IntakeError) as caught:
        settings.load_callers({"INTAKE_CALLER_AUTH": "keys", "INTAKE_API_CLIENT_ID": "x"})
    assert [d["field"] for d in caught.value.details] == ["INTAKE_CALLER_AUTH", "INTAKE_API_CLIENT_ID",
                                                          "INTAKE_API_TENANT_ID"]
    assert settings.caller_mode({}) == "function_key"
    assert settings.caller_mode({"INTAKE_CALLER_AUTH": " Entra "}) == "entra"
