"""Randomised tamper trials: whatever one changes in the stored stream, verify names the spot.

One scenario store per backend (SQLite and PostgreSQL, module-scoped): several tenants'
stores, reads, denials, rotations, re-encryptions, deletions and a compromise, sealed by two
checkpoints (C1 in the middle, C2 at the end of the sealed range), then a short unsealed
tail. Each trial tampers with the events table through raw SQL (on PostgreSQL with the
append-only triggers disabled inside the tampering transaction), checks that
``verify_audit`` reports the exact position, then restores the table row for row and checks
that the store verifies intact again, so every trial starts from the same store.

Trial kinds: one changed byte (sealed range, sometimes the tail), one deleted event, two
events' contents swapped, a forged event (a copy of another row under another identity) and
the newest events truncated after a fresh seal (verified against the anchor).
"""

from __future__ import annotations

import itertools
import random
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL, RUN_ID, MakeService, drop_schema
from keyledger import (
    AuditTampered,
    DecryptionFailed,
    InvalidInput,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.application import ledger as ledger_module
from keyledger.context import make_actor
from keyledger.domain.ids import SEAL_CHAIN_ID, secret_id
from keyledger.infrastructure.event_tags import TRAILER_BYTES
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.models import Checkpoint, TamperFinding, VerifyReport

TRIALS = 50
KINDS = ("modify", "delete", "swap", "insert", "truncate")
TENANTS = ("acme", "globex", "initech", "umbrella")
_HERMETIC = (
    "KEYLEDGER_MASTER_KEY",
    "SMRT_SECRET_MASTER_KEY",
    "KEYLEDGER_MASTER_KEY_FILE",
    "KEYLEDGER_PREVIOUS_MASTER_KEYS",
    "KEYLEDGER_DATABASE_URL",
    "KEYLEDGER_AUDIT_KEY",
    "KEYLEDGER_AUDIT_SEAL_EVERY",
)
_schema_numbers = itertools.count(1)


@pytest.fixture(autouse=True)
def _no_audit_key_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _HERMETIC:
        monkeypatch.delenv(name, raising=False)


# -- raw access to the events table ------------------------------------------------------


class Stored(NamedTuple):
    """One row of the events table, as stored."""

    position: int
    originator_id: UUID
    version: int
    topic: str
    state: bytes


class RawStore(Protocol):
    def rows(self) -> dict[int, Stored]: ...

    def apply(self, *, delete: Iterable[int] = (), insert: Iterable[Stored] = ()) -> None:
        """Delete rows by position, then insert rows at their positions: one commit."""

    def close(self) -> None: ...


class SQLiteRaw:
    """``stored_events``: position = rowid, ids as 32-character hex TEXT."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)

    def rows(self) -> dict[int, Stored]:
        cursor = self.conn.execute(
            "SELECT rowid, originator_id, originator_version, topic, state FROM stored_events"
        )
        return {
            int(r[0]): Stored(int(r[0]), UUID(hex=r[1]), int(r[2]), r[3], bytes(r[4]))
            for r in cursor.fetchall()
        }

    def apply(self, *, delete: Iterable[int] = (), insert: Iterable[Stored] = ()) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for position in delete:
                self.conn.execute("DELETE FROM stored_events WHERE rowid = ?", (position,))
            for row in insert:
                self.conn.execute(
                    "INSERT INTO stored_events "
                    "(rowid, originator_id, originator_version, topic, state) VALUES (?,?,?,?,?)",
                    (row.position, row.originator_id.hex, row.version, row.topic, row.state),
                )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def run(self, statement: str) -> None:
        """One statement on the store's other tables (``?`` parameters)."""
        self.conn.execute(statement)

    def drop_events_key(self) -> None:
        """Rebuild the events table without its primary key, rows and rowids kept."""
        self.conn.executescript(
            "BEGIN IMMEDIATE;"
            "CREATE TABLE unkeyed (originator_id TEXT, originator_version INTEGER, "
            "topic TEXT, state BLOB);"
            "INSERT INTO unkeyed (rowid, originator_id, originator_version, topic, state) "
            "SELECT rowid, originator_id, originator_version, topic, state FROM stored_events;"
            "DROP TABLE stored_events;"
            "ALTER TABLE unkeyed RENAME TO stored_events;"
            "COMMIT;"
        )

    def close(self) -> None:
        self.conn.close()


class PostgresRaw:
    """``keyledger_events`` of one schema: position = notification_id. Each change runs in
    one transaction that disables the append-only triggers and enables them again, so they
    are never off outside it."""

    def __init__(self, schema: str) -> None:
        self.conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
        self.conn.execute("SET lock_timeout = '10s'")
        self.conn.execute("SET statement_timeout = '30s'")
        self.table = sql.SQL("{}.keyledger_events").format(sql.Identifier(schema))
        self.schema = schema

    def run(self, statement: str) -> None:
        """One statement on the store's other tables, in its schema."""
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema))
            )
            self.conn.execute(statement.encode())

    def rows(self) -> dict[int, Stored]:
        cursor = self.conn.execute(
            sql.SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state FROM {}"
            ).format(self.table)
        )
        return {
            int(r[0]): Stored(int(r[0]), r[1], int(r[2]), r[3], bytes(r[4]))
            for r in cursor.fetchall()
        }

    def apply(self, *, delete: Iterable[int] = (), insert: Iterable[Stored] = ()) -> None:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(self.table))
            for position in delete:
                self.conn.execute(
                    sql.SQL("DELETE FROM {} WHERE notification_id = %s").format(self.table),
                    (position,),
                )
            for row in insert:
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (notification_id, originator_id, originator_version, "
                        "topic, state) VALUES (%s, %s, %s, %s, %s)"
                    ).format(self.table),
                    (row.position, row.originator_id, row.version, row.topic, row.state),
                )
            self.conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(self.table))

    def drop_events_key(self) -> None:
        row = self.conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'",
            (self.table.as_string(self.conn),),
        ).fetchone()
        assert row is not None
        self.conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(self.table, sql.Identifier(row[0]))
        )

    def burn_position(self) -> int:
        """Take a position from the sequence without using it, as a rolled-back append
        does: a gap in the stream."""
        row = self.conn.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'notification_id'))",
            (self.table.as_string(self.conn),),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def triggers_enabled(self) -> bool:
        rows = self.conn.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (self.table.as_string(self.conn),),
        ).fetchall()
        return len(rows) == 2 and all(r[0] == "O" for r in rows)

    def close(self) -> None:
        self.conn.close()


# -- the scenario store ------------------------------------------------------------------


def _scenario_part_one(service: SecretService) -> None:
    for t in TENANTS:
        for i in range(6):
            service.store_for_tenant(
                t,
                f"s{i}",
                f"value-{t}-{i}",
                category=f"cat{i % 2}",
                metadata={"i": str(i)},
                user_id="alice",
                ip_address="203.0.113.7",
                user_agent="tamper/1",
            )
        for i in range(6):
            for _ in range(i % 3 + 2):
                service.retrieve_for_tenant(t, f"s{i}", user_id="bob")
        service.store_for_tenant(t, "s0", f"value-{t}-0b")
        service.store_for_tenant(t, "s1", f"value-{t}-1b", description="updated")


def _scenario_part_two(service: SecretService, between: Callable[[], None]) -> None:
    for t in TENANTS:
        service.rotate_key_for_tenant(t, user_id="ops")
        service.store_for_tenant(t, "s6", f"value-{t}-6")
        between()
        service.reencrypt_all_for_tenant(t, user_id="ops")
        with tenant(t, user_id="carol"):
            service.delete("s5")
            service.disable("s4")
            with pytest.raises(SecretDisabled):
                service.retrieve("s4")
            for i in range(4):
                service.retrieve(f"s{i}")
            service.store("s5", f"value-{t}-5b")
            service.retrieve("s5")
            service.compromise_key(1, "laptop lost")
            service.enable("s4")


def _scenario_tail(service: SecretService) -> None:
    service.store_for_tenant("acme", "s0", "value-acme-0c")
    service.retrieve_for_tenant("acme", "s0")
    service.retrieve_for_tenant("globex", "s6")
    service.rotate_key_for_tenant("initech")
    service.store_for_tenant("initech", "s7", "value-initech-7")
    service.change_for_tenant("globex", "s2", "delete", make_actor("dave"))
    service.retrieve_for_tenant("initech", "s3")
    service.store_for_tenant("acme", "s8", "value-acme-8")


@dataclass
class Scenario:
    backend: str
    url: str
    master_key: str
    service: SecretService
    raw: RawStore
    anchor: list[Checkpoint]  # C1 and C2
    gap: int | None  # a position taken from the PostgreSQL sequence and never used

    @property
    def last_sealed(self) -> int:
        return self.anchor[-1].to_position

    @property
    def checkpoint_positions(self) -> set[int]:
        return {c.position for c in self.anchor if c.position is not None}


def _open(url: str, master_key: str | None, **kwargs: Any) -> SecretService:
    with pytest.MonkeyPatch.context() as patch:
        for name in _HERMETIC:
            patch.delenv(name, raising=False)
        return SecretService.create(url, master_key=master_key, **kwargs)


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    backend = str(request.param)
    schema: str | None = None
    raw: SQLiteRaw | PostgresRaw
    if backend == "postgres":
        request.getfixturevalue("_postgres_server")
        schema = f"kl_{RUN_ID}_tamper{next(_schema_numbers)}"
        url = f"{POSTGRES_URL}?schema={schema}"
    else:
        path = tmp_path_factory.mktemp("tamper") / "k.db"
        url = f"sqlite:///{path}"
    master_key = secrets.token_hex(32)
    service = _open(url, master_key)
    raw = PostgresRaw(schema) if schema is not None else SQLiteRaw(path)
    gaps: list[int] = []

    def between() -> None:
        if isinstance(raw, PostgresRaw) and not gaps:
            gaps.append(raw.burn_position())

    try:
        _scenario_part_one(service)
        assert service.seal_audit().stopped_at is None
        _scenario_part_two(service, between)
        assert service.seal_audit().stopped_at is None
        _scenario_tail(service)
        anchor = service.audit_checkpoints()
        assert len(anchor) == 2
        yield Scenario(backend, url, master_key, service, raw, anchor, gaps[0] if gaps else None)
    finally:
        service.close()
        raw.close()
        if schema is not None:
            drop_schema(schema)


# -- helpers -----------------------------------------------------------------------------


def _flip(state: bytes, index: int, mask: int) -> bytes:
    return state[:index] + bytes([state[index] ^ mask]) + state[index + 1 :]


def _at(report: VerifyReport, position: int) -> list[TamperFinding]:
    return [f for f in report.findings if f.position == position]


def _describe(report: VerifyReport) -> str:
    return "; ".join(f"{f.kind}@{f.position} ({f.detail})" for f in report.findings) or "none"


def _assert_intact(scenario: Scenario, why: str) -> None:
    report = scenario.service.verify_audit()
    assert report.intact, f"{why}: {_describe(report)}"
    anchored = scenario.service.verify_audit(anchor=scenario.anchor)
    assert anchored.intact, f"{why} (anchored): {_describe(anchored)}"


class Trial:
    """One tampering: applies itself, remembers exactly what to put back."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.raw = scenario.raw
        self.seed = seed
        self.rng = random.Random(seed)
        self.before = self.raw.rows()
        self.touched: set[int] = set()

    def msg(self, what: str, report: VerifyReport) -> str:
        return f"seed {self.seed}: {what}; findings: {_describe(report)}"

    def apply(self, *, delete: Iterable[int] = (), insert: Iterable[Stored] = ()) -> None:
        delete, insert = list(delete), list(insert)
        self.touched.update(delete)
        self.touched.update(row.position for row in insert)
        self.raw.apply(delete=delete, insert=insert)

    def undo(self) -> None:
        """Put every touched position back as it was before the trial (or remove it)."""
        now = self.raw.rows()
        self.raw.apply(
            delete=sorted(p for p in self.touched if p in now),
            insert=[self.before[p] for p in sorted(self.touched) if p in self.before],
        )
        assert self.raw.rows() == self.before, f"seed {self.seed}: the undo left a difference"

    @property
    def sealed(self) -> list[int]:
        return sorted(p for p in self.before if p <= self.scenario.last_sealed)

    @property
    def tail(self) -> list[int]:
        return sorted(p for p in self.before if p > self.scenario.last_sealed)

    def segment(self, position: int) -> int:
        """Which checkpoint seals ``position`` (1 or 2)."""
        return 1 if position <= self.scenario.anchor[0].to_position else 2

    # -- the kinds ------------------------------------------------------------------------

    def modify(self) -> None:
        in_tail = self.rng.random() < 0.3
        position = self.rng.choice(self.tail if in_tail else self.sealed)
        row = self.before[position]
        index = self.rng.randrange(len(row.state))
        self.apply(
            delete=[position],
            insert=[row._replace(state=_flip(row.state, index, self.rng.randrange(1, 256)))],
        )
        report = self.scenario.service.verify_audit()
        what = (
            f"byte {index} of the event at {position} changed ({'tail' if in_tail else 'sealed'})"
        )
        assert not report.intact, self.msg(what, report)
        here = {f.kind for f in _at(report, position)}
        checkpoint = row.originator_id == SEAL_CHAIN_ID
        if not in_tail:
            assert "modified" in here, self.msg(what, report)
        else:
            assert here & {"modified", "untagged", "unverifiable"}, self.msg(what, report)
        if not checkpoint:  # a changed checkpoint also breaks the chain after it
            assert {f.position for f in report.findings} == {position}, self.msg(what, report)

    def delete(self) -> None:
        position = self.rng.choice(self.sealed)
        self.apply(delete=[position])
        report = self.scenario.service.verify_audit()
        what = f"the sealed event at {position} deleted"
        assert not report.intact, self.msg(what, report)
        assert "deleted" in {f.kind for f in _at(report, position)}, self.msg(what, report)

    def swap(self) -> None:
        first, second = sorted(self.rng.sample(self.sealed, 2))
        a, b = self.before[first], self.before[second]
        self.apply(
            delete=[first, second],
            insert=[b._replace(position=first), a._replace(position=second)],
        )
        report = self.scenario.service.verify_audit()
        what = f"the events at {first} and {second} swapped"
        assert not report.intact, self.msg(what, report)
        same_segment = self.segment(first) == self.segment(second)
        expected = {"reordered"} if same_segment else {"reordered", "modified"}
        for position in (first, second):
            kinds = {f.kind for f in _at(report, position)}
            assert kinds & expected, self.msg(what, report)

    def insert(self) -> None:
        source = self.before[self.rng.choice(sorted(self.before))]
        if self.rng.random() < 0.5:
            forged = source._replace(originator_id=UUID(int=self.rng.getrandbits(128)))
            how = "another originator id"
        else:
            top = max(
                r.version for r in self.before.values() if r.originator_id == source.originator_id
            )
            forged = source._replace(version=top + self.rng.randint(1, 3))
            how = f"version {forged.version}"
        gap = self.scenario.gap
        in_gap = gap is not None and gap not in self.before and self.rng.random() < 0.4
        position = gap if in_gap and gap is not None else max(self.before) + 1
        self.apply(insert=[forged._replace(position=position)])
        report = self.scenario.service.verify_audit()
        what = (
            f"a copy of the event at {source.position} with {how} inserted at {position}"
            f" ({'a sequence gap in the sealed range' if in_gap else 'the tail'})"
        )
        assert not report.intact, self.msg(what, report)
        kinds = {f.kind for f in _at(report, position)}
        assert ("inserted" if in_gap else "modified") in kinds, self.msg(what, report)

    def truncate(self) -> None:
        service = self.scenario.service
        sealed = service.seal_audit()  # the final seal: its checkpoint is the newest event
        assert sealed.stopped_at is None
        assert len(sealed.checkpoints) == 1
        anchor = service.audit_checkpoints()
        newest = anchor[-1].position
        assert newest is not None
        assert newest == max(self.raw.rows())
        tail_length = newest - self.scenario.last_sealed
        k = self.rng.randint(1, tail_length + 25)
        now = self.raw.rows()
        cut = sorted(now)[-k:]
        self.apply(delete=cut)
        remaining_head = max(p for p in now if p not in cut)
        report = service.verify_audit(anchor=anchor)
        what = f"the newest {k} events ({cut[0]}..{cut[-1]}) truncated after a seal"
        assert not report.intact, self.msg(what, report)
        assert report.head_position == remaining_head, self.msg(what, report)
        truncated = [f for f in report.findings if f.kind == "truncated"]
        assert len(truncated) == 1, self.msg(what, report)
        assert remaining_head < truncated[0].position <= cut[0], self.msg(what, report)
        # Without the anchor nothing shows: truncation at the head is what anchors are for.
        assert service.verify_audit().intact, self.msg(what, service.verify_audit())


# -- tests -------------------------------------------------------------------------------


def test_an_untouched_store_verifies_intact(scenario: Scenario) -> None:
    report = scenario.service.verify_audit(anchor=scenario.anchor)

    assert report.intact, _describe(report)
    assert report.checkpoints == 2
    assert report.anchored_checkpoints == 2
    assert report.last_sealed_position == scenario.last_sealed
    rows = scenario.raw.rows()
    assert report.head_position == max(rows)
    assert report.checked_events == len(rows)
    assert report.sealed_events == len([p for p in rows if p <= scenario.last_sealed])
    assert report.unsealed_events == len(rows) - report.sealed_events
    assert 150 <= len(rows) <= 300
    assert report.unsealed_events >= 8
    # A service opened afresh on the store (nothing cached) agrees.
    with _open(scenario.url, scenario.master_key) as fresh:
        assert fresh.verify_audit(anchor=scenario.anchor).intact


@pytest.mark.parametrize("seed", range(TRIALS))
def test_a_tampered_position_is_named_and_an_exact_undo_verifies_intact_again(
    scenario: Scenario, seed: int
) -> None:
    kind = KINDS[seed % len(KINDS)]
    trial = Trial(scenario, seed * 7919 + (0 if scenario.backend == "sqlite" else 1))
    try:
        getattr(trial, kind)()
    finally:
        trial.undo()
    _assert_intact(scenario, f"seed {trial.seed} ({kind}) after the undo")


@pytest.mark.parametrize("which", [0, 1], ids=["sealed-checkpoint", "newest-checkpoint"])
def test_a_checkpoint_whose_bytes_changed_is_checkpoint_invalid(
    scenario: Scenario, which: int
) -> None:
    position = scenario.anchor[which].position
    assert position is not None
    trial = Trial(scenario, which)
    row = trial.before[position]
    body_end = row.state.rindex(b'"tags"')
    start = row.state.index(b'"_data_":"', body_end) + len(b'"_data_":"')
    replacement = b"A" if row.state[start : start + 1] != b"A" else b"B"
    changed = row.state[:start] + replacement + row.state[start + 1 :]
    try:
        trial.apply(delete=[position], insert=[row._replace(state=changed)])
        report = scenario.service.verify_audit()
        assert not report.intact
        assert "checkpoint_invalid" in {f.kind for f in _at(report, position)}, _describe(report)
    finally:
        trial.undo()
    _assert_intact(scenario, "after restoring the checkpoint")


# A tamperer who rewrites a checkpoint's JSON so that a field decodes with the wrong type
# or value should get checkpoint_invalid (as an undecodable checkpoint does); today
# verify_audit raises instead (verification.py: the decoded fields are used unchecked,
# e.g. bytes.fromhex(checkpoint.key_id) and _u64(checkpoint.after_position)).
RETYPED_FIELDS = {
    "key_id not hex": (rb'"key_id":"', rb'"key_id":"zz'),
    "after_position a string": (rb'"after_position":(\d+)', rb'"after_position":"\1"'),
    # (out of the 8 unsigned bytes each is hashed as: verify crashed, found by review)
    "after_position negative": (rb'"after_position":(\d+)', rb'"after_position":-1'),
    "to_position negative": (rb'"to_position":(\d+)', rb'"to_position":-1'),
    "event_count too large": (rb'"event_count":(\d+)', rb'"event_count":18446744073709551616'),
    "positions not bytes": (
        rb'"positions":\{"_type_":"bytes_b64","_data_":"([^"]*)"\}',
        rb'"positions":"\1"',
    ),
}


@pytest.mark.parametrize(
    ("pattern", "replacement"), RETYPED_FIELDS.values(), ids=list(RETYPED_FIELDS)
)
def test_a_checkpoint_with_a_retyped_field_is_checkpoint_invalid(
    scenario: Scenario, pattern: bytes, replacement: bytes
) -> None:
    position = scenario.anchor[-1].position
    assert position is not None
    trial = Trial(scenario, 0)
    row = trial.before[position]
    body, trailer = row.state[:-TRAILER_BYTES], row.state[-TRAILER_BYTES:]
    changed, count = re.subn(pattern, replacement, body, count=1)
    assert count == 1
    try:
        trial.apply(delete=[position], insert=[row._replace(state=changed + trailer)])
        report = scenario.service.verify_audit()
        assert "checkpoint_invalid" in {f.kind for f in _at(report, position)}, _describe(report)
    finally:
        trial.undo()
        _assert_intact(scenario, "after restoring the checkpoint")


def test_verifying_with_another_master_key_is_unverifiable_not_intact(scenario: Scenario) -> None:
    with _open(scenario.url, secrets.token_hex(32)) as stranger:
        report = stranger.verify_audit()
        anchored = stranger.verify_audit(anchor=scenario.anchor)

    assert not report.intact
    assert {f.kind for f in report.findings} == {"unverifiable"}
    assert scenario.checkpoint_positions <= {f.position for f in report.findings}
    assert not anchored.intact
    # The stranger cannot check the tail's tags either: every tail event is unverifiable.
    tail = {p for p in scenario.raw.rows() if p > scenario.last_sealed}
    assert tail <= {f.position for f in report.findings}


def test_a_previous_master_key_still_verifies_what_it_sealed(scenario: Scenario) -> None:
    with _open(
        scenario.url, secrets.token_hex(32), previous_master_keys=[scenario.master_key]
    ) as rotated:
        report = rotated.verify_audit(anchor=scenario.anchor)

    assert report.intact, _describe(report)


def test_the_schema_is_as_healthy_after_the_trials_as_before(scenario: Scenario) -> None:
    status = scenario.service.check_schema()

    assert status.ok
    if not isinstance(scenario.raw, PostgresRaw):
        assert status.append_only_enforced is None  # SQLite has no append-only trigger
        return
    assert status.append_only_enforced is True
    assert scenario.raw.triggers_enabled()
    with pytest.raises(psycopg.Error, match="append-only"):
        scenario.raw.conn.execute(
            sql.SQL("DELETE FROM {} WHERE notification_id = 1").format(scenario.raw.table)
        )


# -- untagged events (own stores: a keyless service writes into them) -------------------

TWO_SERVICE_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("backend", TWO_SERVICE_BACKENDS, indirect=True)
def test_an_event_written_without_any_key_is_untagged_and_stops_the_seal(
    make_service: MakeService,
) -> None:
    keyed = make_service()
    keyed.store_for_tenant("acme", "db", "value-1", user_id="alice")
    keyed.retrieve_for_tenant("acme", "db")
    first = keyed.seal_audit()
    assert first.stopped_at is None
    assert first.sealed_events == 3

    keyless = make_service(master_key=None)
    with tenant("acme", user_id="mallory"), pytest.raises(MasterKeyUnavailable):
        keyless.retrieve("db")
    with tenant("acme"):
        untagged = keyed.get_audit_logs(limit=1)[0]
    assert (untagged.action, untagged.result, untagged.user_id) == ("read", "failure", "mallory")
    keyed.store_for_tenant("acme", "db", "value-2")  # a tagged event after it

    report = keyed.verify_audit()
    assert not report.intact
    assert [(f.kind, f.position) for f in report.findings] == [("untagged", untagged.position)]

    stopped = keyed.seal_audit()
    assert stopped.stopped_at == untagged.position
    assert stopped.stopped_reason is not None
    assert "tag" in stopped.stopped_reason
    assert all(c.to_position < untagged.position for c in stopped.checkpoints)
    assert keyed.seal_audit().stopped_at == untagged.position  # it stays stopped there
    with pytest.raises(MasterKeyUnavailable):
        keyless.seal_audit()

    with pytest.raises(InvalidInput, match="stream positions"):
        keyed.seal_audit(accept_untagged=True)  # type: ignore[arg-type]
    accepted = keyed.seal_audit(accept_untagged=[untagged.position])
    assert accepted.stopped_at is None
    assert accepted.checkpoints[-1].to_position > untagged.position
    assert keyed.unsealed_events() == 1  # only the newest checkpoint itself
    sealed = keyed.verify_audit(anchor=keyed.audit_checkpoints())
    assert sealed.intact, _describe(sealed)


def _sealed_once(tmp_path: Path) -> tuple[Path, str]:
    """A SQLite store with one secret and one checkpoint (its newest row); its master key."""
    path = tmp_path / "k.db"
    master_key = secrets.token_hex(32)
    with _open(f"sqlite:///{path}", master_key) as service:
        service.store_for_tenant("acme", "db", "v1")
        assert len(service.seal_audit().checkpoints) == 1
    return path, master_key


def test_a_corrupt_newest_checkpoint_never_fails_a_write_through_the_automatic_seal(
    tmp_path: Path,
) -> None:
    path, master_key = _sealed_once(tmp_path)
    raw = SQLiteRaw(path)
    try:
        position = max(raw.rows())
        row = raw.rows()[position]
        assert row.originator_id == SEAL_CHAIN_ID
        raw.apply(delete=[position], insert=[row._replace(state=b"{" + row.state[2:])])
    finally:
        raw.close()

    settings = KeyledgerSettings(audit_seal_every=1)
    with _open(f"sqlite:///{path}", master_key, settings=settings) as sealing_often:
        try:
            sealing_often.store_for_tenant("acme", "other", "v")  # must not raise
        finally:
            # The write itself committed either way.
            assert sealing_often.list_for_tenant("acme")[-1].name == "other"
        report = sealing_often.verify_audit()
    assert "checkpoint_invalid" in {f.kind for f in _at(report, position)}


def test_a_forged_newest_checkpoint_stops_every_seal_instead_of_silencing_it(
    tmp_path: Path,
) -> None:
    """A checkpoint written without the audit key and claiming to cover positions far
    ahead would make each later seal seal nothing; sealing must refuse after it."""
    path, master_key = _sealed_once(tmp_path)
    raw = SQLiteRaw(path)
    try:
        rows = raw.rows()
        newest = rows[max(rows)]
        assert newest.originator_id == SEAL_CHAIN_ID
        body = newest.state[:-TRAILER_BYTES]  # no key: the forger cannot tag it
        forged_body = re.sub(rb'"to_position":\d+', b'"to_position":1000000000000', body)
        assert forged_body != body
        forged = newest._replace(
            position=max(rows) + 1, version=newest.version + 1, state=forged_body
        )
        raw.apply(insert=[forged])
    finally:
        raw.close()

    with _open(f"sqlite:///{path}", master_key) as service:
        service.store_for_tenant("acme", "db", "v2")
        with pytest.raises(AuditTampered, match="valid tag"):
            service.seal_audit()
        with pytest.raises(AuditTampered):
            service.unsealed_events()
        assert not service.verify_audit().intact


def test_an_undecodable_event_never_fails_a_committed_write_through_the_bulk_catch_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every few thousand appends a writer catches the audit model up; an event whose
    bytes were altered stops that catch-up. The write before it has committed: it must
    not be reported failed (its caller would retry it). Audit queries still say why."""
    path = tmp_path / "k.db"
    master_key = secrets.token_hex(32)
    with _open(f"sqlite:///{path}", master_key) as service:
        service.store_for_tenant("acme", "db", "v1")
        service.store_for_tenant("acme", "other", "v")
    raw = SQLiteRaw(path)
    try:
        position = max(raw.rows())
        row = raw.rows()[position]
        raw.apply(delete=[position], insert=[row._replace(state=b"x" + row.state[1:])])
    finally:
        raw.close()
    monkeypatch.setattr(ledger_module, "AUDIT_CATCH_UP_EVERY", 2)

    with _open(f"sqlite:///{path}", master_key) as service:
        for n in range(2, 6):
            service.store_for_tenant("acme", "db", f"v{n}")  # must not raise
        assert service.retrieve_for_tenant("acme", "db").value == "v5"
        assert service.list_for_tenant("acme")[0].version == 5
        with super_admin(), pytest.raises(AuditTampered, match=f"position {position}"):
            service.get_audit_logs()


def _raw_of(service: SecretService) -> SQLiteRaw | PostgresRaw:
    env = service._ledger.env
    schema = env.get("POSTGRES_SCHEMA")
    return PostgresRaw(schema) if schema else SQLiteRaw(Path(str(env.get("SQLITE_DBNAME"))))


@pytest.mark.parametrize(
    ("backend", "deleted"),
    [
        ("sqlite", "a-read"),
        ("sqlite", "a-secrets-middle-version"),
        pytest.param("postgres", "a-secrets-middle-version", marks=pytest.mark.postgres),
    ],
    indirect=["backend"],
)
def test_a_seal_stops_before_a_deletion_in_the_tail_instead_of_vouching_for_it(
    make_service: MakeService, deleted: str
) -> None:
    """A deletion in the unsealed tail leaves a trace that verify reports: a gap in
    SQLite's positions, a break in an aggregate's versions. A seal that covered the rows
    after it would make the stream verify intact for good (found by review: the routine
    seal of an idle worker did). It stops before the trace, which verify still reports."""
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    service.store_for_tenant("acme", "db", "v1")
    assert service.seal_audit().stopped_at is None
    service.store_for_tenant("acme", "db", "v2")  # version 2
    service.retrieve_for_tenant("acme", "db")
    service.store_for_tenant("acme", "db", "v3")  # version 3
    service.retrieve_for_tenant("acme", "db")
    raw = _raw_of(service)
    try:
        rows = sorted(raw.rows().values())
        secret = secret_id("acme", "db")
        if deleted == "a-read":
            victim = next(r for r in rows if r.topic.endswith("SecretRead"))
        else:
            victim = next(r for r in rows if r.originator_id == secret and r.version == 2)
        raw.apply(delete=[victim.position])
    finally:
        raw.close()
    found = [(f.kind, f.position) for f in service.verify_audit().findings]
    assert found
    assert {kind for kind, _ in found} == {"deleted"}

    result = service.seal_audit()

    following = min(r.position for r in rows if r.position > victim.position)
    assert result.stopped_at is not None
    assert result.stopped_at <= max(following, *(p for _, p in found))
    assert result.stopped_reason is not None
    assert "missing" in result.stopped_reason
    # (what it sealed ends before the trace: verify goes on finding it)
    assert all(c.to_position < result.stopped_at for c in result.checkpoints)
    assert [(f.kind, f.position) for f in service.verify_audit().findings] == found
    assert service.seal_audit().stopped_at == result.stopped_at  # and stays stopped there


@pytest.mark.parametrize("backend", TWO_SERVICE_BACKENDS, indirect=True)
def test_an_event_stored_twice_once_the_primary_key_is_dropped_is_found_and_never_sealed(
    make_service: MakeService,
) -> None:
    """A read stored again (its tag verifies: the bytes are the original's) counts
    twice in the audit log and the access counts. The primary key makes that
    impossible, so its absence is itself a finding; the copies are reported, and no
    seal vouches for such a stream (found by review: verify said intact, before and
    after a seal)."""
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    service.store_for_tenant("acme", "db", "v1")
    service.retrieve_for_tenant("acme", "db")
    raw = _raw_of(service)
    try:
        read = next(r for r in raw.rows().values() if r.topic.endswith("SecretRead"))
        raw.drop_events_key()
        copy_at = max(raw.rows()) + 1
        raw.apply(insert=[read._replace(position=copy_at)])
    finally:
        raw.close()

    report = service.verify_audit()
    assert [(f.kind, f.position) for f in report.findings] == [
        ("key_dropped", 0),
        ("duplicated", copy_at),
    ]
    with pytest.raises(AuditTampered, match="primary key"):
        service.seal_audit()
    status = service.check_schema()
    assert not status.ok
    assert any("primary key" in item for item in status.missing)


@pytest.mark.parametrize("backend", TWO_SERVICE_BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE kl_catalog SET key_version = 2, envelope_version = 2 WHERE name = 'db'",
        "DELETE FROM kl_catalog WHERE name = 'db'",
    ],
    ids=["row-moved-to-the-active-key", "row-deleted"],
)
def test_a_catalog_edited_to_hide_a_keys_user_does_not_get_the_key_destroyed(
    make_service: MakeService, edit: str
) -> None:
    """The catalog is a read model anyone who can write the database can edit. Cleanup
    destroyed a retired key version that the catalog no longer showed in use, although
    a live secret's events still said it was (found by review): the value was lost for
    good, and the audit log blamed the operator. The secrets' events decide."""
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    service.store_for_tenant("acme", "db", "precious")
    service.rotate_key_for_tenant("acme")  # version 1 retired, still used by "db"
    raw = _raw_of(service)
    try:
        raw.run(edit)
    finally:
        raw.close()

    result = service.cleanup_retired_keys(older_than_days=0)

    assert result.destroyed == 0
    [outcome] = result.keys
    assert (outcome.tenant_id, outcome.version, outcome.outcome) == ("acme", 1, "skipped")
    assert outcome.reason is not None
    assert "by its events, which the catalog does not show" in outcome.reason
    assert service.retrieve_for_tenant("acme", "db").value == "precious"


@pytest.mark.parametrize("backend", TWO_SERVICE_BACKENDS, indirect=True)
def test_a_failed_read_audited_under_a_wrong_master_key_can_be_accepted_into_a_seal(
    make_service: MakeService,
) -> None:
    """A process with a mistyped master key audits its failed read with a tag made from
    that key: unverifiable by the store's keys. Found by review: nothing but adding the
    wrong key back let a seal pass it, so one mistake stopped sealing for good. It is
    accepted like an untagged event, after investigation, at its position only."""
    keyed = make_service()
    keyed.store_for_tenant("acme", "db", "value-1")
    assert keyed.seal_audit().stopped_at is None
    wrong = make_service(master_key=secrets.token_hex(32))
    with pytest.raises(DecryptionFailed):
        wrong.retrieve_for_tenant("acme", "db", user_id="mallory")
    with tenant("acme"):
        failed = keyed.get_audit_logs(limit=1)[0]
    assert (failed.action, failed.result, failed.user_id) == ("read", "failure", "mallory")
    keyed.store_for_tenant("acme", "db", "value-2")

    findings = [(f.kind, f.position) for f in keyed.verify_audit().findings]
    assert findings == [("unverifiable", failed.position)]
    stopped = keyed.seal_audit()
    assert stopped.stopped_at == failed.position
    assert "--accept-untagged" in (stopped.stopped_reason or "")
    assert keyed.seal_audit(accept_untagged=[failed.position + 1]).stopped_at == failed.position

    accepted = keyed.seal_audit(accept_untagged=[failed.position])
    assert accepted.stopped_at is None
    assert keyed.verify_audit(anchor=keyed.audit_checkpoints()).intact


def test_a_state_rewritten_as_text_that_is_not_utf8_is_named_as_modified(
    tmp_path: Path,
) -> None:
    """SQLite handed it back as str and failed to decode it: `audit verify` stopped with
    a read error and named no position (found by review)."""
    path = tmp_path / "k.db"
    master_key = secrets.token_hex(32)
    with _open(f"sqlite:///{path}", master_key) as service:
        for name in ("a", "b", "c"):
            service.store_for_tenant("acme", name, "v")
        service.seal_audit()
        with service._ledger.store.writing() as cur:
            cur.execute("SELECT MAX(rowid) FROM stored_events WHERE rowid <= 3")
            (position,) = cur.fetchone()
            cur.execute(  # text now, and not UTF-8
                "UPDATE stored_events SET state = CAST(state || x'ff00' AS TEXT) WHERE rowid = ?",
                (position,),
            )

        report = service.verify_audit()

    assert not report.intact
    assert "modified" in {finding.kind for finding in _at(report, position)}
