"""Verifying the audit stream against its checkpoints, its event tags and an anchor.

Three layers, each catching what the one before cannot:

1. The checkpoint chain: every checkpoint's digest is recomputed under its audit key and
   must chain to the one before; sequences must be contiguous and segments adjacent.
2. Sealed segments: every stored event inside a segment is tagged again with its position
   and compared with the tag the checkpoint kept. An event whose tag differs was modified;
   one the checkpoint does not list was inserted; a listed position with no event was
   deleted; an event whose bytes match the tag kept for another position was moved there
   (reordered).
3. The unsealed tail (after the newest checkpoint): each event's own tag (``event_tags``)
   shows modified or forged events; untagged events are reported; an aggregate whose
   versions skip or run backwards shows deleted or reordered events. A deleted newest
   event of an aggregate, or a deleted one-event audit record, cannot be seen in the tail:
   that is what sealing often, and anchoring, are for.

An anchor (checkpoints exported and kept elsewhere) proves the chain once reached each
anchored checkpoint: a missing or different one means the newest rows were cut or the
chain rewritten.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from uuid import UUID

from keyledger.application.continuity import earlier_versions, gap_detail, version_break
from keyledger.application.sealing import (
    KEY_DROPPED,
    SEALED_TAG_BYTES,
    ZERO_DIGEST,
    checkpoint_digest,
    decode_checkpoint,
    sealed_tag,
    tag_status,
)
from keyledger.application.stream import (
    Row,
    events_key_intact,
    head_position,
    iter_seal_rows,
    repeated_events,
    row_at,
    rows_after,
)
from keyledger.domain.seal import AuditSeal, decode_positions
from keyledger.errors import MasterKeyUnavailable
from keyledger.infrastructure.audit_keys import AuditKey
from keyledger.models import Checkpoint, TamperFinding, TamperKind, VerifyReport

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

REORDER_SEARCH_LIMIT = 10_000


@dataclass
class _Segment:
    """One checkpoint's segment; ``key`` None when its tags cannot be trusted or checked.

    Only the chain's outline is kept for every segment; its positions and tags are read
    again from the checkpoint row when the scan enters the segment (``open``) and dropped
    when it leaves (``close_segment``), so memory does not grow with the stream.
    """

    sequence: int
    after: int
    to: int
    key: AuditKey | None
    row_position: int
    digest: bytes
    tags: dict[int, bytes] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    suspects: list[tuple[Row, TamperKind]] = field(default_factory=list)

    def open(self, ledger: Ledger) -> None:
        if self.key is None:
            return
        row = row_at(ledger, self.row_position)
        checkpoint = None if row is None else decode_checkpoint(ledger, row)
        if checkpoint is None or checkpoint.digest != self.digest:
            return  # changed since it was verified: the next verification reports it
        positions = decode_positions(self.after, checkpoint.positions)
        blob, size = checkpoint.tags, SEALED_TAG_BYTES
        self.tags = {p: blob[i * size : (i + 1) * size] for i, p in enumerate(positions)}


class _Verifier:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.keys = ledger.audit_keys
        self.findings: list[TamperFinding] = []
        self.segments: list[_Segment] = []
        self.stream_checkpoints: dict[int, tuple[int, bytes]] = {}
        self.independent_seen = False  # a checkpoint sealed with KEYLEDGER_AUDIT_KEY

    def found(
        self, kind: TamperKind, position: int, detail: str, checkpoint: int | None = None
    ) -> None:
        self.findings.append(
            TamperFinding(kind=kind, position=position, detail=detail, checkpoint=checkpoint)
        )

    # -- 1. the chain -------------------------------------------------------------------

    def load_chain(self) -> None:
        previous_digest, previous_to, expected = ZERO_DIGEST, 0, 1
        for row in iter_seal_rows(self.ledger):
            checkpoint = decode_checkpoint(self.ledger, row)
            if checkpoint is None:
                self.found("checkpoint_invalid", row.position, "the checkpoint does not decode")
                continue
            sequence = checkpoint.originator_version
            self.stream_checkpoints[sequence] = (row.position, checkpoint.digest)
            if sequence != expected:
                self.found(
                    "checkpoint_missing",
                    row.position,
                    f"checkpoints {expected}..{sequence - 1} of the chain are missing",
                    sequence,
                )
            key = self._checked_key(row.position, checkpoint, previous_digest, previous_to)
            if key is not None and self.keys.is_independent(key.key_id):
                self.independent_seen = True
            elif key is not None and self.independent_seen:
                self.found(
                    "checkpoint_invalid",
                    row.position,
                    "sealed with a master-key-derived audit key after the chain moved to "
                    "KEYLEDGER_AUDIT_KEY: a master-key holder could have forged it",
                    sequence,
                )
                key = None
            tags = checkpoint.tags
            if key is not None and (
                len(tags) != checkpoint.event_count * SEALED_TAG_BYTES
                or len(decode_positions(checkpoint.after_position, checkpoint.positions))
                != checkpoint.event_count
            ):
                self.found("checkpoint_invalid", row.position, "malformed", sequence)
                key = None
            self.segments.append(
                _Segment(
                    sequence,
                    checkpoint.after_position,
                    checkpoint.to_position,
                    key,
                    row.position,
                    checkpoint.digest,
                )
            )
            previous_digest, previous_to = checkpoint.digest, checkpoint.to_position
            expected = sequence + 1

    def _checked_key(
        self,
        position: int,
        checkpoint: AuditSeal.Checkpoint,
        previous_digest: bytes,
        previous_to: int,
    ) -> AuditKey | None:
        sequence = checkpoint.originator_version
        key = self.keys.get(bytes.fromhex(checkpoint.key_id))
        if key is None:
            self.found(
                "unverifiable",
                position,
                f"checkpoint {sequence} was sealed with audit key {checkpoint.key_id}, "
                "which is not configured",
                sequence,
            )
            return None
        if not hmac.compare_digest(checkpoint_digest(key, checkpoint), checkpoint.digest):
            self.found(
                "checkpoint_invalid", position, "the checkpoint's digest does not verify", sequence
            )
            return None
        if checkpoint.previous_digest != previous_digest:
            self.found(
                "checkpoint_invalid",
                position,
                "the checkpoint does not chain to the one before it",
                sequence,
            )
        if checkpoint.after_position != previous_to:
            self.found(
                "checkpoint_invalid",
                position,
                f"the checkpoint starts after position {checkpoint.after_position}, "
                f"the one before it ended at {previous_to}",
                sequence,
            )
        return key

    # -- 2. sealed segments -------------------------------------------------------------

    def check_sealed(self, segment: _Segment, row: Row) -> None:
        if segment.key is None:
            return
        expected = segment.tags.get(row.position)
        if expected is None:
            segment.suspects.append((row, "inserted"))
        elif hmac.compare_digest(sealed_tag(segment.key, row), expected):
            segment.seen.add(row.position)
        else:
            segment.suspects.append((row, "modified"))

    def close_segment(self, segment: _Segment) -> None:
        try:
            self._report_segment(segment)
        finally:
            segment.tags, segment.seen, segment.suspects = {}, set(), []

    def _report_segment(self, segment: _Segment) -> None:
        if segment.key is None:
            return
        missing = [p for p in segment.tags if p not in segment.seen]
        moved: dict[int, int] = {}  # stored position -> position it was sealed at
        open_positions = set(missing)
        if len(segment.suspects) * len(missing) <= REORDER_SEARCH_LIMIT:
            for row, _ in segment.suspects:
                for position in sorted(open_positions):
                    if hmac.compare_digest(
                        _tag_at(segment.key, row, position), segment.tags[position]
                    ):
                        moved[row.position] = position
                        open_positions.discard(position)
                        break
        stored_positions = {row.position for row, _ in segment.suspects}
        for row, kind in segment.suspects:
            if row.position in moved:
                self.found(
                    "reordered",
                    row.position,
                    f"the event sealed at position {moved[row.position]} is now here",
                    segment.sequence,
                )
            elif kind == "inserted":
                self.found(
                    "inserted",
                    row.position,
                    "an event the checkpoint never sealed",
                    segment.sequence,
                )
            else:
                self.found(
                    "modified",
                    row.position,
                    "the event differs from what was sealed",
                    segment.sequence,
                )
        for position in sorted(open_positions):
            if position not in stored_positions:
                self.found("deleted", position, "a sealed event is missing", segment.sequence)

    def found_gap(self, first: int, last: int) -> None:
        self.found("deleted", first, gap_detail(first, last))

    # -- 3. the tail --------------------------------------------------------------------

    def check_tail(self, rows: list[Row], versions: dict[UUID, tuple[int, int]]) -> None:
        earlier = earlier_versions(self.ledger, rows, versions)
        for row in rows:
            if row.malformed:
                self.found("modified", row.position, MALFORMED)
                continue
            status = tag_status(self.keys, row, independent_only=self.independent_seen)
            if status == "untagged":
                self.found("untagged", row.position, "an unsealed event without a tag")
            elif status == "mismatch":
                self.found(
                    "modified",
                    row.position,
                    "the event's own tag does not verify: altered or forged",
                )
            elif status == "unknown_key":
                self.found(
                    "unverifiable",
                    row.position,
                    "tagged with an audit key that is not configured, or with a "
                    "master-key-derived key after the chain moved to KEYLEDGER_AUDIT_KEY",
                )
            # Version continuity of the row's aggregate (continuity)
            found = version_break(row, versions, earlier)
            if found is not None:
                self.found(found[0], row.position, found[1])

    # -- anchors ------------------------------------------------------------------------

    def check_anchor(self, anchor: list[Checkpoint], head: int) -> None:
        truncated_reported = False
        for anchored in sorted(anchor, key=lambda c: c.sequence):
            stored = self.stream_checkpoints.get(anchored.sequence)
            position = anchored.position if anchored.position is not None else anchored.to_position
            if stored is None:
                if position > head and not truncated_reported:
                    truncated_reported = True
                    self.found(
                        "truncated",
                        head + 1,
                        f"the stream ends at position {head}, but anchored checkpoint "
                        f"{anchored.sequence} sealed events up to {anchored.to_position} "
                        f"and sat at position {position}",
                        anchored.sequence,
                    )
                elif position <= head:
                    self.found(
                        "checkpoint_missing",
                        position,
                        f"anchored checkpoint {anchored.sequence} is missing from the stream",
                        anchored.sequence,
                    )
            elif stored[1].hex() != anchored.digest:
                self.found(
                    "checkpoint_invalid",
                    stored[0],
                    f"checkpoint {anchored.sequence} differs from its anchored digest",
                    anchored.sequence,
                )


MALFORMED = (
    "the row's columns hold no event (an id, version, topic or state of another type, "
    "or out of range): altered in the database"
)


def _tag_at(key: AuditKey, row: Row, position: int) -> bytes:
    return sealed_tag(key, Row(position, row.originator_id, row.version, row.topic, row.state))


def verify(
    ledger: Ledger, *, from_position: int = 0, anchor: list[Checkpoint] | None = None
) -> VerifyReport:
    """Check the stream from ``from_position`` on (see the module doc).
    ``MasterKeyUnavailable`` without any audit key: every tag would be reported as
    unverifiable, a false alarm of tampering where the setup is what is wrong (found by
    review)."""
    if ledger.audit_keys.empty:
        raise MasterKeyUnavailable(
            "no audit key: set KEYLEDGER_AUDIT_KEY, or the master key it is derived from "
            "(a retired one in KEYLEDGER_PREVIOUS_MASTER_KEYS verifies what it tagged)"
        )
    verifier = _Verifier(ledger)
    verifier.load_chain()
    if from_position:  # checkpoints whose segments end before it are out of scope (their
        ends = {s.sequence: s.to for s in verifier.segments}  # keys may be retired since)
        verifier.findings = [
            f
            for f in verifier.findings
            if f.checkpoint is None or ends.get(f.checkpoint, from_position) >= from_position
        ]
    if not events_key_intact(ledger):
        verifier.found("key_dropped", 0, KEY_DROPPED)
        for position, originator_id, version, first in repeated_events(ledger):
            verifier.found(
                "duplicated",
                position,
                f"a second copy of version {version} of aggregate {originator_id}, "
                f"first stored at position {first}",
            )
    head = head_position(ledger)
    segments = [s for s in verifier.segments if s.to >= from_position]
    last_sealed = verifier.segments[-1].to if verifier.segments else 0
    start = segments[0].after if segments else max(from_position - 1, last_sealed)
    checked = sealed = unsealed = 0
    versions: dict[UUID, tuple[int, int]] = {}
    uncovered: list[int] = []
    index = 0
    if segments:
        segments[0].open(ledger)
    # SQLite numbers events 1, 2, 3, ... with no gap, even after rolled-back appends, so a
    # gap is a deletion: this catches deleted newest checkpoints together with what they
    # sealed. PostgreSQL's sequence leaves gaps on rollback: there, only anchors can.
    contiguous = ledger.store.dialect == "sqlite"
    previous = start
    for page in rows_after(ledger, start):
        tail: list[Row] = []
        for row in page:
            checked += 1
            if contiguous and row.position > previous + 1 and row.position > last_sealed + 1:
                verifier.found_gap(max(previous, last_sealed) + 1, row.position - 1)
            previous = row.position
            while index < len(segments) and row.position > segments[index].to:
                verifier.close_segment(segments[index])
                index += 1
                if index < len(segments):
                    segments[index].open(ledger)
            if index < len(segments) and row.position > segments[index].after:
                sealed += 1
                verifier.check_sealed(segments[index], row)
            elif row.position > last_sealed:
                unsealed += 1
                tail.append(row)
            else:  # between segments: only where the chain itself is broken
                uncovered.append(row.position)
        verifier.check_tail(tail, versions)
    if uncovered:
        verifier.found(
            "unverifiable",
            uncovered[0],
            f"{len(uncovered)} event(s) from position {uncovered[0]} to {uncovered[-1]} are "
            "covered by no checkpoint: the chain is broken there",
        )
    for later in segments[index:]:
        if later is not segments[index]:
            later.open(ledger)
        verifier.close_segment(later)
    if anchor:
        verifier.check_anchor(anchor, head)
    findings = sorted(verifier.findings, key=lambda f: (f.position, f.kind))
    return VerifyReport(
        intact=not findings,
        from_position=from_position,
        head_position=head,
        last_sealed_position=last_sealed,
        checkpoints=len(verifier.segments),
        checked_events=checked,
        sealed_events=sealed,
        unsealed_events=unsealed,
        anchored_checkpoints=len(anchor or []),
        findings=findings,
    )
