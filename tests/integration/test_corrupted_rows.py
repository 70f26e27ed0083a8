"""Rows altered in the database give typed errors and findings, never a crash.

Someone with write access to the store (or a bad restore) can change what a row holds: a
field of an event's JSON renamed or retyped, a column set to another type (SQLite keeps
whatever it is given), a wrapped data key written back as text. Reads, writes and audit
queries must then fail with a keyledger error that says what happened (``AuditTampered``,
``DecryptionFailed``), ``audit verify`` must name the row, and ``audit seal`` must not
seal it. Found by fuzzing a store's rows; each case here is one of the fuzzer's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_audit_tamper import SQLiteRaw

from conftest import MakeService
from keyledger import (
    AuditTampered,
    DecryptionFailed,
    SecretDisabled,
    SecretService,
    StorageError,
    super_admin,
    tenant,
)
from keyledger.application import ledger as ledger_module
from keyledger.cli import main
from keyledger.domain.ids import secret_id
from keyledger.infrastructure.settings import KeyledgerSettings

Tamper = Callable[[str], None]


@pytest.fixture
def backend() -> str:
    """SQLite only: its columns hold any type, and the test edits its file directly."""
    return "sqlite"


@pytest.fixture
def tampered(make_service: MakeService) -> tuple[Path, Tamper]:
    """A store with two secrets of tenant t1 (s1 read once, s2 disabled), closed; and a
    function running one SQL statement on its file."""
    service = make_service()
    service.store_for_tenant("t1", "s1", "value-1")
    service.retrieve_for_tenant("t1", "s1")
    service.store_for_tenant("t1", "s2", "value-2")
    service.disable_for_tenant("t1", "s2")
    path = Path(str(service._ledger.env.get("SQLITE_DBNAME")))
    service.close()

    def run(statement: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(statement)

    return path, run


def event_position(path: Path, topic_end: str) -> int:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT rowid FROM stored_events WHERE topic LIKE ? ORDER BY rowid LIMIT 1",
            ("%" + topic_end,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_renamed_field_fails_reads_and_audit_queries_as_tampering(
    tampered: tuple[Path, Tamper], make_service: MakeService
) -> None:
    path, run = tampered
    at = event_position(path, "SecretCreated")
    run(
        "UPDATE stored_events SET state = CAST(REPLACE(CAST(state AS TEXT), "
        f"'\"name\"', '\"namf\"') AS BLOB) WHERE rowid = {at}"
    )
    service = make_service()

    with pytest.raises(AuditTampered, match="audit verify"):
        service.retrieve_for_tenant("t1", "s1")
    with pytest.raises(AuditTampered, match=f"position {at}"), tenant("t1"):
        service.get_audit_logs()
    report = service.verify_audit()
    assert not report.intact
    assert (at, "modified") in {(f.position, f.kind) for f in report.findings}


@pytest.mark.parametrize(
    "assignment",
    [
        "originator_version = -1",
        "originator_version = NULL",
        "originator_version = 'x'",
        "originator_version = 9223372036854775807 + 0.5",
        "originator_id = 'zz'",
        "originator_id = NULL",
        "topic = 7",
        "state = CAST(X'7B7D' AS TEXT)",
        "state = NULL",
    ],
)
def test_audit_verify_names_a_row_whose_columns_were_retyped(
    tampered: tuple[Path, Tamper], make_service: MakeService, assignment: str
) -> None:
    path, run = tampered
    at = event_position(path, "SecretRead")
    run(f"UPDATE stored_events SET {assignment} WHERE rowid = {at}")
    service = make_service()

    report = service.verify_audit()

    assert (at, "modified") in {(f.position, f.kind) for f in report.findings}
    sealed = service.seal_audit()
    assert sealed.stopped_at == at  # never sealed: sealing it would vouch for it
    with pytest.raises(AuditTampered, match=f"position {at}"), super_admin():
        list(service.export_audit())


def test_the_cli_reports_a_tampered_row_in_one_error_line(
    tampered: tuple[Path, Tamper], master_key: str
) -> None:
    path, run = tampered
    at = event_position(path, "SecretCreated")
    run(f"UPDATE stored_events SET state = CAST(X'00' AS BLOB) || state WHERE rowid = {at}")
    env = {"KEYLEDGER_DATABASE_URL": f"sqlite:///{path}", "KEYLEDGER_MASTER_KEY": master_key}

    for args in (["secrets", "get", "t1", "s1"], ["audit", "log", "t1"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: "), result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_wrapped_key_written_back_as_text_is_undecryptable_material(
    tampered: tuple[Path, Tamper], make_service: MakeService
) -> None:
    _, run = tampered
    run("UPDATE kl_key_material SET wrapped = hex(wrapped)")
    service = make_service()

    with pytest.raises(DecryptionFailed):
        service.retrieve_for_tenant("t1", "s1")
    report = service.diagnose_tenant_secret_key_drift("t1")
    assert "active_tenant_encryption_key_unwrap_failed" in {i.code for i in report.issues}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"disabled":true', '"disabled":false'),  # a plausible edit: the flag turned off
        ('"envelope":', '"envelopf":'),  # a field gone
        ('"metadata":{}', '"metadata":[]'),  # a field of another type
    ],
)
def test_a_snapshot_altered_in_the_database_is_replayed_past(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, old: str, new: str
) -> None:
    """Snapshots are not part of the stream (audit verify never sees them): one whose tag
    does not verify is not used; the secret is replayed from its events."""
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", 5)
    service = make_service()
    for i in range(4):
        service.store_for_tenant("t1", "s1", f"value-{i}")
    service.disable_for_tenant("t1", "s1")  # version 5: snapshotted, disabled
    path = Path(str(service._ledger.env.get("SQLITE_DBNAME")))
    service.close()
    with sqlite3.connect(path) as conn:
        changed = conn.execute(
            "UPDATE stored_snapshots SET state = CAST(REPLACE(CAST(state AS TEXT), ?, ?) "
            "AS BLOB) WHERE instr(CAST(state AS TEXT), ?) > 0",
            (old, new, old),
        ).rowcount
    assert changed == 1

    service = make_service()
    with pytest.raises(SecretDisabled):
        service.retrieve_for_tenant("t1", "s1")
    service.enable_for_tenant("t1", "s1")
    assert service.retrieve_for_tenant("t1", "s1").value == "value-3"


@pytest.mark.parametrize("stores", [7, 5], ids=["moved-on", "at-the-snapshots-version"])
def test_a_snapshot_tagged_before_an_audit_key_rotation_is_renewed_by_the_next_load(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, stores: int
) -> None:
    """After a rotation of the audit key no snapshot verifies: the first load replays
    the secret from its events and snapshots it afresh, under the new key, so that the
    loads after it start from a snapshot again (before 0.16.0 every load replayed until
    the secret's next multiple of SNAPSHOT_INTERVAL)."""
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", 5)
    old_key, new_key = "1a" * 32, "2b" * 32
    service = make_service(settings=KeyledgerSettings(audit_key=old_key))
    for i in range(stores):
        service.store_for_tenant("t1", "s1", f"value-{i}")  # version 5: snapshotted
    service.close()

    def rotated() -> tuple[SecretService, list[int]]:
        opened = make_service(
            settings=KeyledgerSettings(audit_key=new_key, previous_audit_keys=old_key)
        )
        ledger = opened._ledger
        replays: list[int] = []
        replay = ledger._from_events

        def counted(aggregate_id: Any, version: int | None) -> Any:
            replays.append(version or 0)
            return replay(aggregate_id, version)

        monkeypatch.setattr(ledger, "_from_events", counted)
        return opened, replays

    service, replays = rotated()
    assert service.retrieve_for_tenant("t1", "s1").value == f"value-{stores - 1}"
    assert replays == [0]  # replayed past the snapshot tagged under the old key
    snapshots = service._ledger.snapshots
    assert snapshots is not None
    versions = [
        e.originator_version for e in snapshots.recorder.select_events(secret_id("t1", "s1"))
    ]
    assert versions == sorted({5, stores})
    service.close()

    service, replays = rotated()
    assert service.retrieve_for_tenant("t1", "s1").value == f"value-{stores - 1}"
    assert replays == []  # started from the renewed snapshot


@pytest.mark.parametrize("source", ["its-own-first-event", "another-secrets-event"])
def test_an_event_copied_into_the_snapshot_table_is_not_built_upon(
    make_service: MakeService, source: str
) -> None:
    """The snapshot table is writable by whoever can write the database (on PostgreSQL,
    by the application's own role). An event copied there at the secret's newest version
    would, as a snapshot, bring back the value and flags of that event and hide every
    later one (found by review: a disabled secret read back its first value, and another
    secret's event read back that secret's value under this one's name)."""
    service = make_service()
    service.store_for_tenant("t1", "s1", "first")
    service.store_for_tenant("t1", "s1", "second")
    service.store_for_tenant("t1", "s2", "of-s2")
    service.disable_for_tenant("t1", "s1")  # version 3
    path = Path(str(service._ledger.env.get("SQLITE_DBNAME")))
    service.close()
    s1, s2 = secret_id("t1", "s1").hex, secret_id("t1", "s2").hex
    copied = s1 if source == "its-own-first-event" else s2
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO stored_snapshots SELECT ?, 3, topic, state FROM stored_events "
            "WHERE originator_id = ? AND originator_version = 1",
            (s1, copied),
        )

    service = make_service()
    with pytest.raises(SecretDisabled):
        service.retrieve_for_tenant("t1", "s1")
    service.enable_for_tenant("t1", "s1")
    assert service.retrieve_for_tenant("t1", "s1").value == "second"
    assert service.retrieve_for_tenant("t1", "s2").access_count == 1  # its first read


def test_a_snapshot_forged_into_the_event_stream_is_tampering(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", 5)
    service = make_service()
    for i in range(5):
        service.store_for_tenant("t1", "s1", f"value-{i}")  # version 5: snapshotted
    service.disable_for_tenant("t1", "s1")  # version 6
    path = Path(str(service._ledger.env.get("SQLITE_DBNAME")))
    service.close()
    with sqlite3.connect(path) as conn:  # version 6 replaced by a copy of the snapshot
        conn.execute(
            "UPDATE stored_events SET (topic, state) = (SELECT topic, state FROM "
            "stored_snapshots) WHERE originator_version = 6 AND topic LIKE '%SecretDisabled'"
        )

    service = make_service()
    with pytest.raises(AuditTampered):
        service.retrieve_for_tenant("t1", "s1")


@pytest.mark.parametrize(
    ("topic_end", "old", "new"),
    [
        ("SecretCreated", '"originator_topic":"keyledger.domain.secret:', '"originator_topic":"x'),
        ("SecretDisabled", '"tenant_id":"t1"', '"tenant_id":"t9"'),
        ("KeyRotated", '"retired_version":1', '"retired_version":-1'),
    ],
    ids=["unknown-topic", "moved-tenant", "unknown-key-version"],
)
def test_a_replay_of_altered_events_is_tampering_not_a_traceback(
    tampered: tuple[Path, Tamper], make_service: MakeService, topic_end: str, old: str, new: str
) -> None:
    """Replay as of a time applies the events through the domain's own methods; an
    altered one they cannot apply is AuditTampered like in every other reader (found by
    review: TopicError, KeyError and OriginatorVersionError reached the CLI)."""
    path, run = tampered
    if topic_end == "KeyRotated":  # (the tampered store has none: one more)
        service = make_service()
        service.rotate_key_for_tenant("t1")
        service.close()
    at = event_position(path, topic_end)
    run(
        "UPDATE stored_events SET state = CAST(REPLACE(CAST(state AS TEXT), "
        f"'{old}', '{new}') AS BLOB) WHERE rowid = {at}"
    )
    service = make_service()
    later = datetime(2099, 1, 1, tzinfo=UTC)

    with pytest.raises(AuditTampered, match="audit verify"):
        service.state_as_of("t1", at=later)


def test_an_audit_model_set_ahead_of_the_stream_is_refused_not_silently_behind(
    tampered: tuple[Path, Tamper], make_service: MakeService
) -> None:
    """The audit model's tracked position moved past the newest event would make every
    later catch-up skip what is appended until the stream gets there (found by review:
    new reads and stores never appeared in the audit log). Audit queries now refuse,
    and a rebuild sets the model right."""
    _, run = tampered
    run("UPDATE kl_tracking SET position = position + 1000")
    service = make_service()
    service.retrieve_for_tenant("t1", "s1")  # (a write never fails for it: logged)

    with tenant("t1"), pytest.raises(StorageError, match="rebuild audit"):
        service.get_audit_logs()

    service.rebuild_read_models(names=["audit"])
    with tenant("t1"):
        reads = [e for e in service.get_audit_logs() if e.action == "read"]
    assert len(reads) == 2


UNREADABLE_ROWS = {
    "metadata-not-json": ("UPDATE kl_catalog SET metadata = '{'", "list"),
    "created-at-text": ("UPDATE kl_catalog SET created_at = 'x'", "list"),
    "expiry-out-of-range": ("UPDATE kl_catalog SET expires_at = 9223372036854775807", "list"),
    "key-status-unknown": ("UPDATE kl_keys SET status = 'x'", "keys"),
    "key-created-at-bytes": ("UPDATE kl_keys SET created_at = X'00'", "due"),
    "audit-time-text": ("UPDATE kl_audit SET timestamp = 'x'", "logs"),
    "tracked-position-text": ("UPDATE kl_tracking SET position = 'x'", "logs"),
    # (a diagnosis confirms a catalog row that marks its secret unrecoverable against the
    # secret's events: an unreadable one is reported, see the next test)
}


@pytest.mark.parametrize(("edit", "query"), UNREADABLE_ROWS.values(), ids=list(UNREADABLE_ROWS))
def test_a_read_model_row_edited_to_an_unreadable_value_is_a_storage_error(
    tampered: tuple[Path, Tamper], make_service: MakeService, edit: str, query: str
) -> None:
    """Read models are tables anyone who can write the database can edit; a value of
    another type there surfaced as a raw JSONDecodeError, ValidationError, TypeError or
    OverflowError (found by review). It is a StorageError naming the rebuild, which
    sets it right."""
    _, run = tampered
    service = make_service()
    with tenant("t1"):
        service.get_audit_logs()  # (the audit model caught up: it has rows to edit)
    service.close()
    run(edit)
    service = make_service()
    calls = {
        "list": lambda: service.list_for_tenant("t1", status=None),
        "keys": lambda: service.list_keys("t1"),
        "due": lambda: service.keys_due("t1"),
        "logs": lambda: service.get_audit_logs(tenant_id="t1"),
        "drift": lambda: service.diagnose_tenant_secret_key_drift("t1"),
    }

    with super_admin(), pytest.raises(StorageError, match="projections rebuild"):
        calls[query]()
    service.rebuild_read_models()
    with super_admin():
        calls[query]()
    assert service.store_for_tenant("t1", "s1", "again").version == 2


def test_a_catalog_key_version_edited_to_text_is_reported_as_drift_of_the_read_model(
    tampered: tuple[Path, Tamper], make_service: MakeService
) -> None:
    """The diagnosis confirms the row against the secret's events, which contradict it:
    a read model to rebuild, not a secret to delete (and not an error that stops the
    diagnosis of the rest)."""
    _, run = tampered
    run("UPDATE kl_catalog SET key_version = 'x'")
    service = make_service()

    report = service.diagnose_tenant_secret_key_drift("t1")

    assert [i.code for i in report.issues if i.severity == "error"] == [
        "read_model_inconsistent_with_stream"
    ]
    assert not any(i.repair_action == "delete-unrecoverable-secret" for i in report.issues)
    service.rebuild_read_models()
    assert service.diagnose_tenant_secret_key_drift("t1").ok


@pytest.mark.parametrize(
    "assignment",
    ["originator_id = 'not-an-aggregate-id'", "originator_version = 'two'"],
    ids=["id-retyped", "version-retyped"],
)
def test_audit_verify_reports_retyped_copies_once_the_primary_key_is_gone(
    tampered: tuple[Path, Tamper], make_service: MakeService, assignment: str
) -> None:
    """Two rows retyped alike share a (id, version) once the primary key is dropped: the
    search for repeated events must report them as malformed rows, not crash on them
    (found by re-reading the stream module: its id conversion raised ValueError)."""
    path, run = tampered
    at = event_position(path, "SecretRead")
    raw = SQLiteRaw(path)
    try:
        raw.drop_events_key()
    finally:
        raw.close()
    with sqlite3.connect(path) as conn:
        copy_at = conn.execute(
            "INSERT INTO stored_events (originator_id, originator_version, topic, state) "
            f"SELECT originator_id, originator_version, topic, state FROM stored_events "
            f"WHERE rowid = {at}"
        ).lastrowid
    run(f"UPDATE stored_events SET {assignment} WHERE rowid IN ({at}, {copy_at})")
    service = make_service()

    findings = {(f.position, f.kind) for f in service.verify_audit().findings}

    assert {(0, "key_dropped"), (at, "modified"), (copy_at, "modified")} <= findings


def test_an_export_reads_the_stream_whatever_the_read_models_hold(
    tampered: tuple[Path, Tamper], make_service: MakeService
) -> None:
    """An export is evidence: 0.21.0's check of the stream's positions read the audit
    model's tracked position first, and an edited kl_tracking stopped every export
    (found by review)."""
    _, run = tampered
    run("UPDATE kl_tracking SET position = 'x'")
    service = make_service()

    with super_admin():
        records = list(service.export_audit())

    assert records
    assert {record["tenant_id"] for record in records} == {"t1"}
