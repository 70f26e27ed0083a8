"""``keyledger audit seal|anchor|verify``: tamper evidence for the audit stream.

Attached to the ``audit`` group of ``keyledger.cli.audit``; importing this module (which
imports ``audit_export``) gives the group with every command.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from pydantic import ValidationError

from keyledger.cli.audit import audit_group
from keyledger.cli.audit_export import (
    open_output,
    output_option,
)  # also registers replay and export
from keyledger.cli.render import (
    emit_json,
    emit_table,
    json_option,
    terminal_safe,
    text,
    to_data,
)
from keyledger.cli.root import CliContext, pass_cli
from keyledger.models import (
    Checkpoint,
    TamperFinding,
    VerifyReport,
)

__all__ = ["audit_group"]


CHECKPOINT_HEADERS = ("SEQUENCE", "FROM", "TO", "EVENTS", "DIGEST")
FINDING_HEADERS = ("POSITION", "KIND", "CHECKPOINT", "DETAIL")


# -- seal and anchor ----------------------------------------------------------------------


def checkpoint_row(checkpoint: Checkpoint) -> tuple[str, ...]:
    """One row of the checkpoints table: the segment FROM..TO it seals."""
    return (
        str(checkpoint.sequence),
        str(checkpoint.after_position + 1),
        str(checkpoint.to_position),
        str(checkpoint.event_count),
        checkpoint.digest,
    )


@audit_group.command("seal")
@click.option(
    "--accept-untagged",
    "accept_untagged",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="POSITION",
    help="Seal the event at this stream position as it is, untagged or tagged with an "
    "audit key that is not configured (after investigating it; `audit verify` lists "
    "them). Repeat for several.",
)
@json_option
@pass_cli
def seal(cli: CliContext, accept_untagged: tuple[int, ...]) -> None:
    """Append checkpoints that seal every event of the stream not sealed yet.

    Needs the audit key (KEYLEDGER_AUDIT_KEY, or derived from the master key). Sealing
    stops at an event whose tag does not verify, or that has no tag (or one made with an
    audit key that is not configured) unless its position was given with
    --accept-untagged: it names the position and exits 1. The checkpoints
    are recorded with --user as the actor.
    """
    result = cli.service.seal_audit(**cli.actor, accept_untagged=accept_untagged)
    if cli.json_output:
        emit_json(to_data(result))
    else:
        if result.checkpoints:
            emit_table(CHECKPOINT_HEADERS, [checkpoint_row(c) for c in result.checkpoints])
        click.echo(f"Sealed {result.sealed_events} events in {len(result.checkpoints)} checkpoints")
    problems = []  # sealed as far as it could: say what stopped it, on one line, exit 1
    if result.stopped_at is not None:
        problems.append(f"sealing stopped at position {result.stopped_at}: {result.stopped_reason}")
    if result.anchor_error is not None:  # sealed, but the anchor is behind
        problems.append(result.anchor_error)
    if problems:
        click.echo(f"Error: {terminal_safe('; '.join(problems))}", err=True)
        click.get_current_context().exit(1)


@audit_group.command("anchor")
@output_option
@pass_cli
def anchor(cli: CliContext, output: str | None) -> None:
    """Write every checkpoint of the seal chain as JSON lines: the anchor.

    Keep the anchor somewhere the database's administrators cannot write; `keyledger
    audit verify --anchor FILE` then shows a stream cut short or a chain rewritten.
    """
    checkpoints = cli.service.audit_checkpoints()
    if not checkpoints:
        raise click.ClickException("no checkpoints to anchor: run `keyledger audit seal` first")
    with open_output(output, append=False) as out:
        for checkpoint in checkpoints:
            out.write(json.dumps(checkpoint.model_dump(mode="json")) + "\n")
    if output is not None:
        click.echo(f"Wrote {len(checkpoints)} checkpoints to {output}", err=True)


# -- verify -------------------------------------------------------------------------------


class AnchorFile(click.ParamType[list[Checkpoint]]):
    """A file of checkpoints as JSON lines (what ``audit anchor`` writes)."""

    name = "file"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> list[Checkpoint]:
        """Read and parse the file; an unreadable or malformed one is a usage error."""
        if isinstance(value, list):
            return value
        try:
            lines = Path(str(value)).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            self.fail(f"cannot read {value}: {reason}", param, ctx)
        checkpoints = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                checkpoints.append(Checkpoint.model_validate_json(line))
            except ValidationError as error:
                problem = error.errors()[0]
                where = ".".join(str(part) for part in problem["loc"])
                self.fail(
                    f"line {number} of {value} is not a checkpoint: "
                    f"{where + ': ' if where else ''}{problem['msg']}",
                    param,
                    ctx,
                )
        if not checkpoints:
            self.fail(f"{value} holds no checkpoints", param, ctx)
        return checkpoints


def verify_summary(report: VerifyReport) -> str:
    """The first line of ``audit verify``."""
    if not report.intact:
        return f"NOT INTACT: {len(report.findings)} findings"
    return (
        f"Intact: {report.checked_events} events checked, {report.sealed_events} sealed in "
        f"{report.checkpoints} checkpoints, {report.unsealed_events} unsealed after position "
        f"{report.last_sealed_position}"
    )


def finding_row(finding: TamperFinding) -> tuple[str, ...]:
    """One row of the findings table."""
    return (str(finding.position), finding.kind, text(finding.checkpoint), finding.detail)


@audit_group.command("verify")
@click.option(
    "--from-position",
    type=click.IntRange(min=0),
    metavar="POSITION",
    default=0,
    show_default=True,
    help="Check from this stream position on.",
)
@click.option(
    "--anchor",
    "anchor_checkpoints",
    type=AnchorFile(),
    metavar="FILE",
    help="Checkpoints kept elsewhere (from `keyledger audit anchor`) to check the chain against.",
)
@json_option
@pass_cli
def verify(
    cli: CliContext, from_position: int, anchor_checkpoints: list[Checkpoint] | None
) -> None:
    """Check the audit stream against its checkpoints, event tags and an anchor.

    Exits 0 only when the stream is intact, 1 when there are findings: events modified,
    deleted, inserted, reordered or untagged, checkpoints invalid or missing, or a stream
    shorter than its anchor (truncated).
    """
    report = cli.service.verify_audit(from_position=from_position, anchor=anchor_checkpoints)
    if cli.json_output:
        emit_json(to_data(report))
    else:
        click.echo(verify_summary(report))
        if report.intact and report.anchored_checkpoints:
            click.echo(f"Anchor: {report.anchored_checkpoints} checkpoints match the stream")
        if report.findings:
            emit_table(FINDING_HEADERS, [finding_row(f) for f in report.findings])
    if not report.intact:
        click.get_current_context().exit(1)
