"""list, exists, categories and list_expiring: the read side (SPEC section 3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyledger import InvalidInput, SecretInfo, SecretService, tenant

NOW = datetime.now(UTC)
LAST_YEAR = NOW - timedelta(days=365)
NEXT_YEAR = NOW + timedelta(days=365)


@pytest.fixture
def acme(service: SecretService):
    with tenant("acme"):
        yield service


@pytest.fixture
def mixed(acme: SecretService) -> SecretService:
    """Tenant acme with one secret of every effective status, plus a deleted one."""
    acme.store("b-active", "v", category="db")
    acme.store("a-disabled", "v", category="api")
    acme.disable("a-disabled")
    acme.store("c-expired", "v", category="db", expires_at=LAST_YEAR)
    acme.store("d-active", "v", category="api", expires_at=NEXT_YEAR)
    acme.store("e-deleted", "v", category="gone")
    acme.delete("e-deleted")
    return acme


def names(infos: list[SecretInfo]) -> list[str]:
    return [info.name for info in infos]


def test_list_returns_secret_infos_sorted_by_name_without_values(acme: SecretService) -> None:
    for name in ("zeta", "alpha", "Mid", "beta"):
        acme.store(name, f"value-of-{name}")

    listed = acme.list()

    assert names(listed) == sorted(["zeta", "alpha", "Mid", "beta"])
    for info in listed:
        assert type(info) is SecretInfo
        assert "value-of" not in repr(info)


def test_list_shows_only_active_secrets_by_default(mixed: SecretService) -> None:
    assert names(mixed.list()) == ["b-active", "d-active"]


def test_list_with_status_disabled_shows_only_disabled_secrets(mixed: SecretService) -> None:
    assert names(mixed.list(status="disabled")) == ["a-disabled"]


def test_list_with_status_none_shows_active_and_disabled_but_not_expired(
    mixed: SecretService,
) -> None:
    assert names(mixed.list(status=None)) == ["a-disabled", "b-active", "d-active"]


def test_list_with_status_none_and_include_expired_shows_every_live_secret(
    mixed: SecretService,
) -> None:
    listed = mixed.list(status=None, include_expired=True)

    assert names(listed) == ["a-disabled", "b-active", "c-expired", "d-active"]
    assert [info.status for info in listed] == ["disabled", "active", "expired", "active"]


def test_list_with_include_expired_adds_expired_secrets_to_the_status_asked_for(
    mixed: SecretService,
) -> None:
    assert names(mixed.list(include_expired=True)) == ["b-active", "c-expired", "d-active"]
    assert names(mixed.list(status="disabled", include_expired=True)) == [
        "a-disabled",
        "c-expired",
    ]


def test_list_with_status_expired_shows_only_expired_secrets(mixed: SecretService) -> None:
    assert names(mixed.list(status="expired")) == ["c-expired"]
    assert names(mixed.list(status="expired", include_expired=False)) == ["c-expired"]


def test_a_disabled_secret_past_its_expiry_is_listed_as_expired(acme: SecretService) -> None:
    acme.store("old", "v", expires_at=LAST_YEAR)
    acme.disable("old")

    assert names(acme.list(status="disabled")) == []
    assert [(i.name, i.status) for i in acme.list(status="expired")] == [("old", "expired")]


def test_list_filters_by_category(mixed: SecretService) -> None:
    assert names(mixed.list(category="db", status=None, include_expired=True)) == [
        "b-active",
        "c-expired",
    ]
    assert names(mixed.list(category="api")) == ["d-active"]
    assert mixed.list(category="no-such-category") == []


def test_list_pages_with_limit_and_offset(acme: SecretService) -> None:
    for i in range(7):
        acme.store(f"s{i}", "v")

    pages = [names(acme.list(limit=3, offset=offset)) for offset in (0, 3, 6, 9)]

    assert pages == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"], []]
    assert names(acme.list(offset=5)) == ["s5", "s6"]
    assert acme.list(limit=0) == []


def test_pages_after_a_name_do_not_shift_while_secrets_come_and_go(acme: SecretService) -> None:
    """Each page starts after the last name of the one before: secrets stored or deleted
    before it between two pages move nothing into or out of a later page."""
    for i in range(7):
        acme.store(f"s{i}", "v")
    pages: list[list[str]] = []
    after: str | None = None
    while page := names(acme.list(limit=3, after_name=after)):
        pages.append(page)
        after = page[-1]
        acme.store(f"a{len(pages)}", "v")  # sorts before every page
        acme.delete("s0")

    assert pages == [["s0", "s1", "s2"], ["s3", "s4", "s5"], ["s6"]]
    assert names(acme.list(after_name="s6")) == []
    assert names(acme.list(after_name="b", limit=1)) == ["s1"]  # any name, not only listed ones


def test_after_name_is_checked_like_a_name(acme: SecretService) -> None:
    with pytest.raises(InvalidInput, match="after_name"):
        acme.list(after_name="")
    with pytest.raises(InvalidInput, match="after_name"):
        acme.list(after_name=3)  # type: ignore[arg-type]


def test_expired_secrets_are_filtered_before_paging_not_after(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.store("b", "v", expires_at=LAST_YEAR)
    acme.store("c", "v", expires_at=LAST_YEAR)
    acme.store("d", "v")
    acme.store("e", "v")

    assert names(acme.list(limit=2)) == ["a", "d"]
    assert names(acme.list(limit=2, offset=2)) == ["e"]


def test_deleted_secrets_are_never_listed(mixed: SecretService) -> None:
    for status in ("active", "disabled", "expired", None):
        assert "e-deleted" not in names(mixed.list(status=status, include_expired=True))


def test_list_reads_its_own_writes(acme: SecretService) -> None:
    acme.store("token", "v", category="old")
    acme.retrieve("token")
    acme.store("token", "v2", category="new")
    acme.retrieve("token")

    [info] = acme.list()

    assert (info.category, info.version, info.access_count) == ("new", 2, 2)


def test_list_shows_the_same_fields_as_retrieve_minus_the_value(acme: SecretService) -> None:
    acme.store("token", "v", category="c", description="d", metadata={"k": "v"})
    secret = acme.retrieve("token")

    [info] = acme.list()

    assert info.model_dump() == secret.model_dump(exclude={"value"})


def test_exists_is_true_for_a_secret_of_any_status(mixed: SecretService) -> None:
    assert mixed.exists("b-active")
    assert mixed.exists("a-disabled")
    assert mixed.exists("c-expired")


def test_exists_is_false_for_unknown_and_deleted_names(mixed: SecretService) -> None:
    assert not mixed.exists("never-stored")
    assert not mixed.exists("e-deleted")


def test_exists_does_not_count_as_a_read(acme: SecretService) -> None:
    acme.store("token", "v")

    acme.exists("token")

    assert acme.list()[0].access_count == 0


def test_categories_are_sorted_unique_and_non_empty(acme: SecretService) -> None:
    acme.store("a", "v", category="db")
    acme.store("b", "v", category="api-keys")
    acme.store("c", "v", category="db")
    acme.store("d", "v")
    acme.store("e", "v", category="")

    assert acme.categories() == ["api-keys", "db"]


def test_categories_include_disabled_and_expired_secrets_but_not_deleted_ones(
    mixed: SecretService,
) -> None:
    assert mixed.categories() == ["api", "db"]


def test_a_new_tenant_has_no_secrets_and_no_categories(acme: SecretService) -> None:
    assert acme.list(status=None, include_expired=True) == []
    assert acme.categories() == []
    assert acme.list_expiring() == []


def test_list_expiring_shows_active_secrets_expiring_within_the_window_soonest_first(
    acme: SecretService,
) -> None:
    acme.store("in-20-days", "v", expires_at=NOW + timedelta(days=20))
    acme.store("in-5-days", "v", expires_at=NOW + timedelta(days=5))
    acme.store("in-60-days", "v", expires_at=NOW + timedelta(days=60))
    acme.store("no-expiry", "v")
    acme.store("already-expired", "v", expires_at=LAST_YEAR)
    acme.store("disabled-in-3-days", "v", expires_at=NOW + timedelta(days=3))
    acme.disable("disabled-in-3-days")
    acme.store("deleted-in-3-days", "v", expires_at=NOW + timedelta(days=3))
    acme.delete("deleted-in-3-days")

    assert names(acme.list_expiring(days=30)) == ["in-5-days", "in-20-days"]
    assert names(acme.list_expiring(days=90)) == ["in-5-days", "in-20-days", "in-60-days"]
    assert names(acme.list_expiring(days=1)) == []


def test_list_expiring_defaults_to_thirty_days(acme: SecretService) -> None:
    acme.store("in-29-days", "v", expires_at=NOW + timedelta(days=29))
    acme.store("in-31-days", "v", expires_at=NOW + timedelta(days=31))

    assert names(acme.list_expiring()) == ["in-29-days"]
