"""A service on a SQLite file, made before ``fork()``, used by parent and children.

This is how gunicorn ``--preload``, Celery's prefork pool and ``multiprocessing``'s fork
start method run an application that opens its service at import. SQLite forbids a child
to use a connection, or SQLite's in-memory record of the locks on a file, inherited from
its parent (https://sqlite.org/howtocorrupt.html, 2.6). Two ways that went wrong were
found by review: a child's commits lost once the parent closed its service (the parent,
believing itself the file's last user, deleted the WAL under the child), and a child
forked during another thread's write that could never write. Each scenario runs in a
fresh interpreter, which forks real children and reports what they saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork")

PRELUDE = r"""
import json, os, sqlite3, sys, threading, time, warnings
from keyledger import SecretService
from keyledger.infrastructure.settings import KeyledgerSettings

warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
URL, KEY = sys.argv[1], sys.argv[2]


def open_service():
    return SecretService.create(
        URL, master_key=KEY, settings=KeyledgerSettings(lock_timeout_seconds=2)
    )


def in_child(work):
    # Fork; the child runs work() once the parent writes to the pipe, reports as JSON.
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        os.close(said_read)
        os.read(go_read, 1)
        try:
            report = work()
        except BaseException as error:
            report = f"{type(error).__name__}: {error}"
        os.write(said_write, json.dumps(report).encode())
        os._exit(0)
    os.close(go_read)
    os.close(said_write)

    def start_and_wait():
        os.write(go_write, b"x")
        os.close(go_write)
        with os.fdopen(said_read, "rb") as said:
            report = json.loads(said.read() or b'"no report"')
        os.waitpid(pid, 0)
        return report

    return start_and_wait


def outcome(work):
    # What work() returned, or the error it raised, as "Type: message".
    try:
        return work()
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def names_afterwards():
    # acme's secret names, as a service opened afterwards sees them.
    with open_service() as fresh:
        return sorted(info.name for info in fresh.list_for_tenant("acme"))
"""

PARENT_CLOSES = (
    PRELUDE
    + r"""
service = open_service()
service.store_for_tenant("acme", "before-fork", "v0")  # used in the thread that forks
service.retrieve_for_tenant("acme", "before-fork")


def serve():
    for n in range(5):
        service.store_for_tenant("acme", f"child-{n}", f"c{n}")
        assert service.retrieve_for_tenant("acme", f"child-{n}").value == f"c{n}"
    return "served"


run = in_child(serve)
service.close()  # the parent is done (or exits) while its child serves
child = run()
with open_service() as fresh:  # what every process sees afterwards
    names = sorted(info.name for info in fresh.list_for_tenant("acme"))
    reads = [fresh.retrieve_for_tenant("acme", f"child-{n}").access_count for n in range(5)]
check = sqlite3.connect(URL.removeprefix("sqlite:///")).execute("PRAGMA integrity_check")
check = check.fetchall()
print(json.dumps({"child": child, "names": names, "reads": reads, "check": check}))
"""
)


def _run(script: str, tmp_path: Path, master_key: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{tmp_path / 'forked.db'}", master_key],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_a_child_keeps_what_it_writes_after_its_parent_closed_the_service(
    tmp_path: Path, master_key: str
) -> None:
    report = _run(PARENT_CLOSES, tmp_path, master_key)

    assert report["child"] == "served"
    assert report["names"] == ["before-fork", *[f"child-{n}" for n in range(5)]]
    assert report["reads"] == [2] * 5  # the child's audited read, and the check's
    assert report["check"] == [["ok"]]


FORKED_DURING_WRITES = (
    PRELUDE
    + r"""
service = open_service()
service.store_for_tenant("acme", "hot", "v")
stop = threading.Event()
parent_errors = []


def write_on():
    n = 0
    while not stop.is_set():
        n += 1
        try:
            service.store_for_tenant("acme", f"parent-{n % 10}", f"p{n}")
            service.retrieve_for_tenant("acme", "hot")
        except Exception as error:
            parent_errors.append(f"{type(error).__name__}: {error}")


def serve(k):
    def work():
        outcomes = []
        for attempt in range(2):  # requests, each in a thread of its own
            outcome = {}

            def request():
                try:
                    service.store_for_tenant("acme", f"child-{k}-{attempt}", "c")
                    outcome["r"] = service.retrieve_for_tenant("acme", "hot").value
                except Exception as error:
                    outcome["r"] = f"{type(error).__name__}: {error}"

            thread = threading.Thread(target=request)
            thread.start()
            thread.join()
            outcomes.append(outcome["r"])
        return outcomes

    return work


writer = threading.Thread(target=write_on)
writer.start()
runs = []
for k in range(6):
    time.sleep(0.03)
    runs.append(in_child(serve(k)))  # forked while the writer thread writes
stop.set()
writer.join()
children = [run() for run in runs]  # each child writes after the parent has stopped
service.store_for_tenant("acme", "parent-after", "v")
stored = sorted(info.name for info in service.list_for_tenant("acme") if "child" in info.name)
print(json.dumps({"children": children, "parent_errors": parent_errors, "stored": stored}))
"""
)


def test_a_child_forked_while_another_thread_writes_can_write(
    tmp_path: Path, master_key: str
) -> None:
    report = _run(FORKED_DURING_WRITES, tmp_path, master_key)

    assert report["children"] == [["v", "v"]] * 6
    assert report["parent_errors"] == []  # the parent's writer thread wrote on
    assert report["stored"] == sorted(f"child-{k}-{a}" for k in range(6) for a in range(2))


CALL_OUTLASTS_THE_WAIT = (
    PRELUDE
    + r"""
import sqlite3
from keyledger.infrastructure import sqlite_store

sqlite_store.CLOSE_WAIT = 0.5  # how long a fork waits for the calls in progress
service = open_service()
service.store_for_tenant("acme", "before", "v0")
holder = sqlite3.connect(URL.removeprefix("sqlite:///"), isolation_level=None)
holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
waiting = threading.Thread(target=service.store_for_tenant, args=("acme", "waiting", "w"))
waiting.start()  # a call in progress, waiting for that lock, when the process forks
time.sleep(0.2)


def serve():
    def store():
        service.store_for_tenant("acme", "child", "c")
        return "stored"

    def store_on_its_own():
        with open_service() as own:  # beside the record of the parent's connections
            own.store_for_tenant("acme", "child-own", "c")
        return "stored on its own"

    return [outcome(store), outcome(store_on_its_own)]


run = in_child(serve)
holder.execute("COMMIT")
waiting.join()
child = run()
service.close()  # the parent is done: nothing the child did may be lost with it
print(json.dumps({"child": child, "names": names_afterwards()}))
"""
)


def test_a_child_whose_connections_could_not_be_closed_refuses_calls_not_loses_them(
    tmp_path: Path, master_key: str
) -> None:
    """A fork waits a bounded time for the calls in progress: when one outlasts it, the
    connections stay open, and the child refuses every call on that file with a reason
    (found by review: it wrote on them, and lost every write once the parent closed)."""
    report = _run(CALL_OUTLASTS_THE_WAIT, tmp_path, master_key)

    inherited, own = report["child"]
    assert inherited.startswith("StorageError: ")
    assert "open when the process forked" in inherited
    assert "start the process with spawn" in inherited
    # A service of the child's own on that file is refused too: SQLite would share the
    # inherited record of the parent's locks with it (found by review of the advice,
    # which was to open one).
    assert own.startswith("StorageError: ")
    assert "forked while its parent had connections to the SQLite database" in own
    assert report["names"] == ["before", "waiting"]


SLOW_CLOSE_ELSEWHERE = (
    PRELUDE
    + r"""
from keyledger.infrastructure import sqlite_store

service = open_service()
service.store_for_tenant("acme", "before", "v0")
main_thread = threading.get_ident()
closing, closed = threading.Event(), threading.Event()
real_close = sqlite_store.KeyledgerSQLiteConnection.close
SLOW = 0.5  # seconds


def slow_close(conn):
    # A connection closed by a thread other than the one that forks; sqlite3 lets other
    # threads run meanwhile. This close takes long enough for a fork to land in it.
    elsewhere = threading.get_ident() != main_thread
    if elsewhere:
        closing.set()
        time.sleep(SLOW)
    real_close(conn)
    if elsewhere:
        closed.set()


sqlite_store.KeyledgerSQLiteConnection.close = slow_close
"""
)

FORKED_WHILE_A_THREAD_ENDS = (
    SLOW_CLOSE_ELSEWHERE
    + r"""
# The writer of a thread that ends is closed by that thread as it ends.
ending = threading.Thread(target=service.store_for_tenant, args=("acme", "threaded", "t"))
ending.start()
assert closing.wait(10)


def serve():  # (in_child reports an error it raises)
    service.store_for_tenant("acme", "child", "c")
    return service.retrieve_for_tenant("acme", "child").value


run = in_child(serve)  # forked while the ending thread closes its writer
assert closed.wait(10)
ending.join()
child = run()  # the child writes once the parent has finished that close
service.close()
print(json.dumps({"child": child, "names": names_afterwards()}))
"""
)


def test_a_child_forked_while_an_ending_thread_closes_its_connection_can_write(
    tmp_path: Path, master_key: str
) -> None:
    """A fork landed in the middle of the close of an ending thread's connection: the
    child inherited SQLite's record of a connection the parent then finished closing,
    as its last, deleting the log under the child (found as a rare CI failure). A fork
    now waits for that close."""
    report = _run(FORKED_WHILE_A_THREAD_ENDS, tmp_path, master_key)

    assert report["child"] == "c"
    assert report["names"] == ["before", "child", "threaded"]


FORKED_WHILE_ANOTHER_THREAD_CLOSES = (
    SLOW_CLOSE_ELSEWHERE
    + r"""
# service.close() in another thread (a shutdown hook, say) while this one forks
closer = threading.Thread(target=service.close)
closer.start()
assert closing.wait(10)


def serve():  # (in_child reports an error it raises)
    sqlite_store.KeyledgerSQLiteConnection.close = real_close
    with open_service() as own:  # the child opens a service of its own
        own.store_for_tenant("acme", "child", "c")
        return own.retrieve_for_tenant("acme", "child").value


run = in_child(serve)  # forked while the other thread closes the service
closer.join()
child = run()  # the child writes once the parent has finished closing
print(json.dumps({"child": child, "names": names_afterwards()}))
"""
)


def test_a_child_forked_while_another_thread_closes_the_service_can_open_its_own(
    tmp_path: Path, master_key: str
) -> None:
    """A fork that landed while another thread closed the service left the child SQLite's
    record of connections the parent then finished closing; a service the child opened
    on the same file lost its log to that close. A fork now waits for a close in
    progress."""
    report = _run(FORKED_WHILE_ANOTHER_THREAD_CLOSES, tmp_path, master_key)

    assert report["child"] == "c"
    assert report["names"] == ["before", "child"]


FORKED_WITH_A_CALL_LEFT_OPEN_WHILE_A_THREAD_ENDS = (
    SLOW_CLOSE_ELSEWHERE
    + r"""
import select, signal

sqlite_store.CLOSE_WAIT = 1.0
SLOW = 3.0  # the close outlasts the fork's wait
finish = threading.Event()


def end_later():
    service.store_for_tenant("acme", "threaded", "t")  # this thread's writer...
    finish.wait()  # ...closed, slowly, as the thread ends


ending = threading.Thread(target=end_later)
ending.start()
time.sleep(0.2)
holder = sqlite3.connect(URL.removeprefix("sqlite:///"), isolation_level=None)
holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
waiting = threading.Thread(target=service.store_for_tenant, args=("acme", "waiting", "w"))
waiting.start()  # a call in progress past the fork's wait: the service is left open
time.sleep(0.2)
finish.set()
assert closing.wait(10)
said_read, said_write = os.pipe()
pid = os.fork()
if pid == 0:

    def open_one():
        with open_service():
            return "opened"

    os.write(said_write, outcome(open_one).encode())
    os._exit(0)
os.close(said_write)
ready, _, _ = select.select([said_read], [], [], 20)
child = os.read(said_read, 2000).decode() if ready else "no answer within 20 s"
if not ready:
    os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
holder.execute("COMMIT")
waiting.join()
ending.join()
print(json.dumps({"child": child}))
"""
)


def test_a_child_forked_while_a_call_is_left_open_and_a_thread_ends_answers(
    tmp_path: Path, master_key: str
) -> None:
    """A fork that must leave a service open (a call outlasts its wait) while another
    thread's writer is being closed: the child refuses the file, and does not hang on
    the lock that close held when the process forked (found by review of the fix)."""
    report = _run(FORKED_WITH_A_CALL_LEFT_OPEN_WHILE_A_THREAD_ENDS, tmp_path, master_key)

    assert report["child"].startswith("StorageError: this process was forked while")


COLLECTED_WHILE_A_THREAD_ENDS = (
    PRELUDE
    + r"""
import gc
from keyledger.infrastructure import sqlite_store

real_close = sqlite_store.KeyledgerSQLiteConnection.close
ending = []


def close_with_a_collection(conn):
    if ending and threading.get_ident() == ending[0]:
        ending.clear()
        gc.collect()  # (an automatic collection, which any allocation can start)
    real_close(conn)


sqlite_store.KeyledgerSQLiteConnection.close = close_with_a_collection


def forgetful_caller():
    service = open_service()  # never closed: the collector finalises it
    service.store_for_tenant("acme", "db", "v1")  # this thread's writer
    del service
    ending.append(threading.get_ident())


gc.disable()
thread = threading.Thread(target=forgetful_caller, daemon=True)
thread.start()
thread.join(10)
print(json.dumps({"thread_ended": not thread.is_alive()}))
sys.stdout.flush()
os._exit(0)
"""
)


def test_a_collection_while_an_ending_thread_closes_its_writer_does_not_deadlock(
    tmp_path: Path, master_key: str
) -> None:
    """The collector finalising an unclosed service inside the close of an ending
    thread's writer took a lock that close held (found by review of the fork fix)."""
    report = _run(COLLECTED_WHILE_A_THREAD_ENDS, tmp_path, master_key)

    assert report["thread_ended"] is True


FORKED_WHILE_A_CLOSE_OUTLASTS_THE_WAIT = (
    SLOW_CLOSE_ELSEWHERE
    + r"""
sqlite_store.CLOSE_WAIT = 0.2  # how long a fork waits for the closes in progress
SLOW = 1.5  # the ending thread's close outlasts it
ending = threading.Thread(target=service.store_for_tenant, args=("acme", "threaded", "t"))
ending.start()
assert closing.wait(10)


def serve():
    def inherited():
        service.retrieve_for_tenant("acme", "before")
        return "served"

    def opened():
        open_service().close()
        return "served"

    return [outcome(inherited), outcome(opened)]


run = in_child(serve)  # forked while the ending thread's writer is still being closed
ending.join()
child = run()
print(json.dumps({"child": child}))
"""
)


def test_a_child_forked_while_a_close_outlasts_the_wait_refuses_the_file(
    tmp_path: Path, master_key: str
) -> None:
    """A file still being closed when the fork's wait runs out is refused in the child:
    by the service it inherited too, whose own connections the fork had closed (found
    by review: only a service opened afterwards was refused)."""
    inherited, opened = _run(FORKED_WHILE_A_CLOSE_OUTLASTS_THE_WAIT, tmp_path, master_key)["child"]

    for said in (inherited, opened):
        assert said.startswith("StorageError: this process was forked while its parent")


COLLECTED_WHILE_A_CLOSE_IS_COUNTED = (
    PRELUDE
    + r"""
import gc
import weakref
from keyledger.infrastructure import sqlite_store

gc.disable()
service = open_service()
service.store_for_tenant("acme", "kept", "k")
garbage = open_service()  # never closed: in reference cycles, freed by the collector
garbage.store_for_tenant("acme", "dropped", "d")
awaiting = weakref.ref(garbage._ledger.store.datastore)
del garbage
assert awaiting() is not None
closes = sqlite_store._CLOSES
armed = [True]


class Collecting(type(closes._changed)):
    def notify_all(self):
        if armed and armed.pop():
            gc.collect()  # an automatic collection, started by an allocation in there
        super().notify_all()


closes._changed = Collecting(closes._changed._lock)
done = threading.Event()
closer = threading.Thread(target=lambda: (service.close(), done.set()), daemon=True)
closer.start()
print(json.dumps({"closed": done.wait(10), "collected": awaiting() is None}))
sys.stdout.flush()
os._exit(0)
"""
)


def test_a_collection_while_a_close_is_counted_does_not_deadlock(
    tmp_path: Path, master_key: str
) -> None:
    """The collector, started by an allocation under the lock that counts closes in
    progress, finalised an unclosed service whose close took that lock again (found by
    review: every later close and fork of the process hung)."""
    report = _run(COLLECTED_WHILE_A_CLOSE_IS_COUNTED, tmp_path, master_key)

    assert report == {"closed": True, "collected": True}


FORK_INTERRUPTED_BY_A_SHUTDOWN_HANDLER = (
    PRELUDE
    + r"""
import signal
from keyledger.infrastructure import sqlite_store

service = open_service()
service.store_for_tenant("acme", "kept", "k")  # this thread's writer, closed by the fork
signal.signal(signal.SIGUSR1, lambda *_: service.close())  # a shutdown handler
real_close = sqlite_store.KeyledgerSQLiteConnection.close
armed = [True]


def close_then_signal(conn):
    real_close(conn)
    if armed and armed.pop():
        signal.raise_signal(signal.SIGUSR1)  # arrives while the fork closes connections


sqlite_store.KeyledgerSQLiteConnection.close = close_then_signal


def give_up():
    time.sleep(10)
    print(json.dumps({"forked": False}))
    sys.stdout.flush()
    os._exit(0)


threading.Thread(target=give_up, daemon=True).start()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"forked": True}))
sys.stdout.flush()
os._exit(0)
"""
)


def test_a_shutdown_handler_closing_the_service_during_a_fork_does_not_deadlock(
    tmp_path: Path, master_key: str
) -> None:
    """A handler's ``close()`` landing while the fork closed the writers waited for a
    lock the fork held, in the same thread (found by review)."""
    assert _run(FORK_INTERRUPTED_BY_A_SHUTDOWN_HANDLER, tmp_path, master_key) == {"forked": True}
