"""Real processes on one SQLite file: concurrent reads, rotations, stores, and a SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyledger import SecretService, tenant
from worker_snippets import EXCLUSIVE_AFTER_KNOB

pytestmark = pytest.mark.slow

WORKERS = 4
PAUSE = 0.01  # up to this many seconds between a worker's calls, so the workers interleave
TENANT = "tenant-procs"
START_TIMEOUT = 30.0
RUN_TIMEOUT = 60.0

# Each child opens its own service, signals readiness, waits for the common start signal
# (so the workers really overlap), runs its part and prints one JSON line of results.
WORKER = (
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

out = {}
mode = args["mode"]
with tenant(args["tenant"], user_id=who):
    if mode == "read":
        counts = []
        for _ in range(args["n"]):
            secret = service.retrieve(args["name"])
            assert secret.value == args["value"], "wrong value read"
            counts.append(secret.access_count)
            time.sleep(random.uniform(0, args["pause"]))
        out["counts"] = counts
    elif mode == "rotate":
        versions = []
        for _ in range(args["n"]):
            versions.append(service.rotate_key().version)
            time.sleep(random.uniform(0, args["pause"]))
        out["versions"] = versions
    elif mode == "store":
        shared, own, failures, stale_reads = [], [], [], []
        own_name = f"own-{who}"
        for j in range(args["n"]):
            value = f"{who}-shared-{j}"
            try:
                shared.append([service.store(args["name"], value).version, value])
            except KeyledgerError as error:
                failures.append(type(error).__name__)
            value = f"{who}-own-{j}"
            try:
                own.append([service.store(own_name, value).version, value])
            except KeyledgerError as error:
                failures.append(type(error).__name__)
            seen = service.retrieve(args["name"])
            if shared and seen.version < shared[-1][0]:
                stale_reads.append([seen.version, shared[-1][0]])
            if not str(seen.value).endswith(tuple(f"-shared-{k}" for k in range(args["n"]))):
                if seen.value != args["initial"]:
                    stale_reads.append(["unexpected value", seen.version])
            time.sleep(random.uniform(0, args["pause"]))
        out.update(shared=shared, own=own, failures=failures, stale_reads=stale_reads)
        out["exclusive"] = len(held)
    elif mode == "crash":
        i = 0
        while True:
            i += 1
            service.store(f"crash-{i}", f"value-of-crash-{i}", metadata={"i": str(i)})
            assert service.retrieve(f"crash-{i}").value == f"value-of-crash-{i}"
            service.store("crash-shared", f"value-of-crash-shared-{i}")
            service.retrieve("crash-shared")
            if i % 4 == 0:
                service.rotate_key()
            if i % 6 == 0:
                service.reencrypt_all()
            if i % 5 == 0:
                service.disable(f"crash-{i - 1}")
            if i == args["progress_at"]:
                (base / "progress").touch()
service.close()
print(json.dumps(out), flush=True)
"""
)


class Workers:
    """Child processes started together on one database; always reaped."""

    def __init__(self, directory: Path, url: str, amk: str) -> None:
        self.directory = directory
        self.url = url
        self.env = {**os.environ, "KEYLEDGER_MASTER_KEY": amk}
        for name in list(self.env):
            if name.startswith("KEYLEDGER_") and name != "KEYLEDGER_MASTER_KEY":
                del self.env[name]
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, count: int, **args: Any) -> None:
        for index in range(count):
            payload = {"dir": str(self.directory), "url": self.url, "who": f"w{index}", **args}
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, json.dumps(payload)],
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        self._wait_for(lambda: all((self.directory / f"ready-w{i}").exists() for i in range(count)))
        (self.directory / "go").touch()

    def _wait_for(self, condition: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not condition():
            dead = [proc for proc in self.procs if proc.poll() is not None]
            if dead:
                _, err = dead[0].communicate(timeout=5)
                pytest.fail(f"worker exited early with {dead[0].returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("workers did not get ready in time")
            time.sleep(0.01)

    def wait_for_file(self, name: str) -> None:
        self._wait_for(lambda: (self.directory / name).exists())

    def results(self) -> list[dict[str, Any]]:
        outputs = []
        deadline = time.monotonic() + RUN_TIMEOUT
        for proc in self.procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail("a worker did not finish in time (hang or deadlock)")
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
        return outputs

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def amk() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def workers(tmp_path: Path, url: str, amk: str) -> Iterator[Workers]:
    group = Workers(tmp_path, url, amk)
    try:
        yield group
    finally:
        group.reap()


def test_four_processes_reading_one_secret_lose_no_count_and_no_audit_entry(
    workers: Workers, url: str, amk: str
) -> None:
    reads = 50
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        service.store("hot", "hot-value")

    workers.start(
        WORKERS, mode="read", pause=PAUSE, tenant=TENANT, name="hot", value="hot-value", n=reads
    )
    results = workers.results()

    total = WORKERS * reads
    for result in results:
        counts = result["counts"]
        assert len(counts) == reads
        assert all(a < b for a, b in itertools.pairwise(counts)), counts
        assert all(1 <= count <= total for count in counts)
    assert max(count for result in results for count in result["counts"]) == total
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        [info] = service.list()
        assert info.access_count == total
        successes = service.get_audit_logs(
            secret_name="hot", action="read", result="success", limit=10_000
        )
        assert len(successes) == total
        assert {entry.user_id for entry in successes} == {f"w{i}" for i in range(WORKERS)}
        assert service.get_audit_logs(secret_name="hot", action="read", result="failure") == []
        assert service.retrieve("hot").access_count == total + 1


def test_four_processes_rotating_one_tenant_leave_one_active_key_and_contiguous_versions(
    workers: Workers, url: str, amk: str
) -> None:
    rotations = 5
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        service.store("before-rotations", "under-version-1")

    workers.start(WORKERS, mode="rotate", pause=PAUSE, tenant=TENANT, n=rotations)
    results = workers.results()

    total = WORKERS * rotations
    returned = [version for result in results for version in result["versions"]]
    assert sorted(returned) == list(range(2, total + 2))
    for result in results:
        assert result["versions"] == sorted(result["versions"])
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        keys = service.list_keys()
        assert sorted(key.version for key in keys) == list(range(1, total + 2))
        assert [key.version for key in keys if key.status == "active"] == [total + 1]
        assert {key.status for key in keys if key.version != total + 1} == {"retired"}
        assert len(service.get_audit_logs(action="rotate_key", limit=1000)) == total
        assert len(service.get_audit_logs(action="rotate_key", result="success")) == total
        assert len(service.get_audit_logs(action="create_key")) == 1
        # Every version's material is usable: old secret reads, new store lands on the last.
        assert service.retrieve("before-rotations").value == "under-version-1"
        assert service.store("after-rotations", "new").key_version == total + 1
        assert service.retrieve("after-rotations").value == "new"
        assert service.reencrypt_all().failed == 0
        assert service.retrieve("before-rotations").key_version == total + 1


@pytest.mark.parametrize("exclusive_after", [None, 1], ids=["optimistic", "under-the-lock"])
def test_four_processes_storing_one_name_and_their_own_names_lose_no_store(
    workers: Workers, url: str, amk: str, exclusive_after: int | None
) -> None:
    """``under-the-lock``: every retry after a lost race is made under the write lock
    (from the fifth attempt in production), so that path meets real contention."""
    stores = 20
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        service.store("contended", "initial-value")

    workers.start(
        WORKERS,
        mode="store",
        pause=PAUSE,
        tenant=TENANT,
        name="contended",
        initial="initial-value",
        n=stores,
        exclusive_after=exclusive_after,
    )
    results = workers.results()
    if exclusive_after is not None:
        assert sum(result["exclusive"] for result in results) > 0

    # No store was given up (contention is retried, never reported as a failure), so
    # every process made all its stores, of the shared name and of its own.
    for index, result in enumerate(results):
        assert result["failures"] == [], f"w{index} lost stores: {result['failures']}"
        assert result["stale_reads"] == [], f"w{index} read older than its own store"
        assert len(result["shared"]) == stores, f"w{index} made too few shared stores"
        assert len(result["own"]) == stores, f"w{index} made too few stores of its own"
        own_versions = [version for version, _ in result["own"]]
        assert own_versions == list(range(1, stores + 1)), f"w{index}: {own_versions}"
    shared = [tuple(item) for result in results for item in result["shared"]]
    assert len(shared) == WORKERS * stores
    assert sorted(version for version, _ in shared) == list(range(2, len(shared) + 2))
    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        secret = service.retrieve("contended")
        assert secret.version == 1 + len(shared)
        assert secret.value == max(shared)[1]
        stored = service.get_audit_logs(secret_name="contended", result="success", limit=10_000)
        writes = [entry for entry in stored if entry.action in ("create", "update")]
        assert len(writes) == 1 + len(shared)
        # Each version a store returned is that process's write in the log (not another's).
        writer_of = {entry.details["version"]: entry.user_id for entry in writes}
        assert sorted(writer_of) == list(range(1, len(shared) + 2))
        for index, result in enumerate(results):
            for version, _ in result["shared"]:
                assert writer_of[version] == f"w{index}", (index, version)
        for index, result in enumerate(results):
            own = result["own"]
            mine = service.retrieve(f"own-w{index}")
            assert (mine.version, mine.value) == (stores, f"w{index}-own-{stores - 1}")
            assert own[-1] == [stores, mine.value]
            own_writes = service.get_audit_logs(secret_name=f"own-w{index}", result="success")
            assert sorted(
                entry.details["version"]
                for entry in own_writes
                if entry.action in ("create", "update") and entry.user_id == f"w{index}"
            ) == list(range(1, stores + 1))
            assert service.get_audit_logs(user_id=f"w{index}", result="failure") == []


def _check_consistent_after_crash(service: SecretService, progress_at: int) -> None:
    """Read models match a replay of the stream; every secret reads; one active key."""
    listed = service.list(status=None, include_expired=True)
    audit = service.get_audit_logs(limit=1_000_000)
    keys = service.list_keys()
    replayed = service.rebuild_read_models()
    assert replayed >= len(audit)
    assert service.list(status=None, include_expired=True) == listed
    assert service.get_audit_logs(limit=1_000_000) == audit
    assert service.list_keys() == keys

    names = {info.name for info in listed}
    assert {f"crash-{i}" for i in range(1, progress_at + 1)} <= names
    newest = max(key.version for key in keys)
    assert [key.version for key in keys if key.status == "active"] == [newest]
    assert sorted(key.version for key in keys) == list(range(1, newest + 1))
    for info in listed:
        secret = service.retrieve(info.name) if info.status == "active" else None
        if secret is None:
            assert service.enable(info.name)
            secret = service.retrieve(info.name)
        assert secret.access_count == info.access_count + 1
        if info.name == "crash-shared":
            assert str(secret.value).startswith("value-of-crash-shared-")
        else:
            assert secret.value == f"value-of-{info.name}"


def test_a_process_killed_mid_work_leaves_a_consistent_store(
    tmp_path: Path, url: str, amk: str
) -> None:
    progress_at = 12
    for round_number in range(3):
        signals = tmp_path / f"round-{round_number}"
        signals.mkdir()
        group = Workers(signals, url, amk)
        try:
            group.start(1, mode="crash", tenant=TENANT, progress_at=progress_at)
            group.wait_for_file("progress")
            time.sleep(random.uniform(0, 0.05))  # land in the middle of some operation
            [child] = group.procs
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            assert child.returncode == -signal.SIGKILL
        finally:
            group.reap()
        with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
            _check_consistent_after_crash(service, progress_at)

    with SecretService.create(url, master_key=amk) as service, tenant(TENANT):
        # The store keeps working after the crashes.
        before = max(key.version for key in service.list_keys())
        rotated = service.rotate_key()
        assert rotated.version == before + 1
        assert service.store("after-crash", "fine").key_version == rotated.version
        assert service.retrieve("after-crash").value == "fine"
        assert service.reencrypt_all().failed == 0
