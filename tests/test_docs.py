"""The README explains every code the app can answer, and no code it cannot."""

from __future__ import annotations

import re
from pathlib import Path

from shared.errors import CODES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
DIAGNOSTICS_ONLY = {"keyvault_secret_expiring", "keyvault_certificate_expiring", "queue_poisoned",
                    "queue_storage_unreachable", "queue_storage_forbidden", "queue_storage_error"}


def table_codes() -> set[str]:
    section = README.split("## Error codes and troubleshooting", 1)[1].split("### Patterns", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))


def test_every_code_has_a_row_and_every_row_is_a_code():
    assert table_codes() == set(CODES) | DIAGNOSTICS_ONLY


def test_statuses_in_the_table_match_the_code_table():
    section = README.split("## Error codes and troubleshooting", 1)[1].split("### Patterns", 1)[0]
    for code, spec in CODES.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{code}` |")]
        assert row.split("|")[2].strip() == str(spec.status), code


def test_cause_and_fix_in_the_table_are_the_code_table_s():
    """The README's cause and fix columns say exactly what the code table says (placeholders shown as names)."""
    section = README.split("## Error codes and troubleshooting", 1)[1].split("### Patterns", 1)[0]
    names = {"secret_name": "`<DYNAMICS_CLIENT_SECRET_NAME>`", "client_id": "`<DYNAMICS_CLIENT_ID>`",
             "environment": "your environment", "certificate_name": "`<DYNAMICS_CLIENT_CERTIFICATE_NAME>`"}
    stale = []
    for code, spec in CODES.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{code}` |")]
        cells = [c.strip() for c in row.split(" | ")]
        if (cells[3], cells[4]) != (spec.cause, spec.fix.format(**names)):
            stale.append(code)
    assert not stale, f"README rows that differ from shared/errors.py: {stale}"


def test_settings_table_is_the_settings_module():
    from shared.settings import SETTINGS

    section = README.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = {m[0]: m for m in re.findall(r"^\| `([A-Z_]+)` \| (yes|no)[^|]* \| ([^|]+) \|", section, flags=re.M)}
    assert set(rows) == {s.name for s in SETTINGS}
    for s in SETTINGS:
        _, required, modes = rows[s.name]
        assert (required == "yes") == s.required, s.name
        assert modes.strip() == ("all" if len(s.modes) == 4 else ", ".join(s.modes)), s.name
        if s.default:
            assert f"`{s.default}`" in [line for line in section.splitlines() if f"`{s.name}`" in line][0]


def test_quick_start_commands_exist_and_ci_calls_the_test_command():
    root = Path(__file__).resolve().parent.parent
    quick = README.split("## Quick start", 1)[1].split("###", 1)[0]
    assert "./scripts/run-local.sh" in quick and "./scripts/test.sh" in quick
    assert "./scripts/test.sh" in (root / ".ci" / "run").read_text()


def test_readme_producer_example_runs_and_the_function_can_read_it(azurite):
    """The README's queue example, run as written (connection string aside), yields a base64 message."""
    import base64
    import json

    from azure.storage.queue import QueueClient

    block = README.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'TextBase64EncodePolicy()' in block
    exec(compile(block.replace('"UseDevelopmentStorage=true"', repr(azurite.connection_string)), "README", "exec"),
         {})
    raw = QueueClient.from_connection_string(azurite.connection_string, "cases")  # no decode policy: as stored
    (msg,) = list(raw.receive_messages(max_messages=1))
    event = json.loads(base64.b64decode(msg.content))
    assert event["externalId"] == "alert-4711"
    raw.delete_message(msg)
