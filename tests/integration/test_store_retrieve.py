"""store and retrieve: values, options, versions, access counts (SPEC section 3)."""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydantic
import pytest
from eventsourcing.persistence import IntegrityError, InterfaceError

from conftest import MakeService
from keyledger import (
    InvalidInput,
    Secret,
    SecretInfo,
    SecretNotFound,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.application import group_commit
from keyledger.domain.secret import Secret as DomainSecret
from keyledger.errors import StorageError
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteConnectionPool
from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit
from threaded import reads_out_of_order

NEXT_YEAR = datetime.now(UTC) + timedelta(days=365)
LAST_YEAR = datetime.now(UTC) - timedelta(days=365)


@pytest.fixture
def acme(service: SecretService):
    with tenant("acme", user_id="alice"):
        yield service


def test_stored_secret_is_retrieved_with_its_value_and_options(acme: SecretService) -> None:
    acme.store(
        "stripe-api-key",
        "sk_live_xxx",
        category="api-keys",
        description="Stripe production key",
        expires_at=NEXT_YEAR,
        metadata={"owner": "billing"},
    )

    secret = acme.retrieve("stripe-api-key")

    assert isinstance(secret, Secret)
    assert secret.name == "stripe-api-key"
    assert secret.value == "sk_live_xxx"
    assert secret.category == "api-keys"
    assert secret.description == "Stripe production key"
    assert secret.metadata == {"owner": "billing"}
    assert secret.expires_at == NEXT_YEAR
    assert secret.status == "active"
    assert secret.version == 1
    assert secret.key_version == 1


def test_store_returns_info_about_the_secret_but_never_its_value(acme: SecretService) -> None:
    info = acme.store("db-password", "hunter2", category="db", metadata={"env": "prod"})

    assert isinstance(info, SecretInfo)
    assert not isinstance(info, Secret)
    assert "hunter2" not in repr(info)
    assert not hasattr(info, "value")
    assert (info.name, info.category, info.metadata) == ("db-password", "db", {"env": "prod"})
    assert (info.status, info.version, info.key_version) == ("active", 1, 1)
    assert info.access_count == 0
    assert info.last_accessed_at is None
    assert info.created_at == info.updated_at


@pytest.mark.parametrize(
    "value",
    ["", "plain ascii", "ünïcödé ✓ 秘密", "x" * 65536],
    ids=["empty", "ascii", "unicode", "at-size-limit"],
)
def test_a_str_value_comes_back_as_the_same_str(acme: SecretService, value: str) -> None:
    acme.store("token", value)

    returned = acme.retrieve("token").value

    assert isinstance(returned, str)
    assert returned == value


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00\xff\x00binary", bytes(range(256)), b"x" * 65536],
    ids=["empty", "nul-bytes", "all-bytes", "at-size-limit"],
)
def test_a_bytes_value_comes_back_as_the_same_bytes(acme: SecretService, value: bytes) -> None:
    acme.store("blob", value)

    returned = acme.retrieve("blob").value

    assert isinstance(returned, bytes)
    assert returned == value


def test_storing_an_existing_name_creates_a_new_version_with_the_new_value(
    acme: SecretService,
) -> None:
    first = acme.store("token", "one")
    second = acme.store("token", b"two")

    secret = acme.retrieve("token")

    assert (first.version, second.version, secret.version) == (1, 2, 2)
    assert secret.value == b"two"
    assert secret.created_at == first.created_at
    assert secret.updated_at > first.updated_at


def test_options_left_out_on_update_keep_their_old_values(acme: SecretService) -> None:
    acme.store(
        "token",
        "one",
        category="api-keys",
        description="the token",
        expires_at=NEXT_YEAR,
        metadata={"owner": "billing"},
    )

    info = acme.store("token", "two")

    assert info.category == "api-keys"
    assert info.description == "the token"
    assert info.expires_at == NEXT_YEAR
    assert info.metadata == {"owner": "billing"}


def test_options_given_on_update_replace_the_old_ones(acme: SecretService) -> None:
    acme.store("token", "one", category="a", description="d1", metadata={"k": "1", "old": "x"})
    later = NEXT_YEAR + timedelta(days=1)

    acme.store(
        "token", "two", category="b", description="d2", expires_at=later, metadata={"k": "2"}
    )

    secret = acme.retrieve("token")
    assert (secret.category, secret.description) == ("b", "d2")
    assert secret.metadata == {"k": "2"}
    assert secret.expires_at == later


def test_an_empty_string_clears_category_and_description(acme: SecretService) -> None:
    acme.store("token", "one", category="api-keys", description="the token")

    info = acme.store("token", "two", category="", description="")

    assert info.category is None
    assert info.description is None
    assert acme.retrieve("token").category is None
    assert acme.categories() == []


def test_empty_metadata_clears_the_metadata(acme: SecretService) -> None:
    acme.store("token", "one", metadata={"owner": "billing"})

    acme.store("token", "two", metadata={})

    assert acme.retrieve("token").metadata == {}


def test_clear_expiry_removes_the_expiry(acme: SecretService) -> None:
    acme.store("token", "one", expires_at=NEXT_YEAR)

    info = acme.store("token", "two", clear_expiry=True)

    assert info.expires_at is None
    assert acme.retrieve("token").expires_at is None


def test_an_expiry_in_another_timezone_is_returned_as_the_same_instant_in_utc(
    acme: SecretService,
) -> None:
    plus_two = timezone(timedelta(hours=2))
    expires = datetime(2099, 1, 1, 12, 0, tzinfo=plus_two)

    acme.store("token", "v", expires_at=expires)

    returned = acme.retrieve("token").expires_at
    assert returned == expires
    assert returned is not None
    assert returned.utcoffset() == timedelta(0)


def test_all_returned_datetimes_are_timezone_aware_utc(acme: SecretService) -> None:
    acme.store("token", "v", expires_at=NEXT_YEAR)

    secret = acme.retrieve("token")

    for moment in (secret.created_at, secret.updated_at, secret.expires_at):
        assert moment is not None
        assert moment.utcoffset() == timedelta(0)
    assert secret.last_accessed_at is not None
    assert secret.last_accessed_at.utcoffset() == timedelta(0)


def test_retrieving_an_unknown_name_raises_secret_not_found(acme: SecretService) -> None:
    with pytest.raises(SecretNotFound, match="nope"):
        acme.retrieve("nope")


def test_secret_not_found_is_also_a_lookup_error(acme: SecretService) -> None:
    with pytest.raises(LookupError):
        acme.retrieve("nope")


def test_access_count_includes_this_read_and_every_earlier_one(acme: SecretService) -> None:
    acme.store("token", "v")

    counts = [acme.retrieve("token").access_count for _ in range(3)]

    assert counts == [1, 2, 3]
    assert acme.list()[0].access_count == 3


def test_last_accessed_at_is_the_time_of_the_latest_read(acme: SecretService) -> None:
    acme.store("token", "v")
    before = datetime.now(UTC)

    first = acme.retrieve("token")
    second = acme.retrieve("token")

    assert first.last_accessed_at is not None
    assert second.last_accessed_at is not None
    assert before <= first.last_accessed_at <= second.last_accessed_at <= datetime.now(UTC)
    assert acme.list()[0].last_accessed_at == second.last_accessed_at


def test_an_update_keeps_the_access_count(acme: SecretService) -> None:
    acme.store("token", "one")
    acme.retrieve("token")
    acme.retrieve("token")

    info = acme.store("token", "two")

    assert info.access_count == 2
    assert acme.retrieve("token").access_count == 3


def test_the_value_is_masked_in_repr_and_str(acme: SecretService) -> None:
    acme.store("token", "sk_live_very_secret")

    secret = acme.retrieve("token")

    assert "sk_live_very_secret" not in repr(secret)
    assert "sk_live_very_secret" not in str(secret)


def test_returned_models_are_frozen(acme: SecretService) -> None:
    info = acme.store("token", "v")
    secret = acme.retrieve("token")

    with pytest.raises(pydantic.ValidationError):
        info.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        secret.value = "changed"  # type: ignore[misc]


def test_an_expiry_in_the_past_is_accepted_and_the_secret_reads_as_expired(
    acme: SecretService,
) -> None:
    info = acme.store("token", "v", expires_at=LAST_YEAR)

    assert info.status == "expired"
    assert info.expires_at == LAST_YEAR
    assert acme.exists("token")


def test_secrets_with_equal_values_stay_independent(
    acme: SecretService,
) -> None:
    acme.store("a", "same")
    acme.store("b", "same")
    acme.store("a", "same")

    assert acme.retrieve("a").value == "same"
    assert acme.retrieve("b").value == "same"
    assert acme.retrieve("a").version == 2


def test_concurrent_reads_from_threads_lose_no_count_and_no_audit_entry(
    service: SecretService,
) -> None:
    service.store_for_tenant("acme", "token", "v")

    def read_many(_: int) -> list[int]:
        with tenant("acme"):
            return [service.retrieve("token").access_count for _ in range(25)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        counts = [count for batch in pool.map(read_many, range(4)) for count in batch]

    assert max(counts) == 100
    assert service.list_for_tenant("acme")[0].access_count == 100
    with tenant("acme"):
        assert len(service.get_audit_logs(action="read", result="success", limit=1000)) == 100


def test_a_retrieve_announces_its_read_to_the_group_commit_before_submitting_it(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A concurrent batch being formed waits briefly for reads on their way
    (application/group_commit.py): each retrieve must say so, and stop saying so when it
    ends, read or refused."""
    committer = service._ledger._reads
    announced_at_submit: list[bool] = []
    submit = committer.submit

    def spy(item: object) -> None:
        announced_at_submit.append(threading.get_ident() in committer._arriving)
        submit(item)  # type: ignore[arg-type]

    monkeypatch.setattr(committer, "submit", spy)
    with tenant("acme"):
        service.store("token", "t0k3n")
        service.retrieve("token")
        service.retrieve("token")
        with pytest.raises(SecretNotFound):
            service.retrieve("no-such-secret")

    assert announced_at_submit == [True, True]
    assert not committer._arriving


@pytest.mark.parametrize(
    ("environment", "seconds"), [(None, 0.001), ("0", 0.0), ("2.5", 0.0025)], ids=str
)
def test_the_group_commit_wait_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, environment: str | None, seconds: float
) -> None:
    if environment is not None:
        monkeypatch.setenv("KEYLEDGER_GROUP_COMMIT_WAIT_MS", environment)

    with SecretService.create("memory:", master_key=secrets.token_hex(32)) as service:
        assert service._ledger._reads.arrival_wait == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["-1", "101", "soon"])
def test_an_invalid_group_commit_wait_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("KEYLEDGER_GROUP_COMMIT_WAIT_MS", value)

    with pytest.raises(InvalidInput) as raised:
        SecretService.create("memory:", master_key=secrets.token_hex(32))
    assert str(raised.value).startswith("invalid configuration: KEYLEDGER_GROUP_COMMIT_WAIT_MS (")
    assert value not in str(raised.value).replace("100", "")


def test_the_group_commit_default_wait_is_the_settings_default() -> None:
    assert KeyledgerSettings().group_commit_wait_ms / 1000 == group_commit.ARRIVAL_WAIT


def test_a_thread_whose_writer_cannot_be_opened_gets_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread opens its own SQLite writer on its first write: if that fails (the
    file replaced by something else, say), every write path says StorageError."""
    service = SecretService.create(f"sqlite:///{tmp_path}/k.db", master_key=secrets.token_hex(32))
    service.store_for_tenant("acme", "token", "v")

    def refuse(self: Any) -> Any:
        raise InterfaceError("file is not a database")

    monkeypatch.setattr(KeyledgerSQLiteConnectionPool, "_create_connection", refuse)
    store = service._ledger.store
    outcomes: list[BaseException | None] = []

    def in_a_new_thread() -> None:
        for attempt in (
            lambda: service.store_for_tenant("acme", "other", "v"),
            lambda: store.writing().__enter__(),
        ):
            try:
                attempt()
                outcomes.append(None)
            except BaseException as error:
                outcomes.append(error)

    worker = threading.Thread(target=in_a_new_thread)
    worker.start()
    worker.join(timeout=30)
    monkeypatch.undo()
    service.close()

    assert [type(outcome) for outcome in outcomes] == [StorageError, StorageError]
    assert all("file is not a database" in str(outcome) for outcome in outcomes)


def test_a_new_secret_decided_on_a_stale_keyring_writes_nothing(service: SecretService) -> None:
    """A store's decision names the keyring version it encrypted under; on a keyring that
    has moved on, the append is refused whole (the retry then encrypts again)."""
    service.store_for_tenant("acme", "first", "v1")
    ledger = service._ledger
    keyring = ledger.keyring("acme")
    assert keyring is not None
    secret = DomainSecret.create(
        tenant_id="acme",
        name="second",
        envelope=b"\x01" * 40,
        key_version=1,
        category=None,
        description=None,
        metadata={},
        expires_at=None,
        actor={"user_id": "alice", "ip_address": None, "user_agent": None},
    )
    events = secret.collect_events()
    stored = [ledger.mapper.to_stored_event(event) for event in events]
    before = ledger.recorder.max_notification_id()

    stale = WriteUnit(expected={keyring.id: keyring.version + 1}, domain_events=events)
    with pytest.raises(StaleStateError):
        ledger.store.insert_events(stored, unit=stale)

    assert ledger.recorder.max_notification_id() == before
    assert [info.name for info in service.list_for_tenant("acme")] == ["first"]
    fresh = WriteUnit(expected={keyring.id: keyring.version}, domain_events=events)
    assert len(ledger.store.insert_events(stored, unit=fresh) or []) == 1
    assert [info.name for info in service.list_for_tenant("acme")] == ["first", "second"]
    with pytest.raises(IntegrityError):  # the same name again: the events' primary key
        ledger.store.insert_events(stored, unit=fresh)
    assert [info.name for info in service.list_for_tenant("acme")] == ["first", "second"]


def test_every_call_on_a_closed_service_is_a_storage_error_saying_so(
    make_service: MakeService,
) -> None:
    """After close(), a call fails with one typed error that says why, on every store
    (before 0.10.0: sqlite3.ProgrammingError, the library's ConnectionPoolClosedError, or
    "PostgreSQL unavailable or lock timeout")."""
    service = make_service()
    service.store_for_tenant("acme", "cached", "v")
    service.close()
    calls = {
        "retrieve a cached secret": lambda: service.retrieve_for_tenant("acme", "cached"),
        "retrieve an unknown one": lambda: service.retrieve_for_tenant("acme", "other"),
        "store": lambda: service.store_for_tenant("acme", "new", "v"),
        "list": lambda: service.list_for_tenant("acme"),
        "rotate": lambda: service.rotate_key_for_tenant("acme"),
        "audit": lambda: service.get_audit_logs(tenant_id="acme"),
    }

    for call in calls.values():
        with super_admin(), pytest.raises(StorageError, match="closed"):
            call()


def test_last_accessed_at_never_goes_back_when_an_earlier_read_commits_later(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads are timed before they queue for the write lock: a read timed first can
    commit second (its thread descheduled, its batch behind another, another process).
    The catalog keeps the time of the latest read (SPEC section 3), rebuilt alike."""
    service.store_for_tenant("acme", "token", "v")

    first, second = reads_out_of_order(service, monkeypatch, "acme", "token")

    assert first.last_accessed_at < second.last_accessed_at  # as timed
    assert first.access_count == 2  # as committed
    (info,) = service.list_for_tenant("acme")
    assert info.access_count == 2
    assert info.last_accessed_at == second.last_accessed_at
    service.rebuild_read_models()
    (rebuilt,) = service.list_for_tenant("acme")
    assert rebuilt.last_accessed_at == second.last_accessed_at
