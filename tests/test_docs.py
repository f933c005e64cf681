"""The README explains every code the app can answer, and no code it cannot."""

from __future__ import annotations

import re
from pathlib import Path

from shared.errors import CODES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
DIAGNOSTICS_ONLY = {"keyvault_secret_expiring"}


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


def test_quick_start_commands_exist_and_ci_calls_the_test_command():
    root = Path(__file__).resolve().parent.parent
    quick = README.split("## Quick start", 1)[1].split("###", 1)[0]
    assert "./scripts/run-local.sh" in quick and "./scripts/test.sh" in quick
    assert "./scripts/test.sh" in (root / ".ci" / "run").read_text()
