"""Fixtures: the HTTPS stand-in wired into the app's settings, Azurite, and a leak check for every test.

The leak check is the suite-wide promise that no client secret and no access token the stand-in
issued ever reaches a log record or a response body a test saw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import azure.functions as func
import pytest

from devstack.standin import StandIn
from shared import instance
from tests.hostsim import Context

LEAK_CHECKED = {"tests": 0, "log_records": 0, "responses": 0}


def find_leaks(texts: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    """Each text that holds a forbidden value, with every forbidden value in it masked (safe to print)."""
    values = sorted({v for v in forbidden if v}, key=len, reverse=True)
    found = []
    for text in texts:
        if any(v in text for v in values):
            masked = text
            for v in values:
                masked = masked.replace(v, f"<{len(v)} chars masked>")
            found.append(masked)
    return found


def check_no_leaks(texts: Iterable[str], forbidden: Iterable[str]) -> None:
    """The leak check run after every test that uses `stack`; raises AssertionError naming the first leak."""
    leaked = find_leaks(texts, forbidden)
    assert not leaked, f"a secret or token reached a log or a response ({len(leaked)} texts): {leaked[0][:200]}"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is itself a finding, keep its raw parts
            text = f"{record.msg} {record.args}"
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.texts.append(text)


@pytest.fixture(autouse=True)
def captured_logs() -> Iterator[_Capture]:
    """Every log record of the test, at DEBUG, from every logger (SDKs included)."""
    handler = _Capture()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


class Stack:
    """The stand-in, the app's environment pointing at it, and every response body the test received."""

    def __init__(self, si: StandIn) -> None:
        self.si = si
        self.bodies: list[str] = []

    def call(self, fn: Any, method: str = "POST", route: str = "api/cases", body: Any = None,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict, func.HttpResponse]:
        """Invoke an HTTP function the way the host does, and keep the body for the leak check."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        req = func.HttpRequest(method=method, url=f"http://localhost/{route}", headers=headers or {}, body=data)
        user_fn = fn.build().get_user_function()
        ctx = Context()
        try:
            resp = user_fn(req, ctx)
        except TypeError:  # health takes no context
            resp = user_fn(req)
        text = resp.get_body().decode()
        self.bodies.append(text)
        return resp.status_code, json.loads(text) if text else {}, resp

    def secrets(self) -> list[str]:
        """Everything that must never be shown: every secret value and every token issued."""
        values = [self.si.dynamics_secret, self.si.kv_secret, *self.si.issued_tokens]
        values += list(getattr(self.si, "retired_secrets", []))
        for value in self.si.vault.all_values():  # certificates' private keys too (PEM lines, PFX base64)
            values += [line for line in value.splitlines() if len(line) > 40 and "CERTIFICATE" not in line] or [value]
        return [v for v in values if v]


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn(hold_seconds=2.0) as si:
        yield si
        assert si.errors == [], si.errors


@pytest.fixture
def stack(standin: StandIn, monkeypatch: pytest.MonkeyPatch, captured_logs: _Capture) -> Iterator[Stack]:
    """The app's settings point at the stand-in; the per-instance objects start fresh and short-timed."""
    for name, value in standin.settings_env().items():
        monkeypatch.setenv(name, value)
    instance.reset(read_timeout=1.0, backoff=0.05)
    st = Stack(standin)
    secret_values = set()
    original_rotate = standin.rotate_dynamics_secret

    def rotate(*args: Any, **kwargs: Any) -> str:
        secret_values.add(standin.dynamics_secret)
        return original_rotate(*args, **kwargs)

    standin.rotate_dynamics_secret = rotate  # type: ignore[method-assign]
    yield st
    instance.reset()
    check_no_leaks(captured_logs.texts + st.bodies, set(st.secrets()) | secret_values)
    LEAK_CHECKED["tests"] += 1
    LEAK_CHECKED["log_records"] += len(captured_logs.texts)
    LEAK_CHECKED["responses"] += len(st.bodies)


@pytest.fixture
def storage_env(azurite, stack, monkeypatch, request):
    """The function's own queues on Azurite (the test module's QUEUES, else cases and cases-poison), the app's
    AzureWebJobsStorage pointing at them, empty before and after."""
    from tools.queues import ensure, queue_client

    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    names = getattr(request.module, "QUEUES", ("cases", "cases-poison"))
    clients = [ensure(queue_client(azurite.connection_string, q)) for q in names]
    for c in clients:
        c.clear_messages()
    yield azurite.connection_string
    for c in clients:
        c.clear_messages()


@pytest.fixture(scope="session")
def azurite() -> Iterator[Any]:
    from tests.azurite import Azurite

    az = Azurite()
    yield az
    az.stop()


@pytest.fixture
def oauth_azurite(standin: StandIn) -> Iterator[Any]:
    """A second Azurite, over HTTPS (the stand-in's trustme certificate) with `--oauth basic`: it lets in a
    bearer token for https://storage.azure.com from the stand-in's Entra ID, as a keyless account would."""
    from tests.azurite import Azurite

    az = Azurite(oauth_tls=(standin.tls.cert_path, standin.tls.key_path))
    yield az
    az.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEAK_CHECKED["tests"]:
        terminalreporter.write_line(
            f"leak check: {LEAK_CHECKED['tests']} tests, {LEAK_CHECKED['log_records']} log records and "
            f"{LEAK_CHECKED['responses']} response bodies hold no client secret and no issued token")
