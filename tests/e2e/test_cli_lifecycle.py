"""The key-lifecycle and drift commands of the CLI, end to end.

``keys list|compromise|cleanup-retired|due|rotate --due``, ``master-key rewrap``,
``tenants erase`` and ``drift diagnose|repair``: output, JSON, confirmation prompts, --yes and
exit codes, through CliRunner on SQLite, one scenario on PostgreSQL and the installed script.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from conftest import POSTGRES_URL, cli_environment, own_schema
from keyledger import SecretService
from keyledger.cli import main
from keyledger.infrastructure.crypto import MasterKey

MASTER_KEY = "3c9e1f7a2b5d4e60" * 4
NEW_MASTER_KEY = "9f8e7d6c5b4a3921" * 4
SCRIPT = Path(sys.executable).parent / "keyledger"
KEY_HEADERS = ["VERSION", "STATUS", "AMK", "CREATED", "RETIRED", "SECRETS"]
ISSUE_HEADERS = ["CODE", "SEVERITY", "SECRET", "VERSION", "REPAIR", "MESSAGE"]


@pytest.fixture(autouse=True)
def database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh SQLite store and a master key in the environment, nothing else of ours."""
    path = tmp_path / "cli.db"
    cli_environment(monkeypatch, f"sqlite:///{path}", MASTER_KEY)
    return path


def run(*args: str, stdin: str | None = None) -> Result:
    """Invoke the CLI in-process; stdin is a pipe, never a terminal."""
    return CliRunner().invoke(main, list(args), input=stdin)


def ok(*args: str, stdin: str | None = None) -> Result:
    """Invoke and insist on success."""
    result = run(*args, stdin=stdin)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def as_json(*args: str, stdin: str | None = None) -> Any:
    """Invoke with --json and parse stdout."""
    return json.loads(ok("--json", *args, stdin=stdin).stdout)


def fails(*args: str, stdin: str | None = None) -> Result:
    """Invoke and insist on exit status 1 with a single ``Error: ...`` line, no traceback."""
    result = run(*args, stdin=stdin)
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
    return result


def assert_usage_error(result: Result, fragment: str) -> None:
    """Exit 2 with click's usage message naming the problem, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert fragment in result.stderr
    assert result.stdout == ""


def assert_aborted(result: Result, prompt: str) -> None:
    """A declined confirmation: the prompt was shown on stderr, exit 1, nothing on stdout."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert prompt in result.stderr
    assert "Aborted!" in result.stderr
    assert result.stdout == ""


UNANSWERED = (
    "Error: no answer to the confirmation (standard input is closed); nothing was changed. "
    "Pass --yes to confirm in advance."
)


def assert_unanswered(result: Result, prompt: str) -> None:
    """A confirmation nobody could answer (stdin closed, as in a script): the prompt, then
    one error line that names --yes, exit 1, nothing on stdout."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert prompt in result.stderr
    assert result.stderr.splitlines()[-1] == UNANSWERED
    assert "Aborted!" not in result.stderr
    assert result.stdout == ""


def put(tenant_id: str, name: str, value: str) -> None:
    ok("secrets", "put", tenant_id, name, stdin=value)


def get(tenant_id: str, name: str) -> str:
    return ok("secrets", "get", tenant_id, name).stdout


def keys(tenant_id: str) -> list[tuple[int, str, int]]:
    """(version, status, secret_count) of each key version of the tenant."""
    return [
        (k["version"], k["status"], k["secret_count"]) for k in as_json("keys", "list", tenant_id)
    ]


def live_names(tenant_id: str) -> list[str]:
    return [info["name"] for info in as_json("secrets", "list", tenant_id, "--status", "all")]


def codes(report: dict[str, Any]) -> list[str]:
    """The codes of a report's issues, without the lazy audit model's lag."""
    return [i["code"] for i in report["issues"] if i["code"] != "projection_behind"]


def audit_actions(tenant_id: str, action: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = as_json("audit", "log", tenant_id, "--action", action)
    return entries


# -- keys list ---------------------------------------------------------------------------


def test_keys_list_of_all_tenants_adds_a_tenant_column() -> None:
    put("acme", "a", "1")
    put("globex", "g", "2")
    ok("keys", "rotate", "acme")
    lines = ok("keys", "list", "--all-tenants").stdout.splitlines()
    assert lines[0].split() == ["TENANT", *KEY_HEADERS]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        ("acme", "1", "retired", "1"),
        ("acme", "2", "active", "0"),
        ("globex", "1", "active", "1"),
    ]
    data = as_json("keys", "list", "--all-tenants")
    assert [(k["tenant_id"], k["version"], k["status"]) for k in data] == [
        ("acme", 1, "retired"),
        ("acme", 2, "active"),
        ("globex", 1, "active"),
    ]
    assert {k["amk_id"] for k in data} == {data[0]["amk_id"]}
    assert ok("keys", "list", "acme").stdout.splitlines()[0].split() == KEY_HEADERS


def test_rotating_due_keys_goes_on_past_a_tenant_that_cannot_be_rotated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "a", "1")  # its key wrapped under MASTER_KEY
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)  # MASTER_KEY not kept
    put("globex", "g", "2")
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0.000000001")

    result = run("keys", "rotate", "--due")

    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert result.stdout.startswith("Key version 2 is now active for tenant 'globex' (")
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.startswith(
        "Error: cannot rotate the key of tenant 'acme': the active key version 1 is wrapped "
        "by master key "
    )
    assert len(result.stderr.splitlines()) == 1
    assert keys("acme") == [(1, "active", 1)]
    assert [status for _, status, _ in keys("globex")] == ["retired", "active"]
    [failure] = audit_actions("acme", "rotate_key")
    assert failure["result"] == "failure"


def test_rotating_due_keys_lists_the_failures_in_json_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: --json listed the rotations only; the failures were on stderr."""
    put("acme", "a", "1")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    put("globex", "g", "2")
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0.000000001")

    result = run("--json", "keys", "rotate", "--due")

    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert [k["tenant_id"] for k in data["rotated"]] == ["globex"]
    [failed] = data["failed"]
    assert failed["tenant_id"] == "acme"
    assert failed["error"].startswith("cannot rotate the key of tenant 'acme'")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "give TENANT or --all-tenants"),
        (("acme", "--all-tenants"), "give TENANT or --all-tenants, not both"),
    ],
)
def test_keys_list_needs_exactly_one_of_tenant_and_all_tenants(
    args: tuple[str, ...], fragment: str
) -> None:
    assert_usage_error(run("keys", "list", *args), fragment)


def test_keys_list_of_all_tenants_on_an_empty_store_prints_the_header() -> None:
    assert ok("keys", "list", "--all-tenants").stdout.split() == ["TENANT", *KEY_HEADERS]
    assert as_json("keys", "list", "--all-tenants") == []


# -- keys compromise ---------------------------------------------------------------------


def test_compromise_asks_for_confirmation_and_a_no_changes_nothing() -> None:
    put("acme", "a", "1")
    refused = run("keys", "compromise", "acme", "1", "--reason", "leaked", stdin="n\n")
    assert_aborted(refused, "Mark key version 1 of tenant 'acme' as compromised?")
    unanswered = run("keys", "compromise", "acme", "1", "--reason", "leaked", stdin="")
    assert_unanswered(unanswered, "Mark key version 1 of tenant 'acme' as compromised?")
    assert keys("acme") == [(1, "active", 1)]
    assert audit_actions("acme", "compromise_key") == []


def test_compromising_the_active_version_rotates_and_blocks_reads_until_stored_afresh() -> None:
    put("acme", "a", "1")
    put("acme", "b", "2")
    result = ok("keys", "compromise", "acme", "1", "--reason", "laptop stolen", stdin="y\n")
    assert result.stdout == (
        "Key version 1 of tenant 'acme' is compromised.\n"
        "Key version 2 is active.\n"
        "2 secret(s) are still under it and cannot be read: store their values afresh "
        "(`keyledger drift diagnose acme` lists them).\n"
    )
    assert keys("acme") == [(1, "compromised", 2), (2, "active", 0)]
    unreadable = fails("secrets", "get", "acme", "a")
    assert "compromised key version 1" in unreadable.stderr
    [entry] = audit_actions("acme", "compromise_key")
    assert (entry["key_version"], entry["details"]) == (1, {"reason": "laptop stolen"})
    assert entry["user_agent"].startswith("keyledger-cli/")

    report = as_json_report("drift", "diagnose", "acme", expect_exit=1)
    assert codes(report) == ["secret_on_compromised_key", "secret_on_compromised_key"]
    put("acme", "a", "fresh")
    assert get("acme", "a") == "fresh"
    assert keys("acme") == [(1, "compromised", 1), (2, "active", 1)]


def test_compromising_a_retired_version_in_json_mode_keeps_the_active_one() -> None:
    put("acme", "a", "1")
    ok("keys", "rotate", "acme")
    data = as_json("keys", "compromise", "acme", "1", "--reason", "old backup", "--yes")
    assert (data["version"], data["status"], data["secret_count"]) == (1, "compromised", 1)
    assert data["active_version"] == 2
    assert keys("acme") == [(1, "compromised", 1), (2, "active", 0)]
    again = ok("keys", "compromise", "acme", "1", "--reason", "again", "-y")
    assert again.stdout.startswith("Key version 1 of tenant 'acme' is compromised.\n")
    assert len(audit_actions("acme", "compromise_key")) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("acme", "1", "--yes"), "Missing option '--reason'"),
        (("acme", "0", "--reason", "r", "--yes"), "0 is not in the range x>=1"),
        (("acme", "one", "--reason", "r", "--yes"), "'one' is not a valid integer"),
        (("acme", "--reason", "r", "--yes"), "Missing argument 'VERSION'"),
    ],
)
def test_bad_compromise_arguments_are_usage_errors(args: tuple[str, ...], fragment: str) -> None:
    put("acme", "a", "1")
    assert_usage_error(run("keys", "compromise", *args), fragment)
    assert keys("acme") == [(1, "active", 1)]


def test_compromise_refusals_are_one_error_line() -> None:
    put("acme", "a", "1")
    unknown = fails("keys", "compromise", "acme", "7", "--reason", "r", "--yes")
    assert unknown.stderr == "Error: tenant 'acme' has no key version 7\n"
    blank = fails("keys", "compromise", "acme", "1", "--reason", "  ", "--yes")
    assert blank.stderr == "Error: a compromise needs a reason\n"
    nobody = fails("keys", "compromise", "nobody", "1", "--reason", "r", "--yes")
    assert nobody.stderr == "Error: tenant 'nobody' has no keys\n"
    assert keys("acme") == [(1, "active", 1)]
    # A mistyped tenant is refused before the confirmation asks (found by review).
    unasked = fails("keys", "compromise", "nobody", "1", "--reason", "r")
    assert unasked.stderr == "Error: tenant 'nobody' has no keys\n"


def test_a_compromise_without_a_reason_is_refused_before_asking() -> None:
    """Found by review: the confirmation came first, then the refusal."""
    put("acme", "a", "1")
    blank = fails("keys", "compromise", "acme", "1", "--reason", "  ")  # no --yes, no answer
    assert blank.stderr == "Error: a compromise needs a reason\n"
    assert "compromised?" not in blank.stdout + blank.stderr
    assert keys("acme") == [(1, "active", 1)]


# -- keys cleanup-retired ----------------------------------------------------------------


def retire_two_versions() -> None:
    """acme: versions 1 and 2 retired and unused after a reencrypt; globex: 1 retired in use."""
    put("acme", "a", "1")
    ok("keys", "rotate", "acme")
    ok("keys", "rotate", "acme")
    ok("keys", "reencrypt", "acme")
    put("globex", "g", "2")
    ok("keys", "rotate", "globex")


def test_cleanup_asks_for_confirmation_and_a_no_destroys_nothing() -> None:
    retire_two_versions()
    refused = run("keys", "cleanup-retired", "--older-than-days", "0", stdin="n\n")
    prompt = "Destroy the key material of every key version retired or compromised 0"
    assert_aborted(refused, prompt)
    unanswered = run("keys", "cleanup-retired", "--older-than-days", "0", stdin="")
    assert_unanswered(unanswered, prompt)
    assert keys("acme")[0] == (1, "retired", 0)


def test_cleanup_destroys_unused_retired_versions_and_reports_the_skipped_ones() -> None:
    retire_two_versions()
    result = ok("keys", "cleanup-retired", "--older-than-days", "0", stdin="y\n")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TENANT", "VERSION", "OUTCOME", "REASON"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["acme", "1", "destroyed"],
        ["acme", "2", "destroyed"],
        ["globex", "1", "skipped"],
    ]
    assert lines[3].endswith("key version 1 of tenant 'globex' still encrypts 1 live secret(s)")
    assert lines[4] == "Destroyed 2 retired or compromised key version(s), skipped 1 still in use."
    assert keys("acme") == [(1, "destroyed", 0), (2, "destroyed", 0), (3, "active", 1)]
    assert keys("globex") == [(1, "retired", 1), (2, "active", 0)]
    assert get("acme", "a") == "1"
    assert get("globex", "g") == "2"
    assert [e["key_version"] for e in audit_actions("acme", "destroy_key")] == [2, 1]


def test_cleanup_respects_the_age_and_speaks_json() -> None:
    retire_two_versions()
    assert as_json("keys", "cleanup-retired", "--yes") == {
        "destroyed": 0,
        "skipped": 0,
        "keys": [],
    }
    assert ok("keys", "cleanup-retired", "-y").stdout == (
        "Destroyed 0 retired or compromised key version(s), skipped 0 still in use.\n"
    )
    data = as_json("keys", "cleanup-retired", "--older-than-days", "0", "--yes")
    assert (data["destroyed"], data["skipped"]) == (2, 1)
    assert data["keys"][2] == {
        "tenant_id": "globex",
        "version": 1,
        "outcome": "skipped",
        "reason": "key version 1 of tenant 'globex' still encrypts 1 live secret(s)",
    }
    assert_usage_error(
        run("keys", "cleanup-retired", "--older-than-days", "-1", "--yes"), "--older-than-days"
    )


# -- keys due / keys rotate --due --------------------------------------------------------


def test_keys_due_lists_versions_over_the_encryption_budget_and_rotate_due_rotates_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_ENCRYPTIONS", "2")
    put("acme", "a", "1")
    put("acme", "b", "2")
    put("globex", "g", "3")
    lines = ok("keys", "due").stdout.splitlines()
    assert lines[0].split() == [
        *("TENANT", "VERSION", "CREATED", "AGE", "DAYS", "ENCRYPTIONS", "REASONS"),
    ]
    assert len(lines) == 2
    row = lines[1].split(maxsplit=5)
    assert (row[0], row[1], row[4], row[5]) == ("acme", "1", "2", "2 encryptions under it")
    [due] = as_json("keys", "due")
    assert (due["tenant_id"], due["version"], due["encryptions"]) == ("acme", 1, 2)
    assert due["reasons"] == ["2 encryptions under it"]

    rotated = ok("keys", "rotate", "--due")
    assert rotated.stdout == (
        "Key version 2 is now active for tenant 'acme' (version 1 was 2 encryptions under it).\n"
    )
    assert keys("acme") == [(1, "retired", 2), (2, "active", 0)]
    assert keys("globex") == [(1, "active", 1)]
    assert ok("keys", "due").stdout.split() == [
        *("TENANT", "VERSION", "CREATED", "AGE", "DAYS", "ENCRYPTIONS", "REASONS"),
    ]
    assert ok("keys", "rotate", "--due").stdout == "No key version is due for rotation.\n"
    assert as_json("keys", "rotate", "--due") == {"rotated": [], "failed": []}
    [entry] = audit_actions("acme", "rotate_key")
    assert entry["user_agent"].startswith("keyledger-cli/")


def test_keys_due_by_age_in_json_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    put("acme", "a", "1")
    put("globex", "g", "2")
    assert as_json("keys", "due") == []
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0.000000001")
    assert [d["tenant_id"] for d in as_json("keys", "due")] == ["acme", "globex"]
    rotated = as_json("keys", "rotate", "--due")["rotated"]
    assert [(k["tenant_id"], k["version"], k["status"]) for k in rotated] == [
        ("acme", 2, "active"),
        ("globex", 2, "active"),
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [((), "give TENANT or --due"), (("acme", "--due"), "give TENANT or --due, not both")],
)
def test_rotate_needs_exactly_one_of_tenant_and_due(args: tuple[str, ...], fragment: str) -> None:
    assert_usage_error(run("keys", "rotate", *args), fragment)


def test_an_invalid_rotation_policy_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0")
    assert fails("keys", "due").stderr == (
        "Error: invalid configuration: KEYLEDGER_KEY_MAX_AGE_DAYS (input should be greater "
        "than 0)\n"
    )


# -- master-key rewrap -------------------------------------------------------------------


def test_master_key_rotation_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    put("acme", "a", "one")
    ok("keys", "rotate", "acme")
    put("globex", "g", "two")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    before = as_json_reports("drift", "diagnose", "--all-tenants")
    assert [codes(r) for r in before] == [
        ["active_tenant_encryption_key_amk_mismatch", "secret_on_retired_key"],
        ["active_tenant_encryption_key_amk_mismatch"],
    ]
    assert all(report["ok"] for report in before)

    result = ok("master-key", "rewrap", "--yes")
    new_amk = as_json("keys", "list", "globex")[0]["amk_id"]
    assert result.stdout == (
        f"Re-wrapped 3 key version(s) under master key {new_amk}; 0 already current, 0 failed.\n"
    )
    assert result.stderr == ""
    assert as_json("master-key", "rewrap", "--yes") == {
        "amk_id": new_amk,
        "rewrapped": 0,
        "already_current": 3,
        "failed": 0,
        "failures": [],
        "failed_versions": [],
    }
    after = as_json_reports("drift", "diagnose", "--all-tenants")
    assert [codes(r) for r in after] == [["secret_on_retired_key"], []]
    assert [e["key_version"] for e in audit_actions("acme", "rewrap_key")] == [2, 1]

    monkeypatch.delenv("KEYLEDGER_PREVIOUS_MASTER_KEYS")
    assert (get("acme", "a"), get("globex", "g")) == ("one", "two")
    assert {k["amk_id"] for k in as_json("keys", "list", "--all-tenants")} == {new_amk}


def test_rewrap_without_the_old_master_key_lists_the_failures_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "a", "one")
    old_amk = as_json("keys", "list", "acme")[0]["amk_id"]
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    result = fails("master-key", "rewrap", "--yes")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Re-wrapped 0 key version(s) under master key ")
    assert lines[0].endswith("; 0 already current, 1 failed.")
    assert lines[1:] == [
        f"  failed: tenant 'acme' key version 1: wrapped by unknown master key {old_amk}"
    ]
    assert result.stderr.startswith("Error: 1 key version(s) could not be re-wrapped: add the")
    data = json.loads(run("--json", "master-key", "rewrap", "--yes").stdout)
    assert (data["rewrapped"], data["failed"]) == (0, 1)
    assert data["failed_versions"] == [  # for scripts, without parsing the sentences
        {"tenant_id": "acme", "version": 1, "amk_id": old_amk, "reason": "unknown_master_key"}
    ]
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MASTER_KEY)
    assert get("acme", "a") == "one"


def test_rewrap_shows_a_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyledger.cli.master_key.is_terminal", lambda stream: True)
    put("acme", "a", "one")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    result = ok("master-key", "rewrap", "--yes")
    assert "Re-wrapping" in result.stderr
    assert result.stdout.startswith("Re-wrapped 1 key version(s) under master key ")


def test_rewrap_without_a_master_key_is_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    put("acme", "a", "one")
    monkeypatch.delenv("KEYLEDGER_MASTER_KEY")
    result = fails("master-key", "rewrap", "--yes")
    assert result.stderr.startswith("Error: no master key configured")
    assert result.stdout == ""


# -- tenants erase -----------------------------------------------------------------------


def wrapped_material(path: Path, tenant_id: str) -> list[bytes]:
    """The wrapped key material of a tenant, read straight from the SQLite file."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT wrapped FROM kl_key_material WHERE tenant_id=?", (tenant_id,)
        ).fetchall()
    return [bytes(row[0]) for row in rows]


def test_erase_asks_for_confirmation_naming_the_tenant_and_a_no_erases_nothing() -> None:
    put("acme", "a", "1")
    refused = run("tenants", "erase", "acme", stdin="n\n")
    assert_aborted(refused, "Erase tenant 'acme'? Every value it ever stored becomes")
    assert get("acme", "a") == "1"
    assert_unanswered(run("tenants", "erase", "acme"), "Erase tenant 'acme'?")  # stdin at EOF
    assert get("acme", "a") == "1"


def test_erase_destroys_every_key_version_keeps_the_audit_and_leaves_others_alone(
    database: Path,
) -> None:
    put("acme", "a", "1")
    ok("keys", "rotate", "acme")
    put("acme", "b", "2")
    put("globex", "g", "3")
    material = wrapped_material(database, "acme")
    assert len(material) == 2
    result = ok("tenants", "erase", "acme", stdin="y\n")
    assert result.stdout == (
        "Erased tenant 'acme': destroyed key version(s) 1, 2. Its values are unrecoverable; "
        "its audit stream is kept.\n"
    )
    assert keys("acme") == [(1, "destroyed", 1), (2, "destroyed", 1)]
    assert wrapped_material(database, "acme") == []
    on_disk = b"".join(p.read_bytes() for p in database.parent.glob("cli.db*"))
    assert not any(blob in on_disk for blob in material)
    assert "cannot be decrypted" in fails("secrets", "get", "acme", "a").stderr
    assert get("globex", "g") == "3"
    [erased] = audit_actions("acme", "erase_tenant")
    assert erased["details"]["versions"] == [1, 2]
    assert [e["secret_name"] for e in audit_actions("acme", "create")] == ["b", "a"]

    assert ok("tenants", "erase", "acme", "--yes").stdout == (
        "Tenant 'acme' has no key version left to destroy.\n"
    )
    # A tenant that never had a key (a mistyped one) is refused, before any question
    # (found by review: it asked, then said there was nothing left to destroy, exit 0).
    nobody = fails("tenants", "erase", "nobody")
    assert nobody.stderr == "Error: tenant 'nobody' has no keys\n"


def test_an_erased_tenant_is_cleaned_up_by_a_confirmed_repair() -> None:
    put("acme", "a", "1")
    assert as_json("tenants", "erase", "acme", "-y") == {
        "tenant_id": "acme",
        "destroyed_key_versions": [1],
    }
    report = as_json_report("drift", "diagnose", "acme", expect_exit=1)
    assert "secret_envelope_missing_tenant_encryption_key" in codes(report)
    repaired = as_json("drift", "repair", "acme", "--yes")
    assert (repaired["deleted_secrets"], repaired["secret_names"]) == (1, ["a"])
    assert live_names("acme") == []
    assert as_json_report("drift", "diagnose", "acme")["ok"] is True


# -- drift diagnose ----------------------------------------------------------------------


def as_json_report(*args: str, expect_exit: int = 0) -> dict[str, Any]:
    """A diagnosis in JSON mode with the expected exit status."""
    result = run("--json", *args)
    assert result.exit_code == expect_exit, (result.stdout, result.stderr, result.exception)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def as_json_reports(*args: str, expect_exit: int = 0) -> list[dict[str, Any]]:
    """Every tenant's diagnosis in JSON mode."""
    result = run("--json", *args)
    assert result.exit_code == expect_exit, (result.stdout, result.stderr, result.exception)
    reports: list[dict[str, Any]] = json.loads(result.stdout)
    return reports


def test_diagnose_of_a_healthy_tenant_exits_0() -> None:
    put("acme", "a", "1")
    ok("projections", "run", "--once")
    result = ok("drift", "diagnose", "acme")
    assert result.stdout == "Tenant 'acme': ok (0 error(s), 0 warning(s), 0 info).\n"
    report = as_json_report("drift", "diagnose", "acme")
    assert (report["tenant_id"], report["ok"], report["issues"]) == ("acme", True, [])
    assert report["summary"]["active_secret_count"] == 1
    refused = fails("drift", "diagnose", "never-stored")  # a mistyped tenant is no "ok"
    assert refused.stderr == (
        "Error: no tenant 'never-stored' in this store (it has no key version and no audit "
        "entry): check the name\n"
    )


def test_diagnose_shows_warnings_and_info_in_a_table_and_still_exits_0() -> None:
    put("acme", "a", "1")
    ok("keys", "rotate", "acme")
    ok("projections", "run", "--once")
    lines = ok("drift", "diagnose", "acme").stdout.splitlines()
    assert lines[0].split() == ISSUE_HEADERS
    assert lines[1].split()[:5] == ["secret_on_retired_key", "info", "a", "1", "reencrypt"]
    assert lines[2] == "Tenant 'acme': ok (0 error(s), 0 warning(s), 1 info)."


def test_diagnose_with_the_wrong_master_key_exits_1_and_marks_values_recoverable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "a", "1")
    old_amk = as_json("keys", "list", "acme")[0]["amk_id"]
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    result = run("drift", "diagnose", "acme")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ISSUE_HEADERS
    assert lines[-1] == "Tenant 'acme': NOT OK (3 error(s), 0 warning(s), 1 info)."
    assert result.stderr == (
        "Error: drift errors in tenant(s) 'acme'; `keyledger drift repair TENANT --dry-run` "
        "shows the repair plan\n"
    )
    report = as_json_report("drift", "diagnose", "acme", expect_exit=1)
    assert report["ok"] is False
    assert codes(report) == [
        "active_tenant_encryption_key_unwrap_failed",
        "active_secrets_without_usable_active_key",
        "secret_envelope_unwrap_failed",
    ]
    unwrap = report["issues"][1]
    assert unwrap["details"]["unknown_master_key"] is True
    assert old_amk in unwrap["message"]
    assert "KEYLEDGER_PREVIOUS_MASTER_KEYS recovers every value" in unwrap["message"]
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    assert get("acme", "a") == "1"
    assert as_json_report("drift", "diagnose", "acme")["ok"] is True


def test_diagnose_without_a_master_key_reports_amk_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "a", "1")
    monkeypatch.delenv("KEYLEDGER_MASTER_KEY")
    report = as_json_report("drift", "diagnose", "acme", expect_exit=1)
    assert codes(report) == ["amk_unavailable"]
    assert report["issues"][-1]["repair_action"] == "none"


def test_diagnose_all_tenants_adds_a_tenant_column_and_fails_when_any_tenant_has_errors() -> None:
    put("acme", "a", "1")
    put("globex", "g", "2")
    ok("keys", "compromise", "globex", "1", "--reason", "leak", "--yes")
    ok("projections", "run", "--once")
    result = run("drift", "diagnose", "--all-tenants")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TENANT", *ISSUE_HEADERS]
    assert lines[1].split()[:5] == ["globex", "secret_on_compromised_key", "error", "g", "1"]
    assert lines[2] == "Checked 2 tenant(s): 1 with drift errors."
    assert result.stderr.startswith("Error: drift errors in tenant(s) 'globex';")
    reports = as_json_reports("drift", "diagnose", "--all-tenants", expect_exit=1)
    assert [(r["tenant_id"], r["ok"]) for r in reports] == [("acme", True), ("globex", False)]


def test_diagnose_all_tenants_of_an_empty_store_is_ok() -> None:
    assert ok("drift", "diagnose", "--all-tenants").stdout == (
        "Checked 0 tenant(s): 0 with drift errors.\n"
    )
    assert as_json_reports("drift", "diagnose", "--all-tenants") == []


def test_diagnose_only_the_named_secrets() -> None:
    put("acme", "a", "1")
    put("acme", "b", "2")
    put("acme", "c", "3")
    ok("keys", "compromise", "acme", "1", "--reason", "leak", "--yes")
    report = as_json_report("drift", "diagnose", "acme", "--secret", "b", expect_exit=1)
    assert [i["secret_name"] for i in report["issues"] if i["secret_name"]] == ["b"]
    both = as_json_report(
        "drift", "diagnose", "acme", "--secret", "a", "--secret", "c", expect_exit=1
    )
    assert [i["secret_name"] for i in both["issues"] if i["secret_name"]] == ["a", "c"]
    refused = fails("drift", "diagnose", "acme", "--secret", " b")
    assert refused.stderr == ("Error: secret name must not have leading or trailing whitespace\n")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "give TENANT or --all-tenants"),
        (("acme", "--all-tenants"), "give TENANT or --all-tenants, not both"),
    ],
)
def test_diagnose_needs_exactly_one_of_tenant_and_all_tenants(
    args: tuple[str, ...], fragment: str
) -> None:
    assert_usage_error(run("drift", "diagnose", *args), fragment)


# -- drift repair ------------------------------------------------------------------------


def wrong_master_key_deployed(monkeypatch: pytest.MonkeyPatch) -> None:
    """acme stored a and b under MASTER_KEY; NEW_MASTER_KEY is now the only key."""
    put("acme", "a", "1")
    put("acme", "b", "2")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)


PLAN = (
    "The repair would delete 2 unrecoverable secret(s) ('a', 'b') "
    "and 1 unusable key version(s) (1)."
)
DELETE_PROMPT = (
    "Delete 2 unrecoverable secret(s) ('a', 'b') and 1 unusable key version(s) (1) "
    "of tenant 'acme'? This cannot be undone."
)


def test_repair_dry_run_shows_the_plan_and_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong_master_key_deployed(monkeypatch)
    result = ok("drift", "repair", "acme", "--dry-run")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ISSUE_HEADERS
    assert lines[-2] == "Tenant 'acme': 4 error(s), 0 warning(s), 1 info."
    assert lines[-1] == PLAN
    assert result.stderr == ""
    plan = as_json("drift", "repair", "acme", "--dry-run", "--yes")
    assert plan["dry_run"] is True
    assert (plan["would_delete_secrets"], plan["would_delete_tenant_encryption_keys"]) == (2, 1)
    assert (plan["secret_names"], plan["key_versions"]) == (["a", "b"], [1])
    assert (plan["deleted_secrets"], plan["deleted_tenant_encryption_keys"]) == (0, 0)
    assert live_names("acme") == ["a", "b"]
    assert audit_actions("acme", "repair") == []


def test_repair_asks_before_deleting_and_a_no_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong_master_key_deployed(monkeypatch)
    refused = run("drift", "repair", "acme", stdin="n\n")
    assert refused.exit_code == 1
    assert DELETE_PROMPT in refused.stderr
    assert "Aborted!" in refused.stderr
    assert refused.stdout.splitlines()[-1] == PLAN
    assert live_names("acme") == ["a", "b"]
    unanswered = run("drift", "repair", "acme", stdin="")
    assert unanswered.exit_code == 1
    assert unanswered.stderr.splitlines()[-1] == UNANSWERED
    assert unanswered.stdout.splitlines()[-1] == PLAN
    assert live_names("acme") == ["a", "b"]
    assert keys("acme") == [(1, "active", 2)]
    # The right key comes back: nothing was lost.
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MASTER_KEY)
    assert get("acme", "b") == "2"


def test_a_confirmed_repair_deletes_audits_and_the_tenant_stores_fresh_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong_master_key_deployed(monkeypatch)
    result = run("--user", "ops", "drift", "repair", "acme", stdin="y\n")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert DELETE_PROMPT in result.stderr
    lines = result.stdout.splitlines()
    index = lines.index(PLAN)
    assert lines[index + 1] == (
        "Repaired tenant 'acme': deleted 2 secret(s) ('a', 'b'), destroyed 1 key version(s) (1)."
    )
    assert live_names("acme") == []
    assert keys("acme") == [(1, "destroyed", 0)]
    [repair] = audit_actions("acme", "repair")
    assert repair["user_id"] == "ops"
    assert repair["details"]["deleted_secrets"] == ["a", "b"]
    assert [e["secret_name"] for e in audit_actions("acme", "delete")] == ["b", "a"]
    assert [e["key_version"] for e in audit_actions("acme", "destroy_key")] == [1]
    put("acme", "a", "fresh")
    assert get("acme", "a") == "fresh"
    assert keys("acme") == [(1, "destroyed", 0), (2, "active", 1)]
    assert as_json_report("drift", "diagnose", "acme")["ok"] is True


def test_repair_with_yes_in_json_mode_asks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_master_key_deployed(monkeypatch)
    result = run("--json", "drift", "repair", "acme", "--yes")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert data["dry_run"] is False
    assert (data["deleted_secrets"], data["deleted_tenant_encryption_keys"]) == (2, 1)
    assert [i["code"] for i in data["remaining_issues"]] in ([], ["projection_behind"])


def test_a_repair_that_deletes_nothing_asks_nothing() -> None:
    put("acme", "a", "1")
    ok("keys", "rotate", "acme")
    result = ok("drift", "repair", "acme")
    assert "would delete nothing" in result.stdout
    assert "Repaired tenant 'acme': deleted nothing." in result.stdout
    assert result.stderr == ""
    assert get("acme", "a") == "1"


def test_repairing_a_tenant_the_store_never_heard_of_is_an_error() -> None:
    """It "repaired" a mistyped tenant: deleted nothing, no issues remain, exit 0."""
    refused = fails("drift", "repair", "never-stored", "--yes")
    assert refused.stderr.startswith("Error: no tenant 'never-stored' in this store")
    assert as_json("audit", "log", "--all-tenants") == []  # no repair recorded


def test_a_repair_without_a_master_key_deletes_nothing_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "a", "1")
    monkeypatch.delenv("KEYLEDGER_MASTER_KEY")
    result = fails("drift", "repair", "acme", "--yes")
    assert "Repaired tenant 'acme': deleted nothing." in result.stdout
    assert "amk_unavailable" in result.stdout.split("Remaining issues:")[1]
    assert result.stderr == (
        "Error: 1 drift error(s) remain in tenant 'acme'; see `keyledger drift diagnose acme`\n"
    )
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MASTER_KEY)
    assert get("acme", "a") == "1"


def test_secrets_on_a_compromised_key_are_not_deleted_by_a_repair() -> None:
    put("acme", "a", "1")
    ok("keys", "compromise", "acme", "1", "--reason", "leak", "--yes")
    result = fails("drift", "repair", "acme")
    assert "secret_on_compromised_key" in result.stdout.split("Remaining issues:")[1]
    assert live_names("acme") == ["a"]


# -- no key material in any output -------------------------------------------------------


def test_no_master_key_appears_in_any_lifecycle_output(monkeypatch: pytest.MonkeyPatch) -> None:
    put("acme", "a", "1")
    put("globex", "g", "2")
    results = [run("keys", "compromise", "globex", "1", "--reason", "r", "--yes")]
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    results += [
        run("drift", "diagnose", "--all-tenants"),
        run("--json", "drift", "diagnose", "acme"),
        run("master-key", "rewrap", "--yes"),
        run("drift", "repair", "acme", "--dry-run"),
        run("--json", "drift", "repair", "acme", "--dry-run"),
    ]
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    results += [
        run("--json", "master-key", "rewrap", "--yes"),
        run("keys", "list", "--all-tenants"),
        run("keys", "due"),
        run("keys", "cleanup-retired", "--older-than-days", "0", "--yes"),
        run("tenants", "erase", "acme", "--yes"),
        run("drift", "repair", "acme", "--yes"),
    ]
    assert all(r.exit_code in (0, 1) for r in results)
    for result in results:
        output = (result.stdout + result.stderr).lower()
        for key in (MASTER_KEY, NEW_MASTER_KEY):
            assert key[:32] not in output
            assert key[32:] not in output


# -- the installed script ----------------------------------------------------------------


def test_the_installed_script_exits_0_1_and_2_from_drift_diagnose(database: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYLEDGER_", "SMRT_"))}
    env |= {"KEYLEDGER_MASTER_KEY": MASTER_KEY, "KEYLEDGER_DATABASE_URL": f"sqlite:///{database}"}

    def keyledger(*args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args],
            input=stdin,
            env=env | extra,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    assert keyledger("secrets", "put", "acme", "a", stdin="1").returncode == 0
    healthy = keyledger("drift", "diagnose", "acme")
    assert (healthy.returncode, healthy.stderr) == (0, "")
    assert healthy.stdout.splitlines()[-1].startswith("Tenant 'acme': ok (0 error(s), ")

    drifted = keyledger("--json", "drift", "diagnose", "acme", KEYLEDGER_MASTER_KEY=NEW_MASTER_KEY)
    assert drifted.returncode == 1
    assert json.loads(drifted.stdout)["ok"] is False
    assert drifted.stderr.startswith("Error: drift errors in tenant(s) 'acme';")

    everyone = keyledger("drift", "diagnose", "--all-tenants", KEYLEDGER_MASTER_KEY=NEW_MASTER_KEY)
    assert everyone.returncode == 1
    recovered = keyledger(
        "drift",
        "diagnose",
        "--all-tenants",
        KEYLEDGER_MASTER_KEY=NEW_MASTER_KEY,
        KEYLEDGER_PREVIOUS_MASTER_KEYS=MASTER_KEY,
    )
    assert recovered.returncode == 0, recovered.stderr

    usage = keyledger("drift", "diagnose")
    assert usage.returncode == 2
    assert "give TENANT or --all-tenants" in usage.stderr
    for proc in (healthy, drifted, everyone, recovered, usage):
        assert MASTER_KEY not in proc.stdout + proc.stderr
        assert NEW_MASTER_KEY not in proc.stdout + proc.stderr


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture
def postgres_url(_postgres_server: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A schema of this test alone in KEYLEDGER_DATABASE_URL, dropped afterwards."""
    with own_schema("life") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        monkeypatch.setenv("KEYLEDGER_DATABASE_URL", url)
        yield schema


def material_rows(schema: str, tenant_id: str) -> list[int]:
    """Key versions with material in the PostgreSQL schema."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version FROM {} WHERE tenant_id = %s ORDER BY version").format(
                sql.Identifier(schema, "kl_key_material")
            ),
            (tenant_id,),
        ).fetchall()
    return [row[0] for row in rows]


def test_a_repair_that_rewraps_says_so_and_asks_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: mid-rotation, `drift repair` re-wrapped the tenant's keys under
    the new master key and shredded the old copies (processes with the old key alone
    then failed) while its dry run said "would delete nothing", its result "deleted
    nothing", and it asked nothing, where `master-key rewrap` asks."""
    put("acme", "a", "one")
    ok("keys", "rotate", "acme")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    plan = ok("drift", "repair", "acme", "--dry-run").stdout

    assert "The repair would delete nothing.\n" in plan
    assert "It would also re-wrap the tenant's key versions wrapped by a previous" in plan
    assert "It would also re-encrypt 1 secret(s) on retired key versions" in plan
    declined = run("drift", "repair", "acme", stdin="n\n")
    assert declined.exit_code == 1
    assert "Re-wrap the key versions of tenant 'acme' under master key " in declined.stderr
    assert {k["amk_id"] for k in as_json("keys", "list", "acme")} == {amk_of(MASTER_KEY)}

    done = ok("drift", "repair", "acme", "--yes").stdout
    assert "Also: re-wrap the tenant's key versions" in done
    assert {k["amk_id"] for k in as_json("keys", "list", "acme")} == {amk_of(NEW_MASTER_KEY)}


def amk_of(hex_key: str) -> str:
    return MasterKey(bytes.fromhex(hex_key)).amk_id


@pytest.mark.postgres
def test_the_whole_lifecycle_on_postgresql(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = postgres_url
    put("acme", "a", "one")
    put("globex", "g", "two")
    ok("keys", "rotate", "acme")
    ok("keys", "reencrypt", "acme")
    cleaned = as_json("keys", "cleanup-retired", "--older-than-days", "0", "--yes")
    assert (cleaned["destroyed"], cleaned["skipped"]) == (1, 0)
    assert material_rows(schema, "acme") == [2]

    # Master-key rotation.
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    assert [codes(r) for r in as_json_reports("drift", "diagnose", "--all-tenants")] == [
        ["active_tenant_encryption_key_amk_mismatch"],
        ["active_tenant_encryption_key_amk_mismatch"],
    ]
    rewrapped = as_json("master-key", "rewrap", "--yes")
    assert (rewrapped["rewrapped"], rewrapped["failed"]) == (2, 0)
    monkeypatch.delenv("KEYLEDGER_PREVIOUS_MASTER_KEYS")
    assert [codes(r) for r in as_json_reports("drift", "diagnose", "--all-tenants")] == [[], []]
    assert (get("acme", "a"), get("globex", "g")) == ("one", "two")

    # Compromise, then due rotation.
    ok("keys", "compromise", "globex", "1", "--reason", "leak", stdin="y\n")
    assert keys("globex") == [(1, "compromised", 1), (2, "active", 0)]
    assert (
        fails("drift", "diagnose", "globex")
        .stdout.splitlines()[-1]
        .startswith("Tenant 'globex': NOT OK")
    )
    put("globex", "g", "two again")
    assert as_json_report("drift", "diagnose", "globex")["ok"] is True
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0.000000001")
    rotated = as_json("keys", "rotate", "--due")["rotated"]
    assert [k["tenant_id"] for k in rotated] == ["acme", "globex"]
    monkeypatch.delenv("KEYLEDGER_KEY_MAX_AGE_DAYS")

    # Erasure: the material is gone, the audit stays, a confirmed repair tidies the listing.
    assert_aborted(run("tenants", "erase", "acme", stdin="n\n"), "Erase tenant 'acme'?")
    ok("tenants", "erase", "acme", stdin="y\n")
    assert material_rows(schema, "acme") == []
    assert audit_actions("acme", "erase_tenant")[0]["details"]["versions"] == [2, 3]
    refused = run("drift", "repair", "acme", stdin="n\n")
    assert_aborted_after_plan(refused)
    assert live_names("acme") == ["a"]
    repaired = as_json("drift", "repair", "acme", "--yes")
    assert repaired["secret_names"] == ["a"]
    assert as_json_reports("drift", "diagnose", "--all-tenants")[0]["ok"] is True
    assert get("globex", "g") == "two again"


def assert_aborted_after_plan(result: Result) -> None:
    """A declined repair: the plan on stdout, the prompt and Aborted! on stderr, exit 1."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert "The repair would delete 1 unrecoverable secret(s) ('a')" in result.stdout
    assert "Aborted!" in result.stderr


# -- Ctrl-C in the middle of a command that commits step by step ---------------------------


def interrupt_after(monkeypatch: pytest.MonkeyPatch, method: str, steps: int) -> None:
    """Make ``SecretService.<method>`` stop with KeyboardInterrupt (a Ctrl-C) once its
    progress has reported ``steps``: the steps before it are committed, as a real Ctrl-C
    leaves them."""
    real = getattr(SecretService, method)

    def interrupted(self: SecretService, *args: Any, **kwargs: Any) -> Any:
        progress = kwargs.get("progress")
        seen = [0]

        def report(n: int) -> None:
            if progress is not None:
                progress(n)
            seen[0] += n
            if seen[0] >= steps:
                raise KeyboardInterrupt

        return real(self, *args, **{**kwargs, "progress": report})

    monkeypatch.setattr(SecretService, method, interrupted)


def secrets_by_version(tenant_id: str) -> dict[int, int]:
    return {k["version"]: k["secret_count"] for k in as_json("keys", "list", tenant_id)}


def test_an_interrupted_reencrypt_says_it_is_partly_done_exits_130_and_a_rerun_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(5):
        put("acme", f"s{i}", f"v{i}")
    ok("keys", "rotate", "acme")
    monkeypatch.setattr("keyledger.application.keys.REENCRYPT_BATCH", 2)
    with monkeypatch.context() as patched:
        interrupt_after(patched, "reencrypt_all", 2)  # after the first batch
        stopped = run("keys", "reencrypt", "acme")

    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert stopped.stderr.strip() == (
        "Interrupted: the re-encryption is partly done (2 secrets done). What it did is "
        "committed; run the same command again to finish it."
    )
    assert secrets_by_version("acme") == {1: 3, 2: 2}
    finished = as_json("keys", "reencrypt", "acme")
    assert (finished["success"], finished["failed"]) == (5, 0)
    assert secrets_by_version("acme") == {1: 0, 2: 5}


def test_an_interrupted_rewrap_says_it_is_partly_done_exits_130_and_a_rerun_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tenant_id in ("acme", "globex", "initech"):
        put(tenant_id, "s", "v")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    with monkeypatch.context() as patched:
        interrupt_after(patched, "rewrap_master_key", 1)
        stopped = run("master-key", "rewrap", "--yes")

    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert "Interrupted: the re-wrap is partly done (1 key versions done)" in stopped.stderr
    assert "run the same command again to finish it" in stopped.stderr
    finished = as_json("master-key", "rewrap", "--yes")
    assert (finished["rewrapped"], finished["already_current"], finished["failed"]) == (2, 1, 0)


def test_an_interrupted_rotation_of_due_keys_has_listed_what_it_rotated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The list of rotations was printed at the end only: stopped by Ctrl-C, the run
    said how many tenants it had rotated, not which."""
    for tenant_id in ("acme", "globex", "initech"):
        put(tenant_id, "s", "v")
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_AGE_DAYS", "0.000000001")
    real = SecretService.rotate_due_key
    calls = [0]

    def second_interrupted(self: SecretService, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(SecretService, "rotate_due_key", second_interrupted)
        stopped = run("keys", "rotate", "--due")

    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert stopped.stdout.startswith("Key version 2 is now active for tenant 'acme' (version 1")
    assert len(stopped.stdout.splitlines()) == 1
    assert "the rotation of due keys is partly done (1 tenants done)" in stopped.stderr


# -- a mistyped tenant or secret is an error, not an "all clean" -------------------------


@pytest.mark.parametrize(
    "command",
    [
        ("audit", "log", "acmee"),
        ("audit", "replay", "acmee", "--position", "1"),
        ("audit", "export", "--tenant", "acmee", "--format", "jsonl"),
        ("keys", "list", "acmee"),
        ("keys", "reencrypt", "acmee"),
        ("drift", "diagnose", "acmee"),
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_a_tenant_the_store_never_heard_of_is_an_error(command: tuple[str, ...]) -> None:
    """It answered "no entries", "0 re-encrypted", "ok" with exit 0 (found by review)."""
    put("acme", "a", "1")

    refused = fails(*command)

    assert refused.stderr == (
        "Error: no tenant 'acmee' in this store (it has no key version and no audit entry): "
        "check the name\n"
    )
    assert [e["action"] for e in as_json("audit", "log", "acme")] == ["create", "create_key"]


def test_a_tenant_known_by_its_audit_entries_alone_is_answered() -> None:
    """A tenant whose only trace is a refused read (no key version yet) exists to an
    investigation."""
    assert run("secrets", "get", "probe", "missing").exit_code == 1  # audited: not found
    [entry] = as_json("audit", "log", "probe")
    assert (entry["action"], entry["result"]) == ("read", "failure")
    assert as_json("keys", "list", "probe") == []


def test_drift_diagnose_of_a_secret_the_tenant_does_not_have_is_an_error() -> None:
    put("acme", "a", "1")
    refused = fails("drift", "diagnose", "acme", "--secret", "a", "--secret", "b")
    assert refused.stderr == "Error: no secret 'b' in tenant 'acme': check the name\n"


def test_rewrap_asks_first_naming_the_versions_and_the_new_master_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It asked nothing (found by review): a new key kept nowhere else, once the old
    copies are shredded, loses every secret."""
    put("acme", "a", "one")
    put("globex", "g", "two")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", NEW_MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MASTER_KEY)
    old_amk = as_json("keys", "list", "acme")[0]["amk_id"]
    new_amk = as_json("master-key", "rewrap", "--yes")["amk_id"]  # (to learn its id)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", NEW_MASTER_KEY)

    refused = run("master-key", "rewrap", stdin="n\n")

    assert refused.exit_code == 1
    assert refused.stderr.startswith(
        f"Re-wrap 2 key version(s) of every tenant under the current master key, id "
        f"{old_amk}? Their copies under other master keys are then shredded"
    )
    assert {k["amk_id"] for k in as_json("keys", "list", "--all-tenants")} == {new_amk}
    unanswered = run("master-key", "rewrap", stdin="")
    assert unanswered.exit_code == 1
    assert "Pass --yes to confirm in advance." in unanswered.stderr
    done = ok("master-key", "rewrap", stdin="y\n")
    assert f"Re-wrapped 2 key version(s) under master key {old_amk}" in done.stdout
    assert get("acme", "a") == "one"


def test_db_backup_copies_the_store_into_a_new_file(database: Path, tmp_path: Path) -> None:
    put("acme", "a", "one")
    target = tmp_path / "backup.db"

    result = ok("db", "backup", str(target))

    assert result.stdout == f"Backed up the store to {target}.\n"
    restored = run("--database", f"sqlite:///{target}", "secrets", "get", "acme", "a")
    assert restored.exit_code == 0
    assert restored.stdout.strip() == "one"
    again = fails("db", "backup", str(target))
    assert again.stderr == f"Error: {target} exists: back up into a new file\n"


def test_an_interrupted_cleanup_says_how_many_versions_it_went_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for tenant_id in ("acme", "globex", "initech"):
        put(tenant_id, "s", "v")
        ok("keys", "rotate", tenant_id)
        ok("keys", "reencrypt", tenant_id)
    with monkeypatch.context() as patched:
        interrupt_after(patched, "cleanup_retired_keys", 2)
        stopped = run("keys", "cleanup-retired", "--older-than-days", "0", "--yes")

    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert "the cleanup is partly done (2 key versions done)" in stopped.stderr
    finished = as_json("keys", "cleanup-retired", "--older-than-days", "0", "--yes")
    assert (finished["destroyed"], finished["skipped"]) == (1, 0)
