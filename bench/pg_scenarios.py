"""The PostgreSQL scenarios: keyledger side by side with the CRUD peer on one server.

Both sides run against the same server in the same run, each in a schema of its own that
exists only for the run: keyledger in ``kl_bench_<random>`` (its ``schema=`` URL option),
the peer in ``peer_bench_<random>`` (``options=-csearch_path=...`` in its URL, so the
tables it creates land there). ``BenchSchemas`` creates them and drops them at the end,
whatever happens in between.

  P1 store, one client            N stores of distinct names, keyledger vs the peer
  P2 retrieve, one client         N retrieves cycling over 100 stored names
  P3 retrieve, 8 clients          (a) 8 threads: keyledger shares ONE service (pool_size=8),
                                      the peer has one connection per thread (its main())
                                  (b) 4 processes x 2 threads: keyledger one service per
                                      process, the peer one connection per thread
  P4 projection rebuild           rebuild_read_models() over a stream of mixed stores and
                                  reads vs merely reading and decoding the same events
  split                           where a keyledger retrieve spends its time at 1 and at 8
                                  clients: round trips, the events table lock, Python CPU

P1-P3 run in alternating rounds (keyledger first, then the peer first, ...); run.py reports
medians and ratios of medians.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
from eventsourcing.persistence import StoredEvent
from psycopg import sql

import scenarios
from keyledger.infrastructure.database_url import redact
from keyledger.infrastructure.pg_prepared import PreparedCall
from keyledger.infrastructure.read_events import READ_TOPIC, decode_read
from keyledger.service import SecretService

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
POOL_OPTIONS = "pool_size=8"  # keyledger's pool: 8 connections kept, max_overflow left at 10
CLIENTS = 8  # P3: concurrent clients
PROCESSES = 4  # P3b: processes ...
THREADS_PER_PROCESS = CLIENTS // PROCESSES  # ... of this many client threads each
WARMUP_PER_CLIENT = 10  # untimed retrieves per client before P3 starts (prepares statements)
SERVER_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "commit_delay",
    "commit_siblings",
    "shared_buffers",
    "max_connections",
)

Log = Callable[[str], None]


# -- the server and the schemas -----------------------------------------------------------


def check_base_url(url: str) -> str | None:
    """Why ``url`` cannot serve as the base URL (None: it can)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return f"not a postgresql:// URL: {redact(url)}"
    if parts.query:
        return "give the base URL without query options (the bench adds schema and pool ones)"
    if not parts.path.strip("/"):
        return f"the URL names no database: {redact(url)}"
    return None


def reachable(url: str, timeout: int = 3) -> str | None:
    """None when the server answers; else why not (one line)."""
    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return None


def server_info(url: str) -> list[tuple[str, str]]:
    """Server version and the settings that decide commit cost."""
    with psycopg.connect(url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        rows = conn.execute(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
            (list(SERVER_SETTINGS),),
        ).fetchall()
    info = [("server", f"PostgreSQL {version[0] if version else '?'} at {_host(url)}")]
    for name, setting, unit in rows:
        if unit == "8kB":
            shown = f"{int(setting) * 8 // 1024} MB"
        elif unit:
            shown = f"{setting} {unit}"
        else:
            shown = setting
        info.append((name, shown))
    return info


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"


def with_query(url: str, query: str) -> str:
    return f"{url}?{query}"


class BenchSchemas:
    """The run's schemas: created on entry, every one dropped on exit (CASCADE)."""

    def __init__(self, base_url: str, log: Log) -> None:
        self.base_url = base_url
        self.log = log
        self.tag = secrets.token_hex(4)
        self.created: list[str] = []

    def __enter__(self) -> BenchSchemas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop_all()

    def new(self, prefix: str) -> str:
        name = f"{prefix}_{self.tag}"
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        self.created.append(name)
        return name

    def keyledger_url(self, schema: str) -> str:
        return with_query(self.base_url, f"schema={schema}&{POOL_OPTIONS}")

    def peer_url(self, schema: str) -> str:
        return with_query(self.base_url, "options=" + quote(f"-csearch_path={schema}", safe="-"))

    def drop_all(self) -> None:
        if not self.created:
            return
        try:
            with psycopg.connect(self.base_url, autocommit=True) as conn:
                for name in reversed(self.created):
                    conn.execute(
                        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                    )
            self.log(f"dropped schemas {', '.join(self.created)}")
            self.created.clear()
        except psycopg.Error as error:
            self.log(f"could not drop schemas {', '.join(self.created)}: {error}")


# -- CPU accounting -----------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def server_cpu_seconds() -> float | None:
    """user+system CPU of every ``postgres`` process on this host (None: none visible).

    A local server's backends, walwriter and checkpointer; on a shared machine this includes
    other clients' backends too, so it is for information only.
    """
    total = 0
    seen = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        if comm != "postgres":
            continue
        fields = text[text.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        seen = True
    return total / _TICK if seen else None


@dataclass
class PgCost:
    """Per operation: this client's CPU (user, system) and the server's CPU."""

    user_us: float
    sys_us: float
    server_us: float | None


class CostMeter:
    """Wall time, client CPU (this process, or reported by child processes), server CPU."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.ru0: Any = None
        self.srv0: float | None = None

    def start(self) -> None:
        scenarios.settle()
        self.srv0 = server_cpu_seconds()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()

    def stop(self, n: int, client_cpu: tuple[float, float] | None = None) -> tuple[float, PgCost]:
        wall = time.perf_counter() - self.t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        srv1 = server_cpu_seconds()
        if client_cpu is None:
            client_cpu = (ru1.ru_utime - self.ru0.ru_utime, ru1.ru_stime - self.ru0.ru_stime)
        server = None if self.srv0 is None or srv1 is None else (srv1 - self.srv0) / n * 1e6
        return n / wall, PgCost(client_cpu[0] / n * 1e6, client_cpu[1] / n * 1e6, server)


# -- P1-P3: the rounds --------------------------------------------------------------------


@dataclass
class PgRoundResult:
    """One round: ops/s and per-operation costs, per scenario and implementation."""

    order: list[str]
    ops: dict[str, dict[str, float]] = field(default_factory=dict)  # scenario -> who -> ops/s
    cost: dict[str, dict[str, PgCost]] = field(default_factory=dict)


SCENARIOS = ("store", "retrieve", "threads", "processes")


def _record(result: PgRoundResult, scenario: str, who: str, ops: float, cost: PgCost) -> None:
    result.ops.setdefault(scenario, {})[who] = ops
    result.cost.setdefault(scenario, {})[who] = cost


def _names_for(client: int, count: int, cycle: int) -> list[str]:
    """The names one concurrent client retrieves: the peer's own pattern (k * 7 + i)."""
    return [f"secret-{(client * 7 + i) % cycle}" for i in range(count)]


def _stores(client: scenarios.Client, tenant: str, n: int) -> tuple[float, PgCost]:
    names = [f"secret-{i}" for i in range(n)]
    meter = CostMeter()
    meter.start()
    for name in names:
        client.store(tenant, name, scenarios.VALUE)
    return meter.stop(n)


def _retrieves(client: scenarios.Client, tenant: str, n: int, cycle: int) -> tuple[float, PgCost]:
    names = [f"secret-{i % cycle}" for i in range(n)]
    if client.retrieve(tenant, names[0]) != scenarios.VALUE:  # correctness check, untimed
        raise RuntimeError(f"{client.name} returned a wrong value")
    meter = CostMeter()
    meter.start()
    for name in names:
        client.retrieve(tenant, name)
    return meter.stop(n)


def _run_clients(
    clients: list[scenarios.Client],
    tenant: str,
    per_client: int,
    cycle: int,
    first: int = 0,
    gate: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Run the clients' retrieves in threads, started together after a warm-up.

    Client k (numbered from ``first``) retrieves ``_names_for(k, ...)``. Every client warms
    up and parks; then ``gate()`` runs (if given) and all start. Returns the (start, end)
    of the timed part on the system-wide monotonic clock.
    """
    barrier = threading.Barrier(len(clients) + 1)
    errors: list[BaseException] = []
    ends: list[float] = []

    def work(client: scenarios.Client, k: int) -> None:
        names = _names_for(k, per_client, cycle)
        try:
            for name in names[:WARMUP_PER_CLIENT]:
                if client.retrieve(tenant, name) != scenarios.VALUE:
                    raise RuntimeError(f"{client.name} returned a wrong value")
        except BaseException as error:
            errors.append(error)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            for name in names:
                client.retrieve(tenant, name)
        except BaseException as error:
            errors.append(error)
        ends.append(time.monotonic())

    threads = [
        threading.Thread(target=work, args=(c, first + k), daemon=True)
        for k, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    while barrier.n_waiting < len(clients) and not barrier.broken:
        time.sleep(0.002)
    if gate is not None and not barrier.broken:
        gate()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]
    return start, max(ends)


def _threads(
    who: str,
    round_client: scenarios.Client,
    make_peer: Callable[[], scenarios.Client],
    tenant: str,
    per_client: int,
    cycle: int,
) -> tuple[float, PgCost]:
    """P3a: 8 threads. keyledger: the round's one service, shared; the peer: 8 connections."""
    if who == "keyledger":
        clients = [round_client] * CLIENTS
    else:
        clients = [make_peer() for _ in range(CLIENTS)]
    try:
        meter = CostMeter()
        meter.start()
        start, end = _run_clients(clients, tenant, per_client, cycle)
        _ops, cost = meter.stop(per_client * CLIENTS)
        return per_client * CLIENTS / (end - start), cost
    finally:
        if who != "keyledger":
            for c in clients:
                c.close()


@dataclass
class ProcessJob:
    """What one P3b worker process needs (picklable: sent to a spawned interpreter)."""

    who: str
    url: str
    amk: bytes
    tenant: str
    first_client: int
    threads: int
    per_client: int
    cycle: int
    peer_dir: str
    bench_dir: str


def _process_main(job: ProcessJob, ready: Any, go: Any, results: Any, done: Any) -> None:
    """A P3b worker: build its clients, warm up, say ready, wait for ``go``, run, report.

    Its connections stay open until ``done``, so the server CPU of their backends is still
    visible when the parent reads it.
    """
    said_ready = False
    try:
        if job.bench_dir not in sys.path:
            sys.path.insert(0, job.bench_dir)
        clients: list[scenarios.Client]
        owned: list[scenarios.Client]
        if job.who == "keyledger":
            shared = scenarios.KeyledgerClient(job.url, job.amk)
            clients = [shared] * job.threads
            owned = [shared]
        else:
            sys.path.insert(0, job.peer_dir)
            import crud_baseline

            clients = [
                scenarios.PeerClient(crud_baseline.CrudSecrets, job.url, job.amk)
                for _ in range(job.threads)
            ]
            owned = list(clients)
        # A long-lived process has warm caches: read every name once, untimed (both sides).
        for i in range(job.cycle):
            clients[0].retrieve(job.tenant, f"secret-{i}")
        ru0: list[Any] = []

        def gate() -> None:
            nonlocal said_ready
            ready.put(os.getpid())
            said_ready = True
            go.wait()
            ru0.append(resource.getrusage(resource.RUSAGE_SELF))

        try:
            start, end = _run_clients(
                clients, job.tenant, job.per_client, job.cycle, job.first_client, gate
            )
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (ru1.ru_utime - ru0[0].ru_utime, ru1.ru_stime - ru0[0].ru_stime)
            results.put(("ok", job.per_client * job.threads, start, end, cpu))
            done.wait(timeout=600)
        finally:
            for client in owned:
                client.close()
    except BaseException as error:
        if not said_ready:
            ready.put(os.getpid())
        results.put(("error", repr(error), 0.0, 0.0, (0.0, 0.0)))


def _processes(
    who: str,
    url: str,
    amk: bytes,
    tenant: str,
    per_client: int,
    cycle: int,
    peer_dir: Path,
) -> tuple[float, PgCost]:
    """P3b: 4 spawned processes of 2 client threads each, started together."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, go, done = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    jobs = [
        ProcessJob(
            who=who,
            url=url,
            amk=amk,
            tenant=tenant,
            first_client=p * THREADS_PER_PROCESS,
            threads=THREADS_PER_PROCESS,
            per_client=per_client,
            cycle=cycle,
            peer_dir=str(peer_dir),
            bench_dir=str(Path(__file__).resolve().parent),
        )
        for p in range(PROCESSES)
    ]
    procs = [
        ctx.Process(target=_process_main, args=(job, ready, go, results, done)) for job in jobs
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        meter = CostMeter()
        meter.start()
        go.set()
        reports = [results.get(timeout=600) for _ in procs]
        total = sum(r[1] for r in reports if r[0] == "ok")
        cpu = (sum(r[4][0] for r in reports), sum(r[4][1] for r in reports))
        _ops, cost = meter.stop(max(total, 1), client_cpu=cpu)
        done.set()
        for p in procs:
            p.join(timeout=60)
    finally:
        done.set()
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    failed = [r for r in reports if r[0] != "ok"]
    if failed:
        raise RuntimeError(f"a {who} worker process failed: {failed[0][1]}")
    span = max(r[3] for r in reports) - min(r[2] for r in reports)
    return total / span, cost


def run_round(
    index: int,
    n: int,
    n_concurrent: int,
    urls: dict[str, str],
    amk: bytes,
    peer_class: Any,
    peer_dir: Path,
    log: Log,
) -> PgRoundResult:
    """One round of P1, P2, P3a, P3b; even rounds start with keyledger, odd with the peer.

    Each side stores into its own schema under a tenant of the round (P1), then retrieves
    from what it just stored (P2), then with 8 clients in threads (P3a) and processes (P3b).
    The phases interleave: first P1, second P1, first P2, second P2, ...
    """
    order = ["keyledger", "peer"] if index % 2 == 0 else ["peer", "keyledger"]
    tenant = f"tenant-pg-round-{index}"
    cycle = min(scenarios.RETRIEVE_NAMES, n)
    per_client = max(n_concurrent // CLIENTS, 1)
    clients: dict[str, scenarios.Client] = {}
    for who in order:
        clients[who] = (
            scenarios.KeyledgerClient(urls[who], amk)
            if who == "keyledger"
            else scenarios.PeerClient(peer_class, urls[who], amk)
        )
    result = PgRoundResult(order=order)

    def make_peer() -> scenarios.Client:
        return scenarios.PeerClient(peer_class, urls["peer"], amk)

    try:
        for who in order:
            _record(result, "store", who, *_stores(clients[who], tenant, n))
        for who in order:
            _record(result, "retrieve", who, *_retrieves(clients[who], tenant, n, cycle))
        for who in order:
            ops_cost = _threads(who, clients[who], make_peer, tenant, per_client, cycle)
            _record(result, "threads", who, *ops_cost)
        for who in order:
            ops_cost = _processes(who, urls[who], amk, tenant, per_client, cycle, peer_dir)
            _record(result, "processes", who, *ops_cost)
    finally:
        for client in clients.values():
            client.close()
        scenarios.settle()
    log(
        f"pg round {index + 1}: order {'/'.join(order)}; "
        + "; ".join(
            f"{s} " + ", ".join(f"{w} {result.ops[s][w]:,.0f}/s" for w in order) for s in SCENARIOS
        )
    )
    return result


# -- P4: projection rebuild vs read and decode --------------------------------------------


@dataclass
class RebuildTrace:
    """One instrumented rebuild: per event, round trips and where the time went (us)."""

    rate: float  # events/s under the instruments
    trips: float  # round trips per event
    statements: float  # execute calls per event
    wait_us: float  # inside driver waits per event (server work + network)
    other_us: float  # the rest of the wall time per event (Python: decode, project)
    client_cpu_us: float  # user + system per event
    server_cpu_us: float | None


@dataclass
class RebuildResult:
    events: int
    build_seconds: float
    build_ops: dict[str, int]
    rounds: int
    rebuild_rates: list[float]  # events/s
    decode_rates: list[float]  # events/s
    trace: RebuildTrace | None = None  # one more rebuild, instrumented (not in the medians)

    @property
    def rebuild_rate(self) -> float:
        return statistics.median(self.rebuild_rates)

    @property
    def decode_rate(self) -> float:
        return statistics.median(self.decode_rates)


def _build_stream(svc: SecretService, target: int, log: Log) -> dict[str, int]:
    """About ``target`` operations, one store to three reads, by 8 threads (a tenant each).

    Each thread stores up to 250 new names, then updates them (a store of an existing
    name); reads cycle over what the thread has stored. Every operation appends one event
    (a tenant's first store appends its keyring's events too).
    """
    threads = CLIENTS
    per_thread = max(target // threads, 4)
    counts = {"stores": 0, "reads": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        tenant = f"tenant-rebuild-{k}"
        stored = 0
        stores = reads = 0
        try:
            for i in range(per_thread):
                if i % 4 == 0:
                    name = f"secret-{stored % 250}"
                    svc.store_for_tenant(tenant, name, scenarios.VALUE, category="rebuild")
                    stored += 1
                    stores += 1
                else:
                    svc.retrieve_for_tenant(tenant, f"secret-{i % min(stored, 250)}")
                    reads += 1
        except BaseException as error:
            errors.append(error)
        with lock:
            counts["stores"] += stores
            counts["reads"] += reads

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"building the stream failed: {errors[0]!r}") from errors[0]
    return counts


def _read_and_decode(svc: SecretService, url: str, schema: str) -> int:
    """Select every event in pages of 1000 by notification_id and decode each one, the
    fastest way keyledger has: reads by ``decode_read`` (as replays do), others by the
    service's mapper."""
    ledger = svc._ledger
    mapper = ledger.mapper
    table = sql.Identifier(schema, ledger.store.events_table_name)
    statement = sql.SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state "
        "FROM {} WHERE notification_id > %s ORDER BY notification_id LIMIT 1000"
    ).format(table)
    count = 0
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = conn.cursor()
        after = 0
        while True:
            rows = cur.execute(statement, (after,)).fetchall()
            if not rows:
                return count
            for row in rows:
                if row[3] == READ_TOPIC:
                    decode_read(bytes(row[4]))
                else:
                    mapper.to_domain_event(StoredEvent(row[1], row[2], row[3], bytes(row[4])))
            count += len(rows)
            after = rows[-1][0]


def _vacuum(url: str, schema: str) -> None:
    """VACUUM the schema's tables (untimed): each rebuild starts without the last one's
    dead rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
        ).fetchall()
        for (table,) in tables:
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, table)))


def run_rebuild(
    schemas: BenchSchemas, amk: bytes, *, events: int, rounds: int, log: Log
) -> RebuildResult:
    """P4 (keyledger only), in a schema of its own holding just this stream."""
    schema = schemas.new("kl_bench_rebuild")
    url = schemas.keyledger_url(schema)
    svc = SecretService.create(url, master_key=amk.hex())
    try:
        t0 = time.perf_counter()
        ops = _build_stream(svc, events, log)
        build_seconds = time.perf_counter() - t0
        # Past 10,000 appends the service seals on its background thread: let that
        # checkpoint land before counting, so the stream does not grow under the rounds.
        svc._ledger.sealer.wait_idle(60)
        total = _read_and_decode(svc, schemas.base_url, schema)
        log(
            f"rebuild stream: {total:,} events ({ops['stores']:,} stores, {ops['reads']:,} "
            f"reads) built in {build_seconds:.1f} s"
        )
        rebuild_rates: list[float] = []
        decode_rates: list[float] = []

        def rebuild() -> None:
            scenarios.settle()
            t = time.perf_counter()
            replayed = svc.rebuild_read_models()
            rebuild_rates.append(replayed / (time.perf_counter() - t))
            if replayed != total:
                raise RuntimeError(f"rebuild replayed {replayed} events, the stream has {total}")

        def decode() -> None:
            scenarios.settle()
            t = time.perf_counter()
            decoded = _read_and_decode(svc, schemas.base_url, schema)
            decode_rates.append(decoded / (time.perf_counter() - t))

        for r in range(rounds):
            _vacuum(schemas.base_url, schema)
            for step in (rebuild, decode) if r % 2 == 0 else (decode, rebuild):
                step()
            log(
                f"rebuild round {r + 1}: rebuild {rebuild_rates[-1]:,.0f} events/s, "
                f"read+decode {decode_rates[-1]:,.0f} events/s"
            )
        trace = _trace_rebuild(svc, total)
        log(
            f"rebuild traced: {trace.trips:.2f} round trips per event, "
            f"{trace.wait_us:,.0f} us waiting + {trace.other_us:,.0f} us other per event"
        )
        # The rebuilt models answer as before.
        if svc.retrieve_for_tenant("tenant-rebuild-0", "secret-0").value != scenarios.VALUE:
            raise RuntimeError("a secret does not read back after the rebuild")
    finally:
        svc.close()
    return RebuildResult(
        events=total,
        build_seconds=build_seconds,
        build_ops=ops,
        rounds=rounds,
        rebuild_rates=rebuild_rates,
        decode_rates=decode_rates,
        trace=trace,
    )


def _trace_rebuild(svc: SecretService, total: int) -> RebuildTrace:
    """One more rebuild under ``Instruments``: its round trips and waits per event."""
    instruments = Instruments(svc)
    meter = CostMeter()
    with instruments.installed():
        meter.start()
        t = time.perf_counter()
        replayed = svc.rebuild_read_models()
        wall = time.perf_counter() - t
        _ops, cost = meter.stop(max(replayed, 1))
    m = instruments.merged()
    n = max(total, 1)
    return RebuildTrace(
        rate=replayed / wall,
        trips=m.trips / n,
        statements=m.statements / n,
        wait_us=m.wait / n * 1e6,
        other_us=(wall - m.wait) / n * 1e6,
        client_cpu_us=cost.user_us + cost.sys_us,
        server_cpu_us=cost.server_us,
    )


# -- where a retrieve spends its time -----------------------------------------------------


@dataclass
class SplitResult:
    """Where keyledger's retrieves spend their time; per retrieve unless said otherwise.

    Times in us. "Write transactions" are the recorder's ``writing()`` transactions: with
    group commit, one of them carries the read events of several retrieves.
    """

    clients: int
    n: int
    ops_per_s: float
    latency_us: float  # wall time of one retrieve as its client sees it
    commit_us: float  # of latency: inside the ledger's commit (queueing + the batch write)
    round_trips: float  # driver waits: one per statement batch sent, BEGIN or COMMIT
    statements: float  # cursor execute calls (a string of several statements counts once)
    write_tx: float  # write transactions per retrieve (1 / mean batch size)
    read_tx: float  # read-only transactions per retrieve
    wait_us: float  # time inside driver waits (server work + network + GIL reacquire)
    tx_lock_us: float  # per write transaction: the statement that takes the lock
    tx_held_us: float  # per write transaction: LOCK TABLE returned -> COMMIT returned
    tx_held_trips: float  # per write transaction: round trips while holding the lock
    tx_held_wait_us: float  # per write transaction: of held, inside driver waits
    tx_commit_us: float  # per write transaction: of held, the COMMIT round trip
    held_us: float  # lock held per retrieve (tx_held_us * write_tx)
    catch_up_us: float  # wall time in the periodic audit catch-up, per retrieve
    catch_up_tx: int  # catch-up transactions that write, during the measurement
    catch_up_locked_tx: int  # of those, how many took the events table lock
    catch_up_trips: float  # round trips of the catch-ups, per retrieve
    catch_up_held_us: float  # lock held by the catch-ups, per retrieve
    lock_busy: float  # fraction of the wall time during which some client held the lock
    client_user_us: float  # this process's CPU per retrieve (all threads)
    client_sys_us: float
    server_cpu_us: float | None


class _Probe:
    """Counters of one thread, merged at the end."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.trips = 0
        self.wait = 0.0
        self.statements = 0
        self.write_tx = 0
        self.read_tx = 0
        self.proj_tx = 0  # the recorder's projecting() transactions (no events table lock)
        self.lock_stmt = 0.0
        self.holding = False
        self.locked_at = 0.0
        self.held = 0.0
        self.held_trips = 0
        self.held_wait = 0.0
        self.commit = 0.0  # COMMIT of locked transactions
        self.in_ledger_commit = 0.0
        self.catching_up = 0.0  # wall time in the ledger's periodic audit catch-up

    SUMMED = (
        *("trips", "wait", "statements", "write_tx", "read_tx", "proj_tx", "lock_stmt", "held"),
        *("held_trips", "held_wait", "commit", "in_ledger_commit", "catching_up"),
    )


def _is_lock_statement(query: Any, old_style: Any) -> bool:
    """The statement that takes the events table lock (alone or with BEGIN and NOTIFY)."""
    if query is old_style:
        return True
    if isinstance(query, bytes):
        return b"LOCK TABLE" in query
    if isinstance(query, str):
        return "LOCK TABLE" in query
    return False


class Instruments:
    """Patches psycopg, the recorder and the ledger to count round trips and time the lock.

    Class-level patches of ``psycopg.Connection.wait`` and ``Cursor.execute`` (they see
    every connection of this process: install only while keyledger alone runs here), and
    instance-level wraps of the recorder's ``writing``, ``reading`` and ``projecting``
    (maintenance under an advisory lock, where the recorder has it) and of the ledger's
    read commit (``commit_read``, else ``commit``) and ``_note_appended`` (where the audit
    read model catches up every few thousand appends: counted apart).

    One psycopg wait is one exchange with the server: a statement (or several sent as one
    string), a BEGIN or a COMMIT; the pool's no-op commit of an idle connection is not
    counted. The one-call writes bypass psycopg's cursors (``PreparedCall``, libpq's
    prepared-statement interface): each of its executions, and each PREPARE it sends once
    per connection, is one exchange and one execute call too. The lock is held from the
    answer to the statement holding LOCK TABLE until the answer that leaves the
    transaction (COMMIT or ROLLBACK).
    """

    def __init__(self, svc: SecretService) -> None:
        self.ledger: Any = svc._ledger
        self.recorder: Any = svc._ledger.store
        statements = getattr(self.recorder, "lock_table_statements", None) or [None]
        self.old_lock_statement = statements[-1]
        self.commit_name = "commit_read" if hasattr(self.ledger, "commit_read") else "commit"
        self.local = threading.local()
        self.probes: list[_Probe] = []
        self.catch_up_probes: list[_Probe] = []
        self.holds: list[tuple[float, float]] = []
        self.mutex = threading.Lock()

    def probe(self) -> _Probe:
        """This thread's probe; inside the ledger's audit catch-up, its catch-up probe."""
        catch_up = getattr(self.local, "catch_up", False)
        name = "catch_up_probe" if catch_up else "probe"
        p: _Probe | None = getattr(self.local, name, None)
        if p is None:
            p = _Probe()
            setattr(self.local, name, p)
            with self.mutex:
                (self.catch_up_probes if catch_up else self.probes).append(p)
        return p

    def reset(self) -> None:
        with self.mutex:
            for p in (*self.probes, *self.catch_up_probes):
                p.reset()
            self.holds.clear()

    def merged(self, catch_up: bool = False) -> _Probe:
        """The counters summed over threads: of the catch-ups, or of everything else."""
        total = _Probe()
        for p in self.catch_up_probes if catch_up else self.probes:
            for slot in _Probe.SUMMED:
                setattr(total, slot, getattr(total, slot) + getattr(p, slot))
        return total

    @contextlib.contextmanager
    def installed(self) -> Iterator[Instruments]:
        orig_wait = psycopg.Connection.wait
        orig_cur_execute = psycopg.Cursor.execute
        orig_pq_execute = PreparedCall._execute
        orig_pq_prepare = PreparedCall._prepare
        orig_writing = self.recorder.writing
        orig_reading = self.recorder.reading
        orig_projecting: Any = getattr(self.recorder, "projecting", None)
        orig_commit = getattr(self.ledger, self.commit_name)
        orig_note_appended: Any = getattr(self.ledger, "_note_appended", None)
        probe, old_lock = self.probe, self.old_lock_statement

        idle = psycopg.pq.TransactionStatus.IDLE
        no_ops = ("BaseConnection._commit_gen", "BaseConnection._rollback_gen")

        def wait(conn: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
            p = probe()
            # The pool's ``with conn:`` ends in a commit that is a no-op, with no exchange,
            # when the connection is idle: not a round trip.
            if getattr(gen, "__qualname__", "") in no_ops and (
                conn.pgconn.transaction_status == idle
            ):
                return orig_wait(conn, gen, *args, **kwargs)
            t = time.perf_counter()
            try:
                return orig_wait(conn, gen, *args, **kwargs)
            finally:
                end = time.perf_counter()
                d = end - t
                p.trips += 1
                p.wait += d
                if p.holding:
                    p.held_trips += 1
                    p.held_wait += d
                    if conn.pgconn.transaction_status == idle:  # COMMIT or ROLLBACK answered
                        p.held += end - p.locked_at
                        p.commit += d
                        p.holding = False
                        with self.mutex:
                            self.holds.append((p.locked_at, end))

        def cur_execute(cur: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            p = probe()
            p.statements += 1
            if not _is_lock_statement(query, old_lock):
                return orig_cur_execute(cur, query, *args, **kwargs)
            t = time.perf_counter()
            result = orig_cur_execute(cur, query, *args, **kwargs)
            p.locked_at = time.perf_counter()
            p.lock_stmt += p.locked_at - t
            p.holding = True
            return result

        def exchange(call: Callable[[], Any]) -> Any:
            p = probe()
            p.statements += 1
            t = time.perf_counter()
            try:
                return call()
            finally:
                p.trips += 1
                p.wait += time.perf_counter() - t

        def pq_execute(prepared: Any, conn: Any, params: Any) -> Any:
            return exchange(lambda: orig_pq_execute(prepared, conn, params))

        def pq_prepare(prepared: Any, conn: Any) -> Any:
            return exchange(lambda: orig_pq_prepare(prepared, conn))

        @contextlib.contextmanager
        def writing() -> Iterator[Any]:
            probe().write_tx += 1
            with orig_writing() as cur:
                yield cur

        @contextlib.contextmanager
        def reading() -> Iterator[Any]:
            probe().read_tx += 1
            with orig_reading() as cur:
                yield cur

        @contextlib.contextmanager
        def projecting() -> Iterator[Any]:
            probe().proj_tx += 1
            with orig_projecting() as cur:
                yield cur

        def note_appended(*args: Any, **kwargs: Any) -> Any:
            p = probe()
            self.local.catch_up = True
            t = time.perf_counter()
            try:
                return orig_note_appended(*args, **kwargs)
            finally:
                p.catching_up += time.perf_counter() - t
                self.local.catch_up = False

        def ledger_commit(*args: Any, **kwargs: Any) -> Any:
            p = probe()
            t = time.perf_counter()
            try:
                return orig_commit(*args, **kwargs)
            finally:
                p.in_ledger_commit += time.perf_counter() - t

        psycopg.Connection.wait = wait  # type: ignore[method-assign,assignment]
        psycopg.Cursor.execute = cur_execute  # type: ignore[method-assign,assignment]
        PreparedCall._execute = pq_execute  # type: ignore[method-assign]
        PreparedCall._prepare = pq_prepare  # type: ignore[method-assign]
        orig_insert_reads = self.recorder.insert_reads

        def insert_reads(batch: Any) -> Any:
            # The pipelined read batch opens its transaction itself (not via writing()).
            probe().write_tx += 1
            return orig_insert_reads(batch)

        self.recorder.insert_reads = insert_reads
        self.recorder.writing = writing
        self.recorder.reading = reading
        if orig_projecting is not None:
            self.recorder.projecting = projecting
        setattr(self.ledger, self.commit_name, ledger_commit)
        if orig_note_appended is not None:
            self.ledger._note_appended = note_appended
        try:
            yield self
        finally:
            psycopg.Connection.wait = orig_wait  # type: ignore[method-assign]
            psycopg.Cursor.execute = orig_cur_execute  # type: ignore[method-assign]
            PreparedCall._execute = orig_pq_execute  # type: ignore[method-assign]
            PreparedCall._prepare = orig_pq_prepare  # type: ignore[method-assign]
            del self.recorder.insert_reads
            del self.recorder.writing
            del self.recorder.reading
            if orig_projecting is not None:
                del self.recorder.projecting
            delattr(self.ledger, self.commit_name)
            if orig_note_appended is not None:
                del self.ledger._note_appended


def _busy_fraction(holds: list[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of [start, end] covered by the union of the hold intervals."""
    covered = 0.0
    cur_s = cur_e = None
    for s, e in sorted(holds):
        if cur_e is None or s > cur_e:
            if cur_s is not None and cur_e is not None:
                covered += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_s is not None and cur_e is not None:
        covered += cur_e - cur_s
    return covered / (end - start) if end > start else 0.0


def measure_split(
    svc: SecretService, tenant: str, *, clients: int, n: int, cycle: int
) -> SplitResult:
    """``n`` retrieves by ``clients`` threads sharing ``svc``, instrumented (no cProfile).

    Every client warms up (``WARMUP_PER_CLIENT`` retrieves) and parks; the counters are
    zeroed; then all start together.
    """
    per_client = max(n // clients, 1)
    total = per_client * clients
    latency = [0.0]
    instruments = Instruments(svc)

    class Timed:
        name = "keyledger"

        def retrieve(self, tenant: str, name: str) -> str:
            t = time.perf_counter()
            value = svc.retrieve_for_tenant(tenant, name).value
            d = time.perf_counter() - t
            with instruments.mutex:
                latency[0] += d
            return str(value)

        def store(self, tenant: str, name: str, value: str) -> None:
            raise NotImplementedError

        def close(self) -> None:
            pass

    meter = CostMeter()

    def gate() -> None:
        instruments.reset()
        latency[0] = 0.0
        meter.start()

    with instruments.installed():
        start, end = _run_clients([Timed()] * clients, tenant, per_client, cycle, gate=gate)
        _ops, cost = meter.stop(total)
        m = instruments.merged()
        cu = instruments.merged(catch_up=True)
        holds = list(instruments.holds)
    # hold intervals are on perf_counter, the span on monotonic: the same clock on Linux,
    # but measure the busy fraction over the holds' own span to be safe.
    busy = (
        _busy_fraction(holds, min(h[0] for h in holds), max(h[1] for h in holds)) if holds else 0.0
    )
    tx = max(m.write_tx, 1)

    def us(x: float, per: float = total) -> float:
        return x / per * 1e6

    return SplitResult(
        clients=clients,
        n=total,
        ops_per_s=total / (end - start),
        latency_us=us(latency[0]),
        commit_us=us(m.in_ledger_commit),
        round_trips=m.trips / total,
        statements=m.statements / total,
        write_tx=m.write_tx / total,
        read_tx=m.read_tx / total,
        wait_us=us(m.wait),
        tx_lock_us=us(m.lock_stmt, tx),
        tx_held_us=us(m.held, tx),
        tx_held_trips=m.held_trips / tx,
        tx_held_wait_us=us(m.held_wait, tx),
        tx_commit_us=us(m.commit, tx),
        held_us=us(m.held),
        catch_up_us=us(m.catching_up),
        catch_up_tx=cu.write_tx + cu.proj_tx,
        catch_up_locked_tx=cu.write_tx,
        catch_up_trips=cu.trips / total,
        catch_up_held_us=us(cu.held),
        lock_busy=busy,
        client_user_us=cost.user_us,
        client_sys_us=cost.sys_us,
        server_cpu_us=cost.server_us,
    )


@dataclass
class PgProfile:
    """The split at 1 and at 8 clients, and a cProfile of retrieves at one client."""

    pool: str
    splits: list[SplitResult]
    profile: scenarios.ProfileResult | None


def run_split_and_profile(
    schemas: BenchSchemas,
    schema: str,
    amk: bytes,
    *,
    n: int,
    profile_n: int,
    with_profile: bool,
    log: Log,
) -> PgProfile:
    """Keyledger alone: 100 secrets of a fresh tenant, then the split at 1 and 8 clients."""
    url = schemas.keyledger_url(schema)
    svc = SecretService.create(url, master_key=amk.hex())
    tenant = "tenant-pg-split"
    try:
        pool = pool_setting(svc)
        cycle = scenarios.RETRIEVE_NAMES
        for i in range(cycle):
            svc.store_for_tenant(tenant, f"secret-{i}", scenarios.VALUE, category="split")
        splits = []
        for clients in (1, CLIENTS):
            split = measure_split(svc, tenant, clients=clients, n=n, cycle=cycle)
            log(
                f"split at {clients} client(s): {split.ops_per_s:,.0f}/s, "
                f"{split.round_trips:.1f} round trips, "
                f"{1 / max(split.write_tx, 1e-9):.1f} reads per write transaction, "
                f"lock held {split.held_us:,.0f} us per retrieve, "
                f"lock busy {split.lock_busy:.0%}"
            )
            splits.append(split)
    finally:
        svc.close()
    profile = None
    if with_profile:
        profile = scenarios.run_profile(
            None,
            amk,
            n=profile_n,
            top=12,
            url=url,
            tenant="tenant-pg-profile",
            layer=pg_layer,
            layer_names=PG_LAYERS,
            ops=("retrieve",),
        )
    return PgProfile(pool=pool, splits=splits, profile=profile)


def pool_setting(svc: SecretService) -> str:
    """The service's pool as configured and as built (min and max connections)."""
    datastore: Any = getattr(svc._ledger.recorder, "datastore", None)
    pool = getattr(datastore, "pool", None)
    if pool is None:
        return f"URL option {POOL_OPTIONS}, max_overflow at its default"
    return (
        f"URL option {POOL_OPTIONS}, max_overflow at its default: psycopg_pool "
        f"min_size={pool.min_size}, max_size={pool.max_size}"
    )


PG_LAYERS = (
    "waiting for PostgreSQL (driver waits: server work + network)",
    "psycopg Python",
    "AES-GCM (cryptography)",
    "keyledger Python",
    "eventsourcing Python",
    "pydantic",
    "json encode/decode",
    "other Python (stdlib, builtins)",
)


def pg_layer(where: str) -> str:
    """The layer of a cProfile row (``where`` as ``scenarios._short`` writes it).

    psycopg's C wait (``wait_c``) is not a builtin, so cProfile counts the time spent in it
    as self time of ``Connection.wait``: that row is the time waiting for the server.
    """
    if where.startswith(("psycopg/connection.py", "psycopg/waiting.py")) and "(wait" in where:
        return PG_LAYERS[0]
    if "psycopg" in where:
        return PG_LAYERS[1]
    if "cryptography" in where:
        return PG_LAYERS[2]
    for prefix, layer in (
        ("keyledger/", PG_LAYERS[3]),
        ("eventsourcing/", PG_LAYERS[4]),
        ("pydantic", PG_LAYERS[5]),
        ("json/", PG_LAYERS[6]),
    ):
        if where.startswith(prefix):
            return layer
    return PG_LAYERS[7]
