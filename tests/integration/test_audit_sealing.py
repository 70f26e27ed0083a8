"""Sealing: automatic seals, the idle worker's seals, and sealers racing in real processes.

The chain must never fork: concurrent sealers (threads or processes, some of them killed
with SIGKILL mid-seal) leave contiguous checkpoints 1..n whose segments cover the stream
without gap or overlap, and the stream verifies intact afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import POSTGRES_URL, RUN_ID, MakeService, drop_created_schemas, drop_schema
from keyledger import SecretService, tenant
from keyledger.application import sealing, stream
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.models import Checkpoint


def assert_contiguous_chain(service: SecretService) -> None:
    """Checkpoints 1..n, each starting where the one before ended."""
    checkpoints = service.audit_checkpoints()
    assert [c.sequence for c in checkpoints] == list(range(1, len(checkpoints) + 1))
    ends = [0, *(c.to_position for c in checkpoints)]
    assert [c.after_position for c in checkpoints] == ends[:-1]
    assert all(c.event_count > 0 for c in checkpoints)


def checkpoints_after(service: SecretService, count: int) -> list[Checkpoint]:
    """The checkpoints once the background sealer has appended ``count`` of them."""
    deadline = time.monotonic() + 10
    while len(checkpoints := service.audit_checkpoints()) < count:
        assert time.monotonic() < deadline, f"{len(checkpoints)} of {count} checkpoints"
        time.sleep(0.01)
    return checkpoints


def test_a_process_seals_by_itself_after_every_n_appends(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The audit model catches up every few appends too: that must not reset the count.
    monkeypatch.setattr("keyledger.application.ledger.AUDIT_CATCH_UP_EVERY", 3)
    service = make_service(settings=KeyledgerSettings(audit_seal_every=10))
    with tenant("acme", user_id="alice"):
        for index in range(12):
            service.store(f"s{index}", "value")
        assert len(checkpoints_after(service, 1)) == 1  # asked for at the 10th append
        for _ in range(10):
            service.retrieve("s0")
    checkpoints = checkpoints_after(service, 2)
    assert len(checkpoints) == 2
    assert checkpoints[0].sealed_by == "system"
    report = service.verify_audit()
    assert report.intact, report.findings
    assert report.last_sealed_position == checkpoints[-1].to_position
    assert report.unsealed_events < 10


def test_no_automatic_seal_when_turned_off(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    with tenant("acme"):
        for index in range(30):
            service.store(f"s{index}", "value")
    assert service.audit_checkpoints() == []
    assert service.unsealed_events() == 31  # the key and 30 secrets


def test_the_idle_projection_worker_seals_the_stream(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    with tenant("acme"):
        for index in range(5):
            service.store(f"s{index}", "value")
    rounds = iter(range(3))
    service.follow_read_models(stop=lambda: next(rounds, None) is None, idle_seconds=0.01)
    assert service.unsealed_events() <= 1  # at most the worker's own newest checkpoint
    assert len(service.audit_checkpoints()) == 1  # idle again: never a seal of a seal
    assert service.verify_audit().intact


def test_the_worker_does_not_seal_when_told_not_to(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    with tenant("acme"):
        service.store("s", "value")
    rounds = iter(range(3))
    service.follow_read_models(
        stop=lambda: next(rounds, None) is None, idle_seconds=0.01, seal=False
    )
    assert service.audit_checkpoints() == []


def test_a_seal_with_nothing_new_appends_nothing(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    with tenant("acme"):
        service.store("s", "value")
    assert service.seal_audit().sealed_events == 2
    again = service.seal_audit()
    assert again.checkpoints == []
    assert again.sealed_events == 0
    assert len(service.audit_checkpoints()) == 1


def test_threads_sealing_while_others_write_never_fork_the_chain(
    make_service: MakeService,
) -> None:
    service = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            with tenant(f"t{worker}"):
                for index in range(40):
                    service.store(f"s{index % 7}", f"v{index}")
                    service.retrieve(f"s{index % 7}")
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def seal() -> None:
        try:
            while not stop.is_set():
                service.seal_audit()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    sealers = [threading.Thread(target=seal) for _ in range(2)]
    for thread in (*writers, *sealers):
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in sealers:
        thread.join()
    assert not errors, errors
    service.seal_audit()
    assert_contiguous_chain(service)
    report = service.verify_audit()
    assert report.intact, report.findings
    assert report.unsealed_events <= 1


# -- real processes ------------------------------------------------------------------------

SEALER = r"""
import json, sys, time
from pathlib import Path
from keyledger import SecretService, tenant
from keyledger.application import sealing, stream
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.models import Checkpoint

args = json.loads(sys.argv[1])
service = SecretService.create(
    args["url"], master_key=args["amk"], settings=KeyledgerSettings(audit_seal_every=0)
)
Path(args["ready"]).touch()
if args["mode"] == "seal":
    while True:
        service.seal_audit()
else:
    with tenant(args["tenant"], user_id=args["tenant"]):
        for index in range(args["n"]):
            service.store(f"s{index % 9}", f"v{index}")
            service.retrieve(f"s{index % 9}")
    print(json.dumps({"done": True}))
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sealing.db'}"
        return
    request.getfixturevalue("_postgres_server")
    schema = f"kl_{RUN_ID}_sealing_{os.getpid()}"
    yield f"{POSTGRES_URL}?schema={schema}"
    _drop(schema)


def _drop(schema: str) -> None:
    drop_schema(schema)
    drop_created_schemas()


@pytest.mark.slow
def test_sealers_in_processes_killed_with_sigkill_leave_one_intact_chain(
    shared_url: str, tmp_path: Path, master_key: str
) -> None:
    rng = random.Random(RUN_ID)
    with SecretService.create(shared_url, master_key=master_key) as setup:
        setup.init_schema()

    def spawn(name: str, mode: str, **extra: object) -> subprocess.Popen[str]:
        ready = tmp_path / f"ready-{name}"
        args = {"url": shared_url, "amk": master_key, "mode": mode, "ready": str(ready)}
        process = subprocess.Popen(
            [sys.executable, "-c", SEALER, json.dumps({**args, **extra})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.01)
        return process

    writers = [spawn(f"w{n}", "write", tenant=f"t{n}", n=120) for n in range(2)]
    sealers = [spawn(f"s{n}", "seal") for n in range(2)]
    kills = 0
    try:
        while kills == 0 or any(writer.poll() is None for writer in writers):
            time.sleep(rng.uniform(0.02, 0.2))
            victim = rng.randrange(len(sealers))
            sealers[victim].send_signal(signal.SIGKILL)  # wherever it is in its seal
            sealers[victim].wait()
            kills += 1
            sealers[victim] = spawn(f"s{victim}-{kills}", "seal")
        for writer in writers:
            out, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
            assert json.loads(out) == {"done": True}
    finally:
        for process in (*writers, *sealers):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    assert kills >= 1
    with SecretService.create(shared_url, master_key=master_key) as service:
        service.seal_audit()
        assert_contiguous_chain(service)
        report = service.verify_audit(anchor=service.audit_checkpoints())
        assert report.intact, report.findings
        assert report.sealed_events + report.unsealed_events == report.checked_events
        with tenant("t0"):
            assert {s.name for s in service.list()} == {f"s{n}" for n in range(9)}


# -- what sealing must not let through -------------------------------------------------------


def test_deleting_the_newest_checkpoints_and_what_they_sealed_is_caught_on_sqlite(
    tmp_path: Path, master_key: str
) -> None:
    """No checkpoint vouches for the newest one; on SQLite the gap it leaves shows."""
    import sqlite3

    path = tmp_path / "gap.db"
    settings = KeyledgerSettings(audit_seal_every=0)
    with SecretService.create(f"sqlite:///{path}", master_key=master_key, settings=settings) as s:
        with tenant("acme"):
            s.store("db", "value")
            s.retrieve("db")
        s.seal_audit()
        with tenant("acme", user_id="mallory"):
            s.retrieve("db")
            s.retrieve("db")
        s.seal_audit()
        with tenant("acme"):
            s.store("other", "value")
    with sqlite3.connect(path) as raw:  # both checkpoints and mallory's reads
        raw.execute("DELETE FROM stored_events WHERE rowid BETWEEN 3 AND 7")
    with SecretService.create(f"sqlite:///{path}", master_key=master_key, settings=settings) as s:
        report = s.verify_audit()
    assert not report.intact
    assert [(f.kind, f.position) for f in report.findings] == [("deleted", 3)]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_forked_child_seals_by_itself_too(make_service: MakeService) -> None:
    """The sealer thread started before a fork does not exist in the child: the child's
    first request must start its own, not set an event that nobody waits for."""
    service = make_service(settings=KeyledgerSettings(audit_seal_every=5))
    with tenant("acme"):
        for index in range(6):
            service.store(f"parent-{index}", "value")
    assert service._ledger.sealer.wait_idle(10)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            with tenant("acme"):
                for index in range(20):
                    service.store(f"child-{index}", "value")
            sealed = service._ledger.sealer.wait_idle(10)
            code = 0 if sealed and service.unsealed_events() < 5 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert service.verify_audit().intact


def test_a_master_key_holder_cannot_reseal_after_the_chain_moved_to_an_audit_key(
    make_service: MakeService,
) -> None:
    audit_key = "5a" * 32
    independent = KeyledgerSettings(audit_seal_every=0, audit_key=audit_key)
    owner = make_service(settings=independent)
    with tenant("acme"):
        owner.store("db", "value")
    assert owner.seal_audit().sealed_events == 2
    # Someone with the database and the master key, but not the audit key, appends and
    # seals under the master-key-derived key.
    forger = make_service(settings=KeyledgerSettings(audit_seal_every=0))
    with tenant("acme", user_id="mallory"):
        forger.retrieve("db")
    read_position = forger.verify_audit().head_position
    # The owner's seal refuses to vouch for what only a derived key tagged.
    assert owner.seal_audit().stopped_at == read_position
    # The forger builds the next checkpoint by hand (keyledger's own seal stops at the
    # owner's checkpoint, whose key it lacks) and appends it.
    ledger = forger._ledger
    with pytest.raises(sealing.UncheckableHead, match="not configured"):
        sealing.chain_head(ledger)  # it cannot check the owner's checkpoint either
    newest = stream.newest_seal_row(ledger)
    assert newest is not None
    decoded = sealing.decode_checkpoint(ledger, newest)
    assert decoded is not None
    head = sealing.ChainHead(decoded.originator_version, decoded.to_position, decoded.digest)
    rows = next(stream.rows_after(ledger, head.to_position))
    key = ledger.audit_keys.current
    assert key is not None
    ledger.commit(sealing._build(ledger, key, head, rows, {"user_id": "mallory"}))
    report = owner.verify_audit()
    assert not report.intact
    assert "checkpoint_invalid" in {f.kind for f in report.findings}
    assert forger.verify_audit().intact is False  # the forger cannot verify the owner's seal


def test_every_seal_appends_its_checkpoints_to_the_anchor_file(
    make_service: MakeService, tmp_path: Path
) -> None:
    anchor = tmp_path / "anchors" / "keyledger.jsonl"
    anchor.parent.mkdir()
    settings = KeyledgerSettings(audit_seal_every=0, audit_anchor_file=anchor)
    service = make_service(settings=settings)
    with tenant("acme"):
        service.store("a", "value")
        service.seal_audit()
        service.store("b", "value")
        service.seal_audit()
    lines = anchor.read_text().splitlines()
    anchored = [Checkpoint.model_validate_json(line) for line in lines]
    assert [c.sequence for c in anchored] == [1, 2]
    assert [(c.sequence, c.position, c.digest) for c in anchored] == [
        (c.sequence, c.position, c.digest) for c in service.audit_checkpoints()
    ]
    assert service.verify_audit(anchor=anchored).intact


def test_an_unwritable_anchor_file_never_fails_the_seal(
    make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such-directory" / "anchors.jsonl"
    settings = KeyledgerSettings(audit_seal_every=0, audit_anchor_file=missing)
    service = make_service(settings=settings)
    with tenant("acme"):
        service.store("a", "value")
    sealed = service.seal_audit()  # an explicit seal says so in its result
    assert len(sealed.checkpoints) == 1
    assert sealed.anchor_error is not None
    assert "anchor file" in sealed.anchor_error
    assert "anchor file" not in caplog.text
    with tenant("acme"):
        service.store("b", "value")
    service._ledger.seal_automatically()  # nobody reads an automatic seal's result: logged
    assert "anchor file" in caplog.text
    assert service.verify_audit().intact
