"""Time as several hosts and processes see it: clocks that disagree, writes that wait,
datetimes from other libraries."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from conftest import MakeService
from keyledger import SecretService, super_admin, tenant
from keyledger.domain import instant


@contextmanager
def clock_ahead(service: SecretService, offset: timedelta) -> Iterator[None]:
    """This "host" runs ``offset`` ahead: its events and its decisions."""
    ledger = service._ledger
    real_now, real_clock = instant.datetime_now_with_tzinfo, ledger.clock
    instant.datetime_now_with_tzinfo = lambda: real_now() + offset  # type: ignore[assignment]
    ledger.clock = lambda: real_clock() + offset  # type: ignore[method-assign]
    try:
        yield
    finally:
        instant.datetime_now_with_tzinfo = real_now  # type: ignore[assignment]
        ledger.clock = real_clock  # type: ignore[method-assign]


def test_replay_at_a_time_between_a_secrets_out_of_order_versions(
    make_service: MakeService,
) -> None:
    """A host an hour ahead updates, an accurate one disables after it: the disable
    (version 3) is timed before the update (version 2). Replay as of now applies each
    secret's versions up to the first one timed after it, and does not fail."""
    here, ahead = make_service(), make_service()
    here.store_for_tenant("acme", "s", "v1", category="first")
    with clock_ahead(ahead, timedelta(hours=1)):
        ahead.store_for_tenant("acme", "s", "v2", category="second")
    here.disable_for_tenant("acme", "s")
    now = datetime.now(UTC)

    state = here.state_as_of("acme", at=now)

    (secret,) = state.secrets
    assert (secret.version, secret.category, secret.status) == (1, "first", "active")
    later = here.state_as_of("acme", at=now + timedelta(hours=2))
    assert [(s.version, s.category, s.status) for s in later.secrets] == [(2, "second", "disabled")]


def test_a_write_that_waits_for_fresh_state_is_timed_after_what_it_loaded(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process commits while this one's disable is between its start and its
    load of the secret: the disable still carries a time after that commit's."""
    first, second = make_service(), make_service()
    first.store_for_tenant("acme", "s", "v1")
    second.store_for_tenant("acme", "s", "v2")  # first's cached copy is now stale
    ledger = first._ledger
    load = ledger.secret
    interleaved: list[bool] = []

    def secret(tenant_id: str, name: str, fresh: bool = False) -> object:
        if fresh and not interleaved:
            interleaved.append(True)
            other = threading.Thread(  # (a thread of its own: not inside this write)
                target=lambda: second.store_for_tenant("acme", "s", "v3")
            )
            other.start()
            other.join()
        return load(tenant_id, name, fresh=fresh)

    monkeypatch.setattr(ledger, "secret", secret)
    with tenant("acme"):
        assert first.disable("s") is True
        trail = sorted(first.audit_trail("s"), key=lambda e: e.position)

    assert interleaved
    assert [e.action for e in trail] == ["create", "update", "update", "disable"]
    assert [e.timestamp for e in trail] == sorted(e.timestamp for e in trail)
    disabled_at = trail[-1].timestamp
    (replayed,) = first.state_as_of("acme", at=disabled_at).secrets
    assert (replayed.version, replayed.status) == (3, "disabled")


def test_cleanup_of_every_retired_version_includes_one_retired_by_a_host_ahead(
    make_service: MakeService,
) -> None:
    """``older_than_days=0`` is every retired version (SPEC section 3), even one whose
    retirement a host with a fast clock timed after this host's now."""
    operator, ahead = make_service(), make_service()
    operator.store_for_tenant("acme", "s", "v1")
    with clock_ahead(ahead, timedelta(minutes=2)):
        ahead.rotate_key_for_tenant("acme")
        ahead.reencrypt_all_for_tenant("acme")

    result = operator.cleanup_retired_keys(older_than_days=0)

    assert [(k.version, k.outcome) for k in result.keys] == [(1, "destroyed")]
    assert [k.status for k in operator.list_keys("acme")] == ["destroyed", "active"]


class _Timestamp(datetime):
    """A datetime subclass, as pandas.Timestamp and pendulum.DateTime are."""


def test_a_datetime_subclass_is_taken_as_the_plain_datetime_it_is(service: SecretService) -> None:
    expires = _Timestamp(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    stored = service.store_for_tenant("acme", "s", "v", expires_at=expires)
    service.store_for_tenant("acme", "s", "v2", expires_at=expires + timedelta(days=1))

    assert stored.expires_at == datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert type(stored.expires_at) is datetime
    (listed,) = service.list_for_tenant("acme")
    assert listed.expires_at == datetime(2030, 1, 3, 3, 4, 5, 6, tzinfo=UTC)


def test_the_events_of_a_reencryption_batch_share_one_time(service: SecretService) -> None:
    """A batch is one write (docs/audit.md): replayed by position, all of it or none."""
    for i in range(5):
        service.store_for_tenant("acme", f"s{i}", "v")
    service.rotate_key_for_tenant("acme")

    assert service.reencrypt_all_for_tenant("acme").success == 5

    with super_admin():
        moved = service.get_audit_logs(tenant_id="acme", action="update")
    assert len(moved) == 5
    assert len({entry.timestamp for entry in moved}) == 1
    first = min(entry.position for entry in moved)
    replayed = service.state_as_of("acme", position=first)
    assert {s.key_version for s in replayed.secrets} == {2}
