"""``SecretService.close()`` while other threads are in the middle of calls.

sqlite3 crashes the whole process (SIGSEGV) when a connection is closed under a statement
another thread is running, so the scenario runs in a child process: a crash is its exit
status, not the test run's end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyledger import SecretService, tenant

CHILD = r"""
import json, sys, threading, time
from keyledger import SecretService, StorageError, tenant

url, master_key, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
stored, refusals, others = [], set(), []
for rnd in range(rounds):
    service = SecretService.create(url, master_key=master_key)
    with tenant("acme"):
        service.store("seed", "seed-value")

    def work(k: int) -> None:
        with tenant("acme"):
            for i in range(10**6):
                try:
                    if k % 2:
                        service.retrieve("seed")
                        service.list(limit=5)
                    else:
                        service.store(f"r{rnd}-w{k}-{i}", f"v{rnd}-{k}-{i}")
                        stored.append(f"r{rnd}-w{k}-{i}")
                except StorageError as error:
                    refusals.add(str(error))
                    return
                except BaseException as error:
                    others.append(repr(error))
                    return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.15)
    service.close()
    for thread in threads:
        thread.join()
print(json.dumps({"stored": stored, "refusals": sorted(refusals), "others": others}))
"""


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_closing_a_service_in_use_by_other_threads_fails_their_calls_cleanly(
    backend: str, tmp_path: Path, master_key: str
) -> None:
    url = "memory:" if backend == "memory" else f"sqlite:///{tmp_path}/busy.db"
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, master_key, "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert outcome["others"] == []
    assert outcome["refusals"] == ["the store is closed: SecretService.close() was called"]
    assert outcome["stored"]
    if backend == "sqlite":  # every store that returned is there, with its value
        service = SecretService.create(url, master_key=master_key)
        try:
            with tenant("acme"):
                for name in outcome["stored"]:
                    rnd, worker, i = name[1:].split("-")
                    expected = f"v{rnd}-{worker[1:]}-{i}"
                    assert service.retrieve(name).value == expected
        finally:
            service.close()


def test_close_from_the_thread_of_a_call_in_progress_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """A signal handler (or a callback) closing the service runs on the thread whose call
    it interrupted: that call ends only after close() returns, then closes the store."""
    from keyledger.infrastructure.sqlite_store import CLOSE_WAIT, KeyledgerSQLiteDatastore

    datastore = KeyledgerSQLiteDatastore(str(tmp_path / "own.db"))
    datastore.enter()
    started = time.monotonic()
    datastore.close()
    waited = time.monotonic() - started
    datastore.leave()

    assert waited < CLOSE_WAIT / 2
    assert datastore.pool.closed


FORKED = r"""
import os, sys, threading, time
from keyledger import StorageError
from keyledger.infrastructure import sqlite_store
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteDatastore

sqlite_store.CLOSE_WAIT = 0.5  # how long the fork waits for the other thread's call
datastore = KeyledgerSQLiteDatastore(sys.argv[1])
inside, done = threading.Event(), threading.Event()

def in_a_call() -> None:
    datastore.enter()
    inside.set()
    done.wait()
    datastore.leave()

thread = threading.Thread(target=in_a_call)
thread.start()
inside.wait()
child = os.fork()
if child == 0:  # the thread in its call does not exist here; its connections stayed open
    started = time.monotonic()
    datastore.close()
    try:
        datastore.enter()
        os._exit(4)
    except StorageError:
        os._exit(0 if time.monotonic() - started < 2 else 3)
_, status = os.waitpid(child, 0)
done.set()
thread.join()
datastore.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_forking(script: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "forked.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_forked_child_closes_without_waiting_for_its_parents_calls(tmp_path: Path) -> None:
    _run_forking(FORKED, tmp_path)


FORKED_IN_A_CALL = r"""
import os, sys
from keyledger import StorageError
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteDatastore

datastore = KeyledgerSQLiteDatastore(sys.argv[1])
datastore.enter()  # this thread is in a call when it forks (a signal handler's fork)
child = os.fork()
if child == 0:  # its connections stayed open: the child refuses calls, says why
    try:
        datastore.leave()  # its call ends in the child, where it was never counted
        datastore.close()
    except BaseException as error:
        print(repr(error), file=sys.stderr)
        os._exit(3)
    try:
        datastore.enter()
    except StorageError as error:
        os._exit(0 if "forked" in str(error) else 5)
    os._exit(4)
_, status = os.waitpid(child, 0)
datastore.leave()
datastore.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_call_in_progress_when_its_thread_forks_ends_cleanly_in_the_child(
    tmp_path: Path,
) -> None:
    _run_forking(FORKED_IN_A_CALL, tmp_path)
