"""The CLI on PostgreSQL: ``db init``/``db check``, the projection worker, status and rebuild.

Every test gets its own schema (kl_<run>_cli<n>), dropped afterwards. Commands run in-process
through CliRunner; the worker and the writers it follows are real ``keyledger`` processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from conftest import POSTGRES_URL, cli_environment
from keyledger import SecretService, super_admin
from keyledger.cli import main
from keyledger.cli.projections import READ_MODELS, stop_on_signals
from keyledger.infrastructure.settings import KeyledgerSettings

MASTER_KEY = "6a0c1e2f3b4d5a69" * 4
TABLES = [
    "keyledger_events",
    "keyledger_snapshots",
    "kl_catalog",
    "kl_audit",
    "kl_keys",
    "kl_tracking",
    "kl_key_material",
]
FUNCTIONS = [
    "function kl_append_read_v1()",
    "function kl_append_reads_v1()",
    "function kl_append_unit_v1()",
    "function kl_store_created_v1()",
    "function kl_store_updated_v1()",
    "function kl_begin_write_v1()",
]
SCRIPT = Path(sys.executable).parent / "keyledger"
WAIT_SECONDS = 15.0


@pytest.fixture
def url(schema: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The schema's URL in KEYLEDGER_DATABASE_URL, a master key, nothing else of ours."""
    url = f"{POSTGRES_URL}?schema={schema}"
    return cli_environment(monkeypatch, url, MASTER_KEY, create=False)  # (db init's tests)


def run(*args: str, stdin: str | None = None) -> Result:
    """Invoke the CLI in-process."""
    return CliRunner().invoke(main, list(args), input=stdin)


def ok(*args: str, stdin: str | None = None) -> Result:
    """Invoke and insist on success."""
    result = run(*args, stdin=stdin)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def as_json(*args: str) -> Any:
    """Invoke with --json and parse stdout."""
    return json.loads(ok("--json", *args).stdout)


def lag(status: dict[str, dict[str, int]]) -> dict[str, int]:
    """Events each read model is behind the stream head (and what it says it is)."""
    behind = {name: model["head"] - model["position"] for name, model in status.items()}
    assert behind == {name: model["behind"] for name, model in status.items()}
    return behind


def tables_in(schema: str) -> list[str]:
    """The tables that exist in ``schema`` (empty when the schema does not exist)."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        ).fetchall()
    return sorted(row[0] for row in rows)


def schema_exists(schema: str) -> bool:
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None


def script_env(url: str) -> dict[str, str]:
    """The environment of a real ``keyledger`` process on the test's schema (small pools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYLEDGER_", "SMRT_"))}
    return env | {
        "KEYLEDGER_DATABASE_URL": f"{url}&pool_size=1&max_overflow=1",
        "KEYLEDGER_MASTER_KEY": MASTER_KEY,
        "KEYLEDGER_CREATE_TABLES": "false",
    }


def keyledger(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the installed script to completion."""
    return subprocess.run(
        [str(SCRIPT), *args],
        input=stdin,
        env=script_env(url),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# -- db check / db init ------------------------------------------------------------------


@pytest.mark.postgres
def test_db_check_on_an_empty_schema_exits_1_lists_the_missing_tables_and_creates_nothing(
    url: str, schema: str
) -> None:
    # KEYLEDGER_CREATE_TABLES is left at its default (true): checking must still create nothing.
    result = run("db", "check")
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    lines = result.stdout.splitlines()
    assert lines[0].split(maxsplit=1) == ["Store:", "postgresql (events table keyledger_events)"]
    missing = [*TABLES, *FUNCTIONS]
    assert lines[1].split(maxsplit=1) == ["Missing:", ", ".join(missing)]
    assert result.stderr.startswith(
        f"Error: the postgresql schema is not ready: missing {', '.join(missing)}"
    )
    assert result.stderr.endswith("; run `keyledger db init`\n")
    assert result.stderr.count("\n") == 1

    data = json.loads(run("--json", "db", "check").stdout)
    assert data["store"] == "postgresql"
    assert (data["present"], data["missing"], data["ok"]) == (False, missing, False)
    assert not schema_exists(schema)


@pytest.mark.postgres
def test_db_init_creates_everything_is_safe_to_run_twice_and_check_then_passes(
    url: str, schema: str
) -> None:
    first = ok("db", "init")
    assert first.stdout.splitlines()[:2] == [
        f"Created: {', '.join([*TABLES, *FUNCTIONS])}",
        "Installed the append-only trigger on keyledger_events.",
    ]
    assert "Missing:             nothing" in first.stdout
    assert "Append-only trigger: installed" in first.stdout
    assert set(TABLES) <= set(tables_in(schema))

    second = as_json("db", "init")
    assert second["created"] == []
    assert second["installed_append_only_trigger"] is False
    assert (second["present"], second["missing"], second["ok"]) == (True, [], True)
    assert second["append_only_enforced"] is True
    assert ok("db", "init").stdout.startswith("Created: nothing, the tables were already there\n")

    check = ok("db", "check")
    assert check.stdout == (
        "Store:               postgresql (events table keyledger_events)\n"
        "Missing:             nothing\n"
        "Append-only trigger: installed\n"
        "Key material:        present for every key version\n"
    )
    assert check.stderr == ""
    assert as_json("db", "check") == {
        "store": "postgresql",
        "events_table": "keyledger_events",
        "present": True,
        "missing": [],
        "append_only_enforced": True,
        "warnings": [],
        "keys_without_material": 0,
        "ok": True,
    }


@pytest.mark.postgres
@pytest.mark.parametrize("trigger", ["kl_events_append_only", "kl_events_no_truncate"])
def test_db_check_fails_when_a_trigger_is_gone_and_db_init_puts_it_back(
    url: str, schema: str, trigger: str
) -> None:
    ok("db", "init")
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP TRIGGER {} ON {}").format(
                sql.Identifier(trigger), sql.Identifier(schema, "keyledger_events")
            )
        )
    result = run("db", "check")
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert "Append-only trigger: missing" in result.stdout
    assert result.stderr == (
        "Error: the postgresql schema is not ready: the append-only trigger is not installed; "
        "run `keyledger db init`\n"
    )
    repaired = as_json("db", "init")
    assert (repaired["created"], repaired["installed_append_only_trigger"]) == ([], True)
    ok("db", "check")


@pytest.mark.postgres
def test_db_init_installs_a_trigger_that_refuses_changes_to_the_stream(
    url: str, schema: str
) -> None:
    ok("db", "init")
    ok("secrets", "put", "acme", "s", stdin="v")
    events = sql.Identifier(schema, "keyledger_events")
    for statement in ("DELETE FROM {}", "UPDATE {} SET topic = topic", "TRUNCATE {}"):
        with (
            psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
        ):
            conn.execute(sql.SQL(statement).format(events))


def test_db_commands_on_sqlite_report_the_trigger_as_not_applicable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYLEDGER_CREATE_TABLES", raising=False)
    path = tmp_path / "k.db"
    database = f"sqlite:///{path}"
    absent = run("--database", database, "db", "check")
    assert absent.exit_code == 1
    assert f"Missing:             the database file {path}\n" in absent.stdout
    assert not path.exists()  # a check creates nothing, not even the file
    path.touch()  # an empty file is an empty SQLite database
    missing = run("--database", database, "db", "check")
    assert missing.exit_code == 1
    assert "Missing:             stored_events, stored_snapshots, kl_catalog" in missing.stdout
    ok("--database", database, "db", "init")
    check = ok("--database", database, "db", "check")
    assert "Append-only trigger: not applicable (sqlite)" in check.stdout
    assert as_json("--database", database, "db", "check")["append_only_enforced"] is None


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (("secrets", "put", "acme", "s"), "v"),
        (("secrets", "list", "acme"), None),
        (("projections", "status"), None),
    ],
    ids=["put", "list", "status"],
)
def test_a_store_without_its_schema_is_one_error_line(
    url: str, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], stdin: str | None
) -> None:
    monkeypatch.setenv("KEYLEDGER_CREATE_TABLES", "false")
    result = run(*args, stdin=stdin)
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("Error: ")
    assert result.stderr.endswith(" does not exist\n")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.postgres
def test_put_and_get_through_the_cli_on_postgresql(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("db", "init")
    monkeypatch.setenv("KEYLEDGER_CREATE_TABLES", "false")
    put = ok("secrets", "put", "acme", "stripe", "--category", "api", stdin="sk_live\n")
    assert put.stdout == "Stored secret 'stripe' in tenant 'acme' (version 1, key version 1).\n"
    assert ok("secrets", "get", "acme", "stripe").stdout == "sk_live"
    listed = as_json("secrets", "list", "acme")
    assert [(s["name"], s["category"], s["access_count"]) for s in listed] == [("stripe", "api", 1)]
    actions = [entry["action"] for entry in as_json("audit", "log", "acme")]
    assert actions == ["read", "create", "create_key"]


# -- projections ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_projections_run_once_brings_the_lagging_audit_model_to_the_head(url: str) -> None:
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")
    ok("secrets", "put", "acme", "b", stdin="v")
    ok("secrets", "get", "acme", "a")
    before = as_json("projections", "status")
    assert set(before) == set(READ_MODELS)
    assert lag(before) == {"catalog": 0, "keys": 0, "audit": 4}

    once = ok("projections", "run", "--once", "--no-seal")
    assert once.stdout == "Applied 4 events; the read models have caught up.\n"
    sealed = ok("projections", "run", "--once")  # its checkpoint, applied too
    assert sealed.stdout == "Applied 1 events; the read models have caught up.\n"
    assert lag(as_json("projections", "status")) == dict.fromkeys(READ_MODELS, 0)
    assert as_json("projections", "run", "--once") == {"events_applied": 0}

    lines = ok("projections", "status").stdout.splitlines()
    assert lines[0].split() == ["READ", "MODEL", "POSITION", "HEAD", "BEHIND"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(READ_MODELS)
    assert all(line.split()[1:] == ["5", "5", "0"] for line in lines[1:])


@pytest.mark.postgres
def test_a_read_model_column_missing_is_named_with_the_rebuild_that_restores_it(
    url: str, schema: str
) -> None:
    """db init never alters a table: the way forward for a read-model column an older
    table lacks is a rebuild, which the messages say, and which works."""
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {}.kl_catalog DROP COLUMN access_count").format(
                sql.Identifier(schema)
            )
        )

    checked = run("db", "check")
    initialised = run("db", "init")

    for failed in (checked, initialised):
        assert failed.exit_code == 1
        assert "missing kl_catalog.access_count" in failed.stderr
        assert "`keyledger projections rebuild`" in failed.stderr
    ok("projections", "rebuild")
    ok("db", "check")
    assert [s["name"] for s in as_json("secrets", "list", "acme")] == ["a"]


@pytest.mark.postgres
def test_projections_status_counts_the_events_behind_not_the_gaps_between_positions(
    url: str, schema: str
) -> None:
    """A write rolled back (a lost race, say) has used up a position: positions have gaps,
    and the lag operators monitor is the events still to apply."""
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")
    ok("projections", "run", "--once")
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        sequence = conn.execute(
            "SELECT pg_get_serial_sequence(%s, 'notification_id')",
            (f"{schema}.keyledger_events",),
        ).fetchone()
        assert sequence is not None
        assert sequence[0] is not None
        for _ in range(50):  # 50 positions used up by writes that rolled back
            conn.execute("SELECT nextval(%s)", (sequence[0],))
    ok("secrets", "put", "acme", "b", stdin="v")  # one event after the gap

    audit = as_json("projections", "status")["audit"]

    assert audit["head"] - audit["position"] > 50
    assert audit["behind"] == 1
    line = next(
        line for line in ok("projections", "status").stdout.splitlines() if line.startswith("audit")
    )
    assert line.split()[-1] == "1"


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_worker_process_keeps_the_read_models_current_and_stops_on_a_signal(
    url: str, stop_signal: signal.Signals
) -> None:
    ok("db", "init")
    worker = subprocess.Popen(
        [str(SCRIPT), "projections", "run", "--idle-seconds", "0.1", "--no-seal"],
        env=script_env(url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for name in ("a", "b", "c"):
            put = keyledger(url, "secrets", "put", "acme", name, stdin="value")
            assert put.returncode == 0, (put.stderr, worker.poll())
        assert keyledger(url, "secrets", "get", "acme", "b").stdout == "value"

        deadline = time.monotonic() + WAIT_SECONDS
        status = as_json("projections", "status")
        while any(lag(status).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
            status = as_json("projections", "status")
        assert worker.poll() is None, ("the worker exited on its own", worker.communicate())
        assert lag(status) == dict.fromkeys(READ_MODELS, 0), status
        assert status["audit"]["head"] == 5

        worker.send_signal(stop_signal)
        stdout, stderr = worker.communicate(timeout=WAIT_SECONDS)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert (worker.returncode, stdout) == (0, "Applied 5 events.\n"), stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("Following the event stream"), stderr
    assert lines[-1] == "Stopped.", stderr
    applied = [int(line.split()[1]) for line in lines if line.startswith("Applied ")]
    assert sum(applied) == 5, stderr
    assert "Traceback" not in stderr


def test_stop_on_signals_sets_the_flag_and_restores_the_handlers() -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGTERM)
        assert stop()
        # A second Ctrl-C does not wait for the worker to notice the flag.
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.postgres
def test_rebuild_of_a_named_read_model_rebuilds_it_and_what_is_built_with_it(url: str) -> None:
    ok("db", "init")
    ok("secrets", "put", "acme", "s", stdin="v")
    ok("secrets", "get", "acme", "s")
    listed = as_json("secrets", "list", "acme")
    audit_log = as_json("audit", "log", "acme")
    assert ok("projections", "rebuild", "audit").stdout == "Rebuilt audit from 3 events.\n"
    assert as_json("projections", "rebuild", "keys") == {
        "events_replayed": 3,
        "read_models": ["catalog", "keys"],
    }
    assert ok("projections", "rebuild", "catalog").stdout == (
        "Rebuilt catalog and keys (one projector builds both) from 3 events.\n"
    )
    assert ok("projections", "rebuild").stdout == "Rebuilt the read models from 3 events.\n"
    assert as_json("secrets", "list", "acme") == listed
    assert as_json("audit", "log", "acme") == audit_log
    assert lag(as_json("projections", "status")) == dict.fromkeys(READ_MODELS, 0)


@pytest.mark.postgres
def test_rebuild_of_an_unknown_read_model_is_a_usage_error(url: str) -> None:
    ok("db", "init")
    result = run("projections", "rebuild", "secrets")
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert "'secrets' is not one of 'catalog', 'audit', 'keys'" in result.stderr
    assert result.stdout == ""


# -- the worker follows by LISTEN/NOTIFY; it exits when the database goes away -------------

LONG_IDLE = 30.0  # --idle-seconds far beyond every wait below: polling cannot pass for NOTIFY
NOTIFIED_WITHIN = 5.0  # a notified worker applies a write well within this


@contextmanager
def worker_process(url: str, app_name: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``keyledger projections run --no-seal`` process on the test's schema, its
    connections named ``app_name``; killed if it is still running when the block ends."""
    worker = subprocess.Popen(
        [str(SCRIPT), "projections", "run", "--no-seal", *args],
        env=script_env(url) | {"PGAPPNAME": app_name},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()


def backends(app_name: str) -> list[tuple[int, str, str]]:
    """(pid, state, last statement) of every server connection named ``app_name``."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (app_name,),
        ).fetchall()
    return [(int(pid), str(state), str(query)) for pid, state, query in rows]


def listening(app_name: str) -> bool:
    """Whether a connection named ``app_name`` has run LISTEN and waits (for a NOTIFY)."""
    return any(
        state == "idle" and query.startswith("LISTEN") for _, state, query in backends(app_name)
    )


def wait_until_listening(
    worker: subprocess.Popen[str], app_name: str, service: SecretService
) -> None:
    """Wait until the worker has caught up (lag 0) and waits in LISTEN."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and worker.poll() is None:
        position, head = service.read_model_status()["audit"]
        if position == head and listening(app_name):
            return
        time.sleep(0.05)
    assert worker.poll() is None, ("the worker exited on its own", worker.communicate())
    pytest.fail(f"the worker never sat idle in LISTEN: {backends(app_name)}")


def audit_lag(service: SecretService) -> int:
    position, head = service.read_model_status()["audit"]
    return head - position


@pytest.mark.postgres
@pytest.mark.slow
def test_an_idle_worker_applies_a_write_at_once_woken_by_its_notify_not_by_polling(
    url: str, schema: str
) -> None:
    """docs/postgresql.md: the worker LISTENs and wakes on each write's NOTIFY; the idle
    interval only bounds a notification missed between a catch-up and the next LISTEN.
    With --idle-seconds 30, a write must still be applied within seconds."""
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")  # create_key and create: 2 events behind
    app_name = f"kl-worker-{schema}"
    with (
        SecretService.create(
            url, master_key=MASTER_KEY, settings=KeyledgerSettings(create_tables=False)
        ) as service,
        worker_process(url, app_name, "--idle-seconds", str(LONG_IDLE)) as worker,
    ):
        wait_until_listening(worker, app_name, service)

        written = time.monotonic()
        assert service.retrieve_for_tenant("acme", "a").value == "v"  # a read event: a write
        while audit_lag(service) and time.monotonic() - written < LONG_IDLE / 2:
            time.sleep(0.02)
        took = time.monotonic() - written
        assert audit_lag(service) == 0, "the worker did not apply the write"
        assert took < NOTIFIED_WITHIN, f"applied after {took:.1f} s: polled, not notified"
        assert worker.poll() is None, ("the worker exited on its own", worker.communicate())

        # A stop request is honoured when the worker wakes: a write's NOTIFY wakes it.
        worker.send_signal(signal.SIGTERM)
        for attempt in range(10):
            service.store_for_tenant("acme", "wake", str(attempt))
            try:
                stdout, stderr = worker.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            pytest.fail("the worker did not stop on SIGTERM")
    assert worker.returncode == 0, stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("Following the event stream"), stderr
    # The worker itself applied the read, in a batch of its own.
    assert lines[1:3] == ["Applied 2 events (2 since start).", "Applied 1 events (3 since start)."]
    assert lines[-1] == "Stopped.", stderr
    applied = sum(int(line.split()[1]) for line in lines if line.startswith("Applied "))
    assert stdout == f"Applied {applied} events.\n"
    assert "Traceback" not in stderr


class Proxy:
    """A TCP relay to the test server on a free local port: ``url`` reaches the database
    through it until ``cut()``, which drops every connection and refuses new ones, as a
    database host that goes away does."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._server = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        user = parts.netloc.rpartition("@")[0]  # the user and password, if any
        netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
        self.url = urlunsplit(parts._replace(netloc=netloc))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # cut
            with self._lock:
                if self._cut:
                    client.close()
                    return
                self._sockets.append(client)
            try:
                server = socket.create_connection(self._server, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.append(server)
                if self._cut:
                    return  # cut() closes both
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            # shutdown() first: a close() alone leaves a socket that a thread blocked in
            # accept() still holds listening.
            for end in [self._listener, *self._sockets]:
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@contextmanager
def listening_worker(
    url: str, schema: str
) -> Iterator[tuple[SecretService, subprocess.Popen[str], str]]:
    """A store with one secret, a service on it and a worker process that has caught up
    and waits in LISTEN (its connections named by the third item)."""
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")
    app_name = f"kl-worker-{schema}"
    with (
        SecretService.create(
            url, master_key=MASTER_KEY, settings=KeyledgerSettings(create_tables=False)
        ) as service,
        worker_process(url, app_name, "--idle-seconds", "0.2") as worker,
    ):
        wait_until_listening(worker, app_name, service)
        yield service, worker, app_name


def applies_a_write_and_stops(service: SecretService, worker: subprocess.Popen[str]) -> str:
    """Store one more secret, insist that the running worker applies it, stop it with
    SIGTERM and insist that it exits 0; its stderr."""
    service.store_for_tenant("acme", "after", "v")
    deadline = time.monotonic() + WAIT_SECONDS
    while audit_lag(service) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert audit_lag(service) == 0, "the worker did not apply the write"
    assert worker.poll() is None, ("the worker exited", worker.communicate())
    worker.send_signal(signal.SIGTERM)
    _stdout, stderr = worker.communicate(timeout=WAIT_SECONDS)
    assert worker.returncode == 0, stderr
    return stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_whose_listen_connection_is_terminated_goes_on(url: str, schema: str) -> None:
    """docs/postgresql.md: a connection the server ends while the worker waits in LISTEN
    is not the database going away: the worker goes on, and applies what comes next."""
    with listening_worker(url, schema) as (service, worker, app_name):
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
            row = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                "FROM pg_stat_activity WHERE application_name = %s",
                (app_name,),
            ).fetchone()
        assert row is not None
        assert row[0] >= 1
        stderr = applies_a_write_and_stops(service, worker)
    assert "Error" not in stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_whose_database_goes_away_exits_1_with_one_error_line(
    url: str, schema: str
) -> None:
    """docs/postgresql.md: the worker "exits 1 with one `Error:` line if the database goes
    away", for the service manager to restart it: the worker reaches the server through a
    relay that is cut, whatever it is doing then, and nothing answers a reconnect."""
    ok("db", "init")
    ok("secrets", "put", "acme", "a", stdin="v")
    app_name = f"kl-worker-{schema}"
    proxy = Proxy(url)
    try:
        with (
            SecretService.create(
                url, master_key=MASTER_KEY, settings=KeyledgerSettings(create_tables=False)
            ) as service,
            worker_process(proxy.url, app_name, "--idle-seconds", "0.1") as worker,
        ):
            wait_until_listening(worker, app_name, service)
            proxy.cut()
            try:
                # (three tries more, each waiting 5 s for a connection, 7 s of pauses)
                stdout, stderr = worker.communicate(timeout=WAIT_SECONDS + 30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker carries on without its database: {backends(app_name)}")
    finally:
        proxy.cut()
    assert worker.returncode == 1, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("Following the event stream"), stderr
    assert lines[-1].startswith("Error: "), stderr
    assert [line for line in lines if "Error" in line] == [lines[-1]], stderr
    # (it tried again three times first, saying so: a lost connection alone is no reason
    # to stop, see the next test)
    retries = [line for line in lines if line.startswith("Warning: ")]
    assert [line.rsplit(" in ", 1)[-1] for line in retries] == ["1 s.", "2 s.", "4 s."], stderr
    assert all(line.startswith(("Following ", "Applied ", "Warning: ")) for line in lines[:-1])


@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_whose_connection_is_terminated_mid_catch_up_goes_on(
    url: str, schema: str
) -> None:
    """Found by review: a connection the server ended while the worker caught up (not
    while it waited in LISTEN) ended the worker. Its catch-up is held on a lock of the
    audit table, its connection terminated there; the worker says it tries again, does,
    and applies every event once."""
    with listening_worker(url, schema) as (service, worker, app_name):
        with (
            psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin,
            admin.transaction(),
        ):
            # (the audit table's rows may be read, not written, until the block ends)
            admin.execute(
                sql.SQL("LOCK TABLE {}.kl_audit IN SHARE MODE").format(sql.Identifier(schema))
            )
            service.store_for_tenant("acme", "during", "v")  # wakes the worker
            deadline = time.monotonic() + WAIT_SECONDS
            blocked: list[int] = []
            while not blocked and time.monotonic() < deadline:
                blocked = [
                    int(pid)
                    for (pid,) in admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'",
                        (app_name,),
                    ).fetchall()
                ]
                time.sleep(0.02)
            assert blocked, f"the worker's catch-up never waited: {backends(app_name)}"
            for pid in blocked:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        stderr = applies_a_write_and_stops(service, worker)
        with super_admin():
            names = [e.secret_name for e in service.get_audit_logs(tenant_id="acme")]
    assert "Error" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("Warning: ")], stderr
    assert sorted(n for n in names if n) == ["a", "after", "during"]  # each applied once
