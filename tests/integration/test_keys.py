"""Tenant data keys: first key, rotate_key, reencrypt_all, the key inventory (SPEC section 3)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from keyledger import (
    ReencryptResult,
    SecretExpired,
    SecretService,
    TenantKeyInfo,
    TenantRequired,
    super_admin,
    tenant,
)

LAST_YEAR = datetime.now(UTC) - timedelta(days=365)


@pytest.fixture
def acme(service: SecretService):
    with tenant("acme"):
        yield service


def statuses(service: SecretService) -> dict[int, str]:
    return {key.version: key.status for key in service.list_keys()}


def key_versions(service: SecretService) -> dict[str, int]:
    infos = service.list(status=None, include_expired=True)
    return {info.name: info.key_version for info in infos}


def test_a_tenant_has_no_keys_until_its_first_store(acme: SecretService) -> None:
    assert acme.list_keys() == []


def test_the_first_store_creates_key_version_one_as_active(acme: SecretService) -> None:
    before = datetime.now(UTC)
    acme.store("token", "v")

    [key] = acme.list_keys()

    assert isinstance(key, TenantKeyInfo)
    assert (key.tenant_id, key.version, key.status) == ("acme", 1, "active")
    assert key.amk_id
    assert before <= key.created_at <= datetime.now(UTC)
    assert key.retired_at is None
    assert key.secret_count == 1


def test_later_stores_reuse_the_active_key(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.store("b", "v")
    acme.store("a", "v2")

    [key] = acme.list_keys()
    assert key.secret_count == 2


def test_rotate_key_makes_a_new_active_version_and_retires_the_previous_one(
    acme: SecretService,
) -> None:
    acme.store("token", "v")

    new = acme.rotate_key()

    assert isinstance(new, TenantKeyInfo)
    assert (new.tenant_id, new.version, new.status, new.retired_at) == ("acme", 2, "active", None)
    assert new.secret_count == 0
    old, current = acme.list_keys()
    assert (old.version, old.status) == (1, "retired")
    assert old.retired_at is not None
    assert old.retired_at >= old.created_at
    assert current == new


def test_concurrent_rotations_each_return_their_new_version_as_active(
    service: SecretService,
) -> None:
    """SPEC: rotate_key returns the new active version, as the rotation made it, even
    when another thread has rotated again before it reads the result back."""
    service.store_for_tenant("acme", "s", "v")
    returned: list[TenantKeyInfo] = []

    def rotate() -> None:
        for _ in range(15):
            returned.append(service.rotate_key_for_tenant("acme"))

    threads = [threading.Thread(target=rotate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(returned) == 90
    assert {info.status for info in returned} == {"active"}
    assert {info.retired_at for info in returned} == {None}
    assert sorted(info.version for info in returned) == list(range(2, 92))


def test_key_versions_are_contiguous_with_exactly_one_active(acme: SecretService) -> None:
    acme.store("token", "v")

    returned = [acme.rotate_key().version for _ in range(4)]

    assert returned == [2, 3, 4, 5]
    assert statuses(acme) == {1: "retired", 2: "retired", 3: "retired", 4: "retired", 5: "active"}


def test_every_key_version_records_the_master_key_that_wrapped_it(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.rotate_key()

    amk_ids = {key.amk_id for key in acme.list_keys()}

    assert len(amk_ids) == 1
    assert "" not in amk_ids


def test_rotating_a_tenant_without_keys_creates_version_one(acme: SecretService) -> None:
    key = acme.rotate_key()

    assert (key.version, key.status, key.retired_at) == (1, "active", None)
    assert acme.store("token", "v").key_version == 1
    assert statuses(acme) == {1: "active"}


def test_rotation_does_not_reencrypt_and_old_secrets_stay_readable(acme: SecretService) -> None:
    acme.store("token", "v")

    acme.rotate_key()

    assert key_versions(acme) == {"token": 1}
    assert acme.retrieve("token").value == "v"
    assert {k.version: k.secret_count for k in acme.list_keys()} == {1: 1, 2: 0}


def test_stores_after_a_rotation_use_the_new_active_key(acme: SecretService) -> None:
    acme.store("old", "v")
    acme.rotate_key()

    info = acme.store("new", "v")
    updated = acme.store("old", "v2")

    assert (info.key_version, updated.key_version) == (2, 2)
    assert acme.retrieve("old").value == "v2"


def test_reencrypt_all_moves_every_live_secret_to_the_active_key(acme: SecretService) -> None:
    acme.store("active", "a", category="c", metadata={"k": "v"})
    acme.store("active", "a2")
    acme.store("disabled", b"b")
    acme.disable("disabled")
    acme.store("expired", "c", expires_at=LAST_YEAR)
    before = {i.name: i for i in acme.list(status=None, include_expired=True)}
    acme.rotate_key()

    result = acme.reencrypt_all()

    assert result == ReencryptResult(success=3, failed=0)
    assert key_versions(acme) == {"active": 2, "disabled": 2, "expired": 2}
    assert {k.version: k.secret_count for k in acme.list_keys()} == {1: 0, 2: 3}
    after = {i.name: i for i in acme.list(status=None, include_expired=True)}
    for name, info in before.items():
        assert after[name].version == info.version
        assert after[name].metadata == info.metadata
        assert after[name].status == info.status


def test_reencrypted_values_read_back_unchanged(acme: SecretService) -> None:
    acme.store("text", "hello ✓")
    acme.store("blob", b"\x00\x01")
    acme.rotate_key()
    acme.rotate_key()

    acme.reencrypt_all()

    assert acme.retrieve("text").value == "hello ✓"
    assert acme.retrieve("blob").value == b"\x00\x01"
    assert acme.retrieve("text").key_version == 3


def test_reencrypted_expired_secret_stays_expired(acme: SecretService) -> None:
    acme.store("expired", "c", expires_at=LAST_YEAR)
    acme.rotate_key()

    acme.reencrypt_all()

    with pytest.raises(SecretExpired):
        acme.retrieve("expired")


def test_secrets_already_on_the_active_key_count_as_success(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.store("b", "v")
    acme.rotate_key()
    acme.store("c", "v")

    first = acme.reencrypt_all()
    second = acme.reencrypt_all()

    assert first == ReencryptResult(success=3, failed=0)
    assert second == ReencryptResult(success=3, failed=0)


def test_reencrypt_all_leaves_deleted_secrets_out(acme: SecretService) -> None:
    acme.store("kept", "v")
    acme.store("gone", "v")
    acme.delete("gone")
    acme.rotate_key()

    assert acme.reencrypt_all() == ReencryptResult(success=1, failed=0)
    assert {k.version: k.secret_count for k in acme.list_keys()} == {1: 0, 2: 1}


def test_reencrypt_all_moves_a_secret_revived_elsewhere_that_this_process_saw_deleted(
    make_service: Callable[..., SecretService],
) -> None:
    """This process deleted "x" (its cache says so); another revived it. The catalog
    lists it live, so re-encryption must load it afresh and move it, not skip it."""
    here, elsewhere = make_service(), make_service()
    here.store_for_tenant("acme", "x", "1")
    here.store_for_tenant("acme", "y", "1")
    here.delete_for_tenant("acme", "x")
    elsewhere.store_for_tenant("acme", "x", "revived")
    here.rotate_key_for_tenant("acme")

    assert here.reencrypt_all_for_tenant("acme") == ReencryptResult(success=2, failed=0)
    with tenant("acme"):
        assert key_versions(here) == {"x": 2, "y": 2}
        assert here.retrieve("x").value == "revived"


def test_reencrypt_all_on_a_tenant_without_secrets_does_nothing(acme: SecretService) -> None:
    assert acme.reencrypt_all() == ReencryptResult(success=0, failed=0)
    assert acme.list_keys() == []


def test_deleted_secrets_do_not_count_towards_a_key_version(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.store("b", "v")

    acme.delete("a")

    assert [k.secret_count for k in acme.list_keys()] == [1]


def test_each_tenant_has_its_own_key_versions(service: SecretService) -> None:
    with tenant("acme"):
        service.store("token", "a")
        service.rotate_key()
        service.rotate_key()
    with tenant("globex"):
        service.store("token", "g")

        assert statuses(service) == {1: "active"}
        assert service.retrieve("token").key_version == 1
    with tenant("acme"):
        assert statuses(service) == {1: "retired", 2: "retired", 3: "active"}


def test_the_key_inventory_of_all_tenants_needs_super_admin(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "a")
    service.store_for_tenant("globex", "token", "g")
    service.rotate_key_for_tenant("globex")

    with pytest.raises(TenantRequired):
        service.list_keys()
    with super_admin():
        inventory = [(k.tenant_id, k.version, k.status) for k in service.list_keys()]

    assert inventory == [("acme", 1, "active"), ("globex", 1, "retired"), ("globex", 2, "active")]


def test_rotate_and_reencrypt_for_an_explicit_tenant(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "v")

    key = service.rotate_key_for_tenant("acme", user_id="ops")
    result = service.reencrypt_all_for_tenant("acme", user_id="ops")

    assert (key.tenant_id, key.version) == ("acme", 2)
    assert result == ReencryptResult(success=1, failed=0)
    assert service.retrieve_for_tenant("acme", "token").key_version == 2


def test_reencrypt_all_reports_progress_over_every_live_secret(acme: SecretService) -> None:
    for i in range(5):
        acme.store(f"s{i}", "v")
    acme.rotate_key()
    acme.store("s0", "v2")
    seen: list[int] = []

    result = acme.reencrypt_all(progress=seen.append)

    assert result == ReencryptResult(success=5, failed=0)
    assert sum(seen) == 5
