"""Rows edited behind keyledger's back give typed errors naming what is wrong, never a crash.

Three kinds, each found by review with a traceback or an error that could not be acted on:

- an event whose time was edited to a naive one, or to one its offset takes out of the
  years 1 to 9999 (``0001-01-01T00:00:00+14:00``): a ``TypeError`` in ``secrets get`` and
  in the projections, or an audit row that no query could read back, every audit query
  then asking for a rebuild that wrote the same row again;
- an event stored under another aggregate's id (a state swapped for another secret's, a
  tenant planted with copies of another's events), or copied within its own aggregate:
  ``projections rebuild`` failed with an ``IntegrityError`` traceback, ``projections
  check`` with the driver's message;
- read-model rows holding JSON nested some hundred thousand deep (a ``RecursionError``
  in ``secrets list`` and ``audit log``), or a key version that is text (a pydantic
  traceback from ``keys cleanup-retired`` and ``projections check``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest
from psycopg import sql
from test_audit_tamper import PostgresRaw, SQLiteRaw, Stored, _raw_of

from conftest import MakeService
from keyledger import AuditTampered, SecretService, StorageError, tenant
from keyledger.domain.ids import keyring_id, secret_id
from keyledger.domain.secret import Secret
from keyledger.infrastructure.event_shapes import EventShapeError, check_shape
from keyledger.infrastructure.event_tags import MAGIC, TRAILER_BYTES

Raw = SQLiteRaw | PostgresRaw


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The stores a test can edit behind keyledger's back (not the in-memory one)."""
    name = str(request.param)
    if name == "postgres":
        request.getfixturevalue("_postgres_server")
    return name


@pytest.fixture
def raw(make_service: MakeService) -> Iterator[Raw]:
    """Tenant t1 (s1 stored twice and read, s2 disabled) and tenant t2 (s3), closed; and
    raw access to its tables."""
    service = make_service()
    service.store_for_tenant("t1", "s1", "value-1")
    service.store_for_tenant("t1", "s1", "value-1b")
    service.retrieve_for_tenant("t1", "s1")
    service.store_for_tenant("t1", "s2", "value-2")
    service.disable_for_tenant("t1", "s2")
    service.store_for_tenant("t2", "s3", "value-3")
    store = _raw_of(service)
    service.close()
    yield store
    store.close()


def reopened(make_service: MakeService) -> SecretService:
    """A service that knows nothing of the events it did not read from the store."""
    return make_service()


def first(store: Raw, topic_end: str, originator_id: UUID | None = None) -> Stored:
    rows = sorted(store.rows().values())
    return next(
        row
        for row in rows
        if row.topic.endswith(topic_end) and originator_id in (None, row.originator_id)
    )


def edited(state: bytes, **fields: Any) -> bytes:
    """``state`` with ``fields`` set in its JSON (its tag trailer kept, now stale)."""
    body, trailer = (
        (state[:-TRAILER_BYTES], state[-TRAILER_BYTES:]) if state.endswith(MAGIC) else (state, b"")
    )
    decoded = json.loads(body)
    decoded.update(fields)
    return json.dumps(decoded, separators=(",", ":")).encode() + trailer


def replace(store: Raw, row: Stored, state: bytes) -> None:
    """The row at ``row.position`` holding ``state`` instead."""
    store.apply(delete=[row.position], insert=[row._replace(state=state)])


def plant(store: Raw, originator_id: UUID, version: int, topic: str, state: bytes) -> int:
    """Append a row as any role with INSERT on the events table can (the store numbers
    it); returns its position."""
    if isinstance(store, PostgresRaw):
        store.conn.execute(
            sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state) "
                "VALUES (%s, %s, %s, %s)"
            ).format(store.table),
            (originator_id, version, topic, state),
        )
    else:
        store.conn.execute(
            "INSERT INTO stored_events (originator_id, originator_version, topic, state) "
            "VALUES (?, ?, ?, ?)",
            (originator_id.hex, version, topic, state),
        )
    return max(store.rows())


def iso(text: str) -> dict[str, str]:
    return {"_type_": "datetime_iso", "_data_": text}


def assert_replays_fail(service: SecretService, error: type[Exception], *fragments: str) -> None:
    """Both replays of the whole stream (a rebuild, a check) fail with ``error``,
    its message holding every fragment."""
    for replay in (service.rebuild_read_models, service.check_read_models):
        with pytest.raises(error) as raised:
            replay()
        for fragment in fragments:
            assert fragment in str(raised.value), (replay.__name__, str(raised.value))


# -- (a) times no keyledger write carries -----------------------------------------------

NAIVE = "2026-12-02T13:35:35"
BEFORE_YEAR_1 = "0001-01-01T00:00:00+14:00"  # (year 0 in UTC)
AFTER_YEAR_9999 = "9999-12-31T23:59:59-23:59"  # (year 10000 in UTC)


@pytest.mark.parametrize(
    ("field", "value"),
    [("expires_at", NAIVE), ("timestamp", NAIVE), ("timestamp", BEFORE_YEAR_1)],
)
def test_a_secret_event_holding_a_time_that_is_no_utc_instant_is_tampering(
    raw: Raw, make_service: MakeService, field: str, value: str
) -> None:
    row = first(raw, "SecretStored")
    replace(raw, row, edited(row.state, **{field: iso(value)}))
    service = reopened(make_service)

    with pytest.raises(AuditTampered, match="audit verify"):
        service.retrieve_for_tenant("t1", "s1")  # (naive: compared with the clock)
    decoded = f"position {row.position} cannot be decoded"
    with pytest.raises(AuditTampered, match=decoded), tenant("t1"):
        service.get_audit_logs()
    assert_replays_fail(service, AuditTampered, f"position {row.position}", "cannot be decoded")


@pytest.mark.parametrize("value", [NAIVE, BEFORE_YEAR_1, AFTER_YEAR_9999])
def test_a_read_holding_a_time_that_is_no_utc_instant_is_tampering_in_every_replay(
    raw: Raw, make_service: MakeService, value: str
) -> None:
    row = first(raw, "SecretRead")
    replace(raw, row, edited(row.state, timestamp=iso(value)))
    service = reopened(make_service)

    # (reads are decoded for the projections apart from the library's mapper)
    untimed = f"position {row.position} holds a time"
    with pytest.raises(AuditTampered, match=untimed), tenant("t1"):
        service.get_audit_logs()
    assert_replays_fail(service, AuditTampered, f"position {row.position}", "no UTC instant")
    assert service.retrieve_for_tenant("t1", "s1").value == "value-1b"  # (no read model's)


def test_the_shape_check_names_a_time_that_is_no_utc_instant_without_its_value() -> None:
    for value in (NAIVE, BEFORE_YEAR_1, AFTER_YEAR_9999):
        event = _created()
        vars(event)["timestamp"] = datetime.fromisoformat(value)
        with pytest.raises(EventShapeError, match="timestamp holds a datetime that is no UTC") as e:
            check_shape(event)
        assert value[:10] not in str(e.value)  # (the type, never the value)
    check_shape(_created())  # (the event as made passes)


def _created() -> Secret.SecretCreated:
    secret = Secret.create(
        tenant_id="t1",
        name="s1",
        envelope=b"sealed",
        key_version=1,
        category=None,
        description=None,
        metadata={},
        expires_at=None,
        actor={"user_id": "system", "ip_address": None, "user_agent": None},
    )
    (event,) = secret.collect_events()
    assert isinstance(event, Secret.SecretCreated)
    return event


# -- (b) events stored under an id that is not theirs, or repeated ----------------------


def test_a_state_swapped_for_another_secrets_is_named_by_rebuild_and_check(
    raw: Raw, make_service: MakeService
) -> None:
    s1_created = first(raw, "SecretCreated", secret_id("t1", "s1"))
    s2_created = first(raw, "SecretCreated", secret_id("t1", "s2"))
    replace(raw, s2_created, s1_created.state)  # (s2's row now says it created s1)
    service = reopened(make_service)

    assert_replays_fail(
        service,
        AuditTampered,
        f"position {s2_created.position} names another secret",
        "audit verify",
    )


def test_a_tenant_planted_with_copies_of_anothers_events_is_named_by_rebuild_and_check(
    raw: Raw, make_service: MakeService
) -> None:
    key_created = first(raw, "TenantKeyCreated", keyring_id("t2"))
    created = first(raw, "SecretCreated", secret_id("t2", "s3"))
    at = plant(raw, keyring_id("evil"), 1, key_created.topic, key_created.state)
    plant(raw, secret_id("evil", "loot"), 1, created.topic, created.state)
    service = reopened(make_service)

    assert_replays_fail(service, AuditTampered, f"position {at} names another keyring")


def test_a_creation_copied_to_a_later_version_of_its_own_secret_is_named(
    raw: Raw, make_service: MakeService
) -> None:
    created = first(raw, "SecretCreated", secret_id("t1", "s1"))
    at = plant(raw, created.originator_id, 3, created.topic, created.state)
    service = reopened(make_service)

    assert_replays_fail(service, AuditTampered, f"position {at} creates its secret at version 3")


def test_a_rotation_copied_to_a_later_version_of_its_own_keyring_is_named(
    raw: Raw, make_service: MakeService
) -> None:
    service = reopened(make_service)
    service.rotate_key_for_tenant("t2")
    service.close()
    rotated = first(raw, "KeyRotated", keyring_id("t2"))
    at = plant(raw, rotated.originator_id, rotated.version + 1, rotated.topic, rotated.state)
    service = reopened(make_service)

    assert_replays_fail(service, AuditTampered, f"position {at} adds key version 2")


def test_a_creation_stored_twice_without_the_events_key_fails_the_check_as_storage_error(
    raw: Raw, make_service: MakeService
) -> None:
    created = first(raw, "SecretCreated", secret_id("t1", "s1"))
    raw.drop_events_key()
    plant(raw, created.originator_id, 1, created.topic, created.state)
    service = reopened(make_service)

    with pytest.raises(StorageError, match="adds a secret or a key version") as raised:
        service.check_read_models()
    assert "audit verify" in str(raised.value)
    assert "UNIQUE" not in str(raised.value)  # (not the driver's message)


# -- (c) read-model rows no query can decode ----------------------------------------------


def deep_json(store: Raw) -> str:
    """SQL for 100,000 opening brackets: JSON nested past any recursion limit."""
    if isinstance(store, PostgresRaw):
        return "repeat('[', 100000)"
    return "replace(hex(zeroblob(100000)), '00', '[')"


def test_catalog_metadata_nested_too_deep_fails_the_listing_as_storage_error(
    raw: Raw, make_service: MakeService
) -> None:
    raw.run(f"UPDATE kl_catalog SET metadata = {deep_json(raw)} WHERE name = 's1'")
    service = reopened(make_service)

    with pytest.raises(StorageError, match=r"\(RecursionError\).*projections rebuild"):
        service.list_for_tenant("t1")


def test_audit_details_nested_too_deep_fail_the_log_and_the_trail_as_storage_error(
    raw: Raw, make_service: MakeService
) -> None:
    service = reopened(make_service)
    with tenant("t1"):
        assert service.get_audit_logs()  # (caught up: the rows are there to edit)
    service.close()
    raw.run(f"UPDATE kl_audit SET details = {deep_json(raw)} WHERE secret_name = 's1'")
    service = reopened(make_service)

    with tenant("t1"):
        with pytest.raises(StorageError, match=r"\(RecursionError\).*projections rebuild"):
            service.get_audit_logs()
        with pytest.raises(StorageError, match=r"\(RecursionError\).*projections rebuild"):
            service.audit_trail("s1")


@pytest.fixture
def retired_twice(make_service: MakeService) -> Iterator[SQLiteRaw]:
    """SQLite only (its columns hold any type): tenant t1 with key versions 1 and 2
    retired and unused, 3 active; raw access to its tables."""
    service = make_service()
    service.store_for_tenant("t1", "s1", "value-1")
    service.rotate_key_for_tenant("t1")
    service.rotate_key_for_tenant("t1")
    service.reencrypt_all_for_tenant("t1")
    store = _raw_of(service)
    service.close()
    assert isinstance(store, SQLiteRaw)
    yield store
    store.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_key_version_edited_to_text_fails_cleanup_before_it_destroys_anything(
    retired_twice: SQLiteRaw, make_service: MakeService
) -> None:
    retired_twice.run("UPDATE kl_keys SET version = 'two' WHERE tenant_id = 't1' AND version = 2")
    service = reopened(make_service)

    with pytest.raises(StorageError, match=r"\(TypeError\).*projections rebuild"):
        service.cleanup_retired_keys(older_than_days=0)
    retired_twice.run("UPDATE kl_keys SET version = 2 WHERE version = 'two'")
    statuses = {key.version: key.status for key in service.list_keys("t1")}
    assert statuses == {1: "retired", 2: "retired", 3: "active"}  # (version 1 kept)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_key_version_edited_to_text_fails_the_check_as_storage_error(
    retired_twice: SQLiteRaw, make_service: MakeService
) -> None:
    retired_twice.run("UPDATE kl_keys SET version = 'two' WHERE tenant_id = 't1' AND version = 2")
    service = reopened(make_service)

    with pytest.raises(StorageError, match="a read model holds a value keyledger never writes"):
        service.check_read_models()
