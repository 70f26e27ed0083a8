"""Real processes on one PostgreSQL schema: mixed work, SIGKILLed writers and projection workers.

Every test gets its own schema (kl_<run>_xp<n>), dropped afterwards. Children are plain
``python -c`` processes with the master key in their environment; they signal readiness
with files, wait for a common start signal so they really overlap, and print one JSON line.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL, RUN_ID
from keyledger import SecretService, super_admin, tenant
from keyledger.domain.ids import SEAL_CHAIN_ID
from worker_snippets import EXCLUSIVE_AFTER_KNOB

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
SHARED_NAMES = ("shared-0", "shared-1")
START_TIMEOUT = 30.0
RUN_TIMEOUT = 45.0
EVERYTHING = 1_000_000  # an audit limit larger than any test's stream

# The common preamble: open a service, say ready, wait for "go".
PREAMBLE = (
    r"""
import json, os, random, sys, time
from pathlib import Path

from keyledger import KeyledgerError, SecretService, tenant

args = json.loads(sys.argv[1])
base = Path(args["dir"])
who = args["who"]
service = SecretService.create(args["url"])
"""
    + EXCLUSIVE_AFTER_KNOB
    + r"""
(base / f"ready-{who}").touch()
deadline = time.monotonic() + 30
while not (base / "go").exists():
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.002)
rng = random.Random(args.get("seed"))
"""
)

# Mixed stores (own names and names shared by every worker), reads, rotations and
# re-encryptions across the tenants; reports everything that succeeded or failed.
MIXED = (
    PREAMBLE
    + r"""
tenants = args["tenants"]
stored = []        # [tenant, name, version, value] of every successful store
reads = []         # [tenant, name] of every successful read
rotations = []     # [tenant, version]
reencrypts = []    # [tenant, success, failed]
wrong = []         # reads that returned something this worker could not have expected
failures = []      # [operation, error class, message]
mine = {}          # (tenant, name) -> last value this worker stored under its own name
ops = ["store_own"] * 3 + ["store_shared"] * 2 + ["read"] * 4 + ["rotate", "reencrypt"]
for j in range(args["n"]):
    t = rng.choice(tenants)
    op = rng.choice(ops)
    try:
        if op in ("store_own", "store_shared"):
            if op == "store_own":
                name = f"own-{who}-{rng.randrange(3)}"
            else:
                name = rng.choice(args["shared"])
            value = f"{who}|{t}|{name}|{j}"
            info = service.store_for_tenant(t, name, value, user_id=who)
            stored.append([t, name, info.version, value])
            if op == "store_own":
                mine[(t, name)] = value
        elif op == "read":
            candidates = [n for (tt, n) in mine if tt == t] + list(args["shared"])
            name = rng.choice(candidates)
            secret = service.retrieve_for_tenant(t, name, user_id=who)
            reads.append([t, name])
            if (t, name) in mine and secret.value != mine[(t, name)]:
                wrong.append([t, name, secret.value, mine[(t, name)]])
            if not secret.value.startswith(("w", "initial|")):
                wrong.append([t, name, secret.value, "?"])
        elif op == "rotate":
            rotations.append([t, service.rotate_key_for_tenant(t, user_id=who).version])
        else:
            result = service.reencrypt_all_for_tenant(t, user_id=who)
            reencrypts.append([t, result.success, result.failed])
    except KeyledgerError as error:
        failures.append([op, type(error).__name__, str(error)])
    time.sleep(rng.uniform(0, args["pause"]))
service.close()
print(json.dumps(dict(stored=stored, reads=reads, rotations=rotations,
                      reencrypts=reencrypts, wrong=wrong, failures=failures,
                      exclusive=len(held))), flush=True)
"""
)

# A writer that never stops on its own: stores, reads, rotations, re-encryptions and
# disables across the tenants, touching "progress" after a number of rounds.
CRASH = (
    PREAMBLE
    + r"""
i = 0
while True:
    i += 1
    t = args["tenants"][i % len(args["tenants"])]
    service.store_for_tenant(t, f"crash-{i}", f"value-of-crash-{i}", metadata={"i": str(i)})
    assert service.retrieve_for_tenant(t, f"crash-{i}").value == f"value-of-crash-{i}"
    service.store_for_tenant(t, "crash-shared", f"value-of-crash-shared-{i}")
    service.retrieve_for_tenant(t, "crash-shared")
    if i % 4 == 0:
        service.rotate_key_for_tenant(t)
    if i % 6 == 0:
        service.reencrypt_all_for_tenant(t)
    if i % 5 == 0 and i > len(args["tenants"]):
        with tenant(t):
            service.disable(f"crash-{i - len(args['tenants'])}")
    if i == args["progress_at"]:
        (base / "progress").touch()
"""
)

# A writer that does a fixed amount of work, then reports what it did.
WRITER = (
    PREAMBLE
    + r"""
reads = 0
for j in range(args["n"]):
    t = args["tenants"][j % len(args["tenants"])]
    service.store_for_tenant(t, f"p-{j % 7}", f"value-{j}", user_id=who)
    service.retrieve_for_tenant(t, f"p-{j % 7}", user_id=who)
    reads += 1
    if j % 25 == 24:
        service.rotate_key_for_tenant(t, user_id=who)
    if j == args["progress_at"]:
        (base / "progress").touch()
    time.sleep(rng.uniform(0, args["pause"]))
service.close()
print(json.dumps({"reads": reads}), flush=True)
"""
)

# A projection worker: follows the stream until killed; touches "following" on progress.
PROJECTOR = (
    PREAMBLE
    + r"""
applied = [0]

def progressed(count):
    applied[0] += count
    (base / f"following-{who}").touch()

service.follow_read_models(stop=lambda: False, idle_seconds=0.1, on_progress=progressed)
"""
)


class Children:
    """Child processes on one store, started together; always reaped."""

    def __init__(self, directory: Path, url: str, amk: str) -> None:
        self.directory = directory
        self.url = url
        self.env = {
            name: value for name, value in os.environ.items() if not name.startswith("KEYLEDGER_")
        }
        self.env["KEYLEDGER_MASTER_KEY"] = amk
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def spawn(self, script: str, who: str, **args: Any) -> subprocess.Popen[str]:
        payload = {"dir": str(self.directory), "url": self.url, "who": who, **args}
        proc = subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(payload)],
            env={**self.env, "PGAPPNAME": self.app_name(who)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs[who] = proc
        return proc

    def go(self) -> None:
        """Wait until every child so far is ready, then let them all start."""
        self.wait_for(lambda: all((self.directory / f"ready-{w}").exists() for w in self.procs))
        (self.directory / "go").touch()

    def wait_for(self, condition: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for who, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode != -signal.SIGKILL:
                    _, err = proc.communicate(timeout=5)
                    pytest.fail(f"{who} exited early with {proc.returncode}: {err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("children did not reach the expected state in time")
            time.sleep(0.01)

    def kill(self, who: str) -> None:
        proc = self.procs[who]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, f"{who} had already exited"

    def result(self, who: str) -> dict[str, Any]:
        proc = self.procs[who]
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{who} did not finish in time (hang or deadlock)")
        assert proc.returncode == 0, err[-3000:]
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def diagnose(self, who: str) -> str:
        """What a stuck child is doing: its readiness, its server sessions, its output."""
        ready = (self.directory / f"ready-{who}").exists()
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
            sessions = conn.execute(
                "SELECT state, wait_event_type, wait_event, left(query, 120) "
                "FROM pg_stat_activity WHERE application_name = %s",
                (self.app_name(who),),
            ).fetchall()
        proc = self.procs[who]
        proc.kill()
        _, err = proc.communicate(timeout=10)
        return f"ready={ready}, sessions={sessions}, stderr={err[-2000:]!r}"

    def app_name(self, who: str) -> str:
        return f"kl-{RUN_ID}-{self.directory.name}-{who}"[:63]

    def reap(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def url(schema: str) -> str:
    return f"{POSTGRES_URL}?schema={schema}"


@pytest.fixture
def amk() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def children(tmp_path: Path, url: str, amk: str) -> Iterator[Children]:
    group = Children(tmp_path, url, amk)
    try:
        yield group
    finally:
        group.reap()


def _snapshot(service: SecretService) -> dict[str, Any]:
    """Everything the read models answer, for every tenant."""
    with super_admin():
        return {
            "lists": {
                t: service.list_for_tenant(t, status=None, include_expired=True) for t in TENANTS
            },
            "keys": {t: service.list_keys(t) for t in TENANTS},
            "all_keys": service.list_keys(),
            "audit": service.get_audit_logs(limit=EVERYTHING),
        }


def _assert_read_models_equal_a_rebuild(service: SecretService) -> dict[str, Any]:
    before = _snapshot(service)
    replayed = service.rebuild_read_models()
    assert replayed >= len(before["audit"])
    after = _snapshot(service)
    for part in ("lists", "keys", "all_keys", "audit"):
        assert after[part] == before[part], f"{part} differs from a fresh rebuild"
    return before


def _assert_access_counts_match_the_audited_reads(snapshot: dict[str, Any]) -> None:
    """No read is lost from access_count: it equals the read/success entries per secret."""
    reads = Counter(
        (entry.tenant_id, entry.secret_name)
        for entry in snapshot["audit"]
        if entry.action == "read" and entry.result == "success"
    )
    for t, listed in snapshot["lists"].items():
        for info in listed:
            assert info.access_count == reads[(t, info.name)], (t, info.name)


def _assert_one_active_key_and_contiguous_versions(service: SecretService) -> None:
    for t in TENANTS:
        keys = service.list_keys(t)
        if not keys:
            continue
        newest = max(key.version for key in keys)
        assert sorted(key.version for key in keys) == list(range(1, newest + 1)), t
        assert [key.version for key in keys if key.status == "active"] == [newest], t
        assert {key.status for key in keys if key.version != newest} <= {"retired"}, t


def _audit_table_counts(schema: str) -> dict[str, int]:
    """Raw SQL on the audit table, its tracking row and the event stream.

    rows: rows in kl_audit; tracked: the audit model's position in kl_tracking; head: the
    newest event; events_to_tracked: how many events are at or before the tracked position
    (every event but the seal chain's checkpoints, which the idle worker appends, is an
    audited one); missing: such events without their kl_audit row; extra: kl_audit rows
    that are not such an event (past the tracked position, say: a batch applied but not
    tracked).

    kl_audit.position is its primary key, so no event can have two rows: an event applied
    a second time would fail its batch on the key (the plain INSERT), not add a row.
    missing == extra == 0 is what shows each event was applied exactly once, in the same
    transaction as the tracking position that covers it.
    """
    s = sql.Identifier(schema)
    audited = sql.SQL(
        "SELECT notification_id FROM {}.keyledger_events "
        "WHERE notification_id <= %(tracked)s AND originator_id <> %(seal)s"
    ).format(s)
    with (
        psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn,
        conn.transaction(),
    ):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        audit = conn.execute(sql.SQL("SELECT count(*) FROM {}.kl_audit").format(s)).fetchone()
        tracked = conn.execute(
            sql.SQL("SELECT position FROM {}.kl_tracking WHERE name = 'audit'").format(s)
        ).fetchone()
        assert audit is not None
        assert tracked is not None
        params = {"tracked": tracked[0], "seal": SEAL_CHAIN_ID}
        events = conn.execute(
            sql.SQL(
                "SELECT (SELECT coalesce(max(notification_id), 0) FROM {s}.keyledger_events), "
                "(SELECT count(*) FROM ({audited}) AS e), "
                "(SELECT count(*) FROM ({audited}) AS e "
                " WHERE NOT EXISTS "
                "  (SELECT FROM {s}.kl_audit a WHERE a.position = e.notification_id)), "
                "(SELECT count(*) FROM {s}.kl_audit a "
                " WHERE a.position NOT IN ({audited}))"
            ).format(s=s, audited=audited),
            params,
        ).fetchone()
        assert events is not None
    return {
        "rows": audit[0],
        "tracked": tracked[0],
        "head": events[0],
        "events_to_tracked": events[1],
        "missing": events[2],
        "extra": events[3],
    }


@pytest.mark.parametrize("exclusive_after", [None, 1], ids=["optimistic", "under-the-lock"])
def test_five_processes_mixing_stores_reads_rotations_and_reencryptions_keep_every_promise(
    children: Children, url: str, amk: str, exclusive_after: int | None
) -> None:
    """``under-the-lock``: every retry after a lost race is made under the write lock
    (from the fifth attempt in production), so that path meets real contention."""
    workers = [f"w{i}" for i in range(5)]
    with SecretService.create(url, master_key=amk) as service:
        for t in TENANTS:
            for name in SHARED_NAMES:
                service.store_for_tenant(t, name, f"initial|{t}|{name}")

    for index, who in enumerate(workers):
        children.spawn(
            MIXED,
            who,
            seed=index,
            tenants=TENANTS,
            shared=SHARED_NAMES,
            n=60,
            pause=0.005,
            exclusive_after=exclusive_after,
        )
    children.go()
    results = {who: children.result(who) for who in workers}
    if exclusive_after is not None:
        assert sum(result["exclusive"] for result in results.values()) > 0

    for who, result in results.items():
        assert result["failures"] == [], f"{who} saw operations fail"
        assert result["wrong"] == [], f"{who} read a value it could not have expected"
        assert all(failed == 0 for _, _, failed in result["reencrypts"]), who
    assert sum(len(r["rotations"]) for r in results.values()) > 0
    assert sum(len(r["reencrypts"]) for r in results.values()) > 0

    with SecretService.create(url, master_key=amk) as service:
        snapshot = _assert_read_models_equal_a_rebuild(service)
        _assert_access_counts_match_the_audited_reads(snapshot)
        _assert_one_active_key_and_contiguous_versions(service)

        with super_admin():
            # Every successful read a worker reported is in the audit log, and no more.
            for who, result in results.items():
                logged = service.get_audit_logs(
                    user_id=who, action="read", result="success", limit=EVERYTHING
                )
                assert Counter((e.tenant_id, e.secret_name) for e in logged) == Counter(
                    (t, name) for t, name in result["reads"]
                ), who
                assert not service.get_audit_logs(user_id=who, result="failure")
                assert not service.get_audit_logs(user_id=who, result="denied")
            # Rotations: one new version each, contiguous after version 1.
            for t in TENANTS:
                rotated = sorted(v for r in results.values() for tt, v in r["rotations"] if tt == t)
                assert rotated == list(range(2, len(rotated) + 2)), t
                assert max(k.version for k in service.list_keys(t)) == len(rotated) + 1
                logged = service.get_audit_logs(tenant_id=t, action="rotate_key", limit=EVERYTHING)
                assert len(logged) == len(rotated), t

        # Every store won once, in order; every value reads back as the latest store.
        by_name: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for result in results.values():
            for t, name, version, value in result["stored"]:
                by_name.setdefault((t, name), []).append((version, value))
        for t in TENANTS:
            listed = {info.name: info for info in service.list_for_tenant(t, status=None)}
            expected_names = {name for (tt, name) in by_name if tt == t} | set(SHARED_NAMES)
            assert set(listed) == expected_names, t
            for name, info in listed.items():
                stores = sorted(by_name.get((t, name), []))
                versions = [version for version, _ in stores]
                first = 2 if name in SHARED_NAMES else 1
                assert versions == list(range(first, first + len(stores))), (t, name)
                secret = service.retrieve_for_tenant(t, name)
                expected = stores[-1][1] if stores else f"initial|{t}|{name}"
                assert secret.value == expected, (t, name)
                assert secret.version == info.version == (versions[-1] if stores else 1)
                assert secret.access_count == info.access_count + 1


def _assert_consistent_after_writer_crash(
    service: SecretService, schema: str, progress_at: int
) -> None:
    before = _assert_read_models_equal_a_rebuild(service)
    _assert_access_counts_match_the_audited_reads(before)
    _assert_one_active_key_and_contiguous_versions(service)
    counts = _audit_table_counts(schema)
    assert counts["rows"] == len(before["audit"])
    assert counts["tracked"] == counts["head"]
    assert counts["rows"] == counts["events_to_tracked"]
    assert (counts["missing"], counts["extra"]) == (0, 0)

    listed_names = set()
    for t in TENANTS:
        listed = before["lists"][t]
        names = {info.name for info in listed}
        listed_names |= names
        # The audit log and the catalog agree on what exists.
        with super_admin():
            created = {
                e.secret_name
                for e in service.get_audit_logs(
                    tenant_id=t, action="create", result="success", limit=EVERYTHING
                )
            }
        assert created == names, t
        for info in listed:
            if info.status != "active":
                with tenant(t):
                    assert service.enable(info.name)
            secret = service.retrieve_for_tenant(t, info.name)
            assert secret.access_count == info.access_count + 1
            if info.name == "crash-shared":
                assert str(secret.value).startswith("value-of-crash-shared-")
            else:
                assert secret.value == f"value-of-{info.name}"
    assert {f"crash-{i}" for i in range(1, progress_at + 1)} <= listed_names


def _seeded_rng() -> random.Random:
    """A random generator for the test's timings, its seed printed: pytest shows it with
    any failure (under "Captured stdout call"), and ``random.Random(seed)`` replays it."""
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    return random.Random(seed)


def test_a_writer_killed_with_sigkill_at_random_moments_leaves_a_consistent_store(
    tmp_path: Path, url: str, schema: str, amk: str
) -> None:
    progress_at = 9
    rng = _seeded_rng()
    for round_number in range(3):
        signals = tmp_path / f"round-{round_number}"
        signals.mkdir()
        group = Children(signals, url, amk)
        try:
            group.spawn(CRASH, "writer", tenants=TENANTS, progress_at=progress_at)
            group.go()
            group.wait_for((signals / "progress").exists)
            time.sleep(rng.uniform(0, 0.3))  # land in the middle of some operation
            group.kill("writer")
        finally:
            group.reap()
        with SecretService.create(url, master_key=amk) as service:
            _assert_consistent_after_writer_crash(service, schema, progress_at)

    with SecretService.create(url, master_key=amk) as service:
        # The store keeps working after the crashes.
        for t in TENANTS:
            before = max(key.version for key in service.list_keys(t))
            rotated = service.rotate_key_for_tenant(t)
            assert rotated.version == before + 1
            assert service.store_for_tenant(t, "after-crash", "fine").key_version == rotated.version
            assert service.retrieve_for_tenant(t, "after-crash").value == "fine"
            assert service.reencrypt_all_for_tenant(t).failed == 0
        _assert_one_active_key_and_contiguous_versions(service)


def _wait_until_caught_up(service: SecretService, children: Children, name: str) -> None:
    """Until the audit model has reached the stream head (the worker ``name`` follows it)."""
    deadline = time.monotonic() + 30
    while True:
        reached, head = service.read_model_status()["audit"]
        if reached == head:
            return
        projector = children.procs[name]
        if projector.poll() is not None:
            _, err = projector.communicate(timeout=5)
            pytest.fail(f"the new projection worker died ({projector.returncode}): {err}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"the new projection worker is stuck at {reached} of {head}; "
                f"{children.diagnose(name)}"
            )
        time.sleep(0.05)


def test_a_projection_worker_killed_with_sigkill_resumes_without_applying_any_event_twice(
    children: Children, url: str, schema: str, amk: str
) -> None:
    rng = _seeded_rng()
    with SecretService.create(url, master_key=amk) as service:
        service.init_schema()
        service.store_for_tenant(TENANTS[0], "seed", "seed-value")

    children.spawn(
        WRITER,
        "writer",
        tenants=TENANTS,
        n=200,
        progress_at=40,
        pause=0.003,
        seed=rng.randrange(2**32),
    )
    children.spawn(PROJECTOR, "projector-1")
    children.go()
    children.wait_for((children.directory / "progress").exists)
    children.wait_for((children.directory / "following-projector-1").exists)
    time.sleep(rng.uniform(0, 0.2))  # land in the middle of a catch-up, or between two
    children.kill("projector-1")
    at_kill = _audit_table_counts(schema)
    # Exactly the events up to the committed position are in the audit table: the batch
    # the worker was applying when it died left nothing behind.
    assert at_kill["rows"] == at_kill["events_to_tracked"]
    assert (at_kill["missing"], at_kill["extra"]) == (0, 0)
    assert at_kill["tracked"] > 0

    children.spawn(PROJECTOR, "projector-2")
    writer = children.result("writer")

    with SecretService.create(url, master_key=amk) as service:
        for number in range(2, 5):
            projector_name = f"projector-{number}"
            _wait_until_caught_up(service, children, projector_name)
            children.kill(projector_name)
            counts = _audit_table_counts(schema)
            if counts["tracked"] == counts["head"]:
                break
            # The idle worker sealed between its last catch-up and the kill: its checkpoint
            # is not tracked yet. Another worker resumes from there (and the one after it has
            # nothing left to seal).
            children.spawn(PROJECTOR, f"projector-{number + 1}")
        assert counts["tracked"] == counts["head"] > at_kill["tracked"]
        assert counts["rows"] == counts["events_to_tracked"]
        assert (counts["missing"], counts["extra"]) == (0, 0)

        with super_admin():
            audit = service.get_audit_logs(limit=EVERYTHING)
            reads = service.get_audit_logs(
                user_id="writer", action="read", result="success", limit=EVERYTHING
            )
        assert len(reads) == writer["reads"]
        assert len(audit) == counts["rows"]
        assert len({entry.position for entry in audit}) == len(audit)

        sealed = len(service.audit_checkpoints())  # the idle worker's checkpoints
        assert service.rebuild_read_models() == counts["rows"] + sealed
        rebuilt = _audit_table_counts(schema)
        assert (rebuilt["rows"], rebuilt["tracked"]) == (counts["rows"], counts["tracked"])
        with super_admin():
            assert service.get_audit_logs(limit=EVERYTHING) == audit
