"""Ctrl-C in the middle of a command that commits step by step.

``master-key rewrap``, ``keys reencrypt``, ``keys rotate --due`` and ``keys
cleanup-retired`` commit each tenant, secret or key version on its own. Stopped with
Ctrl-C they printed click's bare "Aborted!" and exited 1, the same as a declined
confirmation, while part of the work stood committed: an operator who then rolled back
the master-key configuration broke the tenants already re-wrapped (found by review).
Such a stop now says that the work is partly done, how much where it is counted, and
that running the command again finishes it; it exits 130, as a process stopped by
SIGINT does (and as ``audit export`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT


@contextmanager
def resumable(what: str, unit: str) -> Iterator[Callable[[int], None]]:
    """Run the block; yields ``done(n)``, which counts the ``unit``s committed so far."""
    count = [0]

    def done(n: int) -> None:
        count[0] += n

    try:
        yield done
    except KeyboardInterrupt:
        if count[0]:
            said = f"{what} is partly done ({count[0]} {unit} done). What it did is committed"
        else:  # (waiting for a lock, say: "partly done" would claim too much)
            said = f"{what} stopped before any step was reported done. A step it finished"
            said += " is committed"
        click.echo(f"\nInterrupted: {said}; run the same command again to finish it.", err=True)
        raise click.exceptions.Exit(INTERRUPTED) from None


def both(first: Callable[[int], None], second: Callable[[int], None]) -> Callable[[int], None]:
    """A progress callback that reports to two."""

    def report(n: int) -> None:
        first(n)
        second(n)

    return report
