"""Reading VACUUM (FULL, VERBOSE)'s report of the rows it kept, in any server language.

A ``VACUUM FULL`` copies into the table's new file every row version that a snapshot
open elsewhere may still see; nothing raises, and the only account of it is the INFO
notice of the server's ``copy_table_data``, whose detail begins "N dead row versions
cannot be removed yet." The text follows the server's ``lc_messages``: a shred that
looked for the English sentence would find nothing on a German server and report a
rewrite that kept deleted key material as complete.

So the report is found by the routine that sent it (a notice field the server never
translates), and N is the one number on the first line of its detail, which holds in
every translation PostgreSQL 15 ships (tests/unit/test_pg_vacuum_report.py holds them).
A report that cannot be read that way (no report, or a first line with no number or
several) is ``None``: the caller cannot tell what was kept, and says the shred is
incomplete rather than claim it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple, Protocol

REPORTING_ROUTINE = "copy_table_data"  # PostgreSQL's cluster.c, which VACUUM FULL runs
_ENGLISH = re.compile(r"^(\d+) dead row versions cannot be removed yet")
_NUMBER = re.compile(r"\d+")


class Notice(Protocol):
    """The fields of a server notice this reads (psycopg's ``Diagnostic`` has them)."""

    @property
    def source_function(self) -> str | None: ...

    @property
    def message_detail(self) -> str | None: ...


class ServerNotice(NamedTuple):
    """The fields of a notice, copied while its handler runs (psycopg's ``Diagnostic``
    reads them from a result that is freed once the handler returns)."""

    source_function: str | None
    message_detail: str | None

    @classmethod
    def of(cls, notice: Notice) -> ServerNotice:
        return cls(notice.source_function, notice.message_detail)


def kept_row_versions(notices: Iterable[Notice]) -> int | None:
    """The dead row versions VACUUM FULL kept, by its report among ``notices``; None
    when no report among them can be read."""
    for notice in notices:
        detail = notice.message_detail
        if not detail:
            continue  # ("vacuuming ...", the routine's first notice, has no detail)
        routine = notice.source_function
        first_line = detail.split("\n", 1)[0]
        if routine is None:  # a server or proxy that leaves the field out: English only
            english = _ENGLISH.match(first_line)
            if english is not None:
                return int(english.group(1))
            continue
        if routine != REPORTING_ROUTINE:
            continue
        numbers = _NUMBER.findall(first_line)
        return int(numbers[0]) if len(numbers) == 1 else None
    return None
