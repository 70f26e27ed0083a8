"""keyledger benchmarks against the CRUD peer, in one run: SQLite files, then PostgreSQL.

    python bench/run.py [--out docs/benchmarks.md] [--quick] [-n N] [--rounds R] [--no-profile]
                        [--postgres | --sqlite-only] [--pg-url URL]

SQLite scenarios (see bench/scenarios.py):
  A  store, one client: N stores of distinct names, keyledger vs the peer, fresh databases
  B  retrieve, one client: N retrieves cycling over 100 stored names, keyledger vs the peer
  C  retrieve cost after 10,000 reads and 100 updates of a secret vs a fresh secret
  D  list_for_tenant(limit=100) over a tenant of 10,000 secrets vs one of 100

PostgreSQL scenarios (see bench/pg_scenarios.py), each side in a schema of its own that the
run creates and drops:
  P1 store, one client; P2 retrieve, one client
  P3 retrieve with 8 clients: (a) 8 threads, (b) 4 processes of 2 threads
  P4 projection rebuild rate vs the rate of merely reading and decoding the same events
  and where a keyledger retrieve spends its time at 1 and at 8 clients.

By default both run, PostgreSQL only if the server (--pg-url, else
KEYLEDGER_BENCH_POSTGRES_URL, else postgresql://postgres@127.0.0.1:5432/test) answers;
--postgres runs (and requires) PostgreSQL only, --sqlite-only skips it. A section that is
not run is kept from the existing report, marked as such.

A/B and P1-P3 run in alternating rounds (keyledger first, then the peer first, ...) and
report medians; the machines here are shared and noisy, so only ratios measured in the
same run mean anything. On SQLite both sides use files in WAL mode with synchronous=FULL.

The peer is ../shared/bench/crud_baseline.py, or the directory in KEYLEDGER_PEER_DIR.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import os
import platform
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pg_scenarios  # the bench/ helper modules next to this file
import scenarios
from keyledger.infrastructure.database_url import redact

SCALES: dict[str, dict[str, int]] = {
    "default": {
        "n": 2000,
        "rounds": 5,
        "history_reads": 10_000,
        "history_updates": 100,
        "history_batches": 15,
        "history_batch_size": 50,
        "cold_reps": 7,
        "list_big": 10_000,
        "list_small": 100,
        "list_reps": 31,
        "profile_n": 500,
        "pg_n": 1000,
        "pg_rounds": 5,
        "pg_concurrent": 2000,
        "rebuild_events": 20_000,
        "rebuild_rounds": 3,
        "split_n": 2000,
        "pg_profile_n": 500,
    },
    "quick": {
        "n": 200,
        "rounds": 3,
        "history_reads": 1_000,
        "history_updates": 10,
        "history_batches": 5,
        "history_batch_size": 20,
        "cold_reps": 3,
        "list_big": 1_000,
        "list_small": 100,
        "list_reps": 11,
        "profile_n": 100,
        "pg_n": 150,
        "pg_rounds": 3,
        "pg_concurrent": 400,
        "rebuild_events": 2000,
        "rebuild_rounds": 2,
        "split_n": 400,
        "pg_profile_n": 100,
    },
}

TARGET_THROUGHPUT = 1.0  # keyledger / peer, at least
TARGET_HISTORY = 1.2  # history / fresh, at most
TARGET_LIST = 2.0  # big tenant / small tenant, at most
TARGET_PG_ONE = 1.0  # keyledger / peer, one client, at least
TARGET_PG_CONCURRENT = 2.0  # keyledger / peer, 8 clients, at least
TARGET_REBUILD = 0.2  # rebuild rate / read-and-decode rate, at least
POSTGRES_MARKER = "<!-- bench: PostgreSQL section (bench/run.py replaces from here on) -->"
KEPT_NOTE = "> Kept from an earlier run:"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- the peer -----------------------------------------------------------------------------


def load_peer() -> tuple[Any, Path]:
    """``CrudSecrets`` from KEYLEDGER_PEER_DIR or <repo>/../shared/bench; exits if absent."""
    configured = os.environ.get("KEYLEDGER_PEER_DIR")
    peer_dir = Path(configured) if configured else REPO.parent / "shared" / "bench"
    peer_file = peer_dir / "crud_baseline.py"
    if not peer_file.is_file():
        where = "KEYLEDGER_PEER_DIR" if configured else "the default location"
        sys.exit(
            f"bench: the CRUD peer was not found: {peer_file} does not exist ({where}).\n"
            "Set KEYLEDGER_PEER_DIR to the directory holding crud_baseline.py "
            "(normally <checkout>/../shared/bench)."
        )
    sys.path.insert(0, str(peer_dir.resolve()))
    try:
        import crud_baseline
    except ImportError as error:
        sys.exit(f"bench: could not import the CRUD peer from {peer_file}: {error}")
    finally:
        sys.path.remove(str(peer_dir.resolve()))
    return crud_baseline.CrudSecrets, peer_file.resolve()


# -- the machine --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def git_revision() -> str:
    """The revision of src/ as this process imported it (computed once, at the start)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not dirty:
        return rev
    return f"{rev}, src/ modified: content sha256 {source_fingerprint()}"


@functools.cache
def start_fingerprint() -> str:
    """``source_fingerprint()`` as of the first call (main() calls it at the start)."""
    return source_fingerprint()


def src_changed_row() -> list[tuple[str, str]]:
    """A machine-table row when src/ changed since the start (the work tree is shared)."""
    now = source_fingerprint()
    if now == start_fingerprint():
        return []
    return [
        (
            "src/ changed during the run",
            f"content sha256 {start_fingerprint()} at the start, {now} at the end: this "
            "process ran the code of the start; worker processes spawned after the change "
            "may have run the newer code",
        )
    ]


def source_fingerprint() -> str:
    """A short hash of src/ as measured, to tell uncommitted versions apart."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info() -> list[tuple[str, str]]:
    import keyledger

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} logical"
    if affinity is not None and affinity != os.cpu_count():
        cores += f" ({affinity} usable by this process)"
    return [
        ("platform", platform.platform()),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("CPU", cpu_model()),
        ("cores", cores),
        ("load average at start", load_average()),
        ("sqlite", sqlite3.sqlite_version),
        ("keyledger", f"{keyledger.__version__} (git {git_revision()})"),
        ("eventsourcing", package_version("eventsourcing")),
        ("cryptography", package_version("cryptography")),
    ]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        shown = "python"
    return shlex.join([shown, *sys.argv])


# -- formatting ---------------------------------------------------------------------------


def verdict(ratio: float, target: float, at_least: bool) -> str:
    ok = ratio >= target if at_least else ratio <= target
    return "PASS" if ok else "FAIL"


def table(header: list[str], rows: list[list[str]], *, numeric: bool = True) -> list[str]:
    right = ["---:" if i and numeric else "---" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def fmt_ops(x: float) -> str:
    return f"{x:,.0f}"


def fmt_us(x: float) -> str:
    return f"{x:,.0f} us" if x >= 100 else f"{x:,.1f} us"


def ratio_spread(xs: list[float]) -> str:
    """The range of per-round ratios, for a table cell."""
    return f"{min(xs):.2f}-{max(xs):.2f}x"


def _throughput_table(
    operation: str, keyledger: list[float], peer: list[float], per_round: list[float]
) -> list[str]:
    """A and B: ops/s of each side (medians), their ratio against the target, us per op."""
    ratio = statistics.median(keyledger) / statistics.median(peer)
    return table(
        ["", "keyledger", "peer", "ratio", "target", "result"],
        [
            [
                f"{operation} ops/s",
                fmt_ops(statistics.median(keyledger)),
                fmt_ops(statistics.median(peer)),
                f"{ratio:.2f}x ({ratio_spread(per_round)})",
                f">= {TARGET_THROUGHPUT:.1f}x",
                verdict(ratio, TARGET_THROUGHPUT, True),
            ],
            [
                f"us per {operation}",
                fmt_us(1e6 / statistics.median(keyledger)),
                fmt_us(1e6 / statistics.median(peer)),
                "",
                "",
                "",
            ],
        ],
    )


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="keyledger vs the CRUD peer on SQLite (WAL, synchronous=FULL) and on "
        "PostgreSQL."
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report path")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "-n", type=int, default=None, help="operations per A/B and P1/P2 measurement"
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating A/B and P1-P3 rounds")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the cProfiles of keyledger operations"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--postgres",
        action="store_true",
        help="run the PostgreSQL scenarios only (fails if the server does not answer)",
    )
    which.add_argument("--sqlite-only", action="store_true", help="skip the PostgreSQL scenarios")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("KEYLEDGER_BENCH_POSTGRES_URL", pg_scenarios.DEFAULT_URL),
        help="PostgreSQL server and database, without query options (default: "
        "KEYLEDGER_BENCH_POSTGRES_URL or %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("-n must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the PostgreSQL schemas of the run are dropped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_fingerprint()
    git_revision()
    mode = "quick" if args.quick else "default"
    scale = dict(SCALES[mode])
    if args.n is not None:
        scale["n"] = scale["pg_n"] = args.n
    if args.rounds is not None:
        scale["rounds"] = scale["pg_rounds"] = args.rounds
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    run_pg, pg_skipped = False, None
    if not args.sqlite_only:
        problem = pg_scenarios.check_base_url(args.pg_url) or pg_scenarios.reachable(args.pg_url)
        if problem is None:
            run_pg = True
        elif args.postgres:
            sys.exit(f"bench: PostgreSQL at {redact(args.pg_url)}: {problem}")
        else:
            pg_skipped = f"PostgreSQL at {redact(args.pg_url)}: {problem}"
            log(f"{pg_skipped}; the PostgreSQL scenarios are skipped")

    peer_class, peer_file = load_peer()
    # Names only (never values): settings such as KEYLEDGER_KEY_CACHE_SECONDS change results.
    overrides = sorted(
        k
        for k in os.environ
        if k.startswith("KEYLEDGER_")
        and k not in ("KEYLEDGER_PEER_DIR", "KEYLEDGER_BENCH_POSTGRES_URL")
    )
    t_start = time.perf_counter()
    sqlite_part = None
    if not args.postgres:
        sqlite_part = run_sqlite(args, mode, scale, peer_class, peer_file, overrides)
    pg_part = None
    if run_pg:
        pg_part = run_postgres(args, mode, scale, peer_class, peer_file, overrides)
    elapsed = time.perf_counter() - t_start

    out = Path(args.out)
    report = compose(out, sqlite_part, pg_part, pg_skipped)
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    log(f"report written to {out} ({elapsed:.0f} s)")
    return 0


def compose(out: Path, sqlite_part: str | None, pg_part: str | None, pg_skipped: str | None) -> str:
    """The report: the SQLite section, then the PostgreSQL one; a part not run this time is
    kept from the existing report at ``out`` (marked), or noted as never run."""
    old = out.read_text() if out.is_file() else ""
    old_sqlite, _, old_pg = old.partition(POSTGRES_MARKER)
    now = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    if sqlite_part is None:
        if old_sqlite.strip():
            sqlite_part = _kept(old_sqlite, f"the run of {now} ran PostgreSQL only.")
        else:
            sqlite_part = "# keyledger benchmarks\n\nSQLite: not run yet (`make bench`).\n"
    if pg_part is None:
        why = pg_skipped or "it ran with --sqlite-only"
        if old_pg.strip():
            pg_part = _kept(old_pg, f"the run of {now} skipped PostgreSQL ({why}).")
        else:
            pg_part = f"## PostgreSQL\n\nNot run: {why}.\n"
    return sqlite_part.rstrip("\n") + "\n\n" + POSTGRES_MARKER + "\n\n" + pg_part.lstrip("\n")


def _kept(section: str, why: str) -> str:
    """``section`` as it was, with one note on top saying why it was not re-run."""
    lines = [line for line in section.strip("\n").splitlines() if not line.startswith(KEPT_NOTE)]
    at = 1 if lines and lines[0].startswith("#") else 0
    note = f"{KEPT_NOTE} {why} Its own date and command are below."
    return "\n".join([*lines[:at], "", note, *lines[at:]]).replace("\n\n\n", "\n\n") + "\n"


def run_sqlite(
    args: argparse.Namespace,
    mode: str,
    scale: dict[str, int],
    peer_class: Any,
    peer_file: Path,
    overrides: list[str],
) -> str:
    """Scenarios A-D on SQLite files; the markdown section."""
    sync = os.environ.get("SQLITE_SYNC")
    if sync is not None and sync.upper() != "FULL":
        log(f"SQLITE_SYNC={sync} ignored: both sides run with synchronous=FULL")
    os.environ["SQLITE_SYNC"] = "FULL"  # the peer reads it when it connects

    started = datetime.now(UTC)
    t_start = time.perf_counter()
    machine = machine_info()
    amk = os.urandom(32)
    gc.collect()

    with tempfile.TemporaryDirectory(prefix="keyledger-bench-") as tmp:
        workdir = Path(tmp)
        floor = scenarios.fsync_floor_us(workdir)
        log(f"durable append floor: {floor:.0f} us (WAL, synchronous=FULL)")

        log(f"A/B: {scale['rounds']} rounds of n={scale['n']}")
        rounds = [
            scenarios.run_round(r, scale["n"], workdir, amk, peer_class, log)
            for r in range(scale["rounds"])
        ]

        log("C: retrieve after history")
        history = scenarios.run_history(
            workdir,
            amk,
            reads=scale["history_reads"],
            updates=scale["history_updates"],
            batches=scale["history_batches"],
            batch_size=scale["history_batch_size"],
            cold_reps=scale["cold_reps"],
            log=log,
        )

        log("D: list(limit=100)")
        listing = scenarios.run_list(
            workdir,
            amk,
            big=scale["list_big"],
            small=scale["list_small"],
            reps=scale["list_reps"],
            log=log,
        )

        profile = None
        if not args.no_profile:
            log("profile: cProfile of keyledger store and retrieve")
            profile = scenarios.run_profile(workdir, amk, n=scale["profile_n"], top=12)
        tmp_shown = str(workdir)

    elapsed = time.perf_counter() - t_start
    machine.insert(5, ("load average at end", load_average()))
    machine += src_changed_row()
    return render(
        mode=mode,
        scale=scale,
        started=started,
        elapsed=elapsed,
        machine=machine,
        peer_file=peer_file,
        tmp=tmp_shown,
        floor=floor,
        overrides=overrides,
        rounds=rounds,
        history=history,
        listing=listing,
        profile=profile,
    )


@dataclass
class PgRun:
    """Everything the PostgreSQL section reports."""

    mode: str
    scale: dict[str, int]
    started: datetime
    elapsed: float
    machine: list[tuple[str, str]]
    server: list[tuple[str, str]]
    url: str
    schemas: list[str]
    pool: str
    peer_file: Path
    overrides: list[str]
    rounds: list[pg_scenarios.PgRoundResult]
    rebuild: pg_scenarios.RebuildResult
    split: pg_scenarios.PgProfile


def run_postgres(
    args: argparse.Namespace,
    mode: str,
    scale: dict[str, int],
    peer_class: Any,
    peer_file: Path,
    overrides: list[str],
) -> str:
    """P1-P4 and the time split on PostgreSQL; the markdown section. Schemas are dropped."""
    started = datetime.now(UTC)
    t_start = time.perf_counter()
    machine = [row for row in machine_info() if row[0] != "sqlite"]
    machine += [
        ("psycopg", package_version("psycopg")),
        ("psycopg-binary", package_version("psycopg-binary")),
        ("psycopg-pool", package_version("psycopg-pool")),
    ]
    server = pg_scenarios.server_info(args.pg_url)
    amk = os.urandom(32)
    gc.collect()
    with pg_scenarios.BenchSchemas(args.pg_url, log) as schemas:
        kl_schema = schemas.new("kl_bench")
        peer_schema = schemas.new("peer_bench")
        urls = {
            "keyledger": schemas.keyledger_url(kl_schema),
            "peer": schemas.peer_url(peer_schema),
        }
        log(
            f"PostgreSQL: schemas {kl_schema} (keyledger, {pg_scenarios.POOL_OPTIONS}) and "
            f"{peer_schema} (peer, search_path)"
        )
        log(
            f"P1-P3: {scale['pg_rounds']} rounds of n={scale['pg_n']}, "
            f"{scale['pg_concurrent']} retrieves with {pg_scenarios.CLIENTS} clients"
        )
        rounds = [
            pg_scenarios.run_round(
                r,
                scale["pg_n"],
                scale["pg_concurrent"],
                urls,
                amk,
                peer_class,
                peer_file.parent,
                log,
            )
            for r in range(scale["pg_rounds"])
        ]
        log(f"P4: projection rebuild over ~{scale['rebuild_events']:,} events")
        rebuild = pg_scenarios.run_rebuild(
            schemas, amk, events=scale["rebuild_events"], rounds=scale["rebuild_rounds"], log=log
        )
        log("split: where a keyledger retrieve spends its time at 1 and 8 clients")
        split = pg_scenarios.run_split_and_profile(
            schemas,
            kl_schema,
            amk,
            n=scale["split_n"],
            profile_n=scale["pg_profile_n"],
            with_profile=not args.no_profile,
            log=log,
        )
        schema_names = list(schemas.created)
    machine.insert(5, ("load average at end", load_average()))
    machine += src_changed_row()
    run = PgRun(
        mode=mode,
        scale=scale,
        started=started,
        elapsed=time.perf_counter() - t_start,
        machine=machine,
        server=server,
        url=redact(args.pg_url),
        schemas=schema_names,
        pool=split.pool,
        peer_file=peer_file,
        overrides=overrides,
        rounds=rounds,
        rebuild=rebuild,
        split=split,
    )
    return render_postgres(run)


def cost_table(rounds: list[scenarios.RoundResult]) -> list[str]:
    rows = []
    for op in ("store", "retrieve"):
        costs = {
            who: [(x.store_cost if op == "store" else x.retrieve_cost)[who] for x in rounds]
            for who in ("keyledger", "peer")
        }

        def med(who: str, attr: str, costs: dict[str, list[scenarios.Cost]] = costs) -> float:
            values = [getattr(c, attr) for c in costs[who]]
            return statistics.median(values) if None not in values else float("nan")

        for attr, label in (("user_us", "user CPU"), ("sys_us", "system CPU")):
            kl, peer = med("keyledger", attr), med("peer", attr)
            rows.append([f"{op}: {label}", fmt_us(kl), fmt_us(peer), f"{kl / peer:.2f}x"])
        kl, peer = med("keyledger", "written"), med("peer", "written")
        if kl == kl and peer == peer:  # not NaN
            rows.append(
                [f"{op}: bytes written", f"{kl:,.0f} B", f"{peer:,.0f} B", f"{kl / peer:.2f}x"]
            )
    return table(["per operation", "keyledger", "peer", "keyledger / peer"], rows)


def profile_tables(profile: scenarios.ProfileResult) -> list[str]:
    """Self time by layer, then per operation its top self-time and cumulative rows."""
    lines = ["", "Self time by layer, per operation:", ""]
    ops = list(profile.by_layer)
    lines += table(
        ["layer", *ops],
        [
            [layer, *(fmt_us(dict(profile.by_layer[op])[layer]) for op in ops)]
            for layer, _ in profile.by_layer[ops[0]]
        ],
    )
    for op in profile.by_self:
        for title, rows in (
            ("top self time", profile.by_self[op]),
            ("keyledger and eventsourcing functions by cumulative time", profile.by_cumulative[op]),
        ):
            lines += ["", f"{op}: {title}", ""]
            lines += table(
                ["function", "calls/op", "self", "cumulative"],
                [
                    [
                        f"`{row.where}`",
                        f"{row.calls / profile.n:.1f}",
                        fmt_us(row.self_us),
                        fmt_us(row.cumulative_us),
                    ]
                    for row in rows
                ],
            )
    return lines


def render(
    *,
    mode: str,
    scale: dict[str, int],
    started: datetime,
    elapsed: float,
    machine: list[tuple[str, str]],
    peer_file: Path,
    tmp: str,
    floor: float,
    overrides: list[str],
    rounds: list[scenarios.RoundResult],
    history: scenarios.HistoryResult,
    listing: scenarios.ListResult,
    profile: scenarios.ProfileResult | None,
) -> str:
    n, r = scale["n"], scale["rounds"]
    lines = ["# keyledger benchmarks", ""]
    lines.append(f"- Date: {started:%Y-%m-%d %H:%M} UTC (took {elapsed:.0f} s)")
    lines.append(f"- Command: `{command_line()}` (`make bench` runs the default mode)")
    lines.append(
        f"- Mode: {mode}"
        + (
            " — a smoke run with reduced sizes: the numbers are not a measurement against the "
            "targets."
            if mode == "quick"
            else ""
        )
    )
    lines.append(
        f"- Storage: SQLite files in a temporary directory ({tmp}), journal_mode=WAL, "
        "synchronous=FULL on both sides, one transaction per operation, one process, "
        f"one client. Floor on this disk: one durable append costs {fmt_us(floor)}."
    )
    lines.append(f"- Peer: `{peer_file}` (`CrudSecrets`, SQLITE_SYNC=FULL)")
    if overrides:
        lines.append(f"- KEYLEDGER_* environment variables set: {', '.join(overrides)}")
    lines += ["", "## Machine", ""]
    lines += table(["", ""], [[k, v] for k, v in machine], numeric=False)

    store_kl = [x.store_ops["keyledger"] for x in rounds]
    store_peer = [x.store_ops["peer"] for x in rounds]
    ret_kl = [x.retrieve_ops["keyledger"] for x in rounds]
    ret_peer = [x.retrieve_ops["peer"] for x in rounds]
    ratio_a = statistics.median(store_kl) / statistics.median(store_peer)
    ratio_b = statistics.median(ret_kl) / statistics.median(ret_peer)
    per_round_a = [a / b for a, b in zip(store_kl, store_peer, strict=True)]
    per_round_b = [a / b for a, b in zip(ret_kl, ret_peer, strict=True)]
    ratio_c = history.hot_us / history.fresh_us
    ratio_cold = history.cold_hot_us / history.cold_fresh_us
    ratio_d = listing.big_us / listing.small_us

    lines += ["", "## Summary", ""]
    lines += table(
        ["scenario", "ratio", "target", "result"],
        [
            [
                "A store, one client (keyledger / peer)",
                f"{ratio_a:.2f}x",
                f">= {TARGET_THROUGHPUT:.1f}x",
                verdict(ratio_a, TARGET_THROUGHPUT, True),
            ],
            [
                "B retrieve, one client (keyledger / peer)",
                f"{ratio_b:.2f}x",
                f">= {TARGET_THROUGHPUT:.1f}x",
                verdict(ratio_b, TARGET_THROUGHPUT, True),
            ],
            [
                "C retrieve after history (history / fresh)",
                f"{ratio_c:.2f}x",
                f"<= {TARGET_HISTORY:.1f}x",
                verdict(ratio_c, TARGET_HISTORY, False),
            ],
            [
                "D list(limit=100) (10,000-secret tenant / 100-secret tenant)"
                if listing.big == 10_000
                else f"D list(limit=100) ({listing.big:,} / {listing.small} secrets)",
                f"{ratio_d:.2f}x",
                f"<= {TARGET_LIST:.0f}x",
                verdict(ratio_d, TARGET_LIST, False),
            ],
        ],
    )

    lines += ["", "## A: store, one client", ""]
    lines.append(
        f"{n:,} stores of distinct names (value `sk_live_` + 40 x, category `api-keys`) into a "
        f"fresh database per side and round; ops/s, median of {r} alternating rounds. The ratio "
        "is the ratio of the medians; per-round ratios in brackets."
    )
    lines.append("")
    lines += _throughput_table("store", store_kl, store_peer, per_round_a)

    lines += ["", "## B: retrieve, one client", ""]
    lines.append(
        f"{n:,} retrieves cycling over {min(scenarios.RETRIEVE_NAMES, n)} names stored in A, "
        "each a recorded read (keyledger: a read event and its projections; the peer: an "
        "audit row and a counter update). Same rounds as A."
    )
    lines.append("")
    lines += _throughput_table("retrieve", ret_kl, ret_peer, per_round_b)
    lines += ["", "Rounds (ops/s):", ""]
    lines += table(
        ["round", "order", "store keyledger", "store peer", "retrieve keyledger", "retrieve peer"],
        [
            [
                str(i + 1),
                " then ".join(x.order),
                fmt_ops(x.store_ops["keyledger"]),
                fmt_ops(x.store_ops["peer"]),
                fmt_ops(x.retrieve_ops["keyledger"]),
                fmt_ops(x.retrieve_ops["peer"]),
            ]
            for i, x in enumerate(rounds)
        ],
    )

    lines += ["", "Cost per operation (medians over the rounds):", ""]
    lines += cost_table(rounds)
    lines.append("")
    lines.append(
        "User CPU is Python, cryptography and SQLite's own work; system CPU is mostly the "
        "write and fsync calls; bytes written are what each operation hands to the kernel "
        "(WAL frames of 4 KiB pages, plus checkpoints): each modified B-tree page costs a frame."
    )

    lines += ["", "## C: retrieve cost does not grow with history (keyledger)", ""]
    lines.append(
        f"One secret stored, then {history.updates} times "
        f"({history.reads // max(history.updates, 1):,} reads, one update): "
        f"{history.reads:,} reads and {history.updates} updates "
        f"(built in {history.build_seconds:.1f} s). "
        "Fresh secrets stored afterwards in the same database. "
        f"Warm: median over {history.batches} batches of {history.batch_size} retrieves each, "
        "alternating, one fresh secret per batch. Cold: a newly opened service on the same file "
        f"(empty caches), its first retrieve, median of {history.cold_reps}, for information."
    )
    lines.append("")
    lines += table(
        ["", "secret with history", "fresh secret", "ratio", "target", "result"],
        [
            [
                "warm service, per retrieve",
                fmt_us(history.hot_us),
                fmt_us(history.fresh_us),
                f"{ratio_c:.2f}x",
                f"<= {TARGET_HISTORY:.1f}x",
                verdict(ratio_c, TARGET_HISTORY, False),
            ],
            [
                "cold service, first retrieve",
                fmt_us(history.cold_hot_us),
                fmt_us(history.cold_fresh_us),
                f"{ratio_cold:.2f}x",
                "(info)",
                "",
            ],
        ],
    )

    lines += ["", "## D: list(limit=100) (keyledger)", ""]
    lines.append(
        f"`list_for_tenant(tenant, limit=100)` on a tenant with {listing.big:,} secrets and on "
        f"a tenant with {listing.small} secrets in the same database (built in "
        f"{listing.build_seconds:.1f} s with store_for_tenant); median of {listing.reps} calls "
        "each, alternating, after two warm-up calls."
    )
    lines.append("")
    lines += table(
        ["", f"{listing.big:,} secrets", f"{listing.small} secrets", "ratio", "target", "result"],
        [
            [
                "per list call",
                fmt_us(listing.big_us),
                fmt_us(listing.small_us),
                f"{ratio_d:.2f}x",
                f"<= {TARGET_LIST:.0f}x",
                verdict(ratio_d, TARGET_LIST, False),
            ]
        ],
    )

    if profile is not None:
        lines += ["", "## Where a keyledger operation spends its time (cProfile)", ""]
        lines.append(
            f"{profile.n} stores and {profile.n} retrieves under cProfile (which slows Python "
            "code down, not SQLite or the fsync): wall time per operation "
            + ", ".join(f"{op} {fmt_us(us)}" for op, us in profile.wall_us.items())
            + ". Times are per operation."
        )
        lines += profile_tables(profile)
    lines.append("")
    return "\n".join(lines)


# -- the PostgreSQL section -------------------------------------------------------------

PG_SCENARIO_LABELS = {
    "store": "P1 store, one client",
    "retrieve": "P2 retrieve, one client",
    "threads": f"P3a retrieve, {pg_scenarios.CLIENTS} threads",
    "processes": (
        f"P3b retrieve, {pg_scenarios.PROCESSES} processes x "
        f"{pg_scenarios.THREADS_PER_PROCESS} threads"
    ),
}
PG_TARGETS = {
    "store": TARGET_PG_ONE,
    "retrieve": TARGET_PG_ONE,
    "threads": TARGET_PG_CONCURRENT,
    "processes": TARGET_PG_CONCURRENT,
}


def _pg_medians(rounds: list[pg_scenarios.PgRoundResult], scenario: str) -> tuple[float, float]:
    return (
        statistics.median(x.ops[scenario]["keyledger"] for x in rounds),
        statistics.median(x.ops[scenario]["peer"] for x in rounds),
    )


def _pg_cost_rows(rounds: list[pg_scenarios.PgRoundResult]) -> list[list[str]]:
    rows = []
    for scenario in pg_scenarios.SCENARIOS:
        for attr, label in (
            ("user_us", "client user CPU"),
            ("sys_us", "client system CPU"),
            ("server_us", "server CPU"),
        ):
            values = {
                who: [getattr(x.cost[scenario][who], attr) for x in rounds]
                for who in ("keyledger", "peer")
            }
            if any(v is None for vs in values.values() for v in vs):
                continue
            kl = statistics.median(values["keyledger"])
            peer = statistics.median(values["peer"])
            ratio = f"{kl / peer:.2f}x" if peer else ""
            rows.append([f"{scenario}: {label}", fmt_us(kl), fmt_us(peer), ratio])
    return rows


def _split_rows(splits: list[pg_scenarios.SplitResult], cores: int) -> list[list[str]]:
    def row(label: str, fn: Callable[[pg_scenarios.SplitResult], str]) -> list[str]:
        return [label, *(fn(x) for x in splits)]

    def cpu(x: pg_scenarios.SplitResult) -> float:
        return x.client_user_us + x.client_sys_us + (x.server_cpu_us or 0.0)

    return [
        row("retrieves/s", lambda x: fmt_ops(x.ops_per_s)),
        row("latency of one retrieve (its client's view)", lambda x: fmt_us(x.latency_us)),
        row("- in the ledger's commit (queueing + the write)", lambda x: fmt_us(x.commit_us)),
        row(
            "- of which the audit catch-ups (every 2,000 appends)",
            lambda x: fmt_us(x.catch_up_us),
        ),
        row(
            "- outside it (validation, caches, decrypt, model)",
            lambda x: fmt_us(x.latency_us - x.commit_us),
        ),
        row("write transactions per retrieve", lambda x: f"{x.write_tx:.2f}"),
        row("retrieves per write transaction", lambda x: f"{1 / x.write_tx:.1f}"),
        row("read-only transactions per retrieve", lambda x: f"{x.read_tx:.2f}"),
        row("round trips per retrieve", lambda x: f"{x.round_trips:.2f}"),
        row("execute calls per retrieve", lambda x: f"{x.statements:.2f}"),
        row("time in driver waits per retrieve", lambda x: fmt_us(x.wait_us)),
        row("per write transaction: BEGIN + LOCK TABLE", lambda x: fmt_us(x.tx_lock_us)),
        row("per write transaction: lock held", lambda x: fmt_us(x.tx_held_us)),
        row("- round trips while held", lambda x: f"{x.tx_held_trips:.1f}"),
        row("- in driver waits while held", lambda x: fmt_us(x.tx_held_wait_us)),
        row("- of which the COMMIT round trip", lambda x: fmt_us(x.tx_commit_us)),
        row(
            "- Python while held (held - waits)",
            lambda x: fmt_us(x.tx_held_us - x.tx_held_wait_us),
        ),
        row("lock held per retrieve (read writes)", lambda x: fmt_us(x.held_us)),
        row(
            "audit catch-up transactions in the run (under the events lock)",
            lambda x: f"{x.catch_up_tx} ({x.catch_up_locked_tx})",
        ),
        row("- their round trips, per retrieve", lambda x: f"{x.catch_up_trips:.2f}"),
        row("- their lock hold, per retrieve", lambda x: fmt_us(x.catch_up_held_us)),
        row("share of wall time the lock is held", lambda x: f"{x.lock_busy:.0%}"),
        row("client CPU per retrieve, user", lambda x: fmt_us(x.client_user_us)),
        row("client CPU per retrieve, system", lambda x: fmt_us(x.client_sys_us)),
        row(
            "server CPU per retrieve (all postgres processes)",
            lambda x: "n/a" if x.server_cpu_us is None else fmt_us(x.server_cpu_us),
        ),
        row(
            f"CPU ceiling: {cores} cores / (client + server CPU)",
            lambda x: f"{cores * 1e6 / cpu(x):,.0f}/s" if cpu(x) else "n/a",
        ),
    ]


def render_postgres(run: PgRun) -> str:
    rounds, scale = run.rounds, run.scale
    n, r = scale["pg_n"], scale["pg_rounds"]
    schemas = ", ".join(f"`{name}`" for name in run.schemas)
    lines = ["## PostgreSQL: keyledger vs the CRUD peer", ""]
    lines.append(f"- Date: {run.started:%Y-%m-%d %H:%M} UTC (took {run.elapsed:.0f} s)")
    lines.append(
        f"- Command: `{command_line()}` (`make bench` runs the default mode and includes this "
        "section when the server answers; `--postgres` runs it alone, `--sqlite-only` skips it)"
    )
    lines.append(
        f"- Mode: {run.mode}"
        + (
            " — a smoke run with reduced sizes: the numbers are not a measurement against the "
            "targets."
            if run.mode == "quick"
            else ""
        )
    )
    server = dict(run.server)["server"]
    lines.append(
        f"- Server: {server}, database URL `{run.url}`, on the same host as the clients (they "
        "share its cores). Each side in a schema of its own, created for the run and dropped "
        f"at its end ({schemas}): keyledger through `?schema=...&{pg_scenarios.POOL_OPTIONS}`, "
        "the peer through `?options=-csearch_path%3D...`."
    )
    lines.append(f"- keyledger's connection pool: {run.pool}.")
    lines.append(
        f"- Peer: `{run.peer_file}` (`CrudSecrets` over psycopg: one autocommit connection "
        "per client, one transaction per operation)"
    )
    if run.overrides:
        lines.append(f"- KEYLEDGER_* environment variables set: {', '.join(run.overrides)}")
    lines += ["", "### Machine and server", ""]
    lines += table(["", ""], [[k, v] for k, v in run.machine + run.server], numeric=False)

    def spread(scenario: str) -> str:
        ratios = [x.ops[scenario]["keyledger"] / x.ops[scenario]["peer"] for x in rounds]
        return f"{min(ratios):.2f}-{max(ratios):.2f}x"

    summary = []
    for scenario in pg_scenarios.SCENARIOS:
        kl, peer = _pg_medians(rounds, scenario)
        target = PG_TARGETS[scenario]
        summary.append(
            [
                PG_SCENARIO_LABELS[scenario],
                fmt_ops(kl),
                fmt_ops(peer),
                f"{kl / peer:.2f}x ({spread(scenario)})",
                f">= {target:.1f}x",
                verdict(kl / peer, target, True),
            ]
        )
    rb = run.rebuild
    ratio_rb = rb.rebuild_rate / rb.decode_rate
    summary.append(
        [
            "P4 rebuild rate / read+decode rate (events/s)",
            fmt_ops(rb.rebuild_rate),
            f"{fmt_ops(rb.decode_rate)} (read+decode)",
            f"{ratio_rb:.0%}",
            f">= {TARGET_REBUILD:.0%}",
            verdict(ratio_rb, TARGET_REBUILD, True),
        ]
    )
    lines += ["", "### Summary", ""]
    lines.append(
        f"Ops/s, medians of {r} alternating rounds (P1-P3); the ratio is keyledger / peer of "
        "the medians, per-round ratios in brackets. P4 is keyledger alone."
    )
    lines.append("")
    lines += table(["scenario", "keyledger", "peer", "ratio", "target", "result"], summary)

    cycle = min(scenarios.RETRIEVE_NAMES, n)
    per_client = max(scale["pg_concurrent"] // pg_scenarios.CLIENTS, 1)
    lines += ["", "### P1-P3: what each round does", ""]
    lines += [
        f"- P1: {n:,} stores of distinct names (value `sk_live_` + 40 x, category `api-keys`) "
        "under a tenant new to the round; ops/s.",
        f"- P2: {n:,} retrieves cycling over {cycle} of those names, each a recorded read "
        "(keyledger: a read event and its projections; the peer: an audit row and a counter "
        "update).",
        f"- P3a: {pg_scenarios.CLIENTS} threads of {per_client:,} retrieves each, client k "
        "reading name (7k + i) mod 100 as the peer's own main() does. keyledger: all threads "
        "share the round's one SecretService (its pool as above); the peer: a new "
        "connection per thread, as in its main(). Each client first makes "
        f"{pg_scenarios.WARMUP_PER_CLIENT} untimed retrieves; all start together; ops/s is "
        "all retrieves over the span from the start to the last client's end.",
        f"- P3b: the same {pg_scenarios.CLIENTS} clients in {pg_scenarios.PROCESSES} spawned "
        f"processes of {pg_scenarios.THREADS_PER_PROCESS} threads: keyledger, one "
        "SecretService per process shared by its threads; the peer, one connection per "
        "thread. Each process first reads every name once (untimed, both sides: a long-lived "
        "process has warm caches), then its clients warm up as in P3a. Process start-up is "
        "not timed.",
        "- Order: even rounds keyledger first, odd rounds the peer first, phase by phase.",
    ]
    lines += ["", "Rounds (ops/s):", ""]
    header = ["round", "order"]
    for scenario in pg_scenarios.SCENARIOS:
        header += [f"{scenario} keyledger", f"{scenario} peer"]
    lines += table(
        header,
        [
            [
                str(i + 1),
                " then ".join(x.order),
                *(
                    fmt_ops(x.ops[scenario][who])
                    for scenario in pg_scenarios.SCENARIOS
                    for who in ("keyledger", "peer")
                ),
            ]
            for i, x in enumerate(rounds)
        ],
    )
    lines += ["", "Cost per operation (medians over the rounds):", ""]
    lines += table(
        ["per operation", "keyledger", "peer", "keyledger / peer"], _pg_cost_rows(rounds)
    )
    lines.append("")
    lines.append(
        "Client CPU is this process's (P3b: the worker processes') user and system time; "
        "server CPU is the user and system time of every `postgres` process on the host over "
        "the same span (a shared server's other clients included), both divided by the "
        "operations."
    )

    lines += ["", "### P4: projection rebuild vs reading and decoding the stream", ""]
    lines.append(
        f"A stream of {rb.events:,} events in a schema of its own, built by "
        f"{pg_scenarios.CLIENTS} threads sharing one service ({rb.build_ops['stores']:,} "
        f"stores, {rb.build_ops['reads']:,} reads, one tenant per thread, in "
        f"{rb.build_seconds:.1f} s). Rebuild: `service.rebuild_read_models()` (replays the "
        "stream into new read-model tables in batches of 1,000 events, then switches to them "
        "under the write lock). Read+decode: a separate connection selects every row of the "
        "events table ordered by notification_id in pages of 1000 (keyset) in one "
        "repeatable-read transaction and decodes each the fastest way keyledger has, the way "
        "the rebuild does: reads with `decode_read`, other events with the service's mapper "
        "(`mapper.to_domain_event(StoredEvent(...))`). Alternating, "
        f"{rb.rounds} rounds, medians; the schema's tables are vacuumed (untimed) before "
        "each round."
    )
    lines.append("")
    lines += table(
        ["round", "rebuild events/s", "read+decode events/s", "ratio"],
        [
            [str(i + 1), fmt_ops(a), fmt_ops(b), f"{a / b:.0%}"]
            for i, (a, b) in enumerate(zip(rb.rebuild_rates, rb.decode_rates, strict=True))
        ]
        + [
            [
                "median",
                fmt_ops(rb.rebuild_rate),
                fmt_ops(rb.decode_rate),
                f"{ratio_rb:.0%} (target >= {TARGET_REBUILD:.0%}: "
                f"{verdict(ratio_rb, TARGET_REBUILD, True)})",
            ]
        ],
    )

    if rb.trace is not None:
        tr = rb.trace
        lines += ["", "One more rebuild, instrumented as below (not in the medians):", ""]
        lines += table(
            ["per event", "rebuild"],
            [
                ["events/s under the instruments", fmt_ops(tr.rate)],
                ["round trips", f"{tr.trips:.2f}"],
                ["execute calls", f"{tr.statements:.2f}"],
                ["time in driver waits (server work + network)", fmt_us(tr.wait_us)],
                ["the rest of the wall time (Python: decode, project)", fmt_us(tr.other_us)],
                ["client CPU (user + system)", fmt_us(tr.client_cpu_us)],
                [
                    "server CPU (all postgres processes)",
                    "n/a" if tr.server_cpu_us is None else fmt_us(tr.server_cpu_us),
                ],
            ],
        )

    splits = run.split.splits
    cores = os.cpu_count() or 1
    lines += ["", "### Where a keyledger retrieve spends its time (1 and 8 clients)", ""]
    lines.append(
        f"keyledger alone, one service, 100 secrets of a fresh tenant in the run's schema; "
        f"{splits[0].n:,} retrieves by 1 thread, then by {pg_scenarios.CLIENTS} threads "
        "sharing the service, after an untimed warm-up per client. Measured by wrapping "
        "psycopg (`Connection.wait`: one wait is one round trip, for a statement string, "
        "which may hold several statements, or a COMMIT; `Cursor.execute`; and keyledger's "
        "`PreparedCall`, whose calls on libpq's prepared-statement interface bypass both: "
        "one call is one round trip and one execute), the recorder's "
        "write and read transactions and the ledger's read commit; no profiler. Per retrieve "
        "unless said otherwise. 'Lock' is the events table's EXCLUSIVE lock that every write "
        "takes, held from the answer to the string holding LOCK TABLE (with BEGIN and "
        "NOTIFY) until the answer to COMMIT. Reads are written by one call of the server "
        "function `kl_append_reads_v1` (`kl_append_read_v1` for a lone read), which takes "
        "that lock on the server, so the lock rows count only transactions that lock from "
        "the client (none in a run of reads alone); the call is one round trip and one "
        "execute. At 8 clients, time inside driver waits includes waiting for the GIL "
        "after the answer arrived."
    )
    lines.append("")
    lines += table(
        ["", *(f"{x.clients} client{'s' if x.clients > 1 else ''}" for x in splits)],
        _split_rows(splits, cores),
    )
    profile = run.split.profile
    if profile is not None:
        lines += ["", "cProfile of keyledger retrieves at one client", ""]
        lines.append(
            f"{profile.n} retrieves cycling over 100 warm names under cProfile (which slows "
            "the Python code down, not the server): wall time per retrieve "
            + ", ".join(fmt_us(us) for us in profile.wall_us.values())
            + ". psycopg's wait for the server is C code that cProfile books as the self "
            "time of `psycopg/connection.py(wait)`."
        )
        lines += profile_tables(profile)
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
