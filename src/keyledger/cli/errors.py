"""Library errors become one ``Error: ...`` line on stderr and exit status 1.

Usage errors (bad options, naive datetimes, a value given on the command line) stay click's
own ``UsageError`` and exit with status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from pydantic import ValidationError

from keyledger.errors import KeyledgerError


@contextmanager
def library_errors() -> Iterator[None]:
    """Turn a ``KeyledgerError`` raised in the block into a ``click.ClickException``."""
    try:
        yield
    except KeyledgerError as error:
        # The library's messages name tenants, secrets and key versions, never values or keys.
        raise click.ClickException(str(error) or type(error).__name__) from None


def configuration_error(error: ValidationError) -> click.ClickException:
    """Name the misconfigured environment variables without echoing their values."""
    names = sorted({_env_name(item["loc"]) for item in error.errors()})
    return click.ClickException(f"invalid configuration: {', '.join(names)}")


def _env_name(loc: tuple[Any, ...]) -> str:
    field = str(loc[0]) if loc else "settings"
    return field.upper() if field.upper().startswith("KEYLEDGER_") else f"KEYLEDGER_{field.upper()}"


class KeyledgerGroup(click.Group):
    """A group that translates library errors raised by any command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command with library errors translated."""
        with library_errors():
            return super().invoke(ctx)
