"""SIGKILL in the middle of every multi-step key operation, then a rerun (issue 4, item 4).

Each trial seeds a store (200 secrets over five tenants on a SQLite file; 100 over four on
PostgreSQL), starts a child process that runs one operation over all of it, and kills the
child with SIGKILL at a random moment: the child announces each write transaction it is
about to start, and the parent picks a random one, waits for it and kills after a random
further delay of a few milliseconds (inside that transaction, between two, or inside the
next). A fresh service then runs the same operation again. It must complete, the diagnosis
of every tenant must show no error or warning (erased tenants: exactly the errors erasure
means), every live value must read back, and the read models must equal a rebuild.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import POSTGRES_URL, own_schema
from keyledger import DecryptionFailed, SecretService, super_admin
from keyledger.infrastructure.crypto import MasterKey

pytestmark = pytest.mark.slow

OPERATIONS = ("rotate", "reencrypt", "rewrap", "cleanup", "erase")
SQLITE_TRIALS = 4  # per operation: 20 SIGKILLs on SQLite; on PostgreSQL see PG_ATTEMPTS
ROTATION_ROUNDS = 4
START_TIMEOUT = 30.0
KILL_JITTER = 0.004  # seconds after the announced transaction began
ERASURE_CODES = {
    "missing_active_tenant_encryption_key",
    "active_secrets_without_usable_active_key",
    "secret_envelope_missing_tenant_encryption_key",
}

# The child: open a service, announce every write transaction with a file, run the operation
# once, touch "done" and wait to be killed.
CHILD = r"""
import json, sys, time
from pathlib import Path

from keyledger import SecretService

args = json.loads(sys.argv[1])
base = Path(args["dir"])
service = SecretService.create(args["url"])
ledger = service._ledger
commit = ledger.commit
count = [0]

def announced_commit(*items, **kwargs):
    count[0] += 1
    (base / f"commit-{count[0]}").touch()
    return commit(*items, **kwargs)

ledger.commit = announced_commit
(base / "started").touch()
op, tenants = args["op"], args["tenants"]
if op == "rotate":
    for _ in range(args["rounds"]):
        for t in tenants:
            service.rotate_key_for_tenant(t)
elif op == "reencrypt":
    for t in tenants:
        service.reencrypt_all_for_tenant(t)
elif op == "rewrap":
    service.rewrap_master_key()
elif op == "cleanup":
    service.cleanup_retired_keys(older_than_days=0)
elif op == "erase":
    for t in args["erase"]:
        service.erase_tenant(t, confirm=True)
(base / "done").touch()
time.sleep(60)
"""


class Plan:
    """One operation over one data set: how to seed it, run it, and check the result."""

    def __init__(self, op: str, tenants: list[str], per_tenant: int) -> None:
        self.op = op
        self.tenants = tenants
        self.per_tenant = per_tenant
        self.erase = tenants[: max(3, len(tenants) // 2)] if op == "erase" else []
        self.old_key = secrets.token_hex(32)
        self.new_key = secrets.token_hex(32) if op == "rewrap" else self.old_key
        self.values: dict[str, dict[str, str]] = {}
        self.wrapped: dict[str, list[bytes]] = {}

    @property
    def transactions(self) -> int:
        """Write transactions the operation takes (what the child announces)."""
        count = len(self.tenants)
        return {
            "rotate": ROTATION_ROUNDS * count,
            "reencrypt": count,
            "rewrap": count,
            "cleanup": 6 * count,  # versions 1-5 destroyed, version 6 refused (in use)
            "erase": len(self.erase),
        }[self.op]

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLEDGER_")}
        env["KEYLEDGER_MASTER_KEY"] = self.new_key
        if self.op == "rewrap":
            env["KEYLEDGER_PREVIOUS_MASTER_KEYS"] = self.old_key
        return env

    def operator(self, url: str) -> SecretService:
        """A service configured the way the child is."""
        previous = [self.old_key] if self.op == "rewrap" else None
        return SecretService.create(url, master_key=self.new_key, previous_master_keys=previous)

    def seed(self, url: str) -> None:
        with SecretService.create(url, master_key=self.old_key) as service:
            for t in self.tenants:
                mine = {f"s{i:03d}": f"{t}-value-{i}-{secrets.token_hex(4)}" for i in range(20)}
                mine.update({f"s{i:03d}": f"{t}-value-{i}" for i in range(20, self.per_tenant)})
                for name, value in mine.items():
                    service.store_for_tenant(t, name, value)
                self.values[t] = mine
                if self.op == "reencrypt":
                    service.rotate_key_for_tenant(t)
                    for i in range(5):
                        mine[f"s{i:03d}"] = f"{t}-under-v2-{i}"
                        service.store_for_tenant(t, f"s{i:03d}", mine[f"s{i:03d}"])
                    service.rotate_key_for_tenant(t)
                elif self.op == "rewrap":
                    for _ in range(3):
                        service.rotate_key_for_tenant(t)
                    mine["late"] = f"{t}-late"
                    service.store_for_tenant(t, "late", mine["late"])
                elif self.op == "cleanup":
                    for _ in range(5):
                        service.rotate_key_for_tenant(t)
                    assert service.reencrypt_all_for_tenant(t).failed == 0
                    service.rotate_key_for_tenant(t)  # version 6 stays in use, 7 is active
                elif self.op == "erase":
                    service.rotate_key_for_tenant(t)
                    mine["late"] = f"{t}-late"
                    service.store_for_tenant(t, "late", mine["late"])
        self.wrapped = {t: [blob for _, blob in material(url, t)] for t in self.erase}

    def rerun(self, service: SecretService) -> None:
        """Run the operation again, to completion, and check what it reports."""
        if self.op == "rotate":
            for _ in range(ROTATION_ROUNDS):
                for t in self.tenants:
                    service.rotate_key_for_tenant(t)
        elif self.op == "reencrypt":
            for t in self.tenants:
                result = service.reencrypt_all_for_tenant(t)
                assert (result.success, result.failed) == (len(self.values[t]), 0)
        elif self.op == "rewrap":
            result = service.rewrap_master_key()
            assert result.failed == 0, result.failures
            assert result.rewrapped + result.already_current == 4 * len(self.tenants)
        elif self.op == "cleanup":
            result = service.cleanup_retired_keys(older_than_days=0)
            assert {o.version for o in result.keys if o.outcome == "destroyed"} <= set(range(1, 6))
            assert {o.version for o in result.keys if o.outcome == "skipped"} == {6}
        elif self.op == "erase":
            for t in self.erase:
                service.erase_tenant(t, confirm=True)

    def check(self, service: SecretService, url: str) -> None:
        """Everything a user relies on after the rerun."""
        for t in self.tenants:
            keys = service.list_keys(t)
            versions = [k.version for k in keys]
            assert versions == list(range(1, len(versions) + 1)), (t, versions)
            report = service.diagnose_tenant_secret_key_drift(t)
            found = Counter(i.code for i in report.issues if i.severity != "info")
            if t in self.erase:
                self._check_erased(service, url, t, keys, found)
                continue
            assert found == Counter(), (t, report.issues)
            assert [k.version for k in keys if k.status == "active"] == [versions[-1]], t
            self._check_operation(service, url, t, keys)
            reader = SecretService.create(url, master_key=self.new_key)
            try:
                read = {
                    info.name: reader.retrieve_for_tenant(t, info.name).value
                    for info in reader.list_for_tenant(t)
                }
            finally:
                reader.close()
            assert read == self.values[t], t
        _assert_read_models_equal_a_rebuild(service, self.tenants)

    def _check_operation(self, service: SecretService, url: str, t: str, keys: list[Any]) -> None:
        status = {k.version: k.status for k in keys}
        if self.op == "rotate":
            assert ROTATION_ROUNDS + 1 <= len(keys) <= 2 * ROTATION_ROUNDS + 1, (t, status)
        elif self.op == "reencrypt":
            on = {info.key_version for info in service.list_for_tenant(t, status=None)}
            assert on == {len(keys)}, (t, on)
        elif self.op == "rewrap":
            assert {k.amk_id for k in keys} == {MasterKey(bytes.fromhex(self.new_key)).amk_id}
        elif self.op == "cleanup":
            assert status == {**dict.fromkeys(range(1, 6), "destroyed"), 6: "retired", 7: "active"}
            assert material_versions(url, t) == [6, 7]

    def _check_erased(
        self, service: SecretService, url: str, t: str, keys: list[Any], found: Counter[str]
    ) -> None:
        assert {k.status for k in keys} == {"destroyed"}, t
        assert material_versions(url, t) == []
        if url.startswith("sqlite:///"):
            # Shredded from the files too, even when the kill came before the WAL checkpoint.
            directory = Path(url.removeprefix("sqlite:///")).parent
            content = b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file())
            assert [blob for blob in self.wrapped[t] if blob in content] == [], t
        live = service.list_for_tenant(t, status=None)
        assert len(live) == len(self.values[t])
        assert set(found) == ERASURE_CODES, (t, found)
        assert found["secret_envelope_missing_tenant_encryption_key"] == len(live)
        for info in live[:3]:
            with pytest.raises(DecryptionFailed):
                service.retrieve_for_tenant(t, info.name)


def material_versions(url: str, tenant_id: str) -> list[int]:
    """Versions with key material in the database, read around keyledger."""
    return [version for version, _ in material(url, tenant_id)]


def material(url: str, tenant_id: str) -> list[tuple[int, bytes]]:
    """(version, wrapped key) of the tenant's key material, read around keyledger."""
    query = "SELECT version, wrapped FROM kl_key_material WHERE tenant_id=? ORDER BY version"
    if url.startswith("postgresql:"):
        base, schema = url.split("?schema=")
        with psycopg.connect(base, options=f"-c search_path={schema}", connect_timeout=5) as conn:
            rows: list[Any] = conn.execute(query.replace("?", "%s"), (tenant_id,)).fetchall()
    else:
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
        try:
            rows = conn.execute(query, (tenant_id,)).fetchall()
        finally:
            conn.close()
    return [(row[0], bytes(row[1])) for row in rows]


def _assert_read_models_equal_a_rebuild(service: SecretService, tenants: list[str]) -> None:
    def snapshot() -> Any:
        with super_admin():
            return (
                [service.list_for_tenant(t, status=None, include_expired=True) for t in tenants],
                service.list_keys(),
                service.get_audit_logs(limit=1_000_000),
            )

    before = snapshot()
    service.rebuild_read_models()
    assert snapshot() == before


def kill_mid_operation(plan: Plan, url: str, directory: Path, rng: random.Random) -> bool:
    """Run the operation in a child and SIGKILL it at a random moment; True when the kill
    came before the operation finished."""
    directory.mkdir()
    target = rng.randrange(1, plan.transactions)  # announced transaction to wait for
    payload = {
        "dir": str(directory),
        "url": url,
        "op": plan.op,
        "tenants": plan.tenants,
        "erase": plan.erase,
        "rounds": ROTATION_ROUNDS,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(payload)],
        env=plan.child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (directory / f"commit-{target}").exists():
            if child.poll() is not None:
                _, err = child.communicate(timeout=5)
                pytest.fail(f"child exited early with {child.returncode}: {err[-3000:]}")
            if (directory / "done").exists():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"child did not reach transaction {target} in time")
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, KILL_JITTER))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)
    return not (directory / "done").exists()


def trial(plan: Plan, url: str, directory: Path, rng: random.Random) -> bool:
    killed_mid_operation = kill_mid_operation(plan, url, directory, rng)
    with plan.operator(url) as service:
        plan.rerun(service)
        plan.check(service, url)
    return killed_mid_operation


# -- SQLite: a seeded file per operation, copied for each trial --------------------------------


def _copy_store(seed_dir: Path, trial_dir: Path) -> str:
    trial_dir.mkdir()
    for path in seed_dir.iterdir():
        shutil.copy2(path, trial_dir / path.name)
    return f"sqlite:///{trial_dir / 'k.db'}"


@pytest.mark.parametrize("op", OPERATIONS)
def test_a_sigkill_anywhere_in_an_operation_on_sqlite_is_completed_by_a_rerun(
    op: str, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Operations with one transaction per tenant need more tenants, or the kill often lands
    # after the last one.
    tenants = 5 if op in ("rotate", "cleanup") else 12
    plan = Plan(op, [f"tenant-{i}" for i in range(tenants)], per_tenant=200 // tenants)
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    plan.seed(f"sqlite:///{seed_dir / 'k.db'}")

    mid_operation = []
    for index in range(SQLITE_TRIALS):
        url = _copy_store(seed_dir, tmp_path / f"trial-{index}")
        try:
            mid_operation.append(trial(plan, url, tmp_path / f"signals-{index}", rng))
        except AssertionError as error:
            raise AssertionError(f"{op} trial {index} (random seed {seed}): {error}") from error

    assert sum(mid_operation) >= 1, f"every kill landed after the end (random seed {seed})"


# -- PostgreSQL: a seeded schema per trial -------------------------------------------------------

PG_ATTEMPTS = 3  # trials (each on a newly seeded schema) until one kill lands mid-operation


@pytest.mark.postgres
@pytest.mark.usefixtures("_postgres_server")
@pytest.mark.parametrize("op", OPERATIONS)
def test_a_sigkill_anywhere_in_an_operation_on_postgres_is_completed_by_a_rerun(
    op: str, tmp_path: Path
) -> None:
    """Every trial's rerun must complete; a kill that came after the end proves nothing
    about crashes, so a trial is repeated on a fresh schema until one came before it."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    mid_operation = []
    for attempt in range(PG_ATTEMPTS):
        failure: BaseException | None = None
        with own_schema("crash") as name:  # (dropped only when its block ends normally)
            url = f"{POSTGRES_URL}?schema={name}"
            try:
                plan = Plan(op, [f"tenant-{i}" for i in range(4)], per_tenant=25)
                plan.seed(url)
                mid_operation.append(trial(plan, url, tmp_path / f"signals-{attempt}", rng))
            except BaseException as error:  # raised below, once the schema is dropped
                failure = error
        if isinstance(failure, AssertionError):
            raise AssertionError(
                f"{op} on PostgreSQL, trial {attempt} (random seed {seed}): {failure}"
            ) from failure
        if failure is not None:
            raise failure
        if mid_operation[-1]:
            break

    assert any(mid_operation), (
        f"{op}: all {len(mid_operation)} kills landed after the end (random seed {seed})"
    )
