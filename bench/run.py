"""keyledger benchmarks against the CRUD peer, on SQLite files, in one process and one run.

    python bench/run.py [--out docs/benchmarks.md] [--quick] [-n N] [--rounds R] [--no-profile]

Scenarios (see bench/scenarios.py):
  A  store, one client: N stores of distinct names, keyledger vs the peer, fresh databases
  B  retrieve, one client: N retrieves cycling over 100 stored names, keyledger vs the peer
  C  retrieve cost after 10,000 reads and 100 updates of a secret vs a fresh secret
  D  list_for_tenant(limit=100) over a tenant of 10,000 secrets vs one of 100

A and B run in alternating rounds (keyledger first, then the peer first, ...) and report
medians; the machines here are shared and noisy, so only ratios measured in the same run
mean anything. Both sides use SQLite files in WAL mode with synchronous=FULL.

The peer is ../shared/bench/crud_baseline.py, or the directory in KEYLEDGER_PEER_DIR.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios  # the bench/ helper module next to this file

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
    },
}

TARGET_THROUGHPUT = 1.0  # keyledger / peer, at least
TARGET_HISTORY = 1.2  # history / fresh, at most
TARGET_LIST = 2.0  # big tenant / small tenant, at most


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


def git_revision() -> str:
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


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="keyledger vs the CRUD peer on SQLite (WAL, synchronous=FULL)."
    )
    parser.add_argument("--out", default="docs/benchmarks.md", help="markdown report path")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, < 30 s")
    parser.add_argument("-n", type=int, default=None, help="operations per A/B measurement")
    parser.add_argument("--rounds", type=int, default=None, help="alternating A/B rounds")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the cProfile of a store and a retrieve"
    )
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("-n must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "default"
    scale = dict(SCALES[mode])
    if args.n is not None:
        scale["n"] = args.n
    if args.rounds is not None:
        scale["rounds"] = args.rounds

    peer_class, peer_file = load_peer()
    sync = os.environ.get("SQLITE_SYNC")
    if sync is not None and sync.upper() != "FULL":
        log(f"SQLITE_SYNC={sync} ignored: both sides run with synchronous=FULL")
    os.environ["SQLITE_SYNC"] = "FULL"  # the peer reads it when it connects
    # Names only (never values): settings such as KEYLEDGER_KEY_CACHE_SECONDS change results.
    overrides = sorted(
        k for k in os.environ if k.startswith("KEYLEDGER_") and k != "KEYLEDGER_PEER_DIR"
    )

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
    report = render(
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
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    log(f"report written to {out} ({elapsed:.0f} s)")
    return 0


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

    def spread(xs: list[float]) -> str:
        return f"{min(xs):.2f}-{max(xs):.2f}x"

    lines += ["", "## A: store, one client", ""]
    lines.append(
        f"{n:,} stores of distinct names (value `sk_live_` + 40 x, category `api-keys`) into a "
        f"fresh database per side and round; ops/s, median of {r} alternating rounds. The ratio "
        "is the ratio of the medians; per-round ratios in brackets."
    )
    lines.append("")
    lines += table(
        ["", "keyledger", "peer", "ratio", "target", "result"],
        [
            [
                "store ops/s",
                fmt_ops(statistics.median(store_kl)),
                fmt_ops(statistics.median(store_peer)),
                f"{ratio_a:.2f}x ({spread(per_round_a)})",
                f">= {TARGET_THROUGHPUT:.1f}x",
                verdict(ratio_a, TARGET_THROUGHPUT, True),
            ],
            [
                "us per store",
                fmt_us(1e6 / statistics.median(store_kl)),
                fmt_us(1e6 / statistics.median(store_peer)),
                "",
                "",
                "",
            ],
        ],
    )

    lines += ["", "## B: retrieve, one client", ""]
    lines.append(
        f"{n:,} retrieves cycling over {min(scenarios.RETRIEVE_NAMES, n)} names stored in A, "
        "each a recorded read (keyledger: a read event and its projections; the peer: an "
        "audit row and a counter update). Same rounds as A."
    )
    lines.append("")
    lines += table(
        ["", "keyledger", "peer", "ratio", "target", "result"],
        [
            [
                "retrieve ops/s",
                fmt_ops(statistics.median(ret_kl)),
                fmt_ops(statistics.median(ret_peer)),
                f"{ratio_b:.2f}x ({spread(per_round_b)})",
                f">= {TARGET_THROUGHPUT:.1f}x",
                verdict(ratio_b, TARGET_THROUGHPUT, True),
            ],
            [
                "us per retrieve",
                fmt_us(1e6 / statistics.median(ret_kl)),
                fmt_us(1e6 / statistics.median(ret_peer)),
                "",
                "",
                "",
            ],
        ],
    )
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
        lines += ["", "Self time by layer, per operation:", ""]
        ops = list(profile.by_layer)
        lines += table(
            ["layer", *ops],
            [
                [layer, *(fmt_us(dict(profile.by_layer[op])[layer]) for op in ops)]
                for layer, _ in profile.by_layer[ops[0]]
            ],
        )
        for op in profile.by_self:
            lines += ["", f"{op}: top self time", ""]
            lines += table(
                ["function", "calls/op", "self", "cumulative"],
                [
                    [
                        f"`{row.where}`",
                        f"{row.calls / profile.n:.1f}",
                        fmt_us(row.self_us),
                        fmt_us(row.cumulative_us),
                    ]
                    for row in profile.by_self[op]
                ],
            )
            lines += ["", f"{op}: keyledger and eventsourcing functions by cumulative time", ""]
            lines += table(
                ["function", "calls/op", "self", "cumulative"],
                [
                    [
                        f"`{row.where}`",
                        f"{row.calls / profile.n:.1f}",
                        fmt_us(row.self_us),
                        fmt_us(row.cumulative_us),
                    ]
                    for row in profile.by_cumulative[op]
                ],
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
