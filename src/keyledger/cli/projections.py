"""``keyledger projections``: maintain the read models built from the event stream."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

import click

from keyledger.application.read_models import READ_MODELS as READ_MODEL_SOURCES
from keyledger.application.read_models import rebuilt_together
from keyledger.cli.errors import KeyledgerSubgroup
from keyledger.cli.render import (
    emit_json,
    emit_table,
    is_terminal,
    json_option,
    terminal_safe,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.errors import StorageError
from keyledger.models import ReadModelCheck, ReadModelDifference, TableComparison

# The read models, in the order the library builds them.
READ_MODELS = tuple(READ_MODEL_SOURCES)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@click.group("projections", cls=KeyledgerSubgroup)
def projections_group() -> None:
    """Maintain the read models (listing, audit queries) built from the stream."""


T = TypeVar("T")


def replaying(cli: CliContext, replay: Callable[[Callable[[int], None] | None], T]) -> T:
    """``replay(progress)``, with a progress bar over the stream on a terminal."""
    if not is_terminal("stderr"):
        return replay(None)
    head = max(head for _, head in cli.service.read_model_status().values())
    with click.progressbar(length=head, label="Replaying", file=sys.stderr) as bar:
        return replay(bar.update)


@projections_group.command("rebuild")
@click.argument("name", required=False, type=click.Choice(READ_MODELS))
@json_option
@pass_cli
def rebuild(cli: CliContext, name: str | None) -> None:
    """Rebuild the read models (or NAME: catalog, audit or keys) from the event stream.

    They are built aside in batches while readers keep their answers, then switched in
    one short transaction. The catalog and the keys come from one projector and are
    rebuilt together; the audit model is rebuilt alone when named.
    """
    names = None if name is None else [name]
    replayed = replaying(
        cli, lambda progress: cli.service.rebuild_read_models(progress=progress, names=names)
    )
    rebuilt = rebuilt_together(names)
    if cli.json_output:
        emit_json({"events_replayed": replayed, "read_models": rebuilt})
    elif name is None:
        click.echo(f"Rebuilt the read models from {replayed} events.")
    else:
        together = " (one projector builds both)" if len(rebuilt) > 1 else ""
        click.echo(f"Rebuilt {' and '.join(rebuilt)}{together} from {replayed} events.")


@projections_group.command("check")
@click.argument("name", required=False, type=click.Choice(READ_MODELS))
@json_option
@pass_cli
def check(cli: CliContext, name: str | None) -> None:
    """Compare the read models (or NAME) with a replay of the event stream, row by row.

    The replay is built aside and dropped afterwards; no live row is changed. Exits 0
    when every row matches, 1 when rows are missing, unexpected or altered (edited
    outside keyledger, say): `keyledger projections rebuild` then restores them, and
    `keyledger audit verify` checks the stream itself.
    """
    names = None if name is None else [name]
    report = replaying(
        cli, lambda progress: cli.service.check_read_models(progress=progress, names=names)
    )
    if cli.json_output:
        emit_json(to_data(report))
    else:
        click.echo(check_summary(report))
        emit_table(
            ("TABLE", "POSITION", "ROWS", "MISSING", "UNEXPECTED", "ALTERED"),
            [comparison_row(t) for t in report.tables],
        )
        if report.differences:
            click.echo("")
            emit_table(
                ("TABLE", "KIND", "ROW", "COLUMNS"),
                [
                    (d.table, d.kind, difference_key(d), ", ".join(d.columns) or "-")
                    for d in report.differences
                ],
            )
    if not report.consistent:
        click.get_current_context().exit(1)


def check_summary(report: ReadModelCheck) -> str:
    """The first line of ``projections check``."""
    *most, last = report.read_models
    models = f"{', '.join(most)} and {last}" if most else last
    if report.consistent:
        return f"Consistent: {models} match a replay of {report.events_replayed} events."
    found = sum(t.missing + t.unexpected + t.altered for t in report.tables)
    shown = len(report.differences)
    listed = f" ({shown} listed)" if shown < found else ""
    return f"NOT CONSISTENT: {found} rows of {models} differ from the stream{listed}."


def comparison_row(t: TableComparison) -> tuple[str, ...]:
    """One row of the tables' counts."""
    return (t.table, *(str(n) for n in (t.position, t.rows, t.missing, t.unexpected, t.altered)))


def difference_key(difference: ReadModelDifference) -> str:
    """The row a difference names: a secret, a key version or an audit position."""
    if difference.position is not None:
        return f"position {difference.position}"
    if difference.version is not None:
        return f"tenant {difference.tenant_id!r} key version {difference.version}"
    return f"tenant {difference.tenant_id!r} secret {difference.name!r}"


@projections_group.command("status")
@json_option
@pass_cli
def status(cli: CliContext) -> None:
    """Show how far each read model has projected the stream (BEHIND is the lag)."""
    positions = cli.service.read_model_status()
    lag = cli.service.read_model_lag()  # events to apply (positions may have gaps)
    if cli.json_output:
        emit_json(
            {
                name: {"position": p, "head": h, "behind": lag[name]}
                for name, (p, h) in positions.items()
            }
        )
    else:
        rows = [(name, str(p), str(h), str(lag[name])) for name, (p, h) in positions.items()]
        emit_table(("READ MODEL", "POSITION", "HEAD", "BEHIND"), rows)
    ahead = [f"{name} at {p}" for name, (p, h) in positions.items() if p > h]
    if ahead:  # (its catch-up refuses too; events appended meanwhile would hide it)
        head = max(h for _, h in positions.values())
        raise click.ClickException(
            f"read model {', '.join(ahead)} is beyond the stream's newest event at {head} "
            "(events were deleted, or the stream restored from an older copy than the "
            "read models): the events that take those positions next would never reach "
            "it; run `keyledger audit verify`, then `keyledger projections rebuild`"
        )


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """A ``stop()`` that turns true on SIGINT or SIGTERM; a second SIGINT interrupts at once.

    The previous handlers come back when the block ends. Outside the main thread (where no
    handler can be installed) ``stop()`` stays false.
    """
    requested = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.set()

    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield requested.is_set
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@projections_group.command("run")
@click.option(
    "--idle-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="How long to wait for new events before looking again; a stop request is "
    "honoured within this time.",
)
@click.option("--once", is_flag=True, help="Catch up once and exit instead of following.")
@click.option(
    "--seal/--no-seal",
    default=True,
    show_default=True,
    help="Seal the audit stream whenever the worker is idle (needs an audit key).",
)
@json_option
@pass_cli
def run(cli: CliContext, idle_seconds: float, once: bool, seal: bool) -> None:
    """Keep the lagging read models current for every process: the projection worker.

    Follows the event stream (LISTEN/NOTIFY on PostgreSQL, polling on SQLite) and applies
    new events until SIGINT or SIGTERM, printing progress on stderr. Each catch-up is one
    transaction, so a killed worker resumes where it stopped and applies nothing twice.
    When idle (and with --once, once caught up), it seals the audit stream, as
    `keyledger audit seal` does, unless --no-seal.
    """
    service = cli.service
    if once:
        # (sealing as the worker does when idle; found by review: --once ignored --seal)
        applied = service.catch_up_read_models(seal=seal)
    else:
        lag = ", ".join(f"{name} {count}" for name, count in service.read_model_lag().items())
        click.echo(f"Following the event stream (events behind: {lag}).", err=True)
        total = 0

        def progress(count: int) -> None:
            nonlocal total
            total += count
            click.echo(f"Applied {count} events ({total} since start).", err=True)

        def retrying(error: StorageError, seconds: float) -> None:
            reason = terminal_safe(str(error))
            click.echo(f"Warning: {reason}; trying again in {seconds:g} s.", err=True)

        with stop_on_signals() as stop:
            applied = service.follow_read_models(
                stop=stop,
                idle_seconds=idle_seconds,
                on_progress=progress,
                seal=seal,
                on_retry=retrying,
            )
        click.echo("Stopped.", err=True)
    if cli.json_output:
        emit_json({"events_applied": applied})
    elif once:
        click.echo(f"Applied {applied} events; the read models have caught up.")
    else:
        click.echo(f"Applied {applied} events.")
