"""The per-instance objects, built once on first use and shared by every invocation in the process.

Settings, the vault secret, the token and the connection pool live for the life of the worker, so
the per-request path does none of that work again.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from shared import settings as settings_mod
from shared import telemetry
from shared.dataverse import DataverseClient
from shared.intake import Intake
from shared.proofs import proof_for
from shared.tokens import TokenProvider

_lock = threading.Lock()
_intake: Intake | None = None
_options: dict[str, Any] = {}


def token_provider(s: settings_mod.Settings, source: Any = None) -> TokenProvider:
    """The chain every Dataverse call stands on: settings > proof (vault secret, certificate, federation,
    managed identity) > tokens. Diagnostics walks the same chain, built here, with its own secret source."""
    return TokenProvider(s, proof_for(s, source))


def dataverse_client(s: settings_mod.Settings, tokens: Any, **options: Any) -> DataverseClient:
    """A record writer on `tokens`, with the options the instance was reset with (tests, benchmarks)."""
    return DataverseClient(s, tokens, **{**_options, **options})


def intake() -> Intake:
    """The instance's intake service; raises IntakeError(config_invalid) while a setting is wrong."""
    global _intake
    held = _intake
    if held is not None:
        return held
    with _lock:
        if _intake is None:
            s = settings_mod.load()
            client = dataverse_client(s, token_provider(s))
            telemetry.get().observe_concurrency(lambda: client.gate.limit)
            _intake = Intake(client)
        return _intake


def settings() -> settings_mod.Settings:
    """The instance's settings (raises IntakeError(config_invalid) while one is wrong)."""
    return intake().client.settings


def default_account() -> str | None:
    """INTAKE_DEFAULT_CUSTOMER_ACCOUNT_ID, or None (also while a setting is wrong: intake then says which)."""
    from shared.errors import IntakeError

    try:
        return settings().default_account_id
    except IntakeError:
        return None


def reset(**client_options: Any) -> None:
    """Forget the instance's objects (tests, benchmarks); options go to the next DataverseClient."""
    global _intake
    from shared import breaker, diagnostics

    diagnostics.forget()
    breaker.reset()
    tokens = sys.modules.get("shared.caller_tokens")  # never imported here: it loads PyJWT (entra mode only)
    if tokens is not None:
        tokens.reset()
    with _lock:
        if _intake is not None:
            _intake.client.close()
        _intake = None
        _options.clear()
        _options.update(client_options)


# azure-core logs every request's headers at INFO; the host would ship them all. urllib3 logs every URL at
# DEBUG, query string included: a contact lookup's filter holds the customer's email or phone. Warnings pass.
for _name in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3", "msal"):
    logging.getLogger(_name).setLevel(logging.WARNING)
