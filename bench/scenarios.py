"""The benchmark scenarios: keyledger side by side with the CRUD peer on SQLite files.

Every scenario works in its own fresh database file under ``workdir`` and returns plain
numbers; ``run.py`` turns them into the report. Timings use ``time.perf_counter`` and the
garbage collector is run between phases, never inside a timed loop.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from keyledger.service import SecretService

VALUE = "sk_live_" + "x" * 40
CATEGORY = "api-keys"
RETRIEVE_NAMES = 100  # scenario B cycles over this many stored names


class Client(Protocol):
    """What scenarios A and B need from either implementation."""

    name: str

    def store(self, tenant: str, name: str, value: str) -> None: ...

    def retrieve(self, tenant: str, name: str) -> str: ...

    def close(self) -> None: ...


class KeyledgerClient:
    name = "keyledger"

    def __init__(self, url: str, amk: bytes) -> None:
        self.service = SecretService.create(url, master_key=amk.hex())

    def store(self, tenant: str, name: str, value: str) -> None:
        self.service.store_for_tenant(tenant, name, value, category=CATEGORY)

    def retrieve(self, tenant: str, name: str) -> str:
        value = self.service.retrieve_for_tenant(tenant, name).value
        assert isinstance(value, str)
        return value

    def close(self) -> None:
        self.service.close()


class PeerClient:
    name = "peer"

    def __init__(self, peer_class: Any, url: str, amk: bytes) -> None:
        self.crud = peer_class(url, amk)

    def store(self, tenant: str, name: str, value: str) -> None:
        self.crud.store(tenant, name, value, CATEGORY)

    def retrieve(self, tenant: str, name: str) -> str:
        value, _count = self.crud.retrieve(tenant, name)
        return str(value)

    def close(self) -> None:
        self.crud.db.close()


def sqlite_url(path: Path) -> str:
    """``sqlite:////abs/path.db``: understood by keyledger and by the peer."""
    return "sqlite:///" + str(path.resolve())


def settle() -> None:
    """Between phases: collect garbage so no collection lands in the next timed loop."""
    gc.collect()


def per_op(samples: list[float]) -> float:
    return statistics.median(samples)


# -- scenarios A and B: one client, store then retrieve -----------------------------------


@dataclass
class Cost:
    """Per operation: CPU in user and kernel mode, and bytes handed to the kernel to write.

    Less noisy than wall time on a shared machine: user time is Python, cryptography and
    SQLite; system time is mostly the writes and fsyncs; bytes written show how many pages
    (WAL frames) each commit appends. ``written`` is None where /proc/self/io is missing.
    """

    user_us: float
    sys_us: float
    written: float | None


@dataclass
class RoundResult:
    """One round: ops/s and costs per implementation for store (A) and retrieve (B)."""

    order: list[str]
    store_ops: dict[str, float] = field(default_factory=dict)
    retrieve_ops: dict[str, float] = field(default_factory=dict)
    store_cost: dict[str, Cost] = field(default_factory=dict)
    retrieve_cost: dict[str, Cost] = field(default_factory=dict)


def _written_bytes() -> int | None:
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("wchar:"):
                    return int(line.split(":")[1])
    except OSError:
        return None
    return None


def _timed(ops: Callable[[], None], n: int) -> tuple[float, Cost]:
    """Run ``ops`` (n operations) once; (ops/s, per-operation cost)."""
    settle()
    w0, c0 = _written_bytes(), resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    ops()
    wall = time.perf_counter() - t0
    c1, w1 = resource.getrusage(resource.RUSAGE_SELF), _written_bytes()
    written = None if w0 is None or w1 is None else (w1 - w0) / n
    user = (c1.ru_utime - c0.ru_utime) / n * 1e6
    cost = Cost(user, (c1.ru_stime - c0.ru_stime) / n * 1e6, written)
    return n / wall, cost


def _timed_stores(client: Client, tenant: str, n: int) -> tuple[float, Cost]:
    names = [f"secret-{i}" for i in range(n)]

    def ops() -> None:
        for name in names:
            client.store(tenant, name, VALUE)

    return _timed(ops, n)


def _timed_retrieves(client: Client, tenant: str, n: int, n_stored: int) -> tuple[float, Cost]:
    cycle = min(RETRIEVE_NAMES, n_stored)
    names = [f"secret-{i % cycle}" for i in range(n)]
    if client.retrieve(tenant, names[0]) != VALUE:  # correctness check, untimed
        raise RuntimeError(f"{client.name} returned a wrong value")

    def ops() -> None:
        for name in names:
            client.retrieve(tenant, name)

    return _timed(ops, n)


def run_round(
    index: int, n: int, workdir: Path, amk: bytes, peer_class: Any, log: Callable[[str], None]
) -> RoundResult:
    """One round of A then B; even rounds start with keyledger, odd rounds with the peer.

    Each implementation stores into a fresh database (A), then retrieves from the database
    it just filled (B). The phases interleave: first A, second A, first B, second B.
    """
    order = ["keyledger", "peer"] if index % 2 == 0 else ["peer", "keyledger"]
    clients: dict[str, Client] = {}
    for who in order:
        url = sqlite_url(workdir / f"round{index}-{who}.db")
        clients[who] = (
            KeyledgerClient(url, amk) if who == "keyledger" else PeerClient(peer_class, url, amk)
        )
    tenant = f"tenant-round-{index}"
    result = RoundResult(order=order)
    try:
        for who in order:
            result.store_ops[who], result.store_cost[who] = _timed_stores(clients[who], tenant, n)
        for who in order:
            ops, cost = _timed_retrieves(clients[who], tenant, n, n)
            result.retrieve_ops[who], result.retrieve_cost[who] = ops, cost
    finally:
        for client in clients.values():
            client.close()
        settle()
    log(
        f"round {index + 1}: order {'/'.join(order)}; store "
        + ", ".join(f"{w} {result.store_ops[w]:,.0f}/s" for w in order)
        + "; retrieve "
        + ", ".join(f"{w} {result.retrieve_ops[w]:,.0f}/s" for w in order)
    )
    return result


# -- scenario C: retrieve cost after a long history -----------------------------------------


@dataclass
class HistoryResult:
    reads: int
    updates: int
    batches: int
    batch_size: int
    hot_us: float  # median per-retrieve time of the secret with history, warm service
    fresh_us: float  # same for fresh secrets in the same database
    hot_samples: list[float]
    fresh_samples: list[float]
    cold_reps: int
    cold_hot_us: float  # first retrieve on a newly opened service, secret with history
    cold_fresh_us: float  # same, a never-read secret
    build_seconds: float


def run_history(
    workdir: Path,
    amk: bytes,
    *,
    reads: int,
    updates: int,
    batches: int,
    batch_size: int,
    cold_reps: int,
    log: Callable[[str], None],
) -> HistoryResult:
    """Scenario C (keyledger only).

    Build: one secret stored, then ``updates`` times (reads // updates reads, one update).
    Measure (warm service): ``batches`` batches of ``batch_size`` retrieves of the hot secret
    and, alternating with them, the same for a fresh secret per batch (each stored after the
    history, in the same database, so it has at most ``batch_size`` reads when measured).
    Then (cold): a newly opened service on the same file, its first retrieve, for the hot
    secret and for a never-read secret, ``cold_reps`` times each, alternating.
    """
    url = sqlite_url(workdir / "history.db")
    tenant = "tenant-history"
    hot = "hot-secret"
    svc = SecretService.create(url, master_key=amk.hex())
    t0 = time.perf_counter()
    svc.store_for_tenant(tenant, hot, VALUE, category=CATEGORY)
    per_update = reads // updates if updates else reads
    done_reads = 0
    for u in range(max(updates, 1)):
        for _ in range(per_update):
            svc.retrieve_for_tenant(tenant, hot)
        done_reads += per_update
        if updates:
            svc.store_for_tenant(tenant, hot, f"sk_live_{u:040d}", category=CATEGORY)
    for _ in range(reads - done_reads):
        svc.retrieve_for_tenant(tenant, hot)
    fresh_names = [f"fresh-{i}" for i in range(batches)]
    cold_names = [f"cold-fresh-{i}" for i in range(cold_reps)]
    for name in fresh_names + cold_names:
        svc.store_for_tenant(tenant, name, VALUE, category=CATEGORY)
    build_seconds = time.perf_counter() - t0
    hot_secret = svc.retrieve_for_tenant(tenant, hot)
    if hot_secret.version != updates + 1 or hot_secret.access_count != reads + 1:
        raise RuntimeError(
            f"history not as built: {hot_secret.version=} {hot_secret.access_count=}"
        )
    log(f"history built in {build_seconds:.1f} s ({reads:,} reads, {updates} updates)")

    def batch(name: str) -> float:
        settle()
        t = time.perf_counter()
        for _ in range(batch_size):
            svc.retrieve_for_tenant(tenant, name)
        return (time.perf_counter() - t) / batch_size * 1e6

    hot_samples: list[float] = []
    fresh_samples: list[float] = []
    for i, fresh in enumerate(fresh_names):
        if i % 2 == 0:
            hot_samples.append(batch(hot))
            fresh_samples.append(batch(fresh))
        else:
            fresh_samples.append(batch(fresh))
            hot_samples.append(batch(hot))
    svc.close()
    settle()

    def first_retrieve(name: str) -> float:
        cold = SecretService.create(url, master_key=amk.hex())
        try:
            settle()
            t = time.perf_counter()
            cold.retrieve_for_tenant(tenant, name)
            return (time.perf_counter() - t) * 1e6
        finally:
            cold.close()

    cold_hot: list[float] = []
    cold_fresh: list[float] = []
    for i, name in enumerate(cold_names):
        if i % 2 == 0:
            cold_hot.append(first_retrieve(hot))
            cold_fresh.append(first_retrieve(name))
        else:
            cold_fresh.append(first_retrieve(name))
            cold_hot.append(first_retrieve(hot))
    settle()
    return HistoryResult(
        reads=reads,
        updates=updates,
        batches=batches,
        batch_size=batch_size,
        hot_us=per_op(hot_samples),
        fresh_us=per_op(fresh_samples),
        hot_samples=hot_samples,
        fresh_samples=fresh_samples,
        cold_reps=cold_reps,
        cold_hot_us=per_op(cold_hot),
        cold_fresh_us=per_op(cold_fresh),
        build_seconds=build_seconds,
    )


# -- scenario D: list(limit=100) over a big and a small tenant ------------------------------


@dataclass
class ListResult:
    big: int
    small: int
    reps: int
    big_us: float
    small_us: float
    build_seconds: float


def run_list(
    workdir: Path,
    amk: bytes,
    *,
    big: int,
    small: int,
    reps: int,
    log: Callable[[str], None],
) -> ListResult:
    """Scenario D (keyledger only): list_for_tenant(limit=100), big tenant vs small tenant.

    Both tenants live in the same database. Two untimed calls each warm up; then ``reps``
    timed calls each, alternating which tenant goes first; medians.
    """
    url = sqlite_url(workdir / "list.db")
    svc = SecretService.create(url, master_key=amk.hex())
    t0 = time.perf_counter()
    for tenant, count in (("tenant-big", big), ("tenant-small", small)):
        for i in range(count):
            svc.store_for_tenant(tenant, f"secret-{i:06d}", VALUE, category=CATEGORY)
    build_seconds = time.perf_counter() - t0
    log(f"list tenants built in {build_seconds:.1f} s ({big:,} + {small} secrets)")
    expect = min(100, small)
    for tenant in ("tenant-big", "tenant-small") * 2:
        got = len(svc.list_for_tenant(tenant, limit=100))
        if got != expect:
            raise RuntimeError(f"list_for_tenant({tenant!r}, limit=100) gave {got} rows")

    def once(tenant: str) -> float:
        t = time.perf_counter()
        svc.list_for_tenant(tenant, limit=100)
        return (time.perf_counter() - t) * 1e6

    big_samples: list[float] = []
    small_samples: list[float] = []
    settle()
    for i in range(reps):
        if i % 2 == 0:
            big_samples.append(once("tenant-big"))
            small_samples.append(once("tenant-small"))
        else:
            small_samples.append(once("tenant-small"))
            big_samples.append(once("tenant-big"))
    svc.close()
    settle()
    return ListResult(
        big=big,
        small=small,
        reps=reps,
        big_us=per_op(big_samples),
        small_us=per_op(small_samples),
        build_seconds=build_seconds,
    )


# -- profile: where a keyledger store and retrieve spend their time -----------------------


@dataclass
class ProfileRow:
    where: str  # file:line(function)
    calls: int
    self_us: float  # per operation
    cumulative_us: float  # per operation


@dataclass
class ProfileResult:
    n: int
    wall_us: dict[str, float]  # per operation, under the profiler
    by_self: dict[str, list[ProfileRow]]
    by_cumulative: dict[str, list[ProfileRow]]
    by_layer: dict[str, list[tuple[str, float]]]  # self time summed per layer, per operation


LAYERS = (
    "SQLite commit (WAL append + fsync)",
    "SQLite statements (execute, fetch)",
    "AES-GCM (cryptography)",
    "keyledger Python",
    "eventsourcing Python",
    "pydantic",
    "json encode/decode",
    "other Python (stdlib, builtins)",
)


def _layer(where: str) -> str:
    if "sqlite3.Connection" in where and "commit" in where:
        return LAYERS[0]
    if "sqlite3." in where:
        return LAYERS[1]
    if "cryptography" in where:
        return LAYERS[2]
    for prefix, layer in (
        ("keyledger/", LAYERS[3]),
        ("eventsourcing/", LAYERS[4]),
        ("pydantic", LAYERS[5]),
        ("json/", LAYERS[6]),
    ):
        if where.startswith(prefix):
            return layer
    return LAYERS[7]


def _short(filename: str) -> str:
    """A path short enough for a table: from the package directory on."""
    parts = Path(filename).parts
    for anchor in ("keyledger", "eventsourcing", "cryptography", "pydantic", "sqlite3"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    if "lib" in parts and len(parts) >= 2:
        return "/".join(parts[-2:])
    return filename


def run_profile(
    workdir: Path | None,
    amk: bytes,
    *,
    n: int,
    top: int,
    url: str | None = None,
    tenant: str = "tenant-profile",
    layer: Callable[[str], str] | None = None,
    layer_names: tuple[str, ...] | None = None,
    ops: tuple[str, ...] = ("store", "retrieve"),
) -> ProfileResult:
    """cProfile ``n`` stores (fresh names) and ``n`` retrieves (cycling over 100 names).

    On a SQLite file in ``workdir`` unless ``url`` names another store (then ``layer`` and
    ``layer_names`` name the layers of that store's profile rows). With
    ``ops=("retrieve",)`` only the retrieves are profiled; the names they read are stored
    and read once first, untimed.
    """
    import cProfile
    import pstats

    if url is None:
        assert workdir is not None
        url = sqlite_url(workdir / "profile.db")
    layer_of = layer or _layer
    svc = SecretService.create(url, master_key=amk.hex())
    svc.store_for_tenant(tenant, "warm-up", VALUE, category=CATEGORY)
    svc.retrieve_for_tenant(tenant, "warm-up")
    if "store" not in ops:
        for i in range(min(RETRIEVE_NAMES, n)):
            svc.store_for_tenant(tenant, f"secret-{i}", VALUE, category=CATEGORY)
        for i in range(min(RETRIEVE_NAMES, n)):  # warm: aggregates and data key cached
            svc.retrieve_for_tenant(tenant, f"secret-{i}")
    all_ops: dict[str, Callable[[int], object]] = {
        "store": lambda i: svc.store_for_tenant(tenant, f"secret-{i}", VALUE, category=CATEGORY),
        "retrieve": lambda i: svc.retrieve_for_tenant(tenant, f"secret-{i % RETRIEVE_NAMES}"),
    }
    chosen = {op: all_ops[op] for op in ops}
    wall: dict[str, float] = {}
    by_self: dict[str, list[ProfileRow]] = {}
    by_cum: dict[str, list[ProfileRow]] = {}
    by_layer: dict[str, list[tuple[str, float]]] = {}
    for op, fn in chosen.items():
        settle()
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.enable()
        for i in range(n):
            fn(i)
        profiler.disable()
        wall[op] = (time.perf_counter() - t) / n * 1e6
        stats = pstats.Stats(profiler)
        rows = []
        raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        for (filename, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
            where = f"{_short(filename)}:{line}({func})" if line else func
            rows.append(ProfileRow(where, nc, tt / n * 1e6, ct / n * 1e6))
        by_self[op] = sorted(rows, key=lambda r: -r.self_us)[:top]
        own = [
            r
            for r in rows
            if r.where.startswith(("keyledger/", "eventsourcing/")) and r.calls >= n // 2
        ]
        by_cum[op] = sorted(own, key=lambda r: -r.cumulative_us)[:top]
        layers = dict.fromkeys(layer_names or LAYERS, 0.0)
        for row in rows:
            layers[layer_of(row.where)] += row.self_us
        by_layer[op] = list(layers.items())
    svc.close()
    settle()
    return ProfileResult(
        n=n, wall_us=wall, by_self=by_self, by_cumulative=by_cum, by_layer=by_layer
    )


def fsync_floor_us(workdir: Path, n: int = 300) -> float:
    """One durable append (WAL, synchronous=FULL) on this disk, median of 3 runs, in us."""
    import sqlite3

    db = sqlite3.connect(workdir / "floor.db", isolation_level=None)
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=FULL")
    db.execute("create table e(id integer primary key, state blob)")
    runs = []
    for _ in range(3):
        settle()
        t = time.perf_counter()
        for _ in range(n):
            db.execute("begin")
            db.execute("insert into e(state) values(?)", (os.urandom(64),))
            db.execute("commit")
        runs.append((time.perf_counter() - t) / n * 1e6)
    db.close()
    return statistics.median(runs)
