"""Confirmation of destructive commands: asked on stderr, answered on stdin, or ``--yes``.

A "no" (or anything but y/yes) aborts as click does ("Aborted!", exit 1). No answer at
all, because standard input is closed (a script, a cron job, a pipe from /dev/null), is an
error that says how to confirm in advance, not a bare "Aborted!".
"""

from __future__ import annotations

import sys

import click


def confirm(question: str, *, yes: bool) -> None:
    """Return if confirmed (or ``yes``); otherwise nothing may be changed: raise."""
    if yes:
        return
    click.echo(f"{question} [y/N]: ", nl=False, err=True)
    try:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise EOFError
        answer = input()
    except (EOFError, RuntimeError):  # RuntimeError: "input(): lost sys.stdin"
        click.echo(err=True)
        raise click.ClickException(
            "no answer to the confirmation (standard input is closed); nothing was changed. "
            "Pass --yes to confirm in advance."
        ) from None
    except KeyboardInterrupt:
        click.echo(err=True)
        raise click.Abort from None
    if answer.strip().lower() not in {"y", "yes"}:
        raise click.Abort
