"""Sealing the audit stream: checkpoints that chain every event under the audit key.

``seal`` appends checkpoints until the stream is covered, ``SEGMENT_EVENTS`` events each.
Before it vouches for an event it checks the event's own tag (``event_tags``): an event
whose tag does not verify stops the seal there, and so does an untagged event (written by
a process without any audit key, or forged) unless the caller, after investigating it,
accepts its position: accepting positions, not "every untagged event", keeps an event
forged after the investigation from being sealed with the investigated ones. Sealing
reads outside any lock; the checkpoint append is an ordinary versioned write, so two
sealers never fork the chain: the loser reloads and seals what remains.

Byte layouts (integers 8-byte big-endian)::

    sealed tag = HMAC-SHA256(audit key, b"keyledger:sealed-event:v1" 0x00 position
                 || originator_id (16) || originator_version || topic 0x00 || state)[:8]
    digest     = HMAC-SHA256(audit key, b"keyledger:checkpoint:v1" 0x00 previous digest (32)
                 || sequence || after_position || to_position || event_count
                 || len(positions) || positions || tags)

The first checkpoint's previous digest is 32 zero bytes.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from uuid import UUID

from keyledger.application.continuity import earlier_versions, gap_detail, version_break
from keyledger.application.ledger import Conflict
from keyledger.application.stream import (
    Row,
    events_key_intact,
    iter_seal_rows,
    newest_seal_row,
    position_of,
    rows_after,
)
from keyledger.domain.ids import SEAL_CHAIN_ID, ActorDict
from keyledger.domain.seal import AuditSeal, encode_positions
from keyledger.errors import AuditTampered, MasterKeyUnavailable
from keyledger.infrastructure.audit_keys import AuditKey, AuditKeyring
from keyledger.infrastructure.event_shapes import INT64_MAX
from keyledger.infrastructure.event_tags import event_tag, split_trailer
from keyledger.models import Checkpoint, SealResult

if TYPE_CHECKING:
    from keyledger.application.ledger import Ledger

SEGMENT_EVENTS = 2000
SEALED_TAG_BYTES = 8
ZERO_DIGEST = bytes(32)
_EVENT_LABEL = b"keyledger:sealed-event:v1\x00"
_CHECKPOINT_LABEL = b"keyledger:checkpoint:v1\x00"

TagStatus = Literal["ok", "untagged", "mismatch", "unknown_key"]


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def sealed_tag(key: AuditKey, row: Row) -> bytes:
    """The 8-byte tag a checkpoint keeps for ``row``: binds position, identity and bytes."""
    message = b"".join(
        (
            _EVENT_LABEL,
            _u64(row.position),
            row.originator_id.bytes,
            _u64(row.version),
            row.topic.encode(),
            b"\x00",
            row.state,
        )
    )
    return key.mac(message)[:SEALED_TAG_BYTES]


def _digest(
    key: AuditKey,
    previous: bytes,
    sequence: int,
    after: int,
    to: int,
    positions: bytes,
    tags: bytes,
) -> bytes:
    count = len(tags) // SEALED_TAG_BYTES
    parts = (previous, _u64(sequence), _u64(after), _u64(to), _u64(count), _u64(len(positions)))
    return key.mac(b"".join((_CHECKPOINT_LABEL, *parts, positions, tags)))


def checkpoint_digest(key: AuditKey, checkpoint: AuditSeal.Checkpoint) -> bytes:
    """The digest ``checkpoint`` should carry, recomputed from its fields."""
    return _digest(
        key,
        checkpoint.previous_digest,
        checkpoint.originator_version,
        checkpoint.after_position,
        checkpoint.to_position,
        checkpoint.positions,
        checkpoint.tags,
    )


def tag_status(keys: AuditKeyring, row: Row, *, independent_only: bool = False) -> TagStatus:
    """Whether ``row`` carries a valid event tag (see ``event_tags``). With
    ``independent_only`` (the chain has moved to KEYLEDGER_AUDIT_KEY), a tag made with a
    master-key-derived key does not count: it is reported as ``unknown_key``. A row whose
    columns hold no event is a ``mismatch``: never sealed, whatever is accepted."""
    if row.malformed:
        return "mismatch"
    body, tag, key_id = split_trailer(row.state)
    if tag is None or key_id is None:
        return "untagged"
    key = keys.get(key_id)
    if key is None or (independent_only and not keys.is_independent(key_id)):
        return "unknown_key"
    expected = event_tag(key, row.originator_id, row.version, row.topic, body)
    return "ok" if hmac.compare_digest(expected, tag) else "mismatch"


_CHECKPOINT_FIELDS: dict[str, type] = {
    "after_position": int,
    "to_position": int,
    "event_count": int,
    "positions": bytes,
    "tags": bytes,
    "previous_digest": bytes,
    "digest": bytes,
    "key_id": str,
    "actor": dict,
    "timestamp": datetime,
}


def decode_checkpoint(ledger: Ledger, row: Row) -> AuditSeal.Checkpoint | None:
    """The checkpoint stored in ``row``, or None when its bytes do not hold a well-formed
    checkpoint (edited, truncated or retyped fields): callers report that as tampering.
    Decoded without KEYLEDGER_REQUIRE_EVENT_TAGS's check: a checkpoint's tag and digest
    are checked by the verification itself, which reports a checkpoint sealed under a
    key no longer configured as ``unverifiable``, not as one that does not decode
    (found by review)."""
    try:
        event = ledger.tagging_mapper.decode(row.stored())
    except Exception:  # whatever the library raises on bytes it cannot read
        return None
    if not isinstance(event, AuditSeal.Checkpoint):
        return None
    for name, kind in _CHECKPOINT_FIELDS.items():
        value = getattr(event, name, None)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
    counts = (event.after_position, event.to_position, event.event_count)
    if not all(0 <= n <= INT64_MAX for n in counts) or not event.originator_version >= 1:
        return None  # (each is hashed as 8 unsigned bytes: an edited -1 would not be)
    try:
        bytes.fromhex(event.key_id)
    except ValueError:
        return None
    if len(event.digest) != len(ZERO_DIGEST) or len(event.previous_digest) != len(ZERO_DIGEST):
        return None
    return event


class UncheckableHead(Exception):
    """The newest checkpoint was sealed with an audit key this process does not have:
    a seal stops at it (``stopped_at``), as it stops at any event it cannot vouch for."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(reason)
        self.position = position
        self.reason = reason


@dataclass(frozen=True)
class ChainHead:
    """The newest checkpoint (sequence 0 and position 0 when nothing is sealed yet)."""

    sequence: int
    to_position: int
    digest: bytes
    independent: bool = False  # sealed with KEYLEDGER_AUDIT_KEY (see is_independent)


def chain_head(ledger: Ledger) -> ChainHead:
    """The newest checkpoint, checked before anything is sealed after it.

    A seal covers the events after the head's ``to_position`` and chains to its digest,
    so a forged head (a row written without the audit key, claiming to cover positions
    far ahead, say) would make every later seal a silent no-op, or chain the new
    checkpoints to a digest nobody vouched for. The head must carry a valid tag of a
    configured audit key, its digest must recompute, and it must cover only positions
    before its own: otherwise ``AuditTampered``, and nothing is sealed (``UncheckableHead``
    when its key is not configured: a seal then stops there, as at any event it cannot
    vouch for)."""
    row = newest_seal_row(ledger)
    if row is None:
        return ChainHead(0, 0, ZERO_DIGEST)
    checkpoint = decode_checkpoint(ledger, row)
    where = f"the newest checkpoint, at position {row.position},"
    advice = "run `keyledger audit verify`; nothing can be sealed after it"
    if checkpoint is None:
        raise AuditTampered(f"{where} is malformed: {advice}")
    key_id = bytes.fromhex(checkpoint.key_id)
    status = tag_status(ledger.audit_keys, row)
    key = ledger.audit_keys.get(key_id)
    if status == "unknown_key" or key is None:
        raise UncheckableHead(
            row.position,
            f"the newest checkpoint was sealed with audit key {checkpoint.key_id}, which "
            "is not configured, so nothing can be sealed after it: configure that key "
            "(KEYLEDGER_AUDIT_KEY, or the master key it derives from as a previous master "
            "key)",
        )
    if status != "ok":
        raise AuditTampered(f"{where} does not carry a valid tag ({status}): {advice}")
    if not hmac.compare_digest(checkpoint_digest(key, checkpoint), checkpoint.digest):
        raise AuditTampered(f"{where} does not match its digest: {advice}")
    if not checkpoint.after_position <= checkpoint.to_position < row.position:
        raise AuditTampered(f"{where} claims to cover positions it cannot: {advice}")
    independent = ledger.audit_keys.is_independent(key_id)
    return ChainHead(
        checkpoint.originator_version, checkpoint.to_position, checkpoint.digest, independent
    )


def checkpoint_model(checkpoint: AuditSeal.Checkpoint, position: int | None) -> Checkpoint:
    """The public view of a checkpoint event (``position``: where it sits in the stream)."""
    actor = checkpoint.actor
    return Checkpoint(
        sequence=checkpoint.originator_version,
        position=position,
        after_position=checkpoint.after_position,
        to_position=checkpoint.to_position,
        event_count=checkpoint.event_count,
        digest=checkpoint.digest.hex(),
        key_id=checkpoint.key_id,
        sealed_at=checkpoint.timestamp,
        sealed_by=str(actor.get("user_id", "")),
    )


def _build(
    ledger: Ledger, key: AuditKey, head: ChainHead, rows: list[Row], actor: ActorDict
) -> AuditSeal.Checkpoint:
    sequence, after, to = head.sequence + 1, head.to_position, rows[-1].position
    positions = encode_positions(after, [row.position for row in rows])
    tags = b"".join(sealed_tag(key, row) for row in rows)
    return AuditSeal.checkpoint(
        sequence,
        ledger.clock(),
        after_position=after,
        to_position=to,
        event_count=len(rows),
        positions=positions,
        tags=tags,
        previous_digest=head.digest,
        digest=_digest(key, head.digest, sequence, after, to, positions, tags),
        key_id=key.key_id.hex(),
        actor=actor,
    )


def seal(
    ledger: Ledger,
    actor: ActorDict,
    *,
    accept_untagged: frozenset[int] = frozenset(),
    max_checkpoints: int | None = None,
) -> SealResult:
    """Append checkpoints covering every event not sealed yet (see the module doc);
    untagged events are vouched for only at the positions in ``accept_untagged``."""
    key = ledger.audit_keys.current
    if key is None:
        raise MasterKeyUnavailable(
            "no audit key: set KEYLEDGER_AUDIT_KEY, or a master key to derive it from"
        )
    if not events_key_intact(ledger):
        raise AuditTampered(KEY_DROPPED + "; nothing can be sealed (run `keyledger audit verify`)")
    made: list[Checkpoint] = []
    sealed = 0
    anchor_error: str | None = None
    while max_checkpoints is None or len(made) < max_checkpoints:
        try:
            head = chain_head(ledger)
        except UncheckableHead as uncheckable:
            return SealResult(
                checkpoints=made,
                sealed_events=sealed,
                stopped_at=uncheckable.position,
                stopped_reason=uncheckable.reason,
                anchor_error=anchor_error,
            )
        page = next(rows_after(ledger, head.to_position, page_size=SEGMENT_EVENTS), [])
        if len(page) < SEGMENT_EVENTS and all(r.originator_id == SEAL_CHAIN_ID for r in page):
            break  # only checkpoints since: the next seal covers them (never seal seals)
        covered, stop = _vouched(ledger.audit_keys, page, accept_untagged, head.independent)
        covered, broken = _continuous(ledger, head.to_position, covered)
        stop = broken or stop
        if covered:
            checkpoint = _build(ledger, key, head, covered, actor)
            try:
                ledger.commit(checkpoint)
            except Conflict:
                continue  # another sealer extended the chain: seal what is left after it
            # Where it landed: for the anchor, and for the caller (`audit seal --json`
            # showed no position without an anchor file: found by review).
            at = position_of(ledger, SEAL_CHAIN_ID, checkpoint.originator_version)
            made.append(checkpoint_model(checkpoint, at))
            if ledger.anchor_file is not None:
                anchor_error = append_anchor(ledger.anchor_file, made[-1]) or anchor_error
            sealed += len(covered)
        if stop is not None:
            position, reason = stop
            return SealResult(
                checkpoints=made,
                sealed_events=sealed,
                stopped_at=position,
                stopped_reason=reason,
                anchor_error=anchor_error,
            )
        if len(page) < SEGMENT_EVENTS:
            break
    return SealResult(
        checkpoints=made,
        sealed_events=sealed,
        stopped_at=None,
        stopped_reason=None,
        anchor_error=anchor_error,
    )


KEY_DROPPED = (
    "the events table has lost its primary key (originator_id, originator_version), "
    "which keyledger creates: an event can now be stored twice (a read replayed, say) "
    "without any tag failing"
)

_STOP_REASONS = {
    "mismatch": "the event's tag does not verify: it was altered or forged (run audit verify)",
    "unknown_key": "the event is tagged with an audit key that is not configured, or with "
    "a master-key-derived key after the chain moved to KEYLEDGER_AUDIT_KEY (a process "
    "that ran with a wrong master key and no KEYLEDGER_AUDIT_KEY tags what it audits so); "
    "investigate it, then seal accepting its position (`keyledger audit seal "
    "--accept-untagged POSITION`, or seal_audit(accept_untagged=[POSITION]))",
    "untagged": "the event carries no tag (written without an audit key, or forged); "
    "investigate it, then seal accepting its position (`keyledger audit seal "
    "--accept-untagged POSITION`, or seal_audit(accept_untagged=[POSITION]))",
}


_ACCEPTABLE: frozenset[TagStatus] = frozenset({"untagged", "unknown_key"})  # (never "mismatch")


def _vouched(
    keys: AuditKeyring, page: list[Row], accept_untagged: frozenset[int], independent_only: bool
) -> tuple[list[Row], tuple[int, str] | None]:
    """The leading rows of ``page`` a seal may cover, and where and why it must stop
    (an untagged event, or one tagged with a key that is not configured, is covered only
    at a position the operator accepted: such events are what a process without the
    store's keys audits, a wrong master key's failed reads among them; found by review,
    one mistyped key stopped every seal for good)."""
    for index, row in enumerate(page):
        status = tag_status(keys, row, independent_only=independent_only)
        if status == "ok" or (status in _ACCEPTABLE and row.position in accept_untagged):
            continue
        return page[:index], (row.position, _STOP_REASONS[status])
    return page, None


def _continuous(
    ledger: Ledger, after: int, rows: list[Row]
) -> tuple[list[Row], tuple[int, str] | None]:
    """The leading rows that show no trace of a deleted or reordered event (a gap in
    SQLite's positions, a break in an aggregate's versions: see continuity), and where
    and why the seal must stop: sealed, the stream as a deletion left it would verify."""
    contiguous = ledger.store.dialect == "sqlite"
    versions: dict[UUID, tuple[int, int]] = {}
    earlier = earlier_versions(ledger, rows, versions)
    previous = after
    for index, row in enumerate(rows):
        if contiguous and row.position != previous + 1:
            detail = gap_detail(previous + 1, row.position - 1)
            return rows[:index], (row.position, f"{detail} (run audit verify)")
        previous = row.position
        found = version_break(row, versions, earlier)
        if found is not None:
            return rows[:index], (row.position, f"{found[1]} (run audit verify)")
    return rows, None


def append_anchor(path: Path | None, checkpoint: Checkpoint) -> str | None:
    """Append ``checkpoint`` to the anchor file (KEYLEDGER_AUDIT_ANCHOR_FILE), durably;
    returns why it could not (None: written, or no anchor file).

    The file is what ``audit verify --anchor`` reads; kept where the database's
    administrators cannot write, it reveals rows cut from the newest end of the stream.
    A failure to write it never undoes the seal: it is reported in the ``SealResult``
    (the CLI exits 1, an automatic seal logs it), so that a scheduled seal notices.
    """
    if path is None:
        return None
    line = checkpoint.model_dump_json() + "\n"
    try:
        with path.open("a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
    except OSError as error:
        return f"the anchor file {path} was not written: {error.strerror}"
    return None


def unsealed_count(ledger: Ledger) -> int:
    """How many events lie after the newest checkpoint."""
    try:
        head = chain_head(ledger)
    except UncheckableHead as uncheckable:
        raise AuditTampered(uncheckable.reason) from None
    table, position = ledger.store.events_table_name, ledger.store.position_column
    with ledger.reading() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {table} WHERE {position} > ?", (head.to_position,))
        return int(cur.fetchone()[0])


def checkpoints(ledger: Ledger) -> list[Checkpoint]:
    """Every checkpoint of the chain, in order, with its stream position."""
    models = []
    for row in iter_seal_rows(ledger):
        event = decode_checkpoint(ledger, row)
        if event is None:
            raise AuditTampered(
                f"the checkpoint at position {row.position} is malformed: "
                "run `keyledger audit verify`"
            )
        models.append(checkpoint_model(event, row.position))
    return models
