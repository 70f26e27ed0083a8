"""Output: human tables by default, JSON with ``--json``."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shlex
import sys
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import click
from pydantic import BaseModel

from keyledger.cli.root import CliContext
from keyledger.models import Secret
from keyledger.validation import DEFAULT_IGNORABLE_SHOWN_AS_NOTHING

F = TypeVar("F", bound=Callable[..., Any])


def _enable_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    obj = ctx.find_object(CliContext)
    if value and obj is not None:
        obj.json_output = True


def json_option(command: F) -> F:
    """``--json`` on a command, the same as ``keyledger --json``."""
    return click.option(
        "--json",
        "json_output",
        is_flag=True,
        expose_value=False,
        callback=_enable_json,
        help="Machine-readable JSON output.",
    )(command)


def to_data(model: BaseModel) -> dict[str, Any]:
    """A result model as JSON-ready data."""
    return model.model_dump(mode="json")


def secret_data(secret: Secret) -> dict[str, Any]:
    """A retrieved secret as JSON data; bytes values are base64 with ``value_encoding``."""
    data = secret.model_dump(mode="json", exclude={"value"})
    if isinstance(secret.value, bytes):
        data["value"] = base64.b64encode(secret.value).decode("ascii")
        data["value_encoding"] = "base64"
    else:
        data["value"] = secret.value
        data["value_encoding"] = "utf-8"
    return data


def emit_json(data: object) -> None:
    """Write ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def timestamp(value: datetime | None) -> str:
    """A UTC timestamp to the second, or ``-``."""
    if value is None:
        return "-"
    utc = value.astimezone(UTC)  # (%Y does not pad years before 1000)
    return f"{utc.year:04d}-" + utc.strftime("%m-%dT%H:%M:%SZ")


def text(value: object) -> str:
    """A table cell: ``-`` for nothing."""
    return "-" if value is None or value == "" else str(value)


def _escaped(char: str) -> str:
    """``\\uXXXX`` (or ``\\UXXXXXXXX``): what both Python and bash's ``$'...'`` read as
    that character (bash reads ``\\xXX`` as a byte, not as U+00XX)."""
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(value: str) -> str:
    """``value`` for a terminal: every character that prints nothing or changes how the
    rest prints (a zero-width space, a soft hyphen, a direction override, a line
    separator; anything ``str.isprintable`` rejects but the plain space) as its escape,
    and a backslash doubled, so that no two names show alike. Names stored by releases
    before 0.12 can hold such characters, and in a table a direction override would
    reorder the rest of its row (CVE-2021-42574)."""
    if value.isprintable() and "\\" not in value and _SHOWN_AS_NOTHING.search(value) is None:
        return value
    return "".join("\\\\" if c == "\\" else c if _plain(c) else _escaped(c) for c in value)


# Printable to str.isprintable(), yet shown as nothing (validation.py has the list).
_SHOWN_AS_NOTHING = re.compile(f"[{DEFAULT_IGNORABLE_SHOWN_AS_NOTHING}]")


def _plain(char: str) -> bool:
    return char.isprintable() and _SHOWN_AS_NOTHING.match(char) is None


def terminal_safe(message: str) -> str:
    """A message for a terminal, on one line: every character that is not printable (an
    escape sequence's ESC, a BEL, a newline) as its escape. Messages can quote text from
    the store that no validation saw: a driver's message quoted a state planted as text,
    and its escape sequence reached the terminal as ``Error: ...``, or a newline in it
    began a line of its own, a fake verdict (both found by review)."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else _escaped(c) for c in message)


def shell_word(value: str) -> str:
    """``value`` as one word of a command line to copy: quoted, and with what
    ``shown`` escapes in bash's ``$'...'`` form, so the hint shows what it runs."""
    if value.isprintable() and _SHOWN_AS_NOTHING.search(value) is None:
        return shlex.quote(value)
    quoted = "".join(_escaped(c) if not _plain(c) else "\\" + c if c in "\\'" else c for c in value)
    return f"$'{quoted}'"


_NO_WIDTH = frozenset(("Mn", "Me", "Cf"))  # marks drawn on the character before, formats


def _width(cell: str) -> int:
    """Terminal columns: two for a wide (East Asian) character, none for a mark."""
    if cell.isascii():
        return len(cell)
    return sum(
        0
        if unicodedata.category(c) in _NO_WIDTH
        else 2
        if unicodedata.east_asian_width(c) in "WF"
        else 1
        for c in cell
    )


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns separated by two spaces, headers first; cells ``shown``."""
    emit_table_pages(headers, [rows])


def emit_table_pages(headers: Sequence[str], pages: Iterable[Sequence[Sequence[str]]]) -> None:
    """``emit_table`` for rows that come in pages, each written before the next is read:
    columns are as wide as the header and the rows so far need (a wider cell in a later
    page widens its column from there on). The header goes out with the first page, or
    alone when there is none."""
    widths = [0] * len(headers)
    head: list[Sequence[str]] = [headers]
    for page in itertools.chain(pages, [()]):
        cells = [[shown(cell) for cell in row] for row in (*head, *page)]
        head = []
        for row in cells:
            widths = [max(w, _width(cell)) for w, cell in zip(widths, row, strict=True)]
        for row in cells:
            click.echo(
                "  ".join(
                    cell + " " * (w - _width(cell)) for cell, w in zip(row, widths, strict=True)
                ).rstrip()
            )


def emit_json_pages(pages: Iterable[Sequence[object]]) -> None:
    """``emit_json`` of the concatenated pages, each written before the next is read: the
    same text as ``emit_json`` of one list."""
    opened = False
    for page in pages:
        for item in page:
            text = json.dumps(item, indent=2, ensure_ascii=False)
            indented = "\n".join("  " + line for line in text.splitlines())
            click.echo(("[\n" if not opened else ",\n") + indented, nl=False)
            opened = True
    click.echo("\n]" if opened else "[]")


def is_terminal(stream: Literal["stdin", "stdout", "stderr"]) -> bool:
    """True when a person, not a pipe or file, is on ``stream``."""
    handle = getattr(sys, stream)
    return handle is not None and bool(handle.isatty())  # None: the stream was closed
