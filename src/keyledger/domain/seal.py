"""The audit seal chain: one aggregate, one checkpoint event per version.

A checkpoint covers every event with a position in ``(after_position, to_position]``: it
lists their positions and an 8-byte keyed tag of each (position, identity, bytes), and a
digest over all of that chained to the previous checkpoint's digest. Checkpoints are events
of the stream like any other, so each is itself covered by the next one. Nothing loads this
aggregate: sealing reads the newest checkpoint and builds the next event directly, and two
sealers racing for the same version conflict on the primary key like any two writers.
"""

from __future__ import annotations

from datetime import datetime

from eventsourcing.domain import Aggregate

from keyledger.domain.ids import SEAL_CHAIN_ID, ActorDict


class AuditSeal(Aggregate):
    """The chain of audit checkpoints."""

    class Checkpoint(Aggregate.Event):
        """Events ``(after_position, to_position]`` sealed under audit key ``key_id``."""

        after_position: int
        to_position: int
        event_count: int
        positions: bytes
        tags: bytes
        previous_digest: bytes
        digest: bytes
        key_id: str
        actor: ActorDict

    @classmethod
    def checkpoint(cls, sequence: int, timestamp: datetime, **fields: object) -> Checkpoint:
        """The ``sequence``-th checkpoint event (its version in the chain)."""
        return cls.Checkpoint(
            originator_id=SEAL_CHAIN_ID,
            originator_version=sequence,
            timestamp=timestamp,
            **fields,
        )


def encode_positions(after: int, positions: list[int]) -> bytes:
    """Positions as unsigned LEB128 deltas from ``after`` (strictly increasing)."""
    out = bytearray()
    previous = after
    for position in positions:
        delta = position - previous
        if delta <= 0:
            raise ValueError("positions must increase strictly")
        previous = position
        while True:
            byte = delta & 0x7F
            delta >>= 7
            if delta:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
    return bytes(out)


def decode_positions(after: int, blob: bytes) -> list[int]:
    """The inverse of ``encode_positions``."""
    positions: list[int] = []
    current, shift, value = after, 0, 0
    for byte in blob:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            continue
        current += value
        positions.append(current)
        shift, value = 0, 0
    return positions
