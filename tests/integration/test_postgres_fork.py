"""A PostgreSQL service made before ``fork()`` works in the parent and in the child.

Servers that load the application once and fork their workers (gunicorn ``--preload``,
Celery's prefork pool, ``multiprocessing`` with the fork start method) hand every worker
the parent's service, and with it the pool's open connections: the same server sessions.
A child that used them, or merely closed them when it exited, answered the parent's
queries, broke its prepared statements and ended its sessions; both could hang. The child
must get connections of its own, and leave the parent's alone.

Each scenario runs in a process of its own with a timeout: the failure it guards against
is a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL, MakeService, own_schema
from keyledger import StorageError
from keyledger.application import ledger as ledger_module

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork"),
]

SCENARIO = textwrap.dedent(
    """
    import os, sys, threading
    import psycopg
    from keyledger import SecretService

    url, mode = sys.argv[1], sys.argv[2]
    service = SecretService.create(url, master_key="ab" * 32)
    for i in range(20):
        service.store_for_tenant("t", f"p{i}", f"v{i}")
        service.retrieve_for_tenant("t", f"p{i}")

    def backends():
        with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
            return {row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND application_name = %s", (os.environ["PGAPPNAME"],))}

    def work(tag, errors):
        for i in range(60):
            try:
                service.store_for_tenant("t", f"{tag}{i}", f"w{i}")
                assert service.retrieve_for_tenant("t", f"{tag}{i}").value == f"w{i}"
                assert service.retrieve_for_tenant("t", f"p{i % 20}").value == f"v{i % 20}"
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}")

    if mode == "closed":
        service.close()
    before = backends()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            errors = []
            if mode == "child-close":
                service.close()  # the child's own pool: not opened yet
            if mode in ("closed", "child-close"):
                try:
                    service.retrieve_for_tenant("t", "p1")
                    print("child: a closed service worked", flush=True)
                except Exception as error:
                    code = 0 if "closed" in str(error) else 3
                    print("child:", type(error).__name__, error, flush=True)
                os._exit(code)
            leaked = [
                fd for fd in map(int, os.listdir("/proc/self/fd"))
                if fd > 2 and os.path.realpath(f"/proc/self/fd/{fd}") == "/dev/null"
                and os.get_inheritable(fd)
            ]
            if leaked:
                print("child: inheritable /dev/null descriptors", leaked, flush=True)
                os._exit(4)
            if mode == "both":
                work("c", errors)
            service.close()
            code = 0 if not errors else 2
            if errors:
                print("child:", errors[:3], flush=True)
        finally:
            os._exit(code)
    errors = []
    if mode == "both":
        work("a", errors)
    _, status = os.waitpid(pid, 0)
    if mode in ("closed", "child-close"):
        print("child exit", os.waitstatus_to_exitcode(status))
        sys.exit(0)
    after_child = backends()
    work("b", errors)
    print("child exit", os.waitstatus_to_exitcode(status))
    print("parent errors", len(errors), errors[:3])
    print("parent sessions kept", len(before & after_child), "of", len(before))
    service.close()
    """
)


def run_scenario(mode: str) -> str:
    with own_schema("fork") as schema:
        result = subprocess.run(
            [sys.executable, "-c", SCENARIO, f"{POSTGRES_URL}?schema={schema}", mode],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            # This run's sessions only: another test run on the server opens and closes its own.
            env={**os.environ, "PGAPPNAME": schema},
        )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("mode", ["closed", "child-close"])
def test_a_service_closed_before_or_after_the_fork_stays_closed_in_the_child(mode: str) -> None:
    out = run_scenario(mode)

    assert "child exit 0" in out, out
    assert "StorageError" in out, out


def test_parent_and_child_both_use_a_service_made_before_the_fork() -> None:
    out = run_scenario("both")

    assert "child exit 0" in out, out
    assert "parent errors 0 []" in out, out


def test_a_child_that_exits_leaves_the_parents_sessions_open() -> None:
    out = run_scenario("exit")

    assert "child exit 0" in out, out
    assert "parent errors 0 []" in out, out
    kept = out.split("parent sessions kept ")[1].split()
    assert kept[0] == kept[2], out
    assert int(kept[0]) > 0, out


@pytest.mark.parametrize("backend", ["postgres"])
def test_close_ends_a_projection_workers_idle_wait_and_its_connection(
    make_service: MakeService, backend: str
) -> None:
    """``close()`` releases the store's connections: the one a worker LISTENs on too,
    within a slice of its idle wait, not when the wait would have ended."""
    service = make_service()
    service.store_for_tenant("t", "s", "v")
    ended: list[BaseException | None] = []

    def follow() -> None:
        try:
            service.follow_read_models(stop=lambda: False, idle_seconds=30.0, seal=False)
            ended.append(None)
        except BaseException as error:  # the store closed under it
            ended.append(error)

    worker = threading.Thread(target=follow)
    worker.start()
    time.sleep(1.0)  # caught up: waiting on LISTEN
    service.close()
    worker.join(timeout=5)

    assert not worker.is_alive()
    assert ended != []
    assert ended[0] is None or isinstance(ended[0], StorageError)


@pytest.mark.parametrize("backend", ["postgres"])
def test_opening_and_closing_services_keeps_no_psycopg_type_classes(
    make_service: MakeService, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg caches the classes it makes for each registration of a composite type;
    the library registered its type for every service opened (13 KB kept per service).
    Snapshots are taken (every 5 versions here) and inserted with that type."""
    monkeypatch.setattr(ledger_module, "SNAPSHOT_INTERVAL", 5)
    composite = pytest.importorskip("psycopg.types.composite")
    cache_info = getattr(composite._make_dumper, "cache_info", None)
    if cache_info is None:
        pytest.skip("this psycopg makes its composite dumpers another way")
    make_service().close()
    before = cache_info().currsize
    for i in range(5):  # the same store, opened again and again (a test suite, a CLI)
        service = make_service()
        for n in range(6):  # past a snapshot: the snapshot recorder inserts with the type
            service.store_for_tenant("t", "s", f"v{i}-{n}")
        schema = str(service._ledger.env.get("POSTGRES_SCHEMA"))
        service.close()

    assert cache_info().currsize == before
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        taken = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "keyledger_snapshots"))
        ).fetchone()
    assert taken is not None
    assert taken[0] >= 5  # each service's snapshots were inserted
