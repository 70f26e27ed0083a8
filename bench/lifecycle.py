"""Key-lifecycle benchmarks (issue 4 targets), in one run, medians of several rounds.

    python bench/lifecycle.py [--out docs/benchmarks-lifecycle.md] [-n 10000] [--rounds 3]

L1  drift diagnosis of a tenant of N secrets vs listing those N secrets (target <= 3x)
L2  reencrypt_all of N secrets vs storing them one by one (target >= 3x faster)

SQLite file (WAL, synchronous=FULL), and PostgreSQL when it answers (--pg-url, else
postgresql://postgres@127.0.0.1:5432/test, in a schema the run creates and drops).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from keyledger import SecretService, __version__

VALUE = "sk_live_" + "x" * 40


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(url: str, n: int, rounds: int) -> dict[str, float]:
    """Median seconds for: list, diagnose, n stores, reencrypt_all of n."""
    results: dict[str, list[float]] = {"list": [], "diagnose": [], "store": [], "reencrypt": []}
    with SecretService.create(url, master_key=secrets.token_hex(32)) as service:
        for round_number in range(rounds):
            tenant = f"tenant-{round_number}"
            results["store"].append(
                _timed(
                    lambda tenant=tenant: [
                        service.store_for_tenant(tenant, f"secret-{i:05d}", VALUE) for i in range(n)
                    ]
                )
            )
            service.rotate_key_for_tenant(tenant)
            for _ in range(3):
                results["list"].append(
                    _timed(lambda tenant=tenant: service.list_for_tenant(tenant, status=None))
                )
                results["diagnose"].append(
                    _timed(lambda tenant=tenant: service.diagnose_tenant_secret_key_drift(tenant))
                )
            outcome = service.reencrypt_all_for_tenant(tenant)
            assert outcome.failed == 0
            results["reencrypt"].append(0.0)
            tenant_b = f"tenant-{round_number}-b"
            for i in range(n):
                service.store_for_tenant(tenant_b, f"secret-{i:05d}", VALUE)
            service.rotate_key_for_tenant(tenant_b)
            results["reencrypt"][-1] = _timed(
                lambda tenant_b=tenant_b: service.reencrypt_all_for_tenant(tenant_b)
            )
    return {name: statistics.median(values) for name, values in results.items()}


def report(store: str, m: dict[str, float], n: int) -> list[str]:
    diagnose_ratio = m["diagnose"] / m["list"]
    speedup = m["store"] / m["reencrypt"]
    return [
        f"### {store}",
        "",
        "| scenario | keyledger | baseline | ratio | target | result |",
        "|---|---:|---:|---:|---:|---|",
        f"| L1 diagnose a tenant of {n:,} secrets vs list them | {m['diagnose'] * 1e3:,.1f} ms"
        f" | {m['list'] * 1e3:,.1f} ms | {diagnose_ratio:.2f}x | <= 3x"
        f" | {'PASS' if diagnose_ratio <= 3 else 'FAIL'} |",
        f"| L2 reencrypt_all of {n:,} secrets vs {n:,} single stores | {m['reencrypt']:,.2f} s"
        f" | {m['store']:,.2f} s | {speedup:.1f}x faster | >= 3x"
        f" | {'PASS' if speedup >= 3 else 'FAIL'} |",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks-lifecycle.md")
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    lines = [
        "# Key-lifecycle benchmarks",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} cores, Python {platform.python_version()}, keyledger {__version__}).",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (part of `make bench`). "
        f"Medians of {args.rounds} rounds; every ratio is measured in the same run.",
        "",
    ]
    with tempfile.TemporaryDirectory() as directory:
        lines += report(
            "SQLite", measure(f"sqlite:///{directory}/l.db", args.n, args.rounds), args.n
        )
    schema = f"kl_bench_life_{secrets.token_hex(3)}"
    try:
        with psycopg.connect(args.pg_url, connect_timeout=3):
            pass
    except psycopg.Error:
        lines += ["### PostgreSQL", "", "Not run: the server did not answer.", ""]
    else:
        try:
            url = f"{args.pg_url}?schema={schema}&pool_size=2"
            lines += report("PostgreSQL", measure(url, args.n, args.rounds), args.n)
        finally:
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
