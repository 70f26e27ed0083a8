"""Audit-investigation benchmarks (issue 5 targets), ratios measured side by side in one run.

    python bench/audit.py [--out docs/benchmarks-audit.md] [--events N] [--pg-events N]
                          [--rounds R] [--skip-postgres] [--pg-url URL] [--profile]

T1  verify_audit() rate vs the rate of merely reading (in pages, ``rows_after``) and decoding
    (``ledger.mapper.to_domain_event``) the same events                   target >= 30%
T2  state_as_of(tenant, position=head) for a tenant of 1,000 secrets vs reading that tenant's
    events once (``tenant_rows``) and decoding each                       target <= 2x
T3  peak memory of exporting N events (``export_audit`` into ``write_jsonl``, a file) vs
    exporting the last N/10 events of the same store, each in a fresh process
                                                                          target <= 1.5x

One stream per backend, built once through the public API by concurrent clients and sealed
once (timed: the seal rate is reported too): a SQLite file (WAL, synchronous=FULL) in a
temporary directory, and a PostgreSQL schema that the run creates and drops (T1 and T2
only; --skip-postgres skips it). Automatic sealing is off while the streams are built
(``audit_seal_every=0``), so the one timed seal covers the whole stream.

T1 and T2 alternate the measured operation and its baseline round by round and report
medians; only ratios from the same run mean anything on these shared machines. With
--profile, or when T1 or T2 misses its target, one verify and one replay run under cProfile
and the report shows where their time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pg_scenarios  # the bench/ helper modules next to this file
import run as common
from keyledger import super_admin
from keyledger.application.export import write_jsonl
from keyledger.application.ledger import Ledger
from keyledger.application.stream import head_position, rows_after, tenant_rows
from keyledger.errors import SecretNotFound
from keyledger.infrastructure.database_url import redact
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.service import SecretService

DEFAULT_EVENTS = 200_000
DEFAULT_PG_EVENTS = 200_000
DEFAULT_ROUNDS = 3
DEFAULT_REPLAY_ROUNDS = 9
EXPORT_SMALL_SHARE = 10  # T3: the small export covers the last events // 10 events
TARGET_VERIFY = 0.30  # verify rate / read+decode rate, at least
TARGET_REPLAY = 2.0  # state_as_of / read+decode of the tenant's events, at most
TARGET_EXPORT = 1.5  # peak memory, big export / small export, at most

VERDICT_NOTE = (
    "Verdict measure: the peak RSS growth, i.e. peak RSS during the export minus RSS just "
    "before it. It counts all the memory the export makes the process hold: Python objects, "
    "but also SQLite's page cache, the driver's buffers and allocator arenas, which "
    "tracemalloc does not see. The tracemalloc peak (Python allocations only, exact to the "
    "byte) is the cross-check. Plain `ru_maxrss` is not used: it is a high-water mark that "
    "cannot be reset, and on Linux a child started by fork/exec inherits its parent's "
    "high-water mark (the parent, holding the benchmark, is larger than an export child), so "
    "its before/after delta in a child can read 0 whatever the export does; it is shown for "
    "completeness."
)

TARGET_TENANT = "tenant-target"
TARGET_SECRETS = 1000
SEED_TARGET = 50  # the target tenant's secrets stored before the main phase
OTHER_TENANTS = 50
OTHER_SECRETS = 20
TARGET_ROTATIONS = 3
# The target's reads: its share of a 200,000-event stream of 51 equally read tenants, kept
# whatever the stream size, so that T2 replays the same tenant on every backend.
TARGET_READS = 3900
THREADS = 32  # concurrent clients building the stream (reads are group-committed)
VALUE = "sk_live_" + "x" * 40
VALUE_UPDATED = "sk_live_" + "y" * 40

Op = tuple[str, str, int]  # (store | update | rotate | read, tenant, name index; -1: pick)


def log(message: str) -> None:
    print(f"[bench audit] {message}", file=sys.stderr, flush=True)


def settle() -> None:
    gc.collect()


# -- building the stream --------------------------------------------------------------------


def name_of(index: int) -> str:
    return f"secret-{index:04d}"


def plan(events: int, seed: int = 5) -> tuple[list[Op], list[Op]]:
    """The seed phase (every other tenant's secrets, the target's first ones) and the main
    phase: the target's remaining stores, updates and rotations spread evenly through a
    volume of reads over all tenants, TARGET_READS of them the target's (at most half)."""
    rng = random.Random(seed)
    others = [f"tenant-{k:02d}" for k in range(OTHER_TENANTS)]
    first: list[Op] = [("store", t, i) for i in range(OTHER_SECRETS) for t in others]
    first += [("store", TARGET_TENANT, i) for i in range(SEED_TARGET)]
    special: list[Op] = []
    for i in range(SEED_TARGET, TARGET_SECRETS):
        special.append(("store", TARGET_TENANT, i))
        if i % 10 == 0:  # an update of a name stored well before
            special.append(("update", TARGET_TENANT, rng.randrange(max(i - 2 * THREADS, 1))))
        if i % 5 == 0:
            special.append(("update", rng.choice(others), rng.randrange(OTHER_SECRETS)))
    for k in range(TARGET_ROTATIONS, 0, -1):
        special.insert(len(special) * k // (TARGET_ROTATIONS + 1), ("rotate", TARGET_TENANT, 0))
    # One event per operation, plus each tenant's keyring creation.
    main_len = max(events - len(first) - (OTHER_TENANTS + 1), len(special))
    at = {j * main_len // len(special): op for j, op in enumerate(special)}
    reads = main_len - len(special)
    target_share = min(TARGET_READS, reads // 2) / reads
    main: list[Op] = []
    for k in range(main_len):
        op = at.get(k)
        if op is None:
            tenant = TARGET_TENANT if rng.random() < target_share else rng.choice(others)
            op = ("read", tenant, -1)
        main.append(op)
    return first, main


@dataclass
class Build:
    seconds: float
    ops: Counter[str]
    events: int  # rows in the events table once built (before the seal)
    target_events: int


def run_ops(
    svc: SecretService, ops: list[Op], known: dict[str, int], ops_done: Counter[str]
) -> None:
    """Run ``ops`` with THREADS clients sharing ``svc``, in plan order as far as threads go."""
    lock = threading.Lock()
    source = iter(ops)
    errors: list[BaseException] = []
    step = max(len(ops) // 5, 1)
    started = time.perf_counter()
    done = [0]

    def next_op() -> Op | None:
        with lock:
            if errors:
                return None
            return next(source, None)

    def work(k: int) -> None:
        rng = random.Random(1000 + k)
        local: Counter[str] = Counter()
        try:
            while (op := next_op()) is not None:
                kind, tenant, index = op
                if kind == "read":
                    if tenant == TARGET_TENANT:  # only names stored a while ago
                        index = rng.randrange(max(known[tenant] - THREADS, 1))
                    else:
                        index = rng.randrange(OTHER_SECRETS)
                    try:
                        svc.retrieve_for_tenant(tenant, name_of(index))
                    except SecretNotFound:
                        local["read of a name not stored yet (a recorded failure)"] += 1
                    else:
                        local["read"] += 1
                elif kind == "rotate":
                    svc.rotate_key_for_tenant(tenant)
                    local["rotate"] += 1
                else:
                    value = VALUE if kind == "store" else VALUE_UPDATED
                    svc.store_for_tenant(tenant, name_of(index), value, category="audit-bench")
                    local[kind] += 1
                    if kind == "store" and tenant == TARGET_TENANT:
                        with lock:
                            known[tenant] += 1
                with lock:
                    done[0] += 1
                    n = done[0]
                if n % step == 0:
                    rate = n / (time.perf_counter() - started)
                    log(f"  {n:,}/{len(ops):,} operations ({rate:,.0f}/s)")
        except BaseException as error:
            with lock:
                errors.append(error)
        with lock:
            ops_done.update(local)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError(f"building the stream failed: {errors[0]!r}") from errors[0]


def count_events(ledger: Ledger) -> int:
    with ledger.reading() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {ledger.store.events_table_name}")
        return int(cur.fetchone()[0])


def build_stream(svc: SecretService, events: int) -> Build:
    first, main = plan(events)
    known = {TARGET_TENANT: 0}
    ops: Counter[str] = Counter()
    t0 = time.perf_counter()
    log(f"seed: {len(first):,} stores by {THREADS} threads")
    run_ops(svc, first, known, ops)
    log(f"main: {len(main):,} operations by {THREADS} threads")
    run_ops(svc, main, known, ops)
    seconds = time.perf_counter() - t0
    ledger = svc._ledger
    total = count_events(ledger)
    target = len(tenant_rows(ledger, TARGET_TENANT))
    log(f"built {total:,} events in {seconds:.1f} s ({total / seconds:,.0f} events/s)")
    return Build(seconds=seconds, ops=ops, events=total, target_events=target)


# -- T1: seal and verify vs read + decode -------------------------------------------------


def read_and_decode(ledger: Ledger) -> int:
    """Every row in pages (``rows_after``, the reader verify uses), each decoded."""
    mapper = ledger.mapper
    count = 0
    for page in rows_after(ledger, 0):
        for row in page:
            mapper.to_domain_event(row.stored())
        count += len(page)
    return count


def read_only(ledger: Ledger) -> int:
    return sum(len(page) for page in rows_after(ledger, 0))


@dataclass
class Seal:
    events: int
    checkpoints: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass
class Verify:
    rounds: list[dict[str, float]] = field(default_factory=list)  # what -> events/s
    checked: int = 0
    sealed: int = 0
    unsealed: int = 0
    checkpoints: int = 0

    def median(self, what: str) -> float:
        return statistics.median(r[what] for r in self.rounds)


def seal_stream(svc: SecretService) -> Seal:
    settle()
    t0 = time.perf_counter()
    result = svc.seal_audit()
    seconds = time.perf_counter() - t0
    if result.stopped_at is not None:
        raise RuntimeError(f"the seal stopped at {result.stopped_at}: {result.stopped_reason}")
    seal = Seal(result.sealed_events, len(result.checkpoints), seconds)
    log(f"sealed {seal.events:,} events in {seconds:.1f} s ({seal.rate:,.0f} events/s)")
    return seal


def measure_verify(svc: SecretService, rounds: int) -> Verify:
    ledger = svc._ledger
    out = Verify()

    def verify() -> float:
        t0 = time.perf_counter()
        report = svc.verify_audit()
        seconds = time.perf_counter() - t0
        if not report.intact:
            raise RuntimeError(f"verify found tampering: {report.findings[:3]}")
        out.checked, out.sealed = report.checked_events, report.sealed_events
        out.unsealed, out.checkpoints = report.unsealed_events, report.checkpoints
        return report.checked_events / seconds

    def timed(count: Callable[[Ledger], int]) -> Callable[[], float]:
        def measure() -> float:
            t0 = time.perf_counter()
            n = count(ledger)
            return n / (time.perf_counter() - t0)

        return measure

    steps = {"verify": verify, "decode": timed(read_and_decode), "read": timed(read_only)}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        result: dict[str, float] = {}
        for what in order:
            settle()
            result[what] = steps[what]()
        out.rounds.append(result)
        log(
            f"T1 round {r + 1}: verify {result['verify']:,.0f}, read+decode "
            f"{result['decode']:,.0f}, read {result['read']:,.0f} events/s"
        )
    return out


# -- T2: state_as_of vs reading the tenant's events -----------------------------------------


@dataclass
class Replay:
    head: int
    tenant_events: int
    secrets: int
    applied: int
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (replay, baseline) s

    @property
    def replay_ms(self) -> float:
        return statistics.median(r[0] for r in self.rounds) * 1e3

    @property
    def baseline_ms(self) -> float:
        return statistics.median(r[1] for r in self.rounds) * 1e3


def decode_tenant(ledger: Ledger) -> int:
    mapper = ledger.mapper
    rows = tenant_rows(ledger, TARGET_TENANT)
    for row in rows:
        mapper.to_domain_event(row.stored())
    return len(rows)


def measure_replay(svc: SecretService, rounds: int) -> Replay:
    ledger = svc._ledger
    head = head_position(ledger)
    state = svc.state_as_of(TARGET_TENANT, position=head)  # warm-up, and the checks
    n = decode_tenant(ledger)
    if len(state.secrets) != TARGET_SECRETS:
        raise RuntimeError(f"the replayed tenant has {len(state.secrets)} secrets")
    out = Replay(head, n, len(state.secrets), state.events_applied)

    def replay() -> float:
        t0 = time.perf_counter()
        svc.state_as_of(TARGET_TENANT, position=head)
        return time.perf_counter() - t0

    def baseline() -> float:
        t0 = time.perf_counter()
        decode_tenant(ledger)
        return time.perf_counter() - t0

    for r in range(rounds):
        pair: dict[str, float] = {}
        for what, step in (("replay", replay), ("baseline", baseline))[:: 1 if r % 2 == 0 else -1]:
            settle()
            pair[what] = step()
        out.rounds.append((pair["replay"], pair["baseline"]))
    log(
        f"T2: state_as_of {out.replay_ms:,.1f} ms, read+decode {out.baseline_ms:,.1f} ms "
        f"({n:,} tenant events)"
    )
    return out


# -- T3: export memory in fresh processes -------------------------------------------------


@dataclass
class ExportRun:
    label: str
    after: int
    traced: bool
    records: int
    stored: int  # stored events after ``after``
    seconds: float
    rss_before_kib: int  # VmRSS just before the export
    hwm_kib: int  # VmHWM at the end (reset to VmRSS just before the export when hwm_reset)
    hwm_reset: bool
    maxrss_before_kib: int  # ru_maxrss (RUSAGE_SELF) just before the export
    maxrss_after_kib: int
    traced_peak: int | None  # bytes

    @property
    def rss_growth_kib(self) -> int:
        """Peak RSS during the export over the RSS just before it."""
        return self.hwm_kib - self.rss_before_kib


def _proc_status_kib(field_name: str) -> int:
    """A ``Vm...`` line of /proc/self/status, in KiB (-1 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def export_child(spec_json: str) -> int:
    """In a fresh process: open the store, export after ``after`` into ``out``, and print
    what it cost as one JSON line (``traced``: under tracemalloc, started just before)."""
    spec = json.loads(spec_json)
    svc = SecretService.create(spec["url"])
    gc.collect()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    if spec["traced"]:
        tracemalloc.start()
    t0 = time.perf_counter()
    with open(spec["out"], "w", encoding="utf-8") as out, super_admin():  # every tenant
        records = write_jsonl(svc.export_audit(after_position=spec["after"]), out)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if spec["traced"] else None
    tracemalloc.stop()
    hwm = _proc_status_kib("VmHWM")
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    svc.close()
    result = {
        "records": records,
        "seconds": seconds,
        "rss_before_kib": rss_before,
        "hwm_kib": hwm,
        "hwm_reset": reset,
        "maxrss_before_kib": maxrss_before,
        "maxrss_after_kib": maxrss_after,
        "traced_peak": peak,
    }
    print(json.dumps(result))
    return 0


def run_export_child(
    url: str, amk: bytes, after: int, out: Path, traced: bool, label: str, stored: int
) -> ExportRun:
    env = dict(os.environ, KEYLEDGER_MASTER_KEY=amk.hex(), KEYLEDGER_AUDIT_SEAL_EVERY="0")
    spec = json.dumps({"url": url, "after": after, "out": str(out), "traced": traced})
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--export-child", spec],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the export child failed:\n{done.stderr}")
    out.unlink(missing_ok=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    run = ExportRun(label=label, after=after, traced=traced, stored=stored, **result)
    peak = run.traced_peak
    traced_note = "" if peak is None else f", tracemalloc peak {peak / 2**20:,.1f} MiB"
    log(
        f"T3 {label}{' (traced)' if traced else ''}: {run.records:,} records in "
        f"{run.seconds:.1f} s, RSS {run.rss_before_kib / 1024:,.1f} MiB before, peak "
        f"{run.hwm_kib / 1024:,.1f} MiB; ru_maxrss {run.maxrss_before_kib / 1024:,.1f} -> "
        f"{run.maxrss_after_kib / 1024:,.1f} MiB{traced_note}"
    )
    return run


def measure_export(url: str, amk: bytes, head: int, events: int, workdir: Path) -> list[ExportRun]:
    """Big: every event (after position 0). Small: the last ``events // 10`` positions of
    the same store. Untraced children first (peak RSS), then traced ones (tracemalloc)."""
    small = events // EXPORT_SMALL_SHARE
    sizes = [("small", max(head - small, 0), small), ("big", 0, head)]
    runs = []
    for traced in (False, True):
        for label, after, stored in sizes:
            settle()
            runs.append(
                run_export_child(url, amk, after, workdir / "export.jsonl", traced, label, stored)
            )
    return runs


def export_ratios(runs: list[ExportRun]) -> tuple[float, float]:
    """(peak RSS growth ratio, tracemalloc peak ratio), big / small."""
    by = {(r.label, r.traced): r for r in runs}
    rss = by["big", False].rss_growth_kib / max(by["small", False].rss_growth_kib, 1)
    big_peak, small_peak = by["big", True].traced_peak, by["small", True].traced_peak
    assert big_peak is not None
    assert small_peak is not None
    return rss, big_peak / small_peak


# -- profiles -----------------------------------------------------------------------------


@dataclass
class Profile:
    title: str
    wall: float
    rows: list[tuple[str, int, float, float]]  # where, calls, self s, cumulative s


def _where(key: tuple[str, int, str]) -> str:
    path, line, func = key
    for marker in ("site-packages/", "src/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({func})" if line else func


def profile(title: str, call: Callable[[], object], top: int = 14) -> Profile:
    settle()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(call)
    wall = time.perf_counter() - t0
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(
        ((_where(key), v[1], v[2], v[3]) for key, v in stats.items()),
        key=lambda row: row[2],
        reverse=True,
    )
    return Profile(title, wall, rows[:top])


# -- one backend --------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    storage: str
    requested: int
    build: Build
    seal: Seal
    verify: Verify
    replay: Replay
    exports: list[ExportRun] | None = None
    profiles: list[Profile] = field(default_factory=list)

    @property
    def verify_ratio(self) -> float:
        """The median of the per-round ratios (each round's two sides ran back to back)."""
        return statistics.median(r["verify"] / r["decode"] for r in self.verify.rounds)

    @property
    def replay_ratio(self) -> float:
        """The median of the per-round ratios (each round's two sides ran back to back)."""
        return statistics.median(a / c for a, c in self.replay.rounds)


def run_backend(
    name: str,
    storage: str,
    url: str,
    amk: bytes,
    events: int,
    args: argparse.Namespace,
    export_dir: Path | None,
) -> Backend:
    log(f"{name}: building a stream of ~{events:,} events")
    settings = KeyledgerSettings(audit_seal_every=0)
    with SecretService.create(url, master_key=amk.hex(), settings=settings) as svc:
        build = build_stream(svc, events)
        seal = seal_stream(svc)
        verify = measure_verify(svc, args.rounds)
        replay = measure_replay(svc, args.replay_rounds)
        result = Backend(name, storage, events, build, seal, verify, replay)
        if args.profile or result.verify_ratio < TARGET_VERIFY:
            log(f"{name}: profiling one verify_audit()")
            result.profiles.append(profile("verify_audit()", svc.verify_audit))
        if args.profile or result.replay_ratio > TARGET_REPLAY:
            log(f"{name}: profiling one state_as_of()")
            result.profiles.append(
                profile(
                    f"state_as_of({TARGET_TENANT!r}, position=head)",
                    lambda: svc.state_as_of(TARGET_TENANT, position=replay.head),
                )
            )
        head = head_position(svc._ledger)
    if export_dir is not None:
        result.exports = measure_export(url, amk, head, events, export_dir)
    return result


# -- the report ---------------------------------------------------------------------------


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def summary_rows(backends: list[Backend]) -> list[list[str]]:
    rows = []
    for b in backends:
        v, r = b.verify, b.replay
        rows.append(
            [
                f"T1 {b.name}: verify_audit() / read+decode (events/s)",
                common.fmt_ops(v.median("verify")),
                common.fmt_ops(v.median("decode")),
                f"{b.verify_ratio:.0%}",
                f">= {TARGET_VERIFY:.0%}",
                common.verdict(b.verify_ratio, TARGET_VERIFY, True),
            ]
        )
        rows.append(
            [
                f"T2 {b.name}: state_as_of(head) / read+decode the tenant's {r.tenant_events:,} "
                f"events (ms), stream of {b.build.events:,}",
                f"{r.replay_ms:,.1f}",
                f"{r.baseline_ms:,.1f}",
                f"{b.replay_ratio:.2f}x",
                f"<= {TARGET_REPLAY:.0f}x",
                common.verdict(b.replay_ratio, TARGET_REPLAY, False),
            ]
        )
    for b in backends:
        if b.exports is None:
            continue
        rss_ratio, traced_ratio = export_ratios(b.exports)
        by = {(x.label, x.traced): x for x in b.exports}
        rows.append(
            [
                f"T3 {b.name}: export of {by['big', False].records:,} / "
                f"{by['small', False].records:,} records, peak RSS growth during the export",
                fmt_mib(by["big", False].rss_growth_kib),
                fmt_mib(by["small", False].rss_growth_kib),
                f"{rss_ratio:.2f}x",
                f"<= {TARGET_EXPORT}x",
                common.verdict(rss_ratio, TARGET_EXPORT, False),
            ]
        )
        rows.append(
            [
                f"T3 {b.name}: the same, tracemalloc peak (cross-check, not the verdict)",
                fmt_mib((by["big", True].traced_peak or 0) / 1024),
                fmt_mib((by["small", True].traced_peak or 0) / 1024),
                f"{traced_ratio:.2f}x",
                f"<= {TARGET_EXPORT}x",
                f"({common.verdict(traced_ratio, TARGET_EXPORT, False)})",
            ]
        )
    return rows


def render(
    backends: list[Backend],
    *,
    started: datetime,
    elapsed: float,
    machine: list[tuple[str, str]],
    server: list[tuple[str, str]] | None,
    pg_note: str | None,
    args: argparse.Namespace,
    overrides: list[str],
) -> str:
    lines = ["# Audit investigation benchmarks (issue 5)", ""]
    lines.append(f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {elapsed:.0f} s)")
    lines.append(
        f"- Command: `{common.command_line()}` (`make bench` runs it with the default sizes: "
        f"{DEFAULT_EVENTS:,} events on SQLite, {DEFAULT_PG_EVENTS:,} on PostgreSQL)"
    )
    default = (
        args.events == DEFAULT_EVENTS
        and args.pg_events == DEFAULT_PG_EVENTS
        and args.rounds == DEFAULT_ROUNDS
        and args.replay_rounds == DEFAULT_REPLAY_ROUNDS
    )
    lines.append(
        "- Sizes: the defaults"
        if default
        else "- Sizes: not the defaults — a smoke run: the numbers are not a measurement "
        "against the targets (T3 in particular needs pages of 1,000 events to repeat)"
    )
    lines.append(
        "- Every ratio compares two things measured side by side in this run; T1 and T2 "
        "alternate the two sides round by round (even rounds the measured operation first, "
        f"odd rounds the baseline first) and report medians; each verdict is the median of "
        "the per-round ratios (the two sides of a round run back to back, so a change in "
        f"the machine's load between rounds cancels out): {args.rounds} rounds for T1, "
        f"{args.replay_rounds} for T2, garbage collected before each timed step. No timing "
        "is asserted in the tests."
    )
    lines.append(
        "- Storage: "
        + "; ".join(f"{b.name}: {b.storage}" for b in backends)
        + (f"; PostgreSQL: {pg_note}" if pg_note else "")
    )
    lines.append(
        "- Automatic sealing was off while the streams were built (`audit_seal_every=0` in "
        "the settings, i.e. KEYLEDGER_AUDIT_SEAL_EVERY=0), so generation times hold no seal "
        "work and one timed `seal_audit()` seals each whole stream before T1."
    )
    if overrides:
        lines.append(f"- KEYLEDGER_* environment variables set: {', '.join(overrides)}")
    lines += ["", "## Machine", ""]
    rows = machine + (server or [])
    lines += common.table(["", ""], [[k, v] for k, v in rows], numeric=False)

    lines += ["", "## Summary", ""]
    lines.append(
        "T1 and T2: measured and baseline are the medians over the rounds, the ratio is the "
        "median of the per-round ratios. T3: one export child per size and measure."
    )
    lines.append("")
    lines += common.table(
        ["target", "measured", "baseline", "ratio", "target", "result"], summary_rows(backends)
    )

    lines += ["", "## The streams", ""]
    lines.append(
        f"Built once per backend through the public API by {THREADS} threads sharing one "
        "`SecretService` (concurrent retrieves share write transactions: group commit). "
        f"Seed phase: {OTHER_TENANTS} tenants of {OTHER_SECRETS} secrets each and the first "
        f"{SEED_TARGET} of the target tenant's {TARGET_SECRETS:,}. Main phase: the target's "
        f"other stores, updates of its secrets (every 10th store) and of the other tenants' "
        f"(every 5th), and {TARGET_ROTATIONS} rotations of its key, spread evenly through "
        f"retrieves of every tenant ({TARGET_READS:,} of them the target's, at most half: "
        f"its share of a {DEFAULT_EVENTS:,}-event stream of {OTHER_TENANTS + 1} equally read "
        "tenants, kept on every backend so that T2 replays the same tenant), so the "
        "target's events are scattered over the whole stream. Retrieves of the target pick "
        "among names stored a while before; one that still reaches a name whose store has "
        "not committed yet is refused and recorded as a failure (an audited event as well)."
    )
    lines.append("")
    lines += common.table(
        ["", *(b.name for b in backends)],
        [
            ["events requested", *(f"{b.requested:,}" for b in backends)],
            ["events stored (before the seal)", *(f"{b.build.events:,}" for b in backends)],
            [
                "operations",
                *(
                    ", ".join(f"{k} {v:,}" for k, v in sorted(b.build.ops.items()))
                    for b in backends
                ),
            ],
            ["build time", *(f"{b.build.seconds:,.1f} s" for b in backends)],
            [
                "build rate",
                *(f"{b.build.events / b.build.seconds:,.0f} events/s" for b in backends),
            ],
            ["target tenant's events", *(f"{b.build.target_events:,}" for b in backends)],
        ],
    )

    lines += ["", "## Seal and T1: verify_audit() vs reading and decoding", ""]
    lines.append(
        "Seal: one `seal_audit()` over the whole stream (checkpoints of 2,000 events; each "
        "event's own tag checked, then tagged with its position), timed once. Verify: "
        "`verify_audit()` over the sealed stream (the checkpoint chain, then every event "
        "re-tagged and compared with its checkpoint; the checkpoints appended by the seal form "
        "the unsealed tail and are checked by their own tags). Read+decode: every row of the "
        "events table in pages of 1,000 through `keyledger.application.stream.rows_after` "
        "(one short read transaction per page, the reader verify and export use) and "
        "`ledger.mapper.to_domain_event(row.stored())` on each. Read: the same pages, not "
        "decoded (for information: what the HMAC work of verify adds to reading)."
    )
    for b in backends:
        v = b.verify
        lines += ["", f"### {b.name}", ""]
        lines.append(
            f"Seal: {b.seal.events:,} events in {b.seal.seconds:.1f} s = "
            f"{common.fmt_ops(b.seal.rate)} events/s, {b.seal.checkpoints} checkpoints; "
            f"{b.seal.rate / v.median('decode'):.0%} of the read+decode rate. Verify checked "
            f"{v.checked:,} events ({v.sealed:,} sealed, {v.unsealed:,} in the tail) under "
            f"{v.checkpoints} checkpoints and found the stream intact."
        )
        lines.append("")
        lines += common.table(
            ["round", "verify events/s", "read+decode events/s", "read events/s", "ratio"],
            [
                [
                    str(i + 1),
                    common.fmt_ops(r["verify"]),
                    common.fmt_ops(r["decode"]),
                    common.fmt_ops(r["read"]),
                    f"{r['verify'] / r['decode']:.0%}",
                ]
                for i, r in enumerate(v.rounds)
            ]
            + [
                [
                    "median (ratio: median of the rounds' ratios)",
                    common.fmt_ops(v.median("verify")),
                    common.fmt_ops(v.median("decode")),
                    common.fmt_ops(v.median("read")),
                    f"{b.verify_ratio:.0%} (target >= {TARGET_VERIFY:.0%}: "
                    f"{common.verdict(b.verify_ratio, TARGET_VERIFY, True)})",
                ]
            ],
        )

    lines += ["", "## T2: state_as_of at the head vs reading the tenant's events once", ""]
    lines.append(
        f"`service.state_as_of({TARGET_TENANT!r}, position=head)` (head: the stream's newest "
        "position, after the seal) replays the tenant's events from the stream alone. "
        f"Baseline: `tenant_rows(ledger, {TARGET_TENANT!r})` (one range scan of the events "
        "table's primary key) and `ledger.mapper.to_domain_event(row.stored())` on each row. "
        "One untimed call of each first."
    )
    for b in backends:
        r = b.replay
        lines += ["", f"### {b.name}", ""]
        lines.append(
            f"Stream of {b.build.events + b.seal.checkpoints:,} events, newest position "
            f"{r.head:,}"
            + (
                " (a sequence: appends that rolled back, such as lost races, leave gaps)"
                if r.head != b.build.events + b.seal.checkpoints
                else ""
            )
            + "; "
            f"the tenant: {r.tenant_events:,} events, {r.secrets:,} live secrets replayed, "
            f"{r.applied:,} events applied."
        )
        lines.append("")
        lines += common.table(
            ["round", "state_as_of", "read+decode", "ratio"],
            [
                [str(i + 1), f"{a * 1e3:,.1f} ms", f"{c * 1e3:,.1f} ms", f"{a / c:.2f}x"]
                for i, (a, c) in enumerate(r.rounds)
            ]
            + [
                [
                    "median (ratio: median of the rounds' ratios)",
                    f"{r.replay_ms:,.1f} ms",
                    f"{r.baseline_ms:,.1f} ms",
                    f"{b.replay_ratio:.2f}x (target <= {TARGET_REPLAY:.0f}x: "
                    f"{common.verdict(b.replay_ratio, TARGET_REPLAY, False)})",
                ]
            ],
        )

    for b in backends:
        if b.exports is None:
            continue
        rss_ratio, traced_ratio = export_ratios(b.exports)
        lines += ["", f"## T3: export memory ({b.name})", ""]
        lines.append(
            "Each export runs in a fresh process (`python bench/audit.py --export-child ...`): "
            "it opens the store, then, inside `super_admin()` (exporting every tenant), "
            "writes `service.export_audit(after_position=...)` "
            "through `write_jsonl` into a file. Big: the whole stream (after position 0). "
            f"Small: the same store after position head - {b.requested // EXPORT_SMALL_SHARE:,}"
            ", so the same code reads the same kind of rows, a tenth as many. First one "
            "untraced child per size, then one per size with `tracemalloc` started just "
            "before the export (its peak: the Python allocations of the export alone). The "
            "untraced children report their RSS just before the export and their peak RSS "
            "during it (Linux `VmHWM`, reset to the current RSS just before the export by "
            "writing 5 to `/proc/self/clear_refs`), and `ru_maxrss` before and after."
        )
        lines.append("")
        lines.append(VERDICT_NOTE)
        lines.append("")
        lines += common.table(
            [
                "export",
                "after position",
                "records written",
                "seconds",
                "records/s",
                "RSS before",
                "peak RSS during",
                "growth",
                "ru_maxrss before / after",
                "tracemalloc peak",
            ],
            [
                [
                    f"{x.label}{' (traced)' if x.traced else ''}",
                    f"{x.after:,}",
                    f"{x.records:,}",
                    f"{x.seconds:,.1f}",
                    common.fmt_ops(x.records / x.seconds),
                    fmt_mib(x.rss_before_kib),
                    fmt_mib(x.hwm_kib) + ("" if x.hwm_reset else " (not reset)"),
                    fmt_mib(x.rss_growth_kib),
                    f"{fmt_mib(x.maxrss_before_kib)} / {fmt_mib(x.maxrss_after_kib)}",
                    "" if x.traced_peak is None else fmt_mib(x.traced_peak / 1024),
                ]
                for x in b.exports
            ],
        )
        lines.append("")
        lines.append(
            f"Ratios big / small: tracemalloc peak {traced_ratio:.2f}x "
            f"({common.verdict(traced_ratio, TARGET_EXPORT, False)}), peak RSS growth "
            f"{rss_ratio:.2f}x ({common.verdict(rss_ratio, TARGET_EXPORT, False)}); target "
            f"<= {TARGET_EXPORT}x. The traced children run slower: tracemalloc hooks every "
            "allocation."
        )
    if not any(b.exports is not None for b in backends):
        lines += ["", "## T3: export memory", "", "Not run (SQLite was not run)."]

    profiled = [b for b in backends if b.profiles]
    if profiled:
        lines += ["", "## Where the time goes (cProfile)", ""]
        lines.append(
            "One call each under cProfile (which slows Python code, not the database); "
            "functions by self time."
        )
        for b in profiled:
            for p in b.profiles:
                lines += ["", f"### {b.name}: {p.title}, {p.wall:.2f} s under the profiler", ""]
                lines += common.table(
                    ["function", "calls", "self", "cumulative"],
                    [
                        [f"`{where}`", f"{calls:,}", f"{own:.3f} s", f"{cum:.3f} s"]
                        for where, calls, own, cum in p.rows
                    ],
                )
    lines.append("")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks-audit.md", help="markdown report path")
    parser.add_argument(
        "--events", type=int, default=DEFAULT_EVENTS, help="SQLite stream size (%(default)s)"
    )
    parser.add_argument(
        "--pg-events",
        type=int,
        default=DEFAULT_PG_EVENTS,
        help="PostgreSQL stream size (%(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="T1 rounds (%(default)s)"
    )
    parser.add_argument(
        "--replay-rounds", type=int, default=DEFAULT_REPLAY_ROUNDS, help="T2 rounds (%(default)s)"
    )
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only (T1, T2)")
    parser.add_argument(
        "--profile", action="store_true", help="profile verify and state_as_of in any case"
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("KEYLEDGER_BENCH_POSTGRES_URL", pg_scenarios.DEFAULT_URL),
        help="PostgreSQL server and database, without query options (default: "
        "KEYLEDGER_BENCH_POSTGRES_URL or %(default)s)",
    )
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    minimum = TARGET_SECRETS * 3
    if args.events < minimum or args.pg_events < minimum:
        parser.error(f"--events and --pg-events must be at least {minimum:,}")
    if args.rounds < 1 or args.replay_rounds < 1:
        parser.error("--rounds and --replay-rounds must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the PostgreSQL schema of the run is dropped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_child:
        return export_child(args.export_child)
    common.start_fingerprint()
    common.git_revision()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = datetime.now(UTC)
    t_start = time.perf_counter()
    machine = common.machine_info()
    overrides = sorted(
        k for k in os.environ if k.startswith("KEYLEDGER_") and k != "KEYLEDGER_BENCH_POSTGRES_URL"
    )
    amk = os.urandom(32)
    backends: list[Backend] = []
    server: list[tuple[str, str]] | None = None
    pg_note: str | None = None

    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory(prefix="keyledger-bench-audit-") as tmp:
            path = Path(tmp) / "audit.db"
            storage = (
                f"one file in a temporary directory ({tmp}), WAL, synchronous=FULL, "
                f"{args.events:,} events requested"
            )
            url = "sqlite:///" + str(path)
            backends.append(run_backend("SQLite", storage, url, amk, args.events, args, Path(tmp)))

    if args.skip_postgres:
        pg_note = "not run (--skip-postgres)"
    else:
        problem = pg_scenarios.check_base_url(args.pg_url) or pg_scenarios.reachable(args.pg_url)
        if problem is not None:
            pg_note = f"not run: {redact(args.pg_url)}: {problem}"
            log(f"PostgreSQL skipped: {problem}")
        else:
            server = pg_scenarios.server_info(args.pg_url)
            with pg_scenarios.BenchSchemas(args.pg_url, log) as schemas:
                schema = schemas.new("kl_bench_audit")
                storage = (
                    f"{server[0][1]}, schema `{schema}` created for the run and dropped at its "
                    f"end, `?schema=...&{pg_scenarios.POOL_OPTIONS}`, {args.pg_events:,} "
                    "events requested"
                    + (
                        f" (fewer than SQLite's {args.events:,}: building a stream through "
                        "the API is slower on PostgreSQL here, see the build rates below, and "
                        "the whole benchmark is kept to about six minutes; the target tenant "
                        "is the same on both: 1,000 secrets, the same operations)"
                        if args.pg_events < args.events and not args.skip_sqlite
                        else ""
                    )
                )
                url = schemas.keyledger_url(schema)
                backends.append(
                    run_backend("PostgreSQL", storage, url, amk, args.pg_events, args, None)
                )
    machine.insert(5, ("load average at end", common.load_average()))
    machine += common.src_changed_row()
    elapsed = time.perf_counter() - t_start
    report = render(
        backends,
        started=started,
        elapsed=elapsed,
        machine=machine,
        server=server,
        pg_note=pg_note,
        args=args,
        overrides=overrides,
    )
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    log(f"report written to {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
