"""The retrieve hot path's shortcuts produce exactly what the general machinery would:
read events encoded directly are byte-identical to the tagging mapper's, decoded reads
equal the mapper's events, and trusted result models equal pydantic's model_construct."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    StoredEvent,
    UUIDAsHex,
)

from keyledger.application.secrets import secret_info, secret_model
from keyledger.domain.access import AuditRecord, ReadView
from keyledger.domain.ids import audit_record_id
from keyledger.domain.secret import Secret as DomainSecret
from keyledger.infrastructure.audit_keys import AuditKey
from keyledger.infrastructure.event_tags import TaggingMapper
from keyledger.infrastructure.read_events import READ_TOPIC, ReadEncoder, decode_read
from keyledger.infrastructure.transcodings import BytesAsBase64
from keyledger.models import Secret, SecretInfo, trusted
from keyledger.projections.timeutil import to_micros

ACTORS: list[dict[str, Any]] = [
    {"user_id": "alice", "ip_address": None, "user_agent": None},
    {"user_id": "bob", "ip_address": "10.0.0.7", "user_agent": 'curl/8 "quoted" \\ \u00e9\u4e2d'},
    {"user_id": "system", "ip_address": "::1", "user_agent": "x" * 300},
]
NAMES = ["db", "api-key.v2", "caf\u00e9_\u4e2d\u6587", "a" * 200]


def _mapper(key: AuditKey | None) -> TaggingMapper:
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), BytesAsBase64()):
        transcoder.register(transcoding)
    return TaggingMapper(transcoder=transcoder, tag_key=key)


def _library_event(
    tenant_id: str,
    name: str,
    value_version: int,
    key_version: int,
    actor: dict[str, Any],
    at: datetime,
) -> AuditRecord.SecretRead:
    event = AuditRecord.read(tenant_id, name, value_version, key_version, actor)
    object.__setattr__(event, "timestamp", at)
    return event


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_direct_read_events_are_byte_identical_to_the_mappers(tagged: bool) -> None:
    key = AuditKey(os.urandom(32)) if tagged else None
    encoder, mapper = ReadEncoder(key), _mapper(key)
    at = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)
    for i, (name, actor) in enumerate((n, a) for n in NAMES for a in ACTORS):
        for moment in (at + timedelta(seconds=i), at.replace(microsecond=0)):  # no fraction too
            expected_event = _library_event("tenant-1", name, i + 1, 7, actor, moment)
            originator = expected_event.originator_id
            read = encoder.read(
                "tenant-1", name, i + 1, 7, actor, {}, timestamp=moment, originator_id=originator
            )
            assert read.stored == mapper.to_stored_event(expected_event)
            assert read.at == int(moment.timestamp() * 1_000_000)


def test_the_encoders_cache_never_mixes_up_actors_or_versions() -> None:
    encoder, mapper = ReadEncoder(None, cache_size=2), _mapper(None)
    at = datetime(2026, 11, 30, tzinfo=UTC)
    for _ in range(3):  # cache hits, misses and clears, in turn
        for version in (1, 2):
            for actor in ACTORS:
                event = _library_event("t", "db", version, version, actor, at)
                read = encoder.read(
                    "t",
                    "db",
                    version,
                    version,
                    actor,
                    {},
                    timestamp=at,
                    originator_id=event.originator_id,
                )
                assert read.stored == mapper.to_stored_event(event)


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_decoded_reads_equal_the_mappers_events(tagged: bool) -> None:
    key = AuditKey(os.urandom(32)) if tagged else None
    encoder, mapper = ReadEncoder(key), _mapper(key)
    for name in NAMES:
        for actor in ACTORS:
            read = encoder.read("tenant-9", name, 4, 2, actor, {})
            event = mapper.to_domain_event(read.stored)
            view = decode_read(read.stored.state)
            assert isinstance(view, ReadView)
            assert view == ReadView(
                event.timestamp,
                event.tenant_id,
                event.secret_name,
                event.value_version,
                event.key_version,
                event.actor,
            )
            assert view.timestamp.tzinfo is not None


def test_read_events_carry_the_read_topic_and_a_fresh_id_each_time() -> None:
    encoder = ReadEncoder(None)
    reads = [encoder.read("t", "db", 1, 1, ACTORS[0], {}) for _ in range(1000)]
    assert {read.stored.topic for read in reads} == {READ_TOPIC}
    assert len({read.stored.originator_id for read in reads}) == 1000
    prefix = audit_record_id("t").bytes[:6]
    assert {read.stored.originator_id.bytes[:6] for read in reads} == {prefix}  # type: ignore[union-attr]
    assert isinstance(reads[0].stored, StoredEvent)


def _fields(**extra: Any) -> dict[str, Any]:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    return dict(
        name="db",
        category="c",
        description=None,
        metadata={"k": "v"},
        status="active",
        version=3,
        key_version=2,
        expires_at=None,
        created_at=now,
        updated_at=now,
        access_count=9,
        last_accessed_at=now,
        **extra,
    )


def test_trusted_models_equal_model_construct() -> None:
    for model, fields in ((SecretInfo, _fields()), (Secret, _fields(value="s3cr3t"))):
        built = trusted(model, dict(fields))  # in the model's field order
        reference = model.model_construct(**fields)
        assert built == reference
        assert built.model_dump() == reference.model_dump()
        assert list(built.model_dump()) == list(model.model_fields)  # field order out
        assert built.model_fields_set == reference.model_fields_set
        assert repr(built) == repr(reference)
        with pytest.raises(Exception, match="frozen"):
            built.name = "other"  # type: ignore[misc]


def test_actors_with_values_other_than_text_are_encoded_as_the_mapper_would() -> None:
    """1 == True == 1.0 in a cache key, never in JSON: such actors are not cached."""
    encoder, mapper = ReadEncoder(None), _mapper(None)
    at = datetime(2026, 11, 30, tzinfo=UTC)
    for actor in (
        {"user_id": "u", "n": 1},
        {"user_id": "u", "n": True},
        {"user_id": "u", "n": 1.0},
    ):
        event = _library_event("t", "db", 1, 1, actor, at)
        read = encoder.read(
            "t", "db", 1, 1, actor, {}, timestamp=at, originator_id=event.originator_id
        )
        assert read.stored == mapper.to_stored_event(event)


def test_the_audit_row_of_a_read_view_is_the_row_of_the_library_event() -> None:
    from keyledger.projections.audit import AuditProjector

    encoder, mapper = ReadEncoder(None), _mapper(None)
    for name in NAMES:
        for actor in ACTORS:
            read = encoder.read("tenant-9", name, 12, 3, actor, {})
            event = mapper.to_domain_event(read.stored)
            view = decode_read(read.stored.state)
            assert AuditProjector.row(77, view) == AuditProjector.row(77, event)
            assert AuditProjector.row(77, read.view) == AuditProjector.row(77, event)


def _aggregate(expires_at: datetime | None) -> DomainSecret:
    return DomainSecret.create(
        tenant_id="t",
        name="db",
        envelope=b"\x01" * 40,
        key_version=2,
        category="c",
        description=None,
        metadata={"k": "v"},
        expires_at=expires_at,
        actor={"user_id": "u", "ip_address": None, "user_agent": None},
    )


@pytest.mark.parametrize("expires_in", [None, timedelta(days=1), timedelta(days=-1)])
def test_hot_path_results_equal_validated_models_field_by_field_in_order(
    expires_in: timedelta | None,
) -> None:
    """``secret_info`` and ``secret_model`` hand their dict to ``trusted`` as it
    is: it must name every field of the model, in the model's order, with the values a
    validated model holds."""
    now = datetime.now(UTC)
    aggregate = _aggregate(None if expires_in is None else now + expires_in)
    accessed = now - timedelta(seconds=5)

    info = secret_info(aggregate, now, 7, to_micros(accessed))
    model = secret_model(aggregate, now, 7, accessed, "s3cr3t")

    for built, cls in ((info, SecretInfo), (model, Secret)):
        validated = cls(**built.model_dump())
        assert list(vars(built)) == list(cls.model_fields)
        assert built == validated
        assert built.model_fields_set == validated.model_fields_set
        assert repr(built) == repr(validated)
    assert model.status == ("expired" if expires_in and expires_in < timedelta(0) else "active")
    assert model.last_accessed_at == accessed
    assert model.access_count == 7
    assert model.metadata is not aggregate.metadata  # the caller's own copy
