"""What a deleted or reordered event leaves in the stream: gaps and version breaks.

An event's own tag (``event_tags``) shows that its bytes are as written, but not that
the events around it are all there. Two traces remain of a deleted or moved event in
the unsealed tail: a gap in the positions (SQLite numbers events 1, 2, 3, ... with no
gap, even after rolled-back appends; PostgreSQL's sequence leaves gaps on rollback, so
there a gap proves nothing), and an aggregate whose versions skip or run backwards.

``audit verify`` reports both; ``audit seal`` stops before either, so that a seal can
never vouch for the stream as it was left by a deletion and hide it from every later
verification (found by review: the routine seal of an idle worker did exactly that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from uuid import UUID

from keyledger.application.stream import Row, positions_of
from keyledger.models import TamperKind

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

# (the position of version ``version`` of aggregate ``originator_id``, or None)
EarlierLookup = Callable[[UUID, int], "int | None"]


def gap_detail(first: int, last: int) -> str:
    return (
        f"positions {first}..{last} are missing: SQLite numbers events without gaps, "
        "so these events were deleted"
    )


def version_break(
    row: Row, versions: dict[UUID, tuple[int, int]], earlier: EarlierLookup
) -> tuple[TamperKind, str] | None:
    """What ``row``'s version says of its aggregate's earlier events, given the versions
    met so far (``versions``: the newest version and its position, by aggregate; only
    versions after the first are remembered, since most rows of a tail are one-event
    aggregates, and for an aggregate first met at a later version its previous version
    is looked up by primary key). None when nothing is amiss."""
    before = versions.get(row.originator_id)
    if row.version > 1:
        versions[row.originator_id] = (row.version, row.position)
    if before is None:
        if row.version > 1:
            position = earlier(row.originator_id, row.version - 1)
            if position is None:
                return "deleted", f"version {row.version - 1} of this event's aggregate is missing"
            if position > row.position:
                return (
                    "reordered",
                    f"version {row.version - 1} of this aggregate comes later, at {position}",
                )
        return None
    version, _ = before
    if row.version <= version:
        return "reordered", f"version {row.version} of this aggregate follows version {version}"
    if row.version > version + 1:
        return "deleted", f"versions {version + 1}..{row.version - 1} of this aggregate are missing"
    return None


def earlier_versions(
    ledger: Ledger, rows: list[Row], versions: dict[UUID, tuple[int, int]]
) -> EarlierLookup:
    """The lookup ``version_break`` needs for ``rows`` (a page, in stream order), from
    one batch of primary-key lookups: the previous version of each row whose aggregate
    was not met in earlier pages (``versions``), instead of a read per row."""
    wanted = list(
        {
            (row.originator_id, row.version - 1): None
            for row in rows
            if row.version > 1 and row.originator_id not in versions
        }
    )
    found = positions_of(ledger, wanted) if wanted else {}
    return lambda originator_id, version: found.get((originator_id, version))
