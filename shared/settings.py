"""App settings, read and validated on first use, never at import.

A missing setting must not stop the host from indexing the functions; it must instead produce an
error that names the setting and says what is wrong with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import IntakeError

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SECRET_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_API_VERSION = re.compile(r"^v\d+\.\d+$")


AUTH_MODES = ("secret", "certificate", "federated", "managed_identity")
_APP = ("secret", "certificate", "federated")  # the modes that sign in as the Dynamics app registration
_VAULT = ("secret", "certificate")  # the modes that read Key Vault


@dataclass(frozen=True)
class Setting:
    name: str
    required: bool  # within the modes that use it
    default: str | None
    meaning: str
    modes: tuple[str, ...] = AUTH_MODES  # the DYNAMICS_AUTH modes that read it; set under another: config_invalid


# The settings the code reads. The deployment template's app settings are checked against this list.
SETTINGS: tuple[Setting, ...] = (
    Setting("DYNAMICS_AUTH", False, "secret", "how the app proves itself to Dataverse: " + ", ".join(AUTH_MODES)),
    Setting("DYNAMICS_URL", True, None, "https://<org>.crm.dynamics.com, the Dataverse environment URL"),
    Setting("DYNAMICS_TENANT_ID", True, None, "Directory (tenant) ID of the Dynamics app registration", _APP),
    Setting("DYNAMICS_CLIENT_ID", True, None, "Application (client) ID of the Dynamics app registration", _APP),
    Setting("KEY_VAULT_URL", True, None, "https://<vault>.vault.azure.net, the vault holding the client secret or "
                                         "certificate", _VAULT),
    Setting("DYNAMICS_CLIENT_SECRET_NAME", False, "dynamics-client-secret", "name of the secret in the vault",
            ("secret",)),
    Setting("DYNAMICS_CLIENT_CERTIFICATE_NAME", False, "dynamics-client-certificate",
            "name of the Key Vault certificate (its private key is read through the secret of that name)",
            ("certificate",)),
    Setting("DYNAMICS_API_VERSION", False, "v9.2", "Dataverse Web API version"),
    Setting("INTAKE_DATAVERSE_CONCURRENCY", False, "24", "this instance's limit of concurrent Dataverse requests "
            "(the fleet shares 52: instances x this stays within it; x-ms-dop-hint may lower it)"),
    Setting("INTAKE_DEFERRAL_MAX_HOURS", False, "24", "how long a queue message may be deferred for a cause outside "
            "it (throttling, an outage) before it is set aside in <queue>-poison"),
    Setting("INTAKE_BATCH_SIZE", False, "10", "at most this many concurrent creates of one instance go to Dataverse "
            "as one $batch request (1: every create alone)"),
    Setting("INTAKE_BATCH_WINDOW_MS", False, "20", "how long the first of concurrent creates waits for others to "
            "join its $batch (a create with nothing else in flight never waits)"),
    Setting("INTAKE_NOTE_MAX_BYTES", False, "5242880", "the largest note attachment the notes routes accept, in "
            "bytes of its base64 text (Dataverse's default maxuploadfilesize; keep it at most the organization's)"),
    Setting("INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID", False, None, "the account a case is filed under when its event "
            "names no customer (an anonymous caller); unset: such an event is refused"),
    Setting("INTAKE_ALERT_ACCOUNT_ID", False, None, "the account the cases of /api/alerts (Azure Monitor) are filed "
            "under; unset: INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID"),
    Setting("AZURE_AUTHORITY_HOST", False, None, "Entra ID authority host; default Microsoft's public cloud"),
    Setting("INTAKE_CALLER_AUTH", False, "function_key", "how callers of the HTTP routes prove who they are: "
            "function_key (a function key) or entra (an Entra ID access token with an app role); read at import"),
    Setting("INTAKE_API_CLIENT_ID", False, None, "required when INTAKE_CALLER_AUTH=entra: application (client) id of "
            "the intake API's app registration (a token's aud must be it or api://<it>)"),
    Setting("INTAKE_API_TENANT_ID", False, None, "required when INTAKE_CALLER_AUTH=entra: directory (tenant) id the "
            "callers' tokens are issued in"),
)
CALLER_MODES = ("function_key", "entra")
PUBLIC_AUTHORITY = "https://login.microsoftonline.com"


def default(name: str) -> str:
    """A setting's default, from the one list (for code that must go on while the settings are wrong)."""
    return next(s.default or "" for s in SETTINGS if s.name == name)


@dataclass(frozen=True)
class Settings:
    dynamics_url: str
    tenant_id: str
    client_id: str
    key_vault_url: str
    secret_name: str
    api_version: str
    authority_host: str | None
    auth: str = "secret"
    certificate_name: str = "dynamics-client-certificate"
    identity_client_id: str | None = None  # AZURE_CLIENT_ID: the user-assigned managed identity, if any
    dataverse_concurrency: int = 24
    deferral_max_hours: float = 24.0
    batch_size: int = 10
    batch_window_ms: float = 20.0
    note_max_bytes: int = 5_242_880
    default_account_id: str | None = None
    alert_account_id: str | None = None

    @property
    def api_base(self) -> str:
        return f"{self.dynamics_url}/api/data/{self.api_version}/"

    @property
    def scope(self) -> str:
        return f"{self.dynamics_url}/.default"

    @property
    def uses_vault(self) -> bool:
        return self.auth in _VAULT

    @property
    def is_public_authority(self) -> bool:
        """MSAL's instance discovery only makes sense against Microsoft's own login hosts."""
        return is_public_authority(self.authority_host)

    def fix_args(self) -> dict[str, str]:
        """Values the operator-facing fix texts may name (never a secret)."""
        client = self.client_id if self.auth != "managed_identity" else (
            self.identity_client_id or "of the Function App's system-assigned managed identity")
        return {"secret_name": self.secret_name, "certificate_name": self.certificate_name, "client_id": client,
                "environment": urlsplit(self.dynamics_url).hostname or self.dynamics_url}


def _https_origin(name: str, value: str, problems: list[dict]) -> str:
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or parts.path or parts.query or parts.fragment \
            or parts.username or parts.password:
        problems.append({"field": name, "problem": f"{name} must be an https origin such as https://host, "
                                                   f"with no path, query or credentials"})
    return value


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting, reporting all problems at once."""
    env = os.environ if environ is None else environ
    given = {s.name: (env.get(s.name) or "").strip() for s in SETTINGS}
    raw = {s.name: given[s.name] or s.default for s in SETTINGS}
    problems: list[dict] = []
    auth = (raw["DYNAMICS_AUTH"] or "").lower()
    if auth not in AUTH_MODES:
        problems.append({"field": "DYNAMICS_AUTH", "problem": f"DYNAMICS_AUTH must be one of {', '.join(AUTH_MODES)}"})
        auth = "secret"
    for s in SETTINGS:
        if auth not in s.modes:
            if given[s.name]:
                problems.append({"field": s.name, "problem": f"{s.name} is not used when DYNAMICS_AUTH={auth}: "
                                                             "remove it, or choose the mode that uses it"})
            raw[s.name] = s.default if s.default is not None else ""
        elif s.required and not raw[s.name]:
            problems.append({"field": s.name, "problem": f"{s.name} is required ({s.meaning})"})
    identity = (env.get("AZURE_CLIENT_ID") or "").strip() or None
    if auth == "federated" and not identity:
        problems.append({"field": "AZURE_CLIENT_ID", "problem": "AZURE_CLIENT_ID is required when "
                         "DYNAMICS_AUTH=federated: the client id of the user-assigned managed identity that the app "
                         "registration trusts (a system-assigned identity cannot be a federated credential)"})
    url = _https_origin("DYNAMICS_URL", raw["DYNAMICS_URL"], problems) if raw["DYNAMICS_URL"] else ""
    vault = _https_origin("KEY_VAULT_URL", raw["KEY_VAULT_URL"], problems) if raw["KEY_VAULT_URL"] else ""
    for name in ("DYNAMICS_TENANT_ID", "DYNAMICS_CLIENT_ID", "INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID",
                 "INTAKE_ALERT_ACCOUNT_ID"):
        if raw[name] and not _GUID.match(raw[name]):
            problems.append({"field": name, "problem": f"{name} must be a GUID"})
    if identity is not None and not _GUID.match(identity):
        problems.append({"field": "AZURE_CLIENT_ID", "problem": "AZURE_CLIENT_ID must be a GUID"})
    for name in ("DYNAMICS_CLIENT_SECRET_NAME", "DYNAMICS_CLIENT_CERTIFICATE_NAME"):
        if not _SECRET_NAME.match(raw[name] or ""):
            problems.append({"field": name, "problem": f"{name} must be 1-127 letters, digits and dashes"})
    numbers: dict[str, float] = {}
    for name, low, high in (("INTAKE_DATAVERSE_CONCURRENCY", 1, 1000), ("INTAKE_DEFERRAL_MAX_HOURS", 0.01, 168),
                            ("INTAKE_BATCH_SIZE", 1, 1000), ("INTAKE_BATCH_WINDOW_MS", 0, 1000),
                            ("INTAKE_NOTE_MAX_BYTES", 1, 131_072_000)):
        try:
            numbers[name] = float(raw[name] or "")
            whole = name.endswith(("CONCURRENCY", "SIZE", "BYTES"))
            if not low <= numbers[name] <= high or (whole and not numbers[name].is_integer()):
                raise ValueError
        except ValueError:
            problems.append({"field": name, "problem": f"{name} must be a number from {low} to {high}"})
    if not _API_VERSION.match(raw["DYNAMICS_API_VERSION"] or ""):
        problems.append({"field": "DYNAMICS_API_VERSION", "problem": "DYNAMICS_API_VERSION must look like v9.2"})
    authority = raw["AZURE_AUTHORITY_HOST"]
    if authority:
        authority = _https_origin("AZURE_AUTHORITY_HOST", authority, problems)
    if problems:
        raise IntakeError("config_invalid", "; ".join(p["problem"] for p in problems), details=problems)
    return Settings(dynamics_url=url, tenant_id=(raw["DYNAMICS_TENANT_ID"] or "").lower(),
                    client_id=(raw["DYNAMICS_CLIENT_ID"] or "").lower(), key_vault_url=vault,
                    secret_name=raw["DYNAMICS_CLIENT_SECRET_NAME"], api_version=raw["DYNAMICS_API_VERSION"],
                    authority_host=authority or None, auth=auth,
                    certificate_name=raw["DYNAMICS_CLIENT_CERTIFICATE_NAME"],
                    identity_client_id=identity.lower() if identity else None,
                    dataverse_concurrency=int(numbers["INTAKE_DATAVERSE_CONCURRENCY"]),
                    deferral_max_hours=numbers["INTAKE_DEFERRAL_MAX_HOURS"],
                    batch_size=int(numbers["INTAKE_BATCH_SIZE"]), batch_window_ms=numbers["INTAKE_BATCH_WINDOW_MS"],
                    note_max_bytes=int(numbers["INTAKE_NOTE_MAX_BYTES"]),
                    default_account_id=(raw["INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID"] or "").lower() or None,
                    alert_account_id=(raw["INTAKE_ALERT_ACCOUNT_ID"] or raw["INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID"]
                                      or "").lower() or None)


@dataclass(frozen=True)
class CallerSettings:
    """What the caller check needs (INTAKE_CALLER_AUTH=entra); read on first use, like every other setting."""

    api_client_id: str
    tenant_id: str
    authority: str  # AZURE_AUTHORITY_HOST as azure-identity reads it: an https origin, the public cloud by default

    @property
    def audiences(self) -> list[str]:
        return [self.api_client_id, f"api://{self.api_client_id}", f"api://{self.api_client_id}/"]

    @property
    def openid_configuration(self) -> str:
        return f"{self.authority}/{self.tenant_id}/v2.0/.well-known/openid-configuration"

    @property
    def v1_issuer(self) -> str:
        """The v1 issuer of the authority's cloud: sts.windows.net everywhere but Microsoft's China cloud."""
        host = urlsplit(self.authority).hostname or ""
        sts = "https://sts.chinacloudapi.cn" if host.endswith(".microsoftonline.cn") else "https://sts.windows.net"
        return f"{sts}/{self.tenant_id}/"


def caller_mode(environ: Mapping[str, str] | None = None) -> str:
    """INTAKE_CALLER_AUTH as given (lower case), its default when unset; may be a value that is no mode."""
    env = os.environ if environ is None else environ
    return (env.get("INTAKE_CALLER_AUTH") or "").strip().lower() or default("INTAKE_CALLER_AUTH")


def load_callers(environ: Mapping[str, str] | None = None) -> CallerSettings:
    """The caller check's settings, every problem named at once (config_invalid)."""
    env = os.environ if environ is None else environ
    problems: list[dict] = []
    if caller_mode(env) not in CALLER_MODES:
        problems.append({"field": "INTAKE_CALLER_AUTH",
                         "problem": f"INTAKE_CALLER_AUTH must be one of {', '.join(CALLER_MODES)}"})
    values = {}
    for name in ("INTAKE_API_CLIENT_ID", "INTAKE_API_TENANT_ID"):
        values[name] = (env.get(name) or "").strip().lower()
        if not values[name]:
            problems.append({"field": name, "problem": f"{name} is required when INTAKE_CALLER_AUTH=entra"})
        elif not _GUID.match(values[name]):
            problems.append({"field": name, "problem": f"{name} must be a GUID"})
    authority = (env.get("AZURE_AUTHORITY_HOST") or "").strip()
    authority = _https_origin("AZURE_AUTHORITY_HOST", authority, problems) if authority else PUBLIC_AUTHORITY
    if problems:
        raise IntakeError("config_invalid", "; ".join(p["problem"] for p in problems), details=problems)
    return CallerSettings(values["INTAKE_API_CLIENT_ID"], values["INTAKE_API_TENANT_ID"], authority)


def is_public_authority(authority_host: str | None) -> bool:
    """Is AZURE_AUTHORITY_HOST (None: the public cloud) one of Microsoft's own login hosts? Elsewhere (a
    stand-in) a credential needs `disable_instance_discovery`, or MSAL asks login.microsoftonline.com."""
    host = urlsplit(authority_host or "https://login.microsoftonline.com").hostname or ""
    return host.startswith("login.") and host.endswith(
        (".microsoftonline.com", ".microsoftonline.us", ".partner.microsoftonline.cn"))
