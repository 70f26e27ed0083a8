"""``keyledger projections``: maintain the read models built from the event stream."""

from __future__ import annotations

import sys

import click

from keyledger.cli.render import emit_json, emit_table, is_terminal, json_option
from keyledger.cli.root import CliContext, pass_cli


@click.group("projections")
def projections_group() -> None:
    """Maintain the read models (listing, audit queries) built from the stream."""


@projections_group.command("rebuild")
@json_option
@pass_cli
def rebuild(cli: CliContext) -> None:
    """Drop every read model and rebuild it from the event stream.

    Readers keep seeing the old rows until the rebuild commits.
    """
    service = cli.service
    if is_terminal("stderr"):
        head = max(head for _, head in service.read_model_status().values())
        with click.progressbar(length=head, label="Replaying", file=sys.stderr) as bar:
            replayed = service.rebuild_read_models(progress=bar.update)
    else:
        replayed = service.rebuild_read_models()
    if cli.json_output:
        emit_json({"events_replayed": replayed})
    else:
        click.echo(f"Rebuilt the read models from {replayed} events.")


@projections_group.command("status")
@json_option
@pass_cli
def status(cli: CliContext) -> None:
    """Show how far each read model has projected the stream."""
    positions = cli.service.read_model_status()
    if cli.json_output:
        emit_json({name: {"position": p, "head": h} for name, (p, h) in positions.items()})
    else:
        rows = [(name, str(p), str(h), str(h - p)) for name, (p, h) in positions.items()]
        emit_table(("READ MODEL", "POSITION", "HEAD", "BEHIND"), rows)
