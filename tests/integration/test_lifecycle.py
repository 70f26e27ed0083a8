"""disable, enable, delete and expiry: what each does to reads and listings (SPEC section 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyledger import SecretDisabled, SecretExpired, SecretNotFound, SecretService, tenant

LAST_YEAR = datetime.now(UTC) - timedelta(days=365)
NEXT_YEAR = datetime.now(UTC) + timedelta(days=365)


@pytest.fixture
def acme(service: SecretService):
    with tenant("acme"):
        yield service


def status_of(service: SecretService, name: str) -> str:
    [info] = [i for i in service.list(status=None, include_expired=True) if i.name == name]
    return info.status


def test_a_disabled_secret_cannot_be_read(acme: SecretService) -> None:
    acme.store("token", "v")

    assert acme.disable("token") is True

    with pytest.raises(SecretDisabled, match="token"):
        acme.retrieve("token")
    assert status_of(acme, "token") == "disabled"


def test_an_enabled_secret_can_be_read_again(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.disable("token")

    assert acme.enable("token") is True

    assert acme.retrieve("token").value == "v"
    assert status_of(acme, "token") == "active"


def test_disable_and_enable_are_idempotent(acme: SecretService) -> None:
    acme.store("token", "v")

    assert acme.disable("token") is True
    assert acme.disable("token") is True
    assert status_of(acme, "token") == "disabled"
    assert acme.enable("token") is True
    assert acme.enable("token") is True
    assert status_of(acme, "token") == "active"


def test_a_refused_read_does_not_count_as_an_access(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.disable("token")
    with pytest.raises(SecretDisabled):
        acme.retrieve("token")

    acme.enable("token")

    assert acme.retrieve("token").access_count == 1


@pytest.mark.parametrize("action", ["disable", "enable", "delete"])
def test_changing_an_unknown_name_returns_false(acme: SecretService, action: str) -> None:
    assert getattr(acme, action)("never-stored") is False
    assert not acme.exists("never-stored")


def test_storing_a_new_value_keeps_a_disabled_secret_disabled(acme: SecretService) -> None:
    acme.store("token", "old")
    acme.disable("token")

    info = acme.store("token", "new")

    assert info.status == "disabled"
    with pytest.raises(SecretDisabled):
        acme.retrieve("token")
    acme.enable("token")
    assert acme.retrieve("token").value == "new"


def test_a_deleted_secret_is_gone_from_every_read_and_listing(acme: SecretService) -> None:
    acme.store("token", "v", category="api")

    assert acme.delete("token") is True

    assert not acme.exists("token")
    assert acme.list(status=None, include_expired=True) == []
    assert acme.categories() == []
    with pytest.raises(SecretNotFound):
        acme.retrieve("token")


@pytest.mark.parametrize("action", ["disable", "enable", "delete"])
def test_a_deleted_secret_cannot_be_changed_any_more(acme: SecretService, action: str) -> None:
    acme.store("token", "v")
    acme.delete("token")

    assert getattr(acme, action)("token") is False
    assert not acme.exists("token")


def test_disabled_and_expired_secrets_can_be_deleted(acme: SecretService) -> None:
    acme.store("disabled", "v")
    acme.disable("disabled")
    acme.store("expired", "v", expires_at=LAST_YEAR)

    assert acme.delete("disabled") is True
    assert acme.delete("expired") is True
    assert acme.list(status=None, include_expired=True) == []


def test_restoring_a_deleted_name_starts_a_fresh_secret_whose_version_continues(
    acme: SecretService,
) -> None:
    acme.store("token", "one", category="api", description="d", metadata={"k": "v"})
    old = acme.store("token", "two", expires_at=NEXT_YEAR)
    acme.retrieve("token")
    acme.delete("token")

    fresh = acme.store("token", "three")

    assert fresh.created_at > old.created_at
    assert fresh.access_count == 0
    assert fresh.last_accessed_at is None
    assert fresh.version == 3
    assert (fresh.category, fresh.description, fresh.metadata, fresh.expires_at) == (
        None,
        None,
        {},
        None,
    )
    secret = acme.retrieve("token")
    assert (secret.value, secret.access_count, secret.status) == ("three", 1, "active")


def test_a_restored_name_that_was_disabled_is_active_again(acme: SecretService) -> None:
    acme.store("token", "one")
    acme.disable("token")
    acme.delete("token")

    acme.store("token", "two")

    assert acme.retrieve("token").value == "two"


def test_an_expired_secret_cannot_be_read(acme: SecretService) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)

    with pytest.raises(SecretExpired, match="token"):
        acme.retrieve("token")
    assert status_of(acme, "token") == "expired"


def test_expiry_is_checked_before_disabled(acme: SecretService) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)
    acme.disable("token")

    with pytest.raises(SecretExpired):
        acme.retrieve("token")


def test_enabling_an_expired_secret_returns_true_but_it_stays_expired(
    acme: SecretService,
) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)

    assert acme.enable("token") is True

    assert status_of(acme, "token") == "expired"
    with pytest.raises(SecretExpired):
        acme.retrieve("token")


def test_enabling_an_expired_secret_after_a_refused_read_keeps_it_expired(
    acme: SecretService,
) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)
    with pytest.raises(SecretExpired):
        acme.retrieve("token")

    assert acme.enable("token") is True

    assert status_of(acme, "token") == "expired"
    with pytest.raises(SecretExpired):
        acme.retrieve("token")


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "after-refused-read"])
@pytest.mark.parametrize("renewal", [{"expires_at": NEXT_YEAR}, {"clear_expiry": True}])
def test_an_expired_secret_renewed_with_a_future_or_no_expiry_is_readable_again(
    acme: SecretService, read_first: bool, renewal: dict
) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    if read_first:
        with pytest.raises(SecretExpired):
            acme.retrieve("token")

    info = acme.store("token", "new", **renewal)

    assert info.status == "active"
    assert acme.retrieve("token").value == "new"


def test_an_expired_secret_deleted_and_stored_again_is_fresh_and_readable(
    acme: SecretService,
) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    with pytest.raises(SecretExpired):
        acme.retrieve("token")
    acme.delete("token")

    info = acme.store("token", "new")

    assert (info.status, info.expires_at) == ("active", None)
    assert acme.retrieve("token").value == "new"


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "after-refused-read"])
def test_an_expired_secret_stored_again_without_a_new_expiry_stays_expired(
    acme: SecretService, read_first: bool
) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    if read_first:
        with pytest.raises(SecretExpired):
            acme.retrieve("token")

    info = acme.store("token", "new")

    assert info.status == "expired"
    assert info.expires_at == LAST_YEAR
    with pytest.raises(SecretExpired):
        acme.retrieve("token")


def test_an_expired_secret_stored_again_with_a_past_expiry_stays_expired(
    acme: SecretService,
) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    with pytest.raises(SecretExpired):
        acme.retrieve("token")

    acme.store("token", "new", expires_at=LAST_YEAR + timedelta(days=1))

    with pytest.raises(SecretExpired):
        acme.retrieve("token")


def test_a_disabled_secret_renewed_after_expiring_stays_disabled(acme: SecretService) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    acme.disable("token")

    acme.store("token", "new", expires_at=NEXT_YEAR)

    assert status_of(acme, "token") == "disabled"
    with pytest.raises(SecretDisabled):
        acme.retrieve("token")


@pytest.mark.parametrize("disable_first", [True, False], ids=["disable-read", "read-disable"])
def test_a_disabled_secret_renewed_after_a_refused_expired_read_stays_disabled(
    acme: SecretService, disable_first: bool
) -> None:
    acme.store("token", "old", expires_at=LAST_YEAR)
    if disable_first:
        assert acme.disable("token") is True
    with pytest.raises(SecretExpired):
        acme.retrieve("token")
    if not disable_first:
        assert acme.disable("token") is True

    acme.store("token", "new", expires_at=NEXT_YEAR)

    assert status_of(acme, "token") == "disabled"
    with pytest.raises(SecretDisabled):
        acme.retrieve("token")
