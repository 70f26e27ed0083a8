"""CLI failure paths found by review (0.11.0): each ends in one "Error:" line or a usage
error, never a traceback, and operator commands record the whole actor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

# The fresh SQLite store and master key of every test, and the in-process invocations.
from test_cli import database, ok, run  # noqa: F401 (database: an autouse fixture)

IP = "203.0.113.7"


def failed(code: int, *args: str, stdin: str | bytes | None = None) -> Result:
    """Exit ``code`` without a traceback (click's own exit, not an exception)."""
    result = run(*args, stdin=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    return result


def audit_entries(tenant: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(ok("--json", "audit", "log", tenant).stdout)
    return data


def shell(command: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in bash with the installed entry point on the PATH."""
    script = Path(sys.executable).with_name("keyledger")  # the installed entry point
    assert script.exists()
    env = {**os.environ, "PATH": f"{script.parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("secrets", "put", "acme", "x", "--expires-at", "9999-12-31T23:59:59-05:00"),
        ("audit", "log", "acme", "--since", "0001-01-01T00:00:00+05:00"),
        ("audit", "replay", "acme", "--as-of", "0001-01-01T00:00:00+05:00"),
    ],
)
def test_a_timestamp_beyond_the_utc_range_is_a_usage_error(args: tuple[str, ...]) -> None:
    result = failed(2, *args, stdin="v")
    assert "is out of range in UTC" in result.stderr


def test_a_closed_stdin_is_one_error_line_for_put_and_for_a_confirmation(tmp_path: Path) -> None:
    ok("secrets", "put", "acme", "kept", stdin="v")
    put = shell("keyledger secrets put acme new <&-", tmp_path)
    assert (put.returncode, put.stdout) == (1, "")
    assert put.stderr.startswith("Error: no value to store: standard input is closed")
    assert len(put.stderr.splitlines()) == 1
    delete = shell("keyledger secrets delete acme kept <&-", tmp_path)
    assert delete.returncode == 1
    assert "Traceback" not in delete.stderr
    assert "standard input is closed" in delete.stderr
    names = [row["name"] for row in json.loads(ok("--json", "secrets", "list", "acme").stdout)]
    assert names == ["kept"]


@pytest.mark.parametrize(
    "command",
    [
        "keyledger secrets put acme kept {flag} </dev/null",
        "printf '' | keyledger secrets put acme kept --binary {flag}",
    ],
    ids=["dev-null", "empty-pipe-binary"],
)
def test_an_empty_stdin_replaces_no_value_unless_allowed(tmp_path: Path, command: str) -> None:
    """Found by review: a cron job's ``put`` with nothing on stdin stored an empty value
    over the secret, exit 0."""
    ok("secrets", "put", "acme", "kept", stdin="v")
    refused = shell(command.format(flag=""), tmp_path)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (
        "Error: no value to store: standard input is empty; pipe the value in, or add "
        "--allow-empty to store an empty value\n"
    )
    assert ok("secrets", "get", "acme", "kept").stdout == "v"
    stored = shell(command.format(flag="--allow-empty"), tmp_path)
    assert stored.returncode == 0, stored.stderr
    secret = json.loads(ok("--json", "secrets", "get", "acme", "kept").stdout)
    assert (secret["version"], secret["value"]) == (2, "")


def test_a_value_over_the_limit_is_refused_without_reading_all_of_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEYLEDGER_MAX_VALUE_BYTES", "1024")
    big = shell("head -c 100000000 /dev/zero | keyledger secrets put acme big --binary", tmp_path)
    assert big.returncode == 1
    assert big.stderr == "Error: value is larger than the limit of 1024 bytes\n"
    at_limit = shell("head -c 1024 /dev/zero | keyledger secrets put acme fits --binary", tmp_path)
    assert at_limit.returncode == 0, at_limit.stderr
    over = shell("head -c 1025 /dev/zero | keyledger secrets put acme over --binary", tmp_path)
    assert over.stderr == "Error: value is 1025 bytes; the limit is 1024\n"


def test_a_bad_category_is_refused_before_the_value_is_read() -> None:
    result = failed(1, "secrets", "put", "acme", "x", "--category", "a\x00b", stdin="v")
    assert result.stderr.startswith("Error: category")
    missing = failed(1, "secrets", "get", "acme", "x")
    assert missing.stderr == "Error: no secret 'x' in tenant 'acme'\n"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("connect_timeout=2.5", "URL option connect_timeout must be an integer"),
        ("connect_timeout=0", "URL option connect_timeout must be positive"),
        ("conn_max_age=nan", "URL option conn_max_age must be a finite number"),
        ("pool_size=99999999999999999999", "URL option pool_size must be at most 1000"),
        ("lock_timeout=3000000", "URL option lock_timeout must be at most 86400"),
    ],
)
def test_postgresql_url_options_out_of_range_are_refused_at_once(query: str, message: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/test?schema=kl_unused&{query}"
    result = failed(1, "--database", url, "secrets", "list", "acme")
    assert result.stderr == f"Error: {message}\n"


@pytest.mark.parametrize("suffix", ["?mode=ro", "#fragment", "?"])
def test_a_sqlite_url_with_options_is_refused_not_silently_stripped(
    tmp_path: Path, suffix: str
) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}{suffix}"
    result = failed(1, "--database", url, "secrets", "put", "acme", "x", stdin="v")
    assert result.stderr.startswith("Error: a SQLite URL takes no options")
    assert not (tmp_path / "other.db").exists()


def test_operator_commands_record_the_ip_and_user_agent_of_the_run() -> None:
    ok("secrets", "put", "acme", "db", stdin="v")
    ok("keys", "rotate", "acme")
    ok("--user", "alice", "--ip", IP, "audit", "seal")
    ok("--user", "alice", "--ip", IP, "master-key", "rewrap", "--yes")
    ok("--user", "alice", "--ip", IP, "tenants", "erase", "acme", "--yes")
    entries = audit_entries("acme")
    erase = [e for e in entries if e["action"] in {"erase_tenant", "destroy_key"}]
    assert erase
    assert {(e["user_id"], e["ip_address"]) for e in erase} == {("alice", IP)}
    assert all(e["user_agent"].startswith("keyledger-cli/") for e in erase)


def test_a_seal_whose_anchor_file_cannot_be_written_exits_1_and_still_seals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ok("secrets", "put", "acme", "db", stdin="v")
    missing = tmp_path / "no-such-dir" / "anchors.jsonl"
    monkeypatch.setenv("KEYLEDGER_AUDIT_ANCHOR_FILE", str(missing))
    result = failed(1, "audit", "seal")
    assert result.stdout.splitlines()[-1] == "Sealed 2 events in 1 checkpoints"
    assert result.stderr.startswith(f"Error: the anchor file {missing} was not written:")
    monkeypatch.delenv("KEYLEDGER_AUDIT_ANCHOR_FILE")
    assert ok("audit", "seal").stdout == "Sealed 0 events in 0 checkpoints\n"  # it stands


def test_db_shred_answers_in_json_mode() -> None:
    assert json.loads(ok("--json", "db", "shred").stdout) == {"shredded": True}


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_timestamp_finer_than_microseconds_is_refused_not_rounded_down(option: str) -> None:
    """Rounded down, --since 12:00:00.0000001 would take in an event at 12:00:00.000000,
    before the instant given, and --until would leave out one before it."""
    ok("secrets", "put", "acme", "a", stdin="v")
    result = failed(2, "audit", "log", "acme", option, "2026-11-30T12:00:00.0000001Z")
    assert "more than 6 fractional digits" in result.stderr
    exported = failed(
        2, "audit", "export", "--tenant", "acme", option, "2030-01-01T00:00:00.1234567Z"
    )
    assert "more than 6 fractional digits" in exported.stderr
    ok("audit", "log", "acme", option, "2026-11-30T12:00:00.123456Z")  # microseconds: fine


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize(
    "command",
    ["secrets get acme kept", "--json secrets list acme", "audit log acme", "master-key generate"],
)
def test_output_that_cannot_be_written_is_one_error_line(tmp_path: Path, command: str) -> None:
    """Found by review: a full disk (here /dev/full) gave a traceback."""
    ok("secrets", "put", "acme", "kept", stdin="v")
    result = shell(f"keyledger {command} >/dev/full", tmp_path)
    assert result.returncode == 1
    assert result.stderr == "Error: cannot write the output: No space left on device\n"
