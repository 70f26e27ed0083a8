"""Instructions per store and per retrieve, keyledger and the CRUD peer, under callgrind.

Wall-clock ratios on a small VM move by 10-40% from one hour to the next; instruction
counts do not: valgrind's callgrind counts the same for the same code, inputs and
``PYTHONHASHSEED``. Each figure is the difference between a run of ``--long`` and one
of ``--short`` operations on a SQLite file (WAL, synchronous=FULL), divided by the
difference in operations, so that start-up and set-up cancel out; keyledger's audit
catch-up, which runs every few thousand appends, is timed so that the difference holds
its share of it (see ``worker``). This is how hot-path
changes are judged (docs/architecture.md, "How hot-path changes are measured");
``make bench`` gives the wall-clock ratios.

    .venv/bin/python bench/instructions.py [--short 100] [--long 400] [--out FILE]

Needs valgrind on the PATH; takes a few minutes (two runs at a time).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("keyledger", "peer")
MODES = ("store", "retrieve")
VALUE = "sk_live_" + "x" * 40
CATEGORY = "api-keys"
NAMES = 100  # retrieves cycle over this many stored names, as in bench/run.py (B)


def worker(side: str, mode: str, count: int, catch_up_every: int) -> None:
    """One measured run (what callgrind executes): set-up, then ``count`` operations."""
    url = "sqlite:///" + tempfile.mkdtemp(prefix="keyledger-instr-") + "/bench.db"
    amk = os.urandom(32)
    if side == "keyledger":
        from keyledger.application import ledger
        from keyledger.service import SecretService

        # The audit model catches up with every AUDIT_CATCH_UP_EVERY appends (2,000); at
        # every (long - short) appends instead, the longer run holds exactly one catch-up
        # more, of (long - short) events, so the difference carries this deferred work at
        # its per-event cost (a little over: the fixed cost of a catch-up is spread over
        # fewer events than in production).
        ledger.AUDIT_CATCH_UP_EVERY = catch_up_every
        service = SecretService.create(url, master_key=amk.hex())

        def store(name: str) -> None:
            service.store_for_tenant("t1", name, VALUE, category=CATEGORY)

        def retrieve(name: str) -> None:
            service.retrieve_for_tenant("t1", name)
    else:
        from run import load_peer  # bench/run.py: KEYLEDGER_PEER_DIR or ../shared/bench

        crud = load_peer()[0](url, amk)

        def store(name: str) -> None:
            crud.store("t1", name, VALUE, CATEGORY)

        def retrieve(name: str) -> None:
            crud.retrieve("t1", name)

    for i in range(NAMES):
        store(f"n{i}")
    for i in range(NAMES):
        retrieve(f"n{i}")
    if mode == "store":
        for i in range(count):
            store(f"s{i}")
    else:
        for i in range(count):
            retrieve(f"n{i % NAMES}")


def _instructions(side: str, mode: str, count: int, catch_up_every: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        mode,
        str(count),
        str(catch_up_every),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def measure(short: int, long: int) -> dict[tuple[str, str], int]:
    """Instructions per operation, by (side, mode)."""
    runs = [(side, mode, n) for side in SIDES for mode in MODES for n in (short, long)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(
            zip(runs, pool.map(lambda run: _instructions(*run, long - short), runs), strict=True)
        )
    return {
        (side, mode): (counts[(side, mode, long)] - counts[(side, mode, short)]) // (long - short)
        for side in SIDES
        for mode in MODES
    }


def _revision() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def report(per_op: dict[tuple[str, str], int], short: int, long: int) -> str:
    lines = [
        "# keyledger: instructions per operation",
        "",
        "- Command: `make bench-instructions` (`bench/instructions.py`; see its docstring)",
        f"- keyledger: git {_revision()}; peer: `crud_baseline.py` (`CrudSecrets`)",
        "",
        "| per operation (instructions) | keyledger | peer | keyledger / peer |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        mine, peer = per_op[("keyledger", mode)], per_op[("peer", mode)]
        lines.append(f"| {mode} | {mine:,} | {peer:,} | {mine / peer:.2f}x |")
    lines.append("")
    lines.append(
        f"callgrind, SQLite file (WAL, synchronous=FULL), ({long} - {short} operations) "
        f"difference, PYTHONHASHSEED=0, {sys.implementation.name} {sys.version.split()[0]}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--worker", nargs=4, metavar=("SIDE", "MODE", "COUNT", "EVERY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        side, mode, count, every = args.worker
        worker(side, mode, int(count), int(every))
        return 0
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind on the PATH", file=sys.stderr)
        return 2
    if not 0 < args.short < args.long:
        print("--short must be positive and less than --long", file=sys.stderr)
        return 2
    table = report(measure(args.short, args.long), args.short, args.long)
    print(table, end="")
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
