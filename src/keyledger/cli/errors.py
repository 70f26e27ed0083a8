"""Library errors become one ``Error: ...`` line on stderr and exit status 1.

Usage errors (bad options, naive datetimes, a value given on the command line) stay click's
own ``UsageError`` and exit with status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from keyledger.errors import KeyledgerError


@contextmanager
def library_errors() -> Iterator[None]:
    """Turn a ``KeyledgerError`` raised in the block into a ``click.ClickException``."""
    try:
        yield
    except KeyledgerError as error:
        # The library's messages name tenants, secrets and key versions, never values or keys.
        raise click.ClickException(str(error) or type(error).__name__) from None


class KeyledgerGroup(click.Group):
    """A group that translates library errors raised by any command below it."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command with library errors translated."""
        with library_errors():
            return super().invoke(ctx)
