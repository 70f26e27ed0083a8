"""The audit investigation commands of the CLI, end to end.

``audit log`` (--all-tenants, --csv), ``audit trail``, ``audit replay``, ``audit export``,
``audit seal``, ``audit anchor`` and ``audit verify``: output, JSON, CSV, resumable exports,
tampering found by verify, usage errors and exit codes, through CliRunner on SQLite, one
scenario through the installed script and one on PostgreSQL. No command ever shows a value.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import POSTGRES_URL, own_schema
from keyledger import SecretService
from keyledger._version import __version__
from keyledger.application.export import EXPORT_FIELDS
from keyledger.cli import audit as audit_cli
from keyledger.cli import audit_export as audit_export_cli
from keyledger.cli import main

MASTER_KEY = "5e1d2c3b4a596877" * 4
SCRIPT = Path(sys.executable).parent / "keyledger"
# Every stored value starts with this; no output of any command may contain it.
VALUE = "VALUE-7f3a9c-do-not-print"
LOG_CSV_HEADER = [
    *("position", "timestamp", "tenant_id", "secret_name", "action", "result", "user_id"),
    *("ip_address", "user_agent", "key_version", "details"),
]
TRAIL_HEADERS = [
    *("POSITION", "TIME", "ACTION", "RESULT", "VERSION", "KEY", "USER", "IP", "USER-AGENT"),
    "DETAILS",
]
SECRET_HEADERS = [
    *("NAME", "STATUS", "VERSION", "KEY", "CATEGORY", "ACCESSES", "LAST-ACCESS", "EXPIRES"),
    "UPDATED",
]
KEY_HEADERS = ["VERSION", "STATUS", "KEY-ID", "AMK", "CREATED", "RETIRED"]

_outputs: list[str] = []


@pytest.fixture(autouse=True)
def no_value_in_any_output() -> Iterator[None]:
    """After every test: nothing any command printed contains a stored value."""
    _outputs.clear()
    yield
    leaked = [output for output in _outputs if VALUE in output]
    assert not leaked, leaked


@pytest.fixture(autouse=True)
def database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh SQLite file and a master key in the environment, nothing else of ours."""
    for name in list(os.environ):
        if name.startswith(("KEYLEDGER_", "SMRT_SECRET_")):
            monkeypatch.delenv(name)
    path = tmp_path / "cli.db"
    monkeypatch.setenv("KEYLEDGER_DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MASTER_KEY)
    return path


def run(*args: str, stdin: str | None = None) -> Result:
    """Invoke the CLI in-process; stdin is a pipe, never a terminal."""
    result = CliRunner().invoke(main, list(args), input=stdin)
    _outputs.extend((result.stdout, result.stderr))
    return result


def ok(*args: str, stdin: str | None = None) -> Result:
    """Invoke and insist on success."""
    result = run(*args, stdin=stdin)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def as_json(*args: str) -> Any:
    """Invoke with --json and parse stdout."""
    return json.loads(ok("--json", *args).stdout)


def exits(code: int, *args: str) -> Result:
    """Invoke and insist on exit status ``code``, without a traceback."""
    result = run(*args)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    return result


def fails(*args: str) -> Result:
    """Exit status 1 with a single ``Error: ...`` line."""
    result = exits(1, *args)
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1
    return result


def assert_usage_error(result: Result, fragment: str) -> None:
    """Exit 2 with click's usage message naming the problem, nothing on stdout."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert "Error: " in result.stderr
    assert fragment in result.stderr
    assert result.stdout == ""


def put(tenant_id: str, name: str, suffix: str = "") -> None:
    ok("secrets", "put", tenant_id, name, stdin=f"{VALUE}{suffix}")


def get(tenant_id: str, name: str, *options: str) -> None:
    """Read a secret (the one command whose output is a value: it is not recorded)."""
    result = CliRunner().invoke(main, [*options, "secrets", "get", tenant_id, name])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout.startswith(VALUE)


def table(output: str) -> list[list[str]]:
    """A table's rows (header first), cells split on runs of two or more spaces."""
    return [re.split(r" {2,}", line.strip()) for line in output.splitlines() if line.strip()]


def column(output: str, header: str) -> list[str]:
    """One column of a table, by header, as stripped cells."""
    rows = table(output)
    index = rows[0].index(header)
    return [row[index].strip() for row in rows[1:]]


def audit_log(*args: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = as_json("audit", "log", *args, "--limit", "10000")
    return entries


def all_entries() -> list[dict[str, Any]]:
    """Every audit entry of every tenant, oldest first."""
    return sorted(audit_log("--all-tenants"), key=lambda entry: entry["position"])


def jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    _outputs.append(text)
    return [json.loads(line) for line in text.splitlines()]


def resume_position(stderr: str) -> int:
    """P of the closing ``... resume after position P with --from-position P`` line."""
    last = stderr.splitlines()[-1]
    assert last.startswith("Exported "), stderr
    position = int(last.rsplit(" ", 1)[1])
    assert f"resume after position {position} with --from-position {position}" in last
    return position


def two_tenants() -> None:
    """acme: db (read by bob from an address, read denied), api; globex: db."""
    put("acme", "db")
    get("acme", "db", "--user", "bob", "--ip", "10.1.2.3")
    put("acme", "api")
    ok("secrets", "disable", "acme", "api")
    assert run("secrets", "get", "acme", "api").exit_code == 1
    put("globex", "db")


def tamper(path: Path, position: int, old: bytes, new: bytes) -> None:
    """Rewrite bytes of the stored event at ``position``, as someone with the file could."""
    with closing(sqlite3.connect(path)) as conn, conn:
        (state,) = conn.execute(
            "SELECT state FROM stored_events WHERE rowid = ?", (position,)
        ).fetchone()
        assert old in state
        conn.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?",
            (state.replace(old, new, 1), position),
        )


def position_of(action: str, secret: str | None = None, tenant: str = "acme") -> int:
    """The position of the first entry of ``action`` (on ``secret``) in ``tenant``."""
    return next(
        e["position"]
        for e in all_entries()
        if e["tenant_id"] == tenant and e["action"] == action and e["secret_name"] == secret
    )


# -- audit log ----------------------------------------------------------------------------


def test_log_filters_still_narrow_the_entries_of_one_tenant() -> None:
    two_tenants()
    entries = audit_log("acme")
    assert {e["tenant_id"] for e in entries} == {"acme"}
    assert [e["position"] for e in entries] == sorted(
        (e["position"] for e in entries), reverse=True
    )

    reads = audit_log("acme", "--action", "read")
    assert [(e["secret_name"], e["result"]) for e in reads] == [
        ("api", "denied"),
        ("db", "success"),
    ]
    assert [e["action"] for e in audit_log("acme", "--secret", "api")] == [
        "read",
        "disable",
        "create",
    ]
    assert [e["secret_name"] for e in audit_log("acme", "--result", "denied")] == ["api"]
    by_bob = audit_log("acme", "--user-id", "bob")
    assert [(e["action"], e["ip_address"]) for e in by_bob] == [("read", "10.1.2.3")]

    oldest_first = list(reversed(entries))
    since = oldest_first[2]["timestamp"]
    assert all(e["timestamp"] >= since for e in audit_log("acme", "--since", since))
    assert audit_log("acme", "--until", oldest_first[0]["timestamp"]) == []
    assert as_json("audit", "log", "acme", "--limit", "2", "--offset", "1") == entries[1:3]

    human = ok("audit", "log", "acme", "--action", "read").stdout
    assert table(human)[0] == [
        *("POSITION", "TIME", "ACTION", "RESULT", "SECRET", "KEY", "USER", "IP"),
        "DETAILS",
    ]
    assert column(human, "IP") == ["-", "10.1.2.3"]


def test_a_log_cut_at_its_limit_says_so_and_where_the_older_entries_start() -> None:
    """Newest first, a page cut at --limit leaves out the oldest entries, the start of an
    incident: it used to look like the whole answer (found by review)."""
    put("acme", "db")
    for _ in range(4):
        get("acme", "db")
    entries = as_json("audit", "log", "acme")
    assert len(entries) == 6  # create_key, create, four reads

    cut = ok("--json", "audit", "log", "acme", "--limit", "4")

    assert json.loads(cut.stdout) == entries[:4]
    position = entries[3]["position"]
    assert cut.stderr == (
        f"More entries match: --before-position {position} shows the next, older page.\n"
    )
    rest = ok("--json", "audit", "log", "acme", "--before-position", str(position))
    assert json.loads(rest.stdout) == entries[4:]
    assert rest.stderr == ""  # the whole rest: no note
    assert ok("audit", "log", "acme", "--limit", "6").stderr == ""
    assert "More entries match" in ok("audit", "log", "acme", "--csv", "--limit", "1").stderr
    # With --offset the named position is for a query without it (kept, it skips some).
    offset = ok("--json", "audit", "log", "acme", "--offset", "1", "--limit", "2")
    assert json.loads(offset.stdout) == entries[1:3]
    assert f"--before-position {entries[2]['position']} (without --offset)" in offset.stderr
    # A tenant the store never heard of is refused whatever the paging.
    assert run("audit", "log", "acmee", "--offset", "1").exit_code == 1
    assert run("audit", "log", "acmee", "--before-position", "99").exit_code == 1


def test_log_all_tenants_lists_both_tenants_with_a_tenant_column() -> None:
    two_tenants()
    entries = audit_log("--all-tenants")
    assert {e["tenant_id"] for e in entries} == {"acme", "globex"}
    assert [
        e["tenant_id"] for e in audit_log("--all-tenants", "--secret", "db", "--action", "create")
    ] == [
        "globex",
        "acme",
    ]
    human = ok("audit", "log", "--all-tenants").stdout
    assert table(human)[0][:2] == ["TENANT", "POSITION"]
    assert column(human, "TENANT") == [e["tenant_id"] for e in entries]
    assert set(column(human, "TENANT")) == {"acme", "globex"}


def test_log_csv_has_the_header_and_parses_with_the_csv_module() -> None:
    two_tenants()
    expected = audit_log("acme")
    result = ok("audit", "log", "acme", "--csv")
    reader = csv.reader(io.StringIO(result.stdout))
    header, *rows = list(reader)
    assert header == LOG_CSV_HEADER
    records = [dict(zip(header, row, strict=True)) for row in rows]
    assert [int(r["position"]) for r in records] == [e["position"] for e in expected]
    assert [r["action"] for r in records] == [e["action"] for e in expected]
    assert [json.loads(r["details"]) for r in records] == [e["details"] for e in expected]
    bob = next(r for r in records if r["user_id"] == "bob")
    assert (bob["ip_address"], bob["key_version"], bob["secret_name"]) == ("10.1.2.3", "1", "db")
    assert all(r["ip_address"] == "" for r in records if r["user_id"] != "bob")

    every = list(csv.DictReader(io.StringIO(ok("audit", "log", "--all-tenants", "--csv").stdout)))
    assert {r["tenant_id"] for r in every} == {"acme", "globex"}
    assert ok("audit", "log", "acme", "--csv", "--limit", "0").stdout.splitlines() == [
        ",".join(LOG_CSV_HEADER)
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("audit", "log", "acme", "--all-tenants"), "give TENANT or --all-tenants, not both"),
        (("audit", "log"), "give TENANT or --all-tenants"),
        (("audit", "log", "acme", "--json", "--csv"), "--json and --csv are mutually exclusive"),
        (("--json", "audit", "log", "--all-tenants", "--csv"), "mutually exclusive"),
        (("audit", "log", "acme", "--since", "2024-01-01T00:00:00"), "has no timezone"),
    ],
    ids=["tenant-and-all", "neither", "json-and-csv", "root-json-and-csv", "naive-since"],
)
def test_log_usage_errors_exit_2(args: tuple[str, ...], fragment: str) -> None:
    put("acme", "db")
    assert_usage_error(run(*args), fragment)


# -- audit trail --------------------------------------------------------------------------


def test_trail_is_the_whole_history_of_one_secret_oldest_first() -> None:
    put("acme", "db")
    put("acme", "other")
    get("acme", "db", "--ip", "192.0.2.7")
    put("acme", "db", "-2")
    get("acme", "db", "--user", "carol", "--ip", "198.51.100.9")
    ok("secrets", "disable", "acme", "db")
    ok("secrets", "enable", "acme", "db")
    ok("keys", "rotate", "acme")
    ok("keys", "reencrypt", "acme")
    ok("secrets", "delete", "acme", "db", "--yes")

    entries = as_json("audit", "trail", "acme", "db")
    assert [e["action"] for e in entries] == [
        *("create", "read", "update", "read", "disable", "enable", "update", "delete"),
    ]
    assert [e["position"] for e in entries] == sorted(e["position"] for e in entries)
    assert {e["secret_name"] for e in entries} == {"db"}
    reads = [e for e in entries if e["action"] == "read"]
    assert [(e["user_id"], e["ip_address"]) for e in reads] == [
        ("system", "192.0.2.7"),
        ("carol", "198.51.100.9"),
    ]
    reencrypt = entries[6]
    assert reencrypt["details"]["reencrypted"] is True
    assert (reencrypt["key_version"], reencrypt["details"]["previous_key_version"]) == (2, 1)

    human = ok("audit", "trail", "acme", "db").stdout
    assert table(human)[0] == TRAIL_HEADERS
    assert column(human, "ACTION") == [
        *("create", "read", "update", "read", "disable", "enable"),
        *("update (re-encrypt)", "delete"),
    ]
    assert column(human, "VERSION")[:4] == ["1", "1", "2", "2"]
    keys = column(human, "KEY")
    assert keys[:4] == ["1", "1", "1", "1"]
    assert keys[6] == "2"
    assert column(human, "IP")[1] == "192.0.2.7"
    assert column(human, "USER")[3] == "carol"
    assert set(column(human, "USER-AGENT")) == {f"keyledger-cli/{__version__}"}


def test_a_long_trail_is_read_and_written_in_pages_with_the_same_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "db")
    for _ in range(6):
        get("acme", "db")
    whole = as_json("audit", "trail", "acme", "db")
    human = ok("audit", "trail", "acme", "db").stdout
    reads: list[int] = []
    original = SecretService.audit_trail

    def counted(self: SecretService, *args: Any, **kwargs: Any) -> Any:
        page = original(self, *args, **kwargs)
        reads.append(len(page))
        return page

    monkeypatch.setattr(audit_cli, "TRAIL_PAGE", 2)
    monkeypatch.setattr(SecretService, "audit_trail", counted)

    assert (
        ok("--json", "audit", "trail", "acme", "db").stdout
        == json.dumps(whole, indent=2, ensure_ascii=False) + "\n"
    )
    assert max(reads) == 2  # never more than a page at a time
    assert table(ok("audit", "trail", "acme", "db").stdout) == table(human)
    assert as_json("audit", "trail", "acme", "db", "--offset", "2", "--limit", "3") == whole[2:5]
    assert as_json("audit", "trail", "acme", "db", "--offset", "6") == whole[6:]
    assert as_json("audit", "trail", "acme", "db", "--limit", "0") == []


def test_trail_of_a_secret_without_entries_is_one_error_line() -> None:
    put("acme", "db")
    result = fails("audit", "trail", "acme", "nothing")
    assert result.stderr == "Error: no audit entries for secret 'nothing' of tenant 'acme'\n"
    # Another tenant's secret of the same name is not this tenant's history.
    fails("audit", "trail", "globex", "db")


# -- audit replay -------------------------------------------------------------------------


def test_replay_shows_the_tenant_as_it_was_never_values() -> None:
    put("globex", "early")
    put("acme", "db")
    put("acme", "db", "-2")
    put("acme", "doomed")
    ok("secrets", "delete", "acme", "doomed", "--yes")
    ok("keys", "rotate", "acme")
    created = position_of("create", "db")
    updated = position_of("update", "db")
    doomed = position_of("create", "doomed")
    rotated = next(e for e in all_entries() if e["action"] == "rotate_key")

    before = as_json("audit", "replay", "acme", "--position", str(created - 2))
    assert (before["secrets"], before["keys"], before["events_applied"]) == ([], [], 0)
    nothing = ok("audit", "replay", "acme", "--as-of", "2000-01-01T00:00:00Z").stdout
    assert (
        nothing.splitlines()[0] == "Tenant acme as of 2000-01-01T00:00:00Z (position 0, 0 events)"
    )
    assert table(nothing)[1:] == [SECRET_HEADERS, KEY_HEADERS]

    between = as_json("audit", "replay", "acme", "--position", str(updated - 1))
    assert [(s["name"], s["version"]) for s in between["secrets"]] == [("db", 1)]
    assert (between["as_of_position"], between["position"]) == (updated - 1, created)
    after_update = ok("audit", "replay", "acme", "--position", str(doomed)).stdout
    assert (
        after_update.splitlines()[0]
        == f"Tenant acme as of position {doomed} (position {doomed}, 4 events)"
    )
    assert column(after_update.split("\n\n")[1], "NAME") == ["db", "doomed"]
    assert column(after_update.split("\n\n")[1], "VERSION") == ["2", "1"]

    after = ok("audit", "replay", "acme", "--as-of", rotated["timestamp"]).stdout
    secrets_table, keys_table = after.split("\n\n")[1:]
    assert column(secrets_table, "NAME") == ["db"]
    assert column(keys_table, "VERSION") == ["1", "2"]
    assert column(keys_table, "STATUS") == ["retired", "active"]
    state = as_json("audit", "replay", "acme", "--as-of", rotated["timestamp"])
    assert [k["version"] for k in state["keys"]] == [1, 2]
    assert column(keys_table, "KEY-ID") == [k["key_id"] for k in state["keys"]]
    assert "value" not in json.dumps(state["secrets"])


@pytest.mark.parametrize(
    "options",
    [(), ("--as-of", "2024-01-01T00:00:00Z", "--position", "3")],
    ids=["neither", "both"],
)
def test_replay_needs_exactly_one_of_as_of_and_position(options: tuple[str, ...]) -> None:
    put("acme", "db")
    assert_usage_error(
        run("audit", "replay", "acme", *options), "give exactly one of --as-of and --position"
    )


# -- audit export -------------------------------------------------------------------------


def test_export_jsonl_has_one_line_per_audited_event_and_resumes_without_duplicates(
    tmp_path: Path,
) -> None:
    two_tenants()
    ok("audit", "seal")  # checkpoints are not audited events and are not exported
    out = tmp_path / "audit.jsonl"
    first = ok("audit", "export", "--all-tenants", "--format", "jsonl", "-o", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # records name people: owner only
    records = jsonl(out)
    entries = all_entries()
    assert len(records) == len(entries)
    assert [r["position"] for r in records] == [e["position"] for e in entries]
    assert [r["action"] for r in records] == [e["action"] for e in entries]
    assert list(records[0]) == list(EXPORT_FIELDS)
    assert first.stdout == ""
    resume = resume_position(first.stderr)
    assert first.stderr.startswith(f"Exported {len(records)} records;")
    assert resume >= records[-1]["position"]

    put("acme", "later")
    get("globex", "db")
    again = ok(
        "audit", "export", "--all-tenants", "--format", "jsonl",
        "--from-position", str(resume), "-o", str(out),
    )  # fmt: skip
    assert again.stderr.startswith("Exported 2 records;")
    combined = jsonl(out)
    positions = [r["position"] for r in combined]
    assert len(positions) == len(set(positions))
    assert positions == [e["position"] for e in all_entries()]

    # To stdout, one tenant: the same records as that tenant's entries.
    acme = ok("audit", "export", "--tenant", "acme", "--format", "jsonl")
    lines = [json.loads(line) for line in acme.stdout.splitlines()]
    assert [r["position"] for r in lines] == [e["position"] for e in reversed(audit_log("acme"))]
    assert resume_position(acme.stderr) >= lines[-1]["position"]


@pytest.mark.parametrize(
    ("interrupt", "fmt"),
    [("sigint", "jsonl"), ("sigterm", "csv"), ("keyboard-interrupt", "jsonl")],
)
def test_an_interrupted_export_exits_130_names_the_resume_position_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: str, fmt: str
) -> None:
    two_tenants()
    full = tmp_path / "full"
    ok("audit", "export", "--all-tenants", "--format", fmt, "-o", str(full))
    export_audit = SecretService.export_audit

    def interrupted(self: SecretService, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The real export (started, and scope-checked, right away), interrupted while the
        fourth record is on its way."""
        records = export_audit(self, **kwargs)

        def stream() -> Iterator[dict[str, Any]]:
            for index, record in enumerate(records):
                if index == 3:
                    if interrupt == "keyboard-interrupt":  # a second Ctrl-C: no waiting
                        raise KeyboardInterrupt
                    signal.raise_signal(signal.SIGINT if interrupt == "sigint" else signal.SIGTERM)
                yield record

        return stream()

    out = tmp_path / "part.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(SecretService, "export_audit", interrupted)
        stopped = run("audit", "export", "--all-tenants", "--format", fmt, "-o", str(out))
    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr, stopped.exception)
    assert stopped.stderr.startswith("Exported 3 records;")
    written = read_export(out, fmt)
    assert len(written) == 3
    assert resume_position(stopped.stderr) == int(written[-1]["position"])

    rest = ok(
        "audit", "export", "--all-tenants", "--format", fmt,
        "--from-position", str(resume_position(stopped.stderr)), "-o", str(out),
    )  # fmt: skip
    assert out.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")
    assert resume_position(rest.stderr) == resume_position(
        ok("audit", "export", "--all-tenants", "--format", fmt).stderr
    )


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("cut", [True, False], ids=["record-cut-short", "record-written-whole"])
def test_an_export_stopped_in_the_middle_of_a_write_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, cut: bool
) -> None:
    """A second Ctrl-C stops at once, also in the middle of writing a record (a slow
    reader of a pipe, a hung mount). Found by review: the record was left cut short, or
    written whole but not counted, and the resumed export wrote it again."""
    two_tenants()
    full = tmp_path / "full"
    ok("audit", "export", "--all-tenants", "--format", fmt, "-o", str(full))
    out = tmp_path / "part"

    class StoppedMidWrite:
        """The output file, stopped at once in the fourth record's write: with part of
        it written, or all of it."""

        def __init__(self, real: Any) -> None:
            self.real, self.rows = real, 0

        def write(self, text: str) -> int:
            self.rows += 1
            if self.rows == 4 + (fmt == "csv"):  # (after the CSV header)
                self.real.write(text[: len(text) // 2] if cut else text)
                raise KeyboardInterrupt
            return int(self.real.write(text))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    open_output = audit_export_cli.open_output

    @contextmanager
    def stopping(path: str | None, *, append: bool) -> Iterator[Any]:
        with open_output(path, append=append) as real:
            yield StoppedMidWrite(real)

    with monkeypatch.context() as patch:
        patch.setattr(audit_export_cli, "open_output", stopping)
        stopped = run("audit", "export", "--all-tenants", "--format", fmt, "-o", str(out))
    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr, stopped.exception)
    assert stopped.stderr.startswith(f"Exported {3 if cut else 4} records;")
    ok(
        "audit", "export", "--all-tenants", "--format", fmt,
        "--from-position", str(resume_position(stopped.stderr)), "-o", str(out),
    )  # fmt: skip
    assert out.read_text(encoding="utf-8") == full.read_text(encoding="utf-8")


def read_export(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The records of an export file (CSV values are text)."""
    if fmt == "jsonl":
        return jsonl(path)
    text = path.read_text(encoding="utf-8")
    _outputs.append(text)
    return list(csv.DictReader(io.StringIO(text)))


def test_export_to_a_file_it_cannot_write_is_one_error_line(tmp_path: Path) -> None:
    put("acme", "db")
    result = fails(
        "audit", "export", "--all-tenants", "--format", "csv", "-o", str(tmp_path / "no" / "f")
    )
    assert (
        result.stderr == f"Error: cannot write {tmp_path / 'no' / 'f'}: No such file or directory\n"
    )


def test_export_csv_has_the_export_header_once_even_when_resumed(tmp_path: Path) -> None:
    two_tenants()
    out = tmp_path / "audit.csv"
    first = ok("audit", "export", "--tenant", "acme", "--format", "csv", "-o", str(out))
    resume = resume_position(first.stderr)
    put("acme", "later")
    put("globex", "other")
    ok(
        "audit", "export", "--tenant", "acme", "--format", "csv",
        "--from-position", str(resume), "-o", str(out),
    )  # fmt: skip
    text = out.read_text(encoding="utf-8")
    _outputs.append(text)
    header, *rows = list(csv.reader(io.StringIO(text)))
    assert header == list(EXPORT_FIELDS)
    records = [dict(zip(header, row, strict=True)) for row in rows]
    acme = list(reversed(audit_log("acme")))
    assert [int(r["position"]) for r in records] == [e["position"] for e in acme]
    assert {r["tenant_id"] for r in records} == {"acme"}
    assert [json.loads(r["details"]) for r in records] == [e["details"] for e in acme]

    stdout = ok("audit", "export", "--all-tenants", "--format", "csv").stdout
    assert stdout.splitlines()[0] == ",".join(EXPORT_FIELDS)
    resumed = ok("audit", "export", "--all-tenants", "--format", "csv", "--from-position", "1")
    assert resumed.stdout.splitlines()[0].split(",")[0] == "2"  # no header when resuming


def test_export_time_window_and_a_progress_bar_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_tenants()
    entries = all_entries()
    since, until = entries[2]["timestamp"], entries[-1]["timestamp"]
    monkeypatch.setattr("keyledger.cli.audit_export.is_terminal", lambda stream: True)
    out = tmp_path / "window.jsonl"
    result = ok(
        "audit", "export", "--all-tenants", "--format", "jsonl",
        "--since", since, "--until", until, "-o", str(out),
    )  # fmt: skip
    assert "Exporting" in result.stderr
    assert [r["position"] for r in jsonl(out)] == [
        e["position"] for e in entries if since <= e["timestamp"] < until
    ]


@pytest.mark.parametrize(
    "target", [(), ("--tenant", "acme", "--all-tenants")], ids=["neither", "both"]
)
def test_export_needs_exactly_one_of_tenant_and_all_tenants(target: tuple[str, ...]) -> None:
    put("acme", "db")
    assert_usage_error(
        run("audit", "export", *target, "--format", "jsonl"),
        "give --tenant TENANT or --all-tenants",
    )


# -- audit seal / verify / anchor ---------------------------------------------------------


def test_seal_then_verify_is_intact() -> None:
    two_tenants()
    head = len(all_entries())
    sealed = ok("--user", "auditor", "audit", "seal")
    lines = sealed.stdout.splitlines()
    assert table(sealed.stdout)[0] == ["SEQUENCE", "FROM", "TO", "EVENTS", "DIGEST"]
    assert table(sealed.stdout)[1][:4] == ["1", "1", str(head), str(head)]
    assert lines[-1] == f"Sealed {head} events in 1 checkpoints"

    verified = ok("audit", "verify")
    assert verified.stdout == (
        f"Intact: {head + 1} events checked, {head} sealed in 1 checkpoints, "
        f"1 unsealed after position {head}\n"
    )
    report = as_json("audit", "verify")
    assert (report["intact"], report["findings"], report["checkpoints"]) == (True, [], 1)

    put("acme", "later")
    again = as_json("--user", "auditor", "audit", "seal")
    assert (again["sealed_events"], again["stopped_at"]) == (2, None)  # with checkpoint 1
    assert [c["sequence"] for c in again["checkpoints"]] == [2]
    assert ok("audit", "seal").stdout == "Sealed 0 events in 0 checkpoints\n"
    checkpoints = [json.loads(line) for line in ok("audit", "anchor").stdout.splitlines()]
    assert [c["sealed_by"] for c in checkpoints] == ["auditor", "auditor"]
    # Where each checkpoint landed, with no anchor file too (it said null: found by review).
    assert again["checkpoints"][0]["position"] == checkpoints[1]["position"] == head + 3
    ok("audit", "verify", "--from-position", str(head + 2))


def test_projections_run_once_seals_unless_told_not_to() -> None:
    """Found by review: --once ignored --seal (on by default), the worker's idle seal."""
    two_tenants()
    ok("projections", "run", "--once", "--no-seal")
    assert as_json("audit", "verify")["checkpoints"] == 0
    ok("projections", "run", "--once")
    report = as_json("audit", "verify")
    assert (report["intact"], report["checkpoints"]) == (True, 1)
    assert report["unsealed_events"] == 1  # the checkpoint itself


def test_verify_without_any_audit_key_is_a_setup_error_not_a_tampering_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: with no key it reported every event as unverifiable, NOT
    INTACT, a false alarm; seal said what was missing."""
    two_tenants()
    ok("audit", "seal")
    monkeypatch.delenv("KEYLEDGER_MASTER_KEY")
    for command in (("audit", "verify"), ("audit", "seal")):
        result = exits(1, *command)
        assert result.stdout == ""
        assert result.stderr.startswith("Error: no audit key"), result.stderr
        assert "NOT INTACT" not in result.stderr


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
def test_verify_names_an_event_modified_in_the_database(database: Path, sealed: bool) -> None:
    two_tenants()
    if sealed:
        ok("audit", "seal")
    read = next(e for e in all_entries() if e["user_id"] == "bob")["position"]
    tamper(database, read, b'"user_id":"bob"', b'"user_id":"eve"')

    result = exits(1, "audit", "verify")
    assert result.stdout.splitlines()[0] == "NOT INTACT: 1 findings"
    rows = table(result.stdout)[1:]
    assert rows[0] == ["POSITION", "KIND", "CHECKPOINT", "DETAIL"]
    assert rows[1][:3] == [str(read), "modified", "1" if sealed else "-"]
    report = json.loads(exits(1, "--json", "audit", "verify").stdout)
    assert report["intact"] is False
    assert [(f["kind"], f["position"]) for f in report["findings"]] == [("modified", read)]


def test_seal_stops_at_an_event_it_cannot_vouch_for(database: Path) -> None:
    two_tenants()
    head = len(all_entries())
    tamper(database, head - 1, b'"user_id":"system"', b'"user_id":"mallet"')
    result = exits(1, "audit", "seal")
    assert result.stderr.startswith(
        f"Error: sealing stopped at position {head - 1}: the event's tag does not"
    )
    assert result.stdout.splitlines()[-1] == f"Sealed {head - 2} events in 1 checkpoints"
    data = json.loads(exits(1, "--json", "audit", "seal").stdout)
    assert (data["stopped_at"], data["sealed_events"]) == (head - 1, 0)


def test_an_untagged_event_stops_the_seal_until_accepted(database: Path) -> None:
    two_tenants()
    head = len(all_entries())
    strip_tag = (
        "UPDATE stored_events SET state = substr(state, 1, length(state) - 28) WHERE rowid = ?"
    )
    with closing(sqlite3.connect(database)) as conn, conn:  # the trailer is 28 bytes
        conn.execute(strip_tag, (head,))
    stopped = exits(1, "audit", "seal")
    assert stopped.stderr.startswith(
        f"Error: sealing stopped at position {head}: the event carries no tag"
    )
    verified = exits(1, "audit", "verify")
    assert table(verified.stdout)[2][:2] == [str(head), "untagged"]
    elsewhere = exits(1, "audit", "seal", "--accept-untagged", str(head + 1))
    assert elsewhere.stderr.startswith(
        f"Error: sealing stopped at position {head}: the event carries no tag"
    )
    accepted = ok("audit", "seal", "--accept-untagged", str(head))
    # The event, and the checkpoint after it: a checkpoint is sealed by the next one.
    assert accepted.stdout.splitlines()[-1] == "Sealed 2 events in 1 checkpoints"
    ok("audit", "verify")
    refused = exits(2, "audit", "seal", "--accept-untagged", "0")
    assert "Invalid value for '--accept-untagged'" in refused.stderr


def test_anchor_shows_a_stream_cut_short(database: Path, tmp_path: Path) -> None:
    two_tenants()
    ok("audit", "seal")
    put("acme", "later")
    ok("audit", "seal")
    anchor = tmp_path / "anchor.jsonl"
    written = ok("audit", "anchor", "-o", str(anchor))
    assert written.stderr == f"Wrote 2 checkpoints to {anchor}\n"
    checkpoints = jsonl(anchor)
    assert [c["sequence"] for c in checkpoints] == [1, 2]
    assert ok("audit", "anchor").stdout == anchor.read_text(encoding="utf-8")
    assert ok("audit", "verify", "--anchor", str(anchor)).stdout.splitlines()[1] == (
        "Anchor: 2 checkpoints match the stream"
    )

    cut = checkpoints[0]["position"] + 1  # the newest events and the newest checkpoint
    with closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("DELETE FROM stored_events WHERE rowid >= ?", (cut,))
    ok("audit", "verify")  # without the anchor, the shorter stream looks whole
    result = exits(1, "audit", "verify", "--anchor", str(anchor))
    assert result.stdout.splitlines()[0].startswith("NOT INTACT: ")
    assert [row[1] for row in table(result.stdout)[2:]] == ["truncated"]
    report = json.loads(exits(1, "--json", "audit", "verify", "--anchor", str(anchor)).stdout)
    assert [(f["kind"], f["position"], f["checkpoint"]) for f in report["findings"]] == [
        ("truncated", cut, 2)
    ]


@pytest.mark.parametrize(
    ("after_a_good_line", "content", "fragment"),
    [
        (True, '{"sequence": 1}\n', "line 2 of"),
        (True, "not json\n", "line 2 of"),
        (False, "\n\n", "holds no checkpoints"),
    ],
    ids=["missing-fields", "not-json", "empty"],
)
def test_a_malformed_anchor_is_a_usage_error(
    tmp_path: Path, after_a_good_line: bool, content: str, fragment: str
) -> None:
    put("acme", "db")
    ok("audit", "seal")
    anchor = tmp_path / "anchor.jsonl"
    good = ok("audit", "anchor").stdout if after_a_good_line else ""
    anchor.write_text(good + content, encoding="utf-8")
    assert_usage_error(run("audit", "verify", "--anchor", str(anchor)), fragment)
    assert_usage_error(run("audit", "verify", "--anchor", str(tmp_path / "none")), "cannot read")


def test_anchor_and_seal_without_what_they_need_are_one_error_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put("acme", "db")
    assert fails("audit", "anchor").stderr == (
        "Error: no checkpoints to anchor: run `keyledger audit seal` first\n"
    )
    monkeypatch.delenv("KEYLEDGER_MASTER_KEY")
    assert fails("audit", "seal").stderr.startswith("Error: no audit key")


# -- the installed script -----------------------------------------------------------------


def test_the_installed_script_exports_seals_and_verifies(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYLEDGER_", "SMRT_"))}
    env |= {
        "KEYLEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'script.db'}",
        "KEYLEDGER_MASTER_KEY": MASTER_KEY,
    }

    def script(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(SCRIPT), *args],
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        _outputs.extend((done.stdout, done.stderr))
        return done

    assert script("secrets", "put", "acme", "db", stdin=VALUE).returncode == 0
    read = subprocess.run(
        [str(SCRIPT), "secrets", "get", "acme", "db"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert read.stdout == VALUE  # the one output that is a value
    out = tmp_path / "audit.jsonl"
    exported = script("audit", "export", "--all-tenants", "--format", "jsonl", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == "Exported 3 records; resume after position 3 with --from-position 3\n"
    assert [r["action"] for r in jsonl(out)] == ["create_key", "create", "read"]
    sealed = script("--user", "ops", "audit", "seal")
    assert sealed.stdout.endswith("Sealed 3 events in 1 checkpoints\n"), sealed.stderr
    verified = script("audit", "verify")
    assert (verified.returncode, verified.stderr) == (0, "")
    assert verified.stdout.startswith("Intact: 4 events checked, 3 sealed in 1 checkpoints")
    trail = script("audit", "trail", "acme", "db")
    assert [row[2] for row in table(trail.stdout)[1:]] == ["create", "read"]
    usage = script("audit", "replay", "acme")
    assert (usage.returncode, usage.stdout) == (2, "")


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def postgres_url(_postgres_server: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A schema of this test alone in KEYLEDGER_DATABASE_URL, dropped afterwards."""
    with own_schema("clia") as schema:
        url = f"{POSTGRES_URL}?schema={schema}"
        monkeypatch.setenv("KEYLEDGER_DATABASE_URL", url)
        yield url


@pytest.mark.postgres
def test_an_investigation_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    ok("db", "init")
    two_tenants()
    ok("keys", "rotate", "acme")
    ok("keys", "reencrypt", "acme")
    ok("secrets", "delete", "acme", "db", "--yes")

    trail = ok("audit", "trail", "acme", "db").stdout
    assert column(trail, "ACTION") == ["create", "read", "update (re-encrypt)", "delete"]
    assert column(trail, "KEY") == ["1", "1", "2", "-"]
    entries = all_entries()
    assert {e["tenant_id"] for e in entries} == {"acme", "globex"}
    deleted = position_of("delete", "db")
    before = as_json("audit", "replay", "acme", "--position", str(deleted - 1))
    assert [s["name"] for s in before["secrets"]] == ["api", "db"]
    assert [k["status"] for k in before["keys"]] == ["retired", "active"]
    after = as_json("audit", "replay", "acme", "--position", str(deleted))
    assert [s["name"] for s in after["secrets"]] == ["api"]

    out = tmp_path / "audit.jsonl"
    ok("audit", "export", "--all-tenants", "--format", "jsonl", "-o", str(out))
    assert [r["position"] for r in jsonl(out)] == [e["position"] for e in entries]
    csv_out = ok("audit", "export", "--tenant", "globex", "--format", "csv").stdout
    assert [r["tenant_id"] for r in csv.DictReader(io.StringIO(csv_out))] == ["globex"] * 2

    assert ok("audit", "seal").stdout.endswith(f"Sealed {len(entries)} events in 1 checkpoints\n")
    anchor = tmp_path / "anchor.jsonl"
    ok("audit", "anchor", "-o", str(anchor))
    verified = ok("audit", "verify", "--anchor", str(anchor))
    assert verified.stdout.splitlines()[0].startswith(
        f"Intact: {len(entries) + 1} events checked, {len(entries)} sealed in 1 checkpoints"
    )


def test_investigations_of_a_stream_with_an_undecodable_event_fail_with_one_line(
    database: Path,
) -> None:
    """After `audit verify` reports a modified event, the commands an investigator runs
    next name the position in one "Error:" line, with no traceback."""
    two_tenants()
    head = len(all_entries())
    tamper(database, head, b'{"timestamp"', b"{garbage!!!")
    verified = exits(1, "audit", "verify")
    assert str(head) in verified.stdout
    for command in (
        ("audit", "export", "--all-tenants", "--format", "jsonl"),
        ("audit", "replay", "globex", "--position", str(head)),
    ):
        failed = exits(1, *command)
        assert failed.stderr == (
            f"Error: the event at position {head} cannot be decoded: its stored bytes were "
            "altered; run `keyledger audit verify`\n"
        ), command


def test_an_audit_query_whose_catch_up_meets_an_undecodable_event_fails_with_one_line(
    database: Path,
) -> None:
    two_tenants()  # no audit query yet: the audit model has not caught up
    tamper(database, 2, b'{"timestamp"', b"{garbage!!!")
    failed = exits(1, "audit", "log", "acme")
    assert failed.stderr == (
        "Error: the event at position 2 cannot be decoded: its stored bytes were "
        "altered; run `keyledger audit verify`\n"
    )
