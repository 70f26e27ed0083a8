"""Point-in-time replay: ``state_as_of`` answers from the stream alone, per tenant, never values.

One history of two tenants (``acme`` under test, ``globex`` writing the same names in
between), with an instant marked after each step: the wall-clock time (strictly between the
events before and after it) and the stream head at that moment. Every instant is asked both
by time and by position.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from keyledger import (
    InvalidInput,
    KeyledgerError,
    SecretDisabled,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.application import stream
from keyledger.models import TenantState
from threaded import reads_out_of_order

EVERYTHING = 1_000_000

VALUES = {
    "acme-db-1": "VAL-acme-db-1-9f1c",
    "acme-db-2": "VAL-acme-db-2-77ab",
    "acme-tmp-1": "VAL-acme-tmp-1-0d0d",
    "acme-tmp-2": "VAL-acme-tmp-2-e5e5",
    "globex-db": "VAL-globex-db-c3c3",
    "globex-other": "VAL-globex-other-4242",
}


@pytest.fixture(autouse=True)
def _no_audit_key_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYLEDGER_AUDIT_KEY", raising=False)


@dataclass(frozen=True)
class Instant:
    at: datetime
    position: int


def head(service: SecretService) -> int:
    return service.read_model_status()["catalog"][1]


def mark(service: SecretService) -> Instant:
    """Now, strictly after every event so far and strictly before every later one."""
    time.sleep(0.001)
    now = datetime.now(UTC)
    while datetime.now(UTC) <= now:
        time.sleep(0.0005)
    return Instant(now, head(service))


@dataclass
class History:
    service: SecretService
    marks: dict[str, Instant]


def build_history(service: SecretService) -> History:
    marks: dict[str, Instant] = {}
    globex = {"user_id": "gina"}
    service.store_for_tenant("globex", "db", VALUES["globex-db"], category="other", **globex)
    marks["before"] = mark(service)

    with tenant("acme", user_id="alice", ip_address="203.0.113.7", user_agent="replay/1"):
        service.store(
            "db",
            VALUES["acme-db-1"],
            category="database",
            description="primary",
            metadata={"env": "prod"},
        )
        service.retrieve("db")
        service.retrieve("db")
        marks["v1"] = mark(service)

        for _ in range(3):  # the other tenant, same name, in between
            service.retrieve_for_tenant("globex", "db", user_id="gina")
        service.store_for_tenant("globex", "other", VALUES["globex-other"], **globex)

        service.store("db", VALUES["acme-db-2"], category="db2", metadata={"env": "staging"})
        service.retrieve("db")
        service.store("tmp", VALUES["acme-tmp-1"])
        marks["v2"] = mark(service)

        service.disable("db")
        with pytest.raises(SecretDisabled):
            service.retrieve("db")
        marks["disabled"] = mark(service)

        service.retrieve("tmp")
        service.delete("tmp")
        marks["deleted"] = mark(service)

        service.enable("db")
        service.rotate_key()
        marks["rotated"] = mark(service)

        service.reencrypt_all()
        marks["reencrypted"] = mark(service)

        service.rotate_key_for_tenant("globex", user_id="gina")
        service.compromise_key(2, "key leaked")
        marks["compromised"] = mark(service)

        service.store("tmp", VALUES["acme-tmp-2"])  # the deleted name, stored again
        service.retrieve("tmp")
        with pytest.raises(KeyledgerError):
            service.retrieve("db")  # its key version is compromised: a failure, no read
        service.retrieve_for_tenant("globex", "db", user_id="gina")
        marks["end"] = mark(service)
    return History(service, marks)


@pytest.fixture
def history(service: SecretService) -> History:
    return build_history(service)


def by_time(history: History, name: str, tenant_id: str = "acme") -> TenantState:
    return history.service.state_as_of(tenant_id, at=history.marks[name].at)


def secrets_of(state: TenantState) -> dict[str, Any]:
    return {s.name: s for s in state.secrets}


def keys_of(state: TenantState) -> dict[int, str]:
    return {k.version: k.status for k in state.keys}


def test_before_its_first_event_a_tenant_has_no_secrets_and_no_keys(history: History) -> None:
    for state in (
        by_time(history, "before"),
        history.service.state_as_of("acme", position=history.marks["before"].position),
        history.service.state_as_of("acme", position=0),
        history.service.state_as_of("acme", at=datetime(2000, 1, 1, tzinfo=UTC)),
    ):
        assert state.tenant_id == "acme"
        assert state.secrets == []
        assert state.keys == []
        assert state.events_applied == 0
        assert state.position == 0


def test_between_value_versions_the_first_version_and_its_metadata(history: History) -> None:
    state = by_time(history, "v1")

    [db] = state.secrets
    assert (db.name, db.version, db.key_version, db.status) == ("db", 1, 1, "active")
    assert (db.category, db.description, db.metadata) == ("database", "primary", {"env": "prod"})
    assert db.access_count == 2
    assert db.created_at == db.updated_at
    assert keys_of(state) == {1: "active"}
    assert state.as_of == history.marks["v1"].at
    assert state.as_of_position is None

    later = secrets_of(by_time(history, "v2"))
    assert (later["db"].version, later["db"].category) == (2, "db2")
    assert later["db"].metadata == {"env": "staging"}
    assert later["db"].description == "primary"  # left out: kept
    assert later["db"].created_at == db.created_at
    assert later["db"].updated_at > db.updated_at
    assert later["db"].access_count == 3
    assert (later["tmp"].version, later["tmp"].access_count) == (1, 0)


def test_after_disable_the_status_is_disabled_and_the_denied_read_is_not_counted(
    history: History,
) -> None:
    db = secrets_of(by_time(history, "disabled"))["db"]

    assert db.status == "disabled"
    assert db.access_count == 3
    assert secrets_of(by_time(history, "deleted"))["db"].status == "disabled"
    assert secrets_of(by_time(history, "rotated"))["db"].status == "active"


def test_after_deletion_the_secret_is_absent_and_a_restored_name_starts_afresh(
    history: History,
) -> None:
    assert "tmp" in secrets_of(by_time(history, "disabled"))
    assert sorted(secrets_of(by_time(history, "deleted"))) == ["db"]

    restored = secrets_of(by_time(history, "end"))["tmp"]
    assert restored.access_count == 1  # the read of the deleted incarnation is forgotten
    assert restored.created_at > history.marks["compromised"].at


def test_rotation_retires_version_one_and_reencryption_moves_the_secret(history: History) -> None:
    rotated = by_time(history, "rotated")
    reencrypted = by_time(history, "reencrypted")

    assert keys_of(rotated) == {1: "retired", 2: "active"}
    assert secrets_of(rotated)["db"].key_version == 1
    assert secrets_of(rotated)["db"].version == 2
    assert secrets_of(reencrypted)["db"].key_version == 2
    assert secrets_of(reencrypted)["db"].version == 2  # re-encryption is no new value
    [one, two] = rotated.keys
    assert one.retired_at == two.created_at
    assert two.retired_at is None
    assert one.key_id != two.key_id
    assert one.amk_id == two.amk_id


def test_after_compromise_the_version_is_compromised_and_replaced(history: History) -> None:
    state = by_time(history, "compromised")

    assert keys_of(state) == {1: "retired", 2: "compromised", 3: "active"}
    assert secrets_of(state)["db"].key_version == 2
    assert state.keys[1].retired_at is not None


def test_access_counts_are_the_successful_reads_before_the_instant(history: History) -> None:
    service = history.service
    with super_admin():
        reads = service.get_audit_logs(tenant_id="acme", action="read", limit=EVERYTHING)
        restores = service.get_audit_logs(tenant_id="acme", action="create", limit=EVERYTHING)
    assert {e.result for e in reads} == {"success", "denied", "failure"}

    for name, instant in history.marks.items():
        for secret in by_time(history, name).secrets:
            since = max(e.position for e in restores if e.secret_name == secret.name)
            expected = [
                e
                for e in reads
                if e.secret_name == secret.name
                and e.result == "success"
                and since < e.position <= instant.position
            ]
            assert secret.access_count == len(expected), (name, secret.name)
            last = max((e.timestamp for e in expected), default=None)
            assert secret.last_accessed_at == last, (name, secret.name)


def test_a_position_gives_the_same_answers_as_the_time_of_that_position(
    history: History,
) -> None:
    for name, instant in history.marks.items():
        for tenant_id in ("acme", "globex"):
            timed = history.service.state_as_of(tenant_id, at=instant.at)
            positioned = history.service.state_as_of(tenant_id, position=instant.position)

            assert positioned.secrets == timed.secrets, (name, tenant_id)
            assert positioned.keys == timed.keys, (name, tenant_id)
            assert positioned.position == timed.position, (name, tenant_id)
            assert positioned.events_applied == timed.events_applied, (name, tenant_id)
            assert positioned.as_of_position == instant.position
            assert positioned.as_of is None


def test_another_tenants_events_never_leak_in(history: History) -> None:
    service = history.service
    end = history.marks["end"]
    with super_admin():
        acme_entries = service.get_audit_logs(tenant_id="acme", limit=EVERYTHING)
        globex_entries = service.get_audit_logs(tenant_id="globex", limit=EVERYTHING)
    acme = service.state_as_of("acme", position=end.position)
    globex = service.state_as_of("globex", position=end.position)

    # Every event of a tenant is audited: the replay applied exactly the tenant's entries.
    assert acme.events_applied == len(acme_entries)
    assert globex.events_applied == len(globex_entries)
    assert acme.position == max(e.position for e in acme_entries)
    assert globex.position == max(e.position for e in globex_entries)
    assert sorted(secrets_of(globex)) == ["db", "other"]
    assert secrets_of(globex)["db"].category == "other"
    assert secrets_of(globex)["db"].access_count == 4
    assert keys_of(globex) == {1: "retired", 2: "active"}
    assert secrets_of(acme)["db"].access_count == 3
    assert {k.key_id for k in acme.keys}.isdisjoint({k.key_id for k in globex.keys})
    # Before acme's first event, globex already had its secret; acme saw none of it.
    assert by_time(history, "before", "globex").secrets != []
    assert service.state_as_of("nobody", at=end.at).events_applied == 0


def test_no_value_appears_anywhere_in_a_replayed_state(history: History) -> None:
    forms = [
        form
        for value in VALUES.values()
        for form in (value, base64.b64encode(value.encode()).decode(), value.encode().hex())
    ]
    for name, instant in history.marks.items():
        for tenant_id in ("acme", "globex"):
            for state in (
                history.service.state_as_of(tenant_id, at=instant.at),
                history.service.state_as_of(tenant_id, position=instant.position),
            ):
                dump = state.model_dump_json() + repr(state) + str(state.model_dump())
                leaked = [form for form in forms if form in dump]
                assert leaked == [], (name, tenant_id)


@pytest.mark.parametrize("page_size", [10_000, 2], ids=["one page", "pages of two events"])
def test_replay_up_to_the_head_equals_the_live_read_model(
    history: History, monkeypatch: pytest.MonkeyPatch, page_size: int
) -> None:
    """Replay reads a tenant a page at a time in primary-key order (bounded memory): with
    pages of two events every aggregate and every read spans several pages."""
    monkeypatch.setattr(stream, "TENANT_PAGE_SIZE", page_size)
    service = history.service
    now = head(service)
    for tenant_id in ("acme", "globex"):
        replayed = service.state_as_of(tenant_id, position=now)
        live = service.list_for_tenant(tenant_id, status=None, include_expired=True)

        fields = ("name", "status", "version", "key_version", "access_count")
        assert [tuple(getattr(s, f) for f in fields) for s in replayed.secrets] == [
            tuple(getattr(s, f) for f in fields) for s in live
        ]
        assert [s.model_dump() for s in replayed.secrets] == [s.model_dump() for s in live]
        keys = service.list_keys(tenant_id)
        assert [
            (k.version, k.status, k.amk_id, k.created_at, k.retired_at) for k in replayed.keys
        ] == [(k.version, k.status, k.amk_id, k.created_at, k.retired_at) for k in keys]


NAIVE = datetime(2030, 1, 1)  # no tzinfo: the point of the test
AWARE = datetime(2030, 1, 1, tzinfo=UTC)
INVALID: dict[str, tuple[Any, dict[str, Any]]] = {
    "both at and position": ("acme", {"at": AWARE, "position": 3}),
    "neither at nor position": ("acme", {}),
    "a naive datetime": ("acme", {"at": NAIVE}),
    "at as text": ("acme", {"at": "2030-01-01T00:00:00+00:00"}),
    "a negative position": ("acme", {"position": -1}),
    "a bool position": ("acme", {"position": True}),
    "position as text": ("acme", {"position": "3"}),
    "an empty tenant id": ("", {"position": 3}),
    "a tenant id with edge spaces": (" acme", {"position": 3}),
    "a tenant id with a control character": ("ac\x00me", {"at": AWARE}),
    "a tenant id too long": ("a" * 201, {"at": AWARE}),
    "a tenant id not a string": (42, {"at": AWARE}),
}


@pytest.mark.parametrize(("tenant_id", "kwargs"), INVALID.values(), ids=list(INVALID))
def test_invalid_input_is_refused_and_writes_nothing(
    service: SecretService, tenant_id: Any, kwargs: dict[str, Any]
) -> None:
    service.store_for_tenant("acme", "db", VALUES["acme-db-1"])
    service.retrieve_for_tenant("acme", "db")
    before = head(service)
    with super_admin():
        audited = service.get_audit_logs(limit=EVERYTHING)

    with tenant("acme"), pytest.raises(InvalidInput):
        service.state_as_of(tenant_id, **kwargs)

    assert head(service) == before
    with super_admin():
        assert service.get_audit_logs(limit=EVERYTHING) == audited


def test_an_aware_instant_in_another_zone_means_the_same_instant(history: History) -> None:
    instant = history.marks["v2"].at
    elsewhere = instant.astimezone(timezone(timedelta(hours=-5)))

    assert (
        history.service.state_as_of("acme", at=elsewhere).secrets == by_time(history, "v2").secrets
    )


# -- one write, one instant: replay never splits a write ------------------------------------


def _audit(service: SecretService, tenant_id: str) -> list[Any]:
    with super_admin():
        return sorted(service.get_audit_logs(tenant_id=tenant_id), key=lambda e: e.position)


def test_replay_never_shows_half_of_a_write_that_appended_several_events(
    service: SecretService,
) -> None:
    """Compromising the active key appends the compromise and the rotation away from it
    in one write; a tenant's first store appends its first key and its secret. Replayed
    at any of their events, by time or by position, the write is whole: never a tenant
    without an active key, never a key without the secret stored with it."""
    service.store_for_tenant("acme", "db", "v1")
    service.compromise_key_for_tenant("acme", 1, "leaked")
    created_key, created, compromised, rotated = _audit(service, "acme")
    assert (created_key.action, compromised.action, rotated.action) == (
        "create_key",
        "compromise_key",
        "rotate_key",
    )

    for entry in (created_key, created):
        for state in (
            service.state_as_of("acme", at=entry.timestamp),
            service.state_as_of("acme", position=entry.position),
        ):
            assert keys_of(state) == {1: "active"}
            assert list(secrets_of(state)) == ["db"]
    for entry in (compromised, rotated):
        for state in (
            service.state_as_of("acme", at=entry.timestamp),
            service.state_as_of("acme", position=entry.position),
        ):
            assert keys_of(state) == {1: "compromised", 2: "active"}
    by_position = service.state_as_of("acme", position=compromised.position)
    assert by_position.as_of_position == compromised.position  # as asked
    assert by_position.position == rotated.position  # the write's last event


def test_replayed_last_access_is_the_latest_read_even_when_appended_earlier(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read timed first can be appended second; the live catalog keeps the latest
    time, and so does a replay."""
    service.store_for_tenant("acme", "db", "v1")
    reads_out_of_order(service, monkeypatch, "acme", "db")
    (live,) = service.list_for_tenant("acme")

    replayed = secrets_of(service.state_as_of("acme", at=datetime.now(UTC)))["db"]

    assert (replayed.access_count, replayed.last_accessed_at) == (2, live.last_accessed_at)
