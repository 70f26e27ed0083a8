"""Event tags: every stored event carries an HMAC of its own identity and bytes.

A tagged event's ``state`` column is the library's encoded state followed by a trailer::

    state || tag (16) || audit key_id (8) || magic b"\\xffKLT" (4)

    tag = HMAC-SHA256(audit key, b"keyledger:event:v1" 0x00 originator_id (16 bytes)
                      || originator_version (8, big-endian) || topic (UTF-8) 0x00 || state)[:16]

JSON never contains a raw 0xff byte, so the magic cannot end an untagged state. The tag
binds the state to its aggregate, version and type: a changed byte, an event moved to
another aggregate or version, or an event forged without the key fails it. It cannot bind
the stream position (the store assigns that during the append), nor show a deleted event:
both are what the checkpoints of ``application/sealing.py`` cover. Events written by a
process without an audit key (no master key and no KEYLEDGER_AUDIT_KEY) are untagged.
"""

from __future__ import annotations

import hmac
from typing import Any
from uuid import UUID

from eventsourcing.domain import Snapshot
from eventsourcing.persistence import Mapper, StoredEvent
from eventsourcing.utils import TopicError, get_topic

from keyledger.errors import AuditTampered
from keyledger.infrastructure.audit_keys import KEY_ID_BYTES, AuditKey, AuditKeyring
from keyledger.infrastructure.event_shapes import check_shape

TAG_BYTES = 16
MAGIC = b"\xffKLT"
_class_versions: dict[type, int] = {}  # an event class's class_version (1: none)
TRAILER_BYTES = TAG_BYTES + KEY_ID_BYTES + len(MAGIC)
_LABEL = b"keyledger:event:v1\x00"


def _uuid_bytes(originator_id: object) -> bytes:
    if isinstance(originator_id, UUID):
        return originator_id.bytes
    return UUID(str(originator_id)).bytes


def event_tag(key: AuditKey, originator_id: object, version: int, topic: str, body: bytes) -> bytes:
    """The 16-byte tag of an event's identity and encoded state."""
    message = b"".join(
        (
            _LABEL,
            _uuid_bytes(originator_id),
            version.to_bytes(8, "big"),
            topic.encode(),
            b"\x00",
            body,
        )
    )
    return key.mac(message)[:TAG_BYTES]


def split_trailer(state: bytes) -> tuple[bytes, bytes | None, bytes | None]:
    """(encoded state, tag, key_id); tag and key_id are None for an untagged state."""
    if len(state) > TRAILER_BYTES and state[-len(MAGIC) :] == MAGIC:
        body = state[:-TRAILER_BYTES]
        tag = state[-TRAILER_BYTES : -TRAILER_BYTES + TAG_BYTES]
        key_id = state[-KEY_ID_BYTES - len(MAGIC) : -len(MAGIC)]
        return body, tag, key_id
    return state, None, None


class TaggingMapper(Mapper[Any]):
    """The library's mapper, with the tag trailer appended on the way in, stripped on the
    way out. Tags are checked by ``audit verify`` and ``audit seal``; on every load too
    when ``required`` (KEYLEDGER_REQUIRE_EVENT_TAGS) holds the keys to check them with."""

    def __init__(
        self,
        *args: Any,
        tag_key: AuditKey | None = None,
        required: AuditKeyring | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tag_key = tag_key
        self.required = required

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        """The library's ``Mapper.to_stored_event`` (keyledger configures no compressor
        and no cipher), tag appended, building one ``StoredEvent`` instead of two."""
        if self.compressor is not None or self.cipher is not None:
            return self._tagged(super().to_stored_event(domain_event))
        cls = type(domain_event)
        topic = get_topic(cls)
        event_state = dict(vars(domain_event))
        originator_id = event_state.pop("originator_id")
        originator_version = event_state.pop("originator_version")
        class_version = _class_versions.get(cls)
        if class_version is None:  # once per class: a miss on a class raises inside getattr
            class_version = _class_versions[cls] = getattr(cls, "class_version", 1)
        if class_version > 1:
            event_state["class_version"] = class_version
        state = self.transcoder.encode(event_state)
        key = self.tag_key
        if key is not None:
            tag = event_tag(key, originator_id, originator_version, topic, state)
            state = b"".join((state, tag, key.key_id, MAGIC))
        return StoredEvent(originator_id, originator_version, topic, state)

    def _tagged(self, stored: StoredEvent) -> StoredEvent:
        key = self.tag_key
        if key is None:
            return stored
        tag = event_tag(
            key, stored.originator_id, stored.originator_version, stored.topic, stored.state
        )
        return StoredEvent(
            originator_id=stored.originator_id,
            originator_version=stored.originator_version,
            topic=stored.topic,
            state=stored.state + tag + key.key_id + MAGIC,
        )

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        if self.required is not None:
            require_tag(self.required, stored_event)
        return self.decode(stored_event)

    def decode(self, stored_event: StoredEvent) -> Any:
        """``to_domain_event`` without the required tag's check, for callers that check
        tags themselves (verification, sealing)."""
        event = self._decoded(stored_event)
        if isinstance(event, Snapshot):  # in the event stream: a forged row
            self._vouch_for_snapshot(stored_event)
        return event

    def _decoded(self, stored_event: StoredEvent) -> Any:
        """The library's decoding of the stored event, its trailer stripped."""
        state = stored_event.state
        if state[-len(MAGIC) :] == MAGIC:
            stored_event = StoredEvent(
                originator_id=stored_event.originator_id,
                originator_version=stored_event.originator_version,
                topic=stored_event.topic,
                state=state[:-TRAILER_BYTES],
            )
        _check_topic(stored_event.topic)
        event = super().to_domain_event(stored_event)
        if isinstance(event, Snapshot):  # its aggregate's topic, resolved when it is used:
            _check_topic(event.topic)  # unverified without an audit key (found by review)
        check_shape(event)  # (a stored event may have been altered: see event_shapes)
        return event

    def _vouch_for_snapshot(self, stored: StoredEvent) -> None:
        """A snapshot is used only when its tag verifies under the current audit key.

        Snapshots are not part of the stream: ``audit verify`` and the checkpoints never
        look at them, so an altered one (a secret's ``disabled`` flag turned off, say)
        would change what keyledger decides unseen. One tagged under another key (before
        an audit-key rotation), untagged, or altered is ``UnverifiedSnapshot``: the
        aggregate is then replayed from its events instead (``Ledger._get``). Without an
        audit key (no master key) nothing is tagged, and nothing can be checked."""
        key = self.tag_key
        if key is None:
            return
        body, tag, key_id = split_trailer(stored.state)
        if tag is None or key_id != key.key_id:
            raise UnverifiedSnapshot(stored.originator_id)
        expected = event_tag(
            key, stored.originator_id, stored.originator_version, stored.topic, body
        )
        if not hmac.compare_digest(expected, tag):
            raise UnverifiedSnapshot(stored.originator_id)


class TagRefused(AuditTampered):
    """A stored event refused on load because its tag does not verify
    (KEYLEDGER_REQUIRE_EVENT_TAGS); ``at`` names its stream position once known."""

    def __init__(self, event: str, why: str) -> None:
        self.why = why
        super().__init__(
            f"{event} {why}, and KEYLEDGER_REQUIRE_EVENT_TAGS refuses it: unless a key was "
            "retired, it was written without the audit key, or altered; run "
            "`keyledger audit verify`"
        )

    def at(self, position: int) -> TagRefused:
        """The same refusal, naming the event's stream position."""
        return TagRefused(f"the stored event at position {position}", self.why)


def require_tag(keys: AuditKeyring, stored: StoredEvent) -> None:
    """``TagRefused`` unless ``stored`` carries a tag that verifies under one of ``keys``
    (the current audit key, or a previous one a rotation left to verify with)."""
    event = f"the stored event {stored.originator_id} version {stored.originator_version}"
    body, tag, key_id = split_trailer(stored.state)
    if tag is None or key_id is None:
        raise TagRefused(event, "carries no tag")
    key = keys.get(key_id)
    if key is None:
        raise TagRefused(
            event,
            f"is tagged with audit key {key_id.hex()}, not one configured (a retired master "
            "key or audit key must stay in KEYLEDGER_PREVIOUS_MASTER_KEYS or "
            "KEYLEDGER_PREVIOUS_AUDIT_KEYS while tags are required)",
        )
    expected = event_tag(key, stored.originator_id, stored.originator_version, stored.topic, body)
    if not hmac.compare_digest(expected, tag):
        raise TagRefused(event, "carries a tag that does not match its contents")


SNAPSHOT_TOPIC = get_topic(Snapshot)
OWN_TOPICS = "keyledger."  # every event class keyledger stores is in its package


def _check_topic(topic: str) -> None:
    """``TopicError`` for a topic outside keyledger's package (and the library's
    snapshots), before anything resolves it: the library imports whatever module a
    stored topic names, and a row forged with ``antigravity:geohash`` opened a web
    browser from `keyledger audit log` (found by review)."""
    if not topic.startswith(OWN_TOPICS) and topic != SNAPSHOT_TOPIC:
        raise TopicError(f"the stored topic {topic!r} is not one of keyledger's events")


class SnapshotMapper(TaggingMapper):
    """The snapshot store's mapper: a row there is used only if it is a snapshot and its
    tag verifies, both checked before it is decoded. Anything else in the snapshot table
    (an event of the stream copied in: the library would rebuild the aggregate from it
    and skip every later event) is ``UnverifiedSnapshot``, and the aggregate is replayed
    from its events."""

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        if stored_event.topic != SNAPSHOT_TOPIC:
            raise UnverifiedSnapshot(stored_event.originator_id)
        self._vouch_for_snapshot(stored_event)
        try:
            event = self._decoded(stored_event)
        except TopicError:  # an aggregate topic outside keyledger: a forged row, which
            # nothing could vouch for without an audit key (replayed from the events)
            raise UnverifiedSnapshot(stored_event.originator_id) from None
        if not isinstance(event, Snapshot):  # (the topic said so: never here)
            raise UnverifiedSnapshot(stored_event.originator_id)
        return event


class UnverifiedSnapshot(Exception):
    """A snapshot whose tag does not verify under the current audit key."""
