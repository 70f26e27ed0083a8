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
from keyledger.infrastructure.settings import invalid_configuration


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
    return click.ClickException(str(invalid_configuration(error)))


class KeyledgerGroup(click.Group):
    """A group that translates library errors raised by any command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command with library errors translated."""
        with library_errors():
            return super().invoke(ctx)
