"""Library errors become one ``Error: ...`` line on stderr and exit status 1.

Usage errors (bad options, naive datetimes, a value given on the command line) stay click's
own ``UsageError`` and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar, cast

import click

from keyledger.errors import KeyledgerError, ShredIncomplete

T = TypeVar("T")


@contextmanager
def library_errors() -> Iterator[None]:
    """Turn a ``KeyledgerError`` raised in the block into a ``click.ClickException``."""
    try:
        yield
    except KeyledgerError as error:
        from keyledger.cli.render import terminal_safe  # (render imports the CLI's root)

        # The library's messages name tenants, secrets and key versions, never values or keys.
        raise click.ClickException(terminal_safe(str(error) or type(error).__name__)) from None


def despite_shred(call: Callable[[], T]) -> tuple[T, ShredIncomplete | None]:
    """``(call(), None)``; when the operation completed but its shred did not, its result
    and the ``ShredIncomplete``: the command reports what was done, then the error (it
    reported nothing, and a rerun found nothing left to report: found by review)."""
    try:
        return call(), None
    except ShredIncomplete as error:
        if error.result is None:
            raise
        return cast(T, error.result), error


class KeyledgerCommand(click.Command):
    """A command whose usage errors never repeat words it did not expect: a value typed
    after the arguments (``secrets get acme db sk_live_...``) would be echoed by click's
    "Got unexpected extra argument (...)" into terminals and CI logs (found by review;
    ``secrets put`` refused them without repeating them already)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            if not error.message.startswith("Got unexpected extra argument"):
                raise
            raise click.UsageError(
                f"{ctx.command_path} got more arguments than it takes (not repeated "
                "here: values are never taken from the command line, and one typed "
                "there would land in logs); see --help",
                ctx,
            ) from None


class KeyledgerSubgroup(click.Group):
    """A group of ``KeyledgerCommand``s."""

    command_class = KeyledgerCommand


class KeyledgerGroup(click.Group):
    """A group that translates library errors raised by any command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command with library errors translated."""
        with library_errors():
            return super().invoke(ctx)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's ``main``, with output that cannot be written (a full disk, /dev/full)
        reported as one ``Error:`` line and exit status 1, not a traceback (found by
        review). The output is flushed here, where that can still be reported: at the
        interpreter's exit, Python prints its own warning instead. (A closed pipe, as
        of ``| head``, is click's: it exits 1 quietly.)"""
        code: Any = 0
        _log_safely()
        try:
            super().main(*args, **kwargs)
        except SystemExit as exit_:
            code = exit_.code
        except OSError as error:
            code = _unwritable(error)
        try:
            sys.stdout.flush()
        except OSError as error:
            code = _unwritable(error)
        if kwargs.get("standalone_mode", True):
            sys.exit(code)
        return code


class _SafeStderrHandler(logging.Handler):
    """What Python's last-resort handler does (each message on stderr as it is, from
    warnings up), with every character that is not printable escaped: a warning can quote
    a driver's message that quotes text planted in the store (found by review: an audit
    catch-up's warning carried an escape sequence to the terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        from keyledger.cli.render import terminal_safe  # (render imports the CLI's root)

        try:
            sys.stderr.write(terminal_safe(self.format(record)) + "\n")
        except Exception:  # (as every handler: a failing log line never fails the call)
            self.handleError(record)


def _log_safely() -> None:
    """In a CLI process whose logging nobody configured (whose warnings would go to the
    last-resort handler), keyledger's warnings go through ``_SafeStderrHandler``."""
    logger = logging.getLogger("keyledger")
    if logging.getLogger().handlers or any(
        isinstance(handler, _SafeStderrHandler) for handler in logger.handlers
    ):
        return
    logger.addHandler(_SafeStderrHandler(logging.WARNING))


def _unwritable(error: OSError) -> int:
    """Report output that could not be written, its reason only (never the output)."""
    with suppress(OSError):  # (stdout cannot take more: its buffer is dropped at exit)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives until the process ends)
    reason = error.strerror or type(error).__name__
    click.echo(f"Error: cannot write the output: {reason}", err=True)
    return 1
