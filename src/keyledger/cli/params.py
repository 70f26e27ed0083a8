"""Parameter types and option checks shared by the command groups."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import click

_FINER_THAN_MICROSECONDS = re.compile(r"[.,]\d{7,}")


class AwareDateTime(click.ParamType[datetime]):
    """An ISO 8601 timestamp that names its offset (``Z`` or ``+02:00``); naive ones are refused."""

    name = "timestamp"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        """Parse ``value``; a missing offset is a usage error (it would be ambiguous)."""
        if isinstance(value, datetime):
            parsed = value
        else:
            if _FINER_THAN_MICROSECONDS.search(str(value)):
                # fromisoformat would drop the extra digits (round down): a --since would
                # then take in events before the instant given, an --until leave out
                # events before it. Instants are kept to the microsecond.
                self.fail(
                    f"{value!r} has more than 6 fractional digits: instants are kept to "
                    "the microsecond",
                    param,
                    ctx,
                )
            try:
                parsed = datetime.fromisoformat(str(value))
            except ValueError:
                self.fail(f"{value!r} is not an ISO 8601 timestamp", param, ctx)
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            self.fail(
                f"{value!r} has no timezone: add 'Z' or an offset such as '+00:00'", param, ctx
            )
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:59-05:00 is past the last UTC instant
            self.fail(f"{value!r} is out of range in UTC", param, ctx)


class KeyValue(click.ParamType[tuple[str, str]]):
    """A ``KEY=VALUE`` pair; the value may itself contain ``=``."""

    name = "key=value"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        """Split at the first ``=``; a missing ``=`` or an empty key is a usage error."""
        if isinstance(value, tuple):
            return (str(value[0]), str(value[1]))
        key, sep, item = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        return key, item


def metadata_from_pairs(pairs: tuple[tuple[str, str], ...]) -> dict[str, str] | None:
    """``--metadata`` pairs as a dict; None (keep the old metadata) when none were given."""
    if not pairs:
        return None
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise click.UsageError(f"--metadata key given twice: {', '.join(duplicates)}")
    return dict(pairs)


AWARE_DATETIME = AwareDateTime()
KEY_VALUE = KeyValue()


# Destructive commands ask first (cli/confirm.py); --yes answers in advance.
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
