"""Read events written directly: the one append of every successful retrieve.

A ``SecretRead`` goes through no library event object and no generic mapper on its way
in: ``ReadEncoder`` writes the stored bytes the mapper would write for the same event
(``tests/unit/test_read_events.py`` holds the two byte-identical, tag included), so
everything that reads the stream back (projections, replay, export, verification)
decodes it as an ``AuditRecord.SecretRead`` like any other event. Built through the
library, the event object and its encoding cost about 23 us of a retrieve; this costs
about a quarter of that.

On the way out, ``decode_read`` turns the stored bytes of a read into a ``ReadView`` for
the projections (catch-up and rebuilds), at a third of the mapper's cost.

A ``PendingRead`` is what a read hands to the store: its stored event, the facts the
catalog needs (tenant, name, instant), the aggregate versions its decision was made on
(checked under the write lock), and, once written, the access count it saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from keyledger.domain.access import AuditRecord, ReadView
from keyledger.domain.ids import ActorDict, audit_record_id
from keyledger.infrastructure.audit_keys import AuditKey
from keyledger.infrastructure.event_shapes import EventShapeError, is_int64
from keyledger.infrastructure.event_tags import MAGIC, TRAILER_BYTES, event_tag
from keyledger.projections.timeutil import to_micros

READ_TOPIC = get_topic(AuditRecord.SecretRead)
_ORIGINATOR_TOPIC = get_topic(AuditRecord)
# The library's JSONTranscoder settings: compact separators, UTF-8 kept as is.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode = json.JSONDecoder().decode
# {"timestamp":{"_type_":"datetime_iso","_data_":"<ISO 8601>"},"originator_topic":...}
_HEAD = b'{"timestamp":{"_type_":"datetime_iso","_data_":"'
_NULL_HEAD = b'{"timestamp":null'


@dataclass(slots=True, eq=False)
class PendingRead:
    """One read on its way to the stream, and what the write learnt for it."""

    stored: StoredEvent
    view: ReadView  # the event as the projections see it
    at: int  # the event's timestamp, microseconds since the epoch
    expected: dict[UUID, int]  # secret and keyring versions the decision was made on
    position: int | None = None  # in the stream, once written (where the store tells)
    access_count: int | None = None
    last_accessed_at: int | None = None

    @property
    def tenant_id(self) -> str:
        return self.view.tenant_id

    @property
    def secret_name(self) -> str:
        return self.view.secret_name


class ReadEncoder:
    """Encodes read events as the tagging mapper would (see the module docstring).

    Only the timestamp changes between two reads of one secret version by one actor, so
    the rest of the JSON is kept per (tenant, name, versions, actor) in a small cache.
    """

    def __init__(self, tag_key: AuditKey | None, cache_size: int = 4096) -> None:
        self._tag_key = tag_key
        self._tails: dict[tuple[object, ...], bytes] = {}
        self._cache_size = cache_size

    def read(
        self,
        tenant_id: str,
        secret_name: str,
        value_version: int,
        key_version: int,
        actor: ActorDict,
        expected: dict[UUID, int],
        timestamp: datetime | None = None,
        originator_id: UUID | None = None,
    ) -> PendingRead:
        """The read of ``secret_name``'s value ``value_version`` under ``key_version``."""
        moment = timestamp or datetime.now(UTC)
        aggregate_id = originator_id or audit_record_id(tenant_id)
        state = b"".join(
            (
                _HEAD,
                moment.isoformat().encode(),
                self._tail(tenant_id, secret_name, value_version, key_version, actor),
            )
        )
        key = self._tag_key
        if key is not None:
            tag = event_tag(key, aggregate_id, 1, READ_TOPIC, state)
            state = b"".join((state, tag, key.key_id, MAGIC))
        return PendingRead(
            stored=StoredEvent(aggregate_id, 1, READ_TOPIC, state),
            view=ReadView(moment, tenant_id, secret_name, value_version, key_version, actor),
            at=to_micros(moment),
            expected=expected,
        )

    def _tail(
        self,
        tenant_id: str,
        secret_name: str,
        value_version: int,
        key_version: int,
        actor: ActorDict,
    ) -> bytes:
        """The encoded state after the timestamp: the same for every read of one secret
        version by one actor."""
        cache_key: tuple[object, ...] = (
            tenant_id,
            secret_name,
            value_version,
            key_version,
            tuple(actor.items()),
        )
        for value in actor.values():
            if value is not None and type(value) is not str:
                cache_key = ()  # only str/None actors are cached (1 == True, not in JSON)
                break
        tail = self._tails.get(cache_key) if cache_key else None
        if tail is None:
            encoded = _encode(
                {
                    "timestamp": None,
                    "originator_topic": _ORIGINATOR_TOPIC,
                    "tenant_id": tenant_id,
                    "secret_name": secret_name,
                    "value_version": value_version,
                    "key_version": key_version,
                    "actor": actor,
                }
            ).encode()
            tail = b'"}' + encoded[len(_NULL_HEAD) :]
            if cache_key:
                if len(self._tails) >= self._cache_size:
                    self._tails.clear()
                self._tails[cache_key] = tail
        return tail


def decode_read(state: bytes) -> ReadView:
    """The ``ReadView`` of a stored ``SecretRead`` (its tag trailer, if any, ignored)."""
    if state[-len(MAGIC) :] == MAGIC:
        state = state[:-TRAILER_BYTES]
    fields = _decode(state.decode())
    view = ReadView(
        datetime.fromisoformat(fields["timestamp"]["_data_"]),
        fields["tenant_id"],
        fields["secret_name"],
        fields["value_version"],
        fields["key_version"],
        fields["actor"],
    )
    # The fields of the library's decoding of this event, checked as event_shapes does
    # (a stored event may have been altered); ``timestamp`` is a datetime already.
    if not (
        type(view.tenant_id) is str
        and type(view.secret_name) is str
        and is_int64(view.value_version)
        and is_int64(view.key_version)
        and type(view.actor) is dict
    ):
        raise EventShapeError("a SecretRead whose fields are not what the class declares")
    return view
