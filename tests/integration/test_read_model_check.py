"""`check_read_models`: the read models compared with a replay of the stream, row by row."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_rebuild import answers, corrupt_every_read_model, varied_scenario

from conftest import shared_store_url
from keyledger import InvalidInput, SecretService, StorageError, tenant
from keyledger.application import read_model_check
from keyledger.models import ReadModelCheck
from keyledger.projections.schema import READ_MODEL_COLUMNS

MakeService = Callable[..., SecretService]


def counts(report: ReadModelCheck) -> dict[str, tuple[int, int, int]]:
    """Per table: (missing, unexpected, altered)."""
    return {t.table: (t.missing, t.unexpected, t.altered) for t in report.tables}


def table_names(service: SecretService) -> set[str]:
    with service._ledger.reading() as cur:
        if service._ledger.store.dialect == "postgres":
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        else:
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in cur.fetchall()}


def test_the_compared_columns_are_the_tables_columns(service: SecretService) -> None:
    postgres = service._ledger.store.dialect == "postgres"
    with service._ledger.reading() as cur:
        for table, (keys, columns) in READ_MODEL_COLUMNS.items():
            if postgres:
                cur.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = ?",
                    (table,),
                )
            else:
                cur.execute("SELECT name FROM pragma_table_info(?)", (table,))
            present = [row[0] for row in cur.fetchall()]
            assert sorted(present) == sorted((*keys, *columns)), table
            assert len(present) == len(keys) + len(columns)


def test_every_read_model_of_a_varied_history_matches_its_replay(service: SecretService) -> None:
    varied_scenario(service)

    report = service.check_read_models()

    assert report.consistent, report.differences
    assert report.read_models == ["catalog", "audit", "keys"]
    assert counts(report) == {t: (0, 0, 0) for t in ("kl_catalog", "kl_keys", "kl_audit")}
    rows = {t.table: t.rows for t in report.tables}
    assert rows["kl_audit"] == len(answers(service)["audit"]) > 30
    assert rows["kl_catalog"] == 6
    assert rows["kl_keys"] == 4
    assert report.events_replayed >= rows["kl_audit"]
    assert {t.position for t in report.tables} == {report.tables[0].position}
    assert not any("_check" in name for name in table_names(service))  # copies dropped


def test_an_empty_store_is_consistent(service: SecretService) -> None:
    report = service.check_read_models()
    assert report.consistent
    assert report.events_replayed == 0
    assert all(t.rows == 0 for t in report.tables)


def test_edited_rows_are_found_named_and_left_as_they_are(service: SecretService) -> None:
    varied_scenario(service)
    answers(service)  # the audit model caught up: its rows are there to edit
    with service._ledger.store.writing() as cur:
        cur.execute(
            "UPDATE kl_catalog SET access_count = 7 WHERE tenant_id = 'acme' AND name = 'db'"
        )
        cur.execute("UPDATE kl_catalog SET category = 'x', metadata = '{}' WHERE name = 'api'")
        cur.execute("DELETE FROM kl_catalog WHERE tenant_id = 'globex'")
        cur.execute(
            "INSERT INTO kl_catalog SELECT secret_id, tenant_id, 'ghost', disabled, expired, "
            "deleted, category, description, metadata, version, key_version, envelope_version, "
            "expires_at, created_at, updated_at, access_count, last_accessed_at "
            "FROM kl_catalog WHERE tenant_id = 'acme' AND name = 'off'"
        )
        cur.execute("UPDATE kl_keys SET status = 'active' WHERE tenant_id = 'acme' AND version = 1")
        cur.execute("DELETE FROM kl_audit WHERE position IN (3, 5)")
        cur.execute("UPDATE kl_audit SET user_id = 'mallory' WHERE position = 4")
    edited = answers(service)

    report = service.check_read_models()

    assert not report.consistent
    assert counts(report) == {
        "kl_catalog": (1, 1, 2),
        "kl_keys": (0, 0, 1),
        "kl_audit": (2, 0, 1),
    }
    found = {
        (d.table, d.kind, d.tenant_id, d.name, d.version, d.position, tuple(d.columns))
        for d in report.differences
    }
    assert found == {
        ("kl_catalog", "missing", "globex", "db", None, None, ()),
        ("kl_catalog", "unexpected", "acme", "ghost", None, None, ()),
        ("kl_catalog", "altered", "acme", "db", None, None, ("access_count",)),
        ("kl_catalog", "altered", "acme", "api", None, None, ("category",)),
        ("kl_keys", "altered", "acme", None, 1, None, ("status",)),
        ("kl_audit", "missing", None, None, None, 3, ()),
        ("kl_audit", "missing", None, None, None, 5, ()),
        ("kl_audit", "altered", None, None, None, 4, ("user_id",)),
    }
    assert answers(service) == edited  # the check changed no live row
    service.rebuild_read_models()
    assert service.check_read_models().consistent


def test_differences_are_listed_up_to_a_bound_and_counted_in_full(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_model_check, "EXAMPLES", 2)
    varied_scenario(service)
    answers(service)  # the audit model caught up: its rows are there to delete
    corrupt_every_read_model(service)  # every count, every key status, every audit row

    report = service.check_read_models()

    by_table = {t.table: t for t in report.tables}
    assert by_table["kl_audit"].missing == by_table["kl_audit"].rows > 30
    assert by_table["kl_catalog"].altered == 6
    shown = [(d.table, d.kind) for d in report.differences]
    assert shown.count(("kl_audit", "missing")) == 2
    assert shown.count(("kl_catalog", "altered")) == 2
    assert report.examples_per_kind == 2


@pytest.mark.parametrize(
    ("names", "tables"),
    [
        (["audit"], {"kl_audit"}),
        (["keys"], {"kl_catalog", "kl_keys"}),  # one projector writes both
        (["catalog", "audit"], {"kl_catalog", "kl_keys", "kl_audit"}),
    ],
)
def test_a_named_check_compares_those_read_models(
    service: SecretService, names: list[str], tables: set[str]
) -> None:
    varied_scenario(service)
    answers(service)  # the audit model caught up: its rows are there to delete
    corrupt_every_read_model(service)

    report = service.check_read_models(names=names)

    assert {t.table for t in report.tables} == tables
    assert {d.table for d in report.differences} == tables
    assert not any("_check" in name for name in table_names(service))


@pytest.mark.parametrize(
    "names", [["secrets"], "audit", [1], []], ids=["unknown", "str", "int", "none"]
)
def test_a_check_of_unknown_read_models_is_refused(service: SecretService, names: Any) -> None:
    with pytest.raises(InvalidInput):
        service.check_read_models(names=names)


def test_a_check_reports_its_progress_over_the_whole_stream(service: SecretService) -> None:
    varied_scenario(service)
    seen: list[int] = []

    report = service.check_read_models(progress=seen.append)

    assert sum(seen) == report.events_replayed > 0


def test_a_lagging_audit_model_is_caught_up_and_compared_in_full(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyledger.application import ledger

    monkeypatch.setattr(ledger, "AUDIT_CATCH_UP_EVERY", 10**9)
    varied_scenario(service)
    assert service.read_model_lag()["audit"] > 30

    report = service.check_read_models(names=["audit"])

    (audit,) = report.tables
    assert report.consistent
    assert audit.rows == report.events_replayed > 30
    assert service.read_model_lag()["audit"] == 0


def test_a_check_that_loses_its_copies_says_so(service: SecretService, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("SQLite's copies are TEMP tables of the check's own connection")
    varied_scenario(service)

    def meanwhile(count: int) -> None:  # another check of the same set ends first
        with service._ledger.store.projecting() as cur:
            cur.execute("DROP TABLE kl_tracking_check_audit")

    with pytest.raises(StorageError, match="another check of the same read models"):
        service.check_read_models(progress=meanwhile, names=["audit"])
    assert service.check_read_models(names=["audit"]).consistent


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from keyledger import SecretService, tenant

    url, key, stop, started = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    service = SecretService.create(url, master_key=key)
    done = 0
    with tenant("busy", user_id="writer"):
        while not stop.exists() or done < 50:
            name = f"s{done % 17}"
            service.store(name, f"v{done}")
            service.retrieve(name)
            if done % 25 == 0:
                service.rotate_key()
            if done % 40 == 39:
                service.delete(name)
            done += 1
            if done == 5:
                started.touch()
    service.close()
    print(done)
    """
)


@pytest.mark.slow
def test_checks_while_another_process_writes_find_no_difference(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    """The catalog is compared with its replay at one position under the write lock, the
    audit model up to the position it reached: writes going on never show as differences."""
    service = make_service()
    url = shared_store_url(backend, tmp_path)
    with tenant("quiet"):
        service.store("a", "1")
    stop, started = tmp_path / "stop", tmp_path / "started"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, master_key, str(stop), str(started)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reports = []
        for _ in range(4):
            reports.append(service.check_read_models())
            time.sleep(0.05)  # the writer writes on between two checks
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0
    assert int(out) >= 50
    assert all(report.consistent for report in reports), [r.differences for r in reports]
    positions = [report.tables[0].position for report in reports]
    assert positions == sorted(positions)
    assert positions[-1] > positions[0]  # writes went on meanwhile
    final = service.check_read_models()
    assert final.consistent
    assert json.loads(final.model_dump_json())["consistent"] is True


def test_on_sqlite_a_check_never_holds_the_write_lock(
    service: SecretService, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its copies are TEMP tables written inside one read snapshot: another connection
    can take the write lock at any moment of the replay. (Replayed in write
    transactions, as a rebuild's are, the check kept writers waiting for seconds on a
    large store, past a short lock timeout: found by review.)"""
    if backend != "sqlite":
        pytest.skip("the SQLite file's write lock")
    varied_scenario(service)
    database = str(service._ledger.env.get("SQLITE_DBNAME"))
    taken: list[bool] = []
    real = read_model_check.copy_replayer

    def replayer(*args: Any) -> Any:
        replay_page = real(*args)

        def replaying(cur: Any) -> Any:
            items = replay_page(cur)
            other = sqlite3.connect(database, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                taken.append(True)
            except sqlite3.OperationalError:
                taken.append(False)
            finally:
                other.close()
            return items

        return replaying

    monkeypatch.setattr(read_model_check, "copy_replayer", replayer)
    monkeypatch.setattr(read_model_check, "PAGE_SIZE", 10)
    monkeypatch.setattr("keyledger.application.read_models.PAGE_SIZE", 10)

    report = service.check_read_models()

    assert report.consistent
    assert len(taken) > 3
    assert all(taken)


def test_an_audit_row_forged_beyond_the_stream_head_is_unexpected(service: SecretService) -> None:
    """`audit log` shows it first, and no comparison up to the audit model's position
    looked at it (found by review)."""
    varied_scenario(service)
    head = answers(service)["audit"][0].position  # (the audit model caught up)
    with service._ledger.store.writing() as cur:
        cur.execute(
            "INSERT INTO kl_audit (position, timestamp, tenant_id, secret_name, action, "
            "result, user_id, ip_address, user_agent, key_version, details) "
            "VALUES (?, 0, 'acme', 'db', 'read', 'success', 'mallory', NULL, NULL, 1, '{}')",
            (head + 1000,),
        )

    report = service.check_read_models(names=["audit"])

    assert not report.consistent
    (audit,) = report.tables
    assert (audit.missing, audit.unexpected, audit.altered) == (0, 1, 0)
    [forged] = report.differences
    assert (forged.kind, forged.position) == ("unexpected", head + 1000)
