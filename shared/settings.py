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


@dataclass(frozen=True)
class Setting:
    name: str
    required: bool
    default: str | None
    meaning: str


# The settings the code reads. The deployment template's app settings are checked against this list.
SETTINGS: tuple[Setting, ...] = (
    Setting("DYNAMICS_URL", True, None, "https://<org>.crm.dynamics.com, the Dataverse environment URL"),
    Setting("DYNAMICS_TENANT_ID", True, None, "Directory (tenant) ID of the Dynamics app registration"),
    Setting("DYNAMICS_CLIENT_ID", True, None, "Application (client) ID of the Dynamics app registration"),
    Setting("KEY_VAULT_URL", True, None, "https://<vault>.vault.azure.net, the vault holding the client secret"),
    Setting("DYNAMICS_CLIENT_SECRET_NAME", False, "dynamics-client-secret", "name of the secret in the vault"),
    Setting("DYNAMICS_API_VERSION", False, "v9.2", "Dataverse Web API version"),
    Setting("AZURE_AUTHORITY_HOST", False, None, "Entra ID authority host; default Microsoft's public cloud"),
)


@dataclass(frozen=True)
class Settings:
    dynamics_url: str
    tenant_id: str
    client_id: str
    key_vault_url: str
    secret_name: str
    api_version: str
    authority_host: str | None

    @property
    def api_base(self) -> str:
        return f"{self.dynamics_url}/api/data/{self.api_version}/"

    @property
    def scope(self) -> str:
        return f"{self.dynamics_url}/.default"

    @property
    def is_public_authority(self) -> bool:
        """MSAL's instance discovery only makes sense against Microsoft's own login hosts."""
        host = urlsplit(self.authority_host or "https://login.microsoftonline.com").hostname or ""
        return host.startswith("login.") and host.endswith(
            (".microsoftonline.com", ".microsoftonline.us", ".partner.microsoftonline.cn"))

    def fix_args(self) -> dict[str, str]:
        """Values the operator-facing fix texts may name (never a secret)."""
        return {"secret_name": self.secret_name, "client_id": self.client_id,
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
    raw = {s.name: (env.get(s.name) or "").strip() or s.default for s in SETTINGS}
    problems: list[dict] = []
    for s in SETTINGS:
        if s.required and not raw[s.name]:
            problems.append({"field": s.name, "problem": f"{s.name} is required ({s.meaning})"})
    url = _https_origin("DYNAMICS_URL", raw["DYNAMICS_URL"], problems) if raw["DYNAMICS_URL"] else ""
    vault = _https_origin("KEY_VAULT_URL", raw["KEY_VAULT_URL"], problems) if raw["KEY_VAULT_URL"] else ""
    for name in ("DYNAMICS_TENANT_ID", "DYNAMICS_CLIENT_ID"):
        if raw[name] and not _GUID.match(raw[name]):
            problems.append({"field": name, "problem": f"{name} must be a GUID"})
    if not _SECRET_NAME.match(raw["DYNAMICS_CLIENT_SECRET_NAME"] or ""):
        problems.append({"field": "DYNAMICS_CLIENT_SECRET_NAME",
                         "problem": "DYNAMICS_CLIENT_SECRET_NAME must be 1-127 letters, digits and dashes"})
    if not _API_VERSION.match(raw["DYNAMICS_API_VERSION"] or ""):
        problems.append({"field": "DYNAMICS_API_VERSION", "problem": "DYNAMICS_API_VERSION must look like v9.2"})
    authority = raw["AZURE_AUTHORITY_HOST"]
    if authority:
        authority = _https_origin("AZURE_AUTHORITY_HOST", authority, problems)
    if problems:
        raise IntakeError("config_invalid", "; ".join(p["problem"] for p in problems), details=problems)
    return Settings(dynamics_url=url, tenant_id=raw["DYNAMICS_TENANT_ID"].lower(),
                    client_id=raw["DYNAMICS_CLIENT_ID"].lower(), key_vault_url=vault,
                    secret_name=raw["DYNAMICS_CLIENT_SECRET_NAME"], api_version=raw["DYNAMICS_API_VERSION"],
                    authority_host=authority or None)
