"""The key lifecycle (SPEC section 6): master-key rotation, compromise, cleanup, rotation policy.

Every test runs on every store through the conftest fixtures; the ones that need a second
service on the same store (another master key) skip on ``memory:``.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import run_around
from keyledger import (
    CleanupResult,
    DecryptionFailed,
    InvalidInput,
    KeyDue,
    MasterKeyUnavailable,
    ReencryptResult,
    SecretKeyDriftError,
    SecretService,
    StorageError,
    TenantKeyInfo,
    TenantRequired,
    super_admin,
    tenant,
)
from keyledger.infrastructure.crypto import MasterKey
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]

ACME = "acme"
GLOBEX = "globex"
TENANTS = ("acme", "globex", "initech")
EVERYTHING = 1_000_000


def amk_id(hex_key: str) -> str:
    return MasterKey(bytes.fromhex(hex_key)).amk_id


def material_versions(service: SecretService, tenant_id: str) -> list[int]:
    """Versions that have key material in the database, read around keyledger."""
    rows = run_around(
        service,
        "SELECT version FROM kl_key_material WHERE tenant_id=? ORDER BY version",
        (tenant_id,),
    )
    return [row[0] for row in rows]


def audit(service: SecretService, tenant_id: str | None = None, **filters: Any) -> list[Any]:
    """Audit entries of one tenant (or all), oldest first."""
    with super_admin():
        return service.get_audit_logs(tenant_id=tenant_id, limit=EVERYTHING, **filters)[::-1]


def statuses(service: SecretService, tenant_id: str) -> dict[int, str]:
    return {key.version: key.status for key in service.list_keys(tenant_id)}


def values(service: SecretService, tenant_id: str) -> dict[str, str | bytes]:
    return {
        info.name: service.retrieve_for_tenant(tenant_id, info.name).value
        for info in service.list_for_tenant(tenant_id, status=None)
    }


def problems(service: SecretService, tenant_id: str) -> list[str]:
    report = service.diagnose_tenant_secret_key_drift(tenant_id)
    return [issue.code for issue in report.issues if issue.severity != "info"]


def populate(service: SecretService) -> dict[str, dict[str, str | bytes]]:
    """Three tenants, each with secrets under a retired and an active key version."""
    stored: dict[str, dict[str, str | bytes]] = {}
    for index, tenant_id in enumerate(TENANTS):
        mine: dict[str, str | bytes] = {}
        for i in range(3):
            mine[f"old-{i}"] = f"{tenant_id}-old-{i}"
        mine["binary"] = bytes([index, 0, 255]) * 5
        for name, value in mine.items():
            service.store_for_tenant(tenant_id, name, value)
        service.rotate_key_for_tenant(tenant_id)
        mine["new"] = f"{tenant_id}-new"
        service.store_for_tenant(tenant_id, "new", mine["new"])
        stored[tenant_id] = mine
    return stored


# -- master-key rotation ----------------------------------------------------------------------


@pytest.fixture
def new_key() -> str:
    return secrets.token_hex(32)


def rotating(make_service: MakeService, new_key: str, old_key: str) -> SecretService:
    """A service with the new master key and the old one as a previous key."""
    return make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=old_key)
    )


def test_the_runbooks_two_rollouts_keep_processes_not_yet_redeployed_working(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    """docs/operations.md, runbook 2, step 2. Deployed in one step, the first key version
    a redeployed process made (a rotation) broke the processes still on the old key alone
    (found by review); after the first rollout (new key as a previous key only) they keep
    storing and reading whatever the redeployed ones wrap under it."""
    make_service().store_for_tenant(ACME, "a", "v1")
    one_step_behind = make_service()  # the old key only
    first_rollout = make_service(
        master_key=master_key, settings=KeyledgerSettings(previous_master_keys=new_key)
    )
    redeployed = rotating(make_service, new_key, master_key)

    redeployed.rotate_key_for_tenant(ACME)  # version 2, wrapped under the new key
    redeployed.store_for_tenant(ACME, "b", "v2")

    with pytest.raises(MasterKeyUnavailable):
        one_step_behind.store_for_tenant(ACME, "a", "v3")
    first_rollout.store_for_tenant(ACME, "a", "v3")
    assert first_rollout.retrieve_for_tenant(ACME, "b").value == "v2"
    assert redeployed.retrieve_for_tenant(ACME, "a").value == "v3"


def test_a_master_key_rotation_rewraps_every_tenant_so_the_old_key_can_be_dropped(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    stored = populate(make_service())
    service = rotating(make_service, new_key, master_key)
    with super_admin():
        listed = {t: service.list_for_tenant(t, status=None) for t in TENANTS}
        versions_before = [(k.tenant_id, k.version, k.status) for k in service.list_keys()]
    progressed: list[int] = []

    result = service.rewrap_master_key(user_id="ops", progress=progressed.append)

    assert result.amk_id == amk_id(new_key)
    assert (result.rewrapped, result.already_current, result.failed) == (6, 0, 0)
    assert result.failures == []
    assert sum(progressed) == 6
    with super_admin():
        keys = service.list_keys()
    assert [(k.tenant_id, k.version, k.status) for k in keys] == versions_before
    assert {k.amk_id for k in keys} == {amk_id(new_key)}
    rewraps = audit(service, action="rewrap_key")
    assert len(rewraps) == 6
    assert {(e.details["previous_amk_id"], e.details["amk_id"]) for e in rewraps} == {
        (amk_id(master_key), amk_id(new_key))
    }
    assert {e.user_id for e in rewraps} == {"ops"}
    # Secret values were not touched: no store, no re-encryption, same listing.
    assert audit(service, action="update") == []
    assert {t: service.list_for_tenant(t, status=None) for t in TENANTS} == listed

    only_new = make_service(master_key=new_key)
    for tenant_id in TENANTS:
        assert values(only_new, tenant_id) == stored[tenant_id]
        assert problems(only_new, tenant_id) == []


def test_after_a_rewrap_the_old_master_key_alone_reads_nothing(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    populate(make_service())
    rotating(make_service, new_key, master_key).rewrap_master_key()

    only_old = make_service(master_key=master_key)

    with pytest.raises(SecretKeyDriftError) as raised:
        only_old.retrieve_for_tenant(ACME, "new")
    assert amk_id(new_key) in str(raised.value)


def test_a_second_rewrap_has_nothing_left_to_do(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    populate(make_service())
    service = rotating(make_service, new_key, master_key)
    service.rewrap_master_key()
    entries = len(audit(service))

    again = service.rewrap_master_key()

    assert (again.rewrapped, again.already_current, again.failed) == (0, 6, 0)
    assert len(audit(service)) == entries


def test_a_rewrap_without_the_old_master_key_fails_per_version_and_changes_nothing(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    stored = populate(make_service())
    service = make_service(master_key=new_key)
    with super_admin():
        keys = service.list_keys()

    result = service.rewrap_master_key()

    assert (result.rewrapped, result.failed) == (0, 6)
    assert all(amk_id(master_key) in failure for failure in result.failures)
    assert all(master_key not in failure for failure in result.failures)
    with super_admin():
        assert service.list_keys() == keys
    assert audit(service, action="rewrap_key") == []
    assert values(make_service(), ACME) == stored[ACME]


def test_a_rewrap_needs_a_master_key(make_service: MakeService) -> None:
    populate(make_service())

    with pytest.raises(MasterKeyUnavailable):
        make_service(master_key=None).rewrap_master_key()


def test_a_rewrap_leaves_destroyed_versions_alone(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    first = make_service()
    stored = populate(first)
    first.reencrypt_all_for_tenant(ACME)
    assert first.cleanup_retired_keys(older_than_days=0).destroyed == 1
    service = rotating(make_service, new_key, master_key)

    result = service.rewrap_master_key()

    assert (result.rewrapped, result.failed) == (5, 0)
    [destroyed] = [k for k in service.list_keys(ACME) if k.status == "destroyed"]
    assert destroyed.amk_id == amk_id(master_key)
    assert values(make_service(master_key=new_key), ACME) == stored[ACME]


# -- compromise -------------------------------------------------------------------------------


def test_compromising_the_active_version_activates_a_new_one_in_the_same_step(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "token", "v")

    info = service.compromise_key_for_tenant(ACME, 1, "leaked in a log", user_id="sec")

    assert isinstance(info, TenantKeyInfo)
    assert (info.version, info.status, info.secret_count) == (1, "compromised", 1)
    assert info.retired_at is not None
    assert statuses(service, ACME) == {1: "compromised", 2: "active"}
    entries = audit(service, ACME)
    compromised, rotated = entries[-2:]
    assert (compromised.action, compromised.key_version) == ("compromise_key", 1)
    assert compromised.details["reason"] == "leaked in a log"
    assert (rotated.action, rotated.key_version) == ("rotate_key", 2)
    assert rotated.position == compromised.position + 1
    assert {compromised.user_id, rotated.user_id} == {"sec"}
    assert service.store_for_tenant(ACME, "fresh", "f").key_version == 2


def test_secrets_under_a_compromised_version_fail_to_read_until_stored_afresh(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "token", "old-token")
    service.store_for_tenant(ACME, "password", "old-password")
    service.compromise_key_for_tenant(ACME, 1, "leaked")

    with pytest.raises(DecryptionFailed) as raised:
        service.retrieve_for_tenant(ACME, "token")
    assert "old-token" not in str(raised.value)
    service.store_for_tenant(ACME, "token", "new-token")

    assert service.retrieve_for_tenant(ACME, "token").value == "new-token"
    assert service.retrieve_for_tenant(ACME, "token").key_version == 2
    with pytest.raises(DecryptionFailed):
        service.retrieve_for_tenant(ACME, "password")
    [failure, *_] = audit(service, ACME, action="read", result="failure")
    assert failure.secret_name == "token"


def test_the_diagnosis_names_every_secret_on_a_compromised_version(service: SecretService) -> None:
    for name in ("a", "b", "c"):
        service.store_for_tenant(ACME, name, name)
    service.compromise_key_for_tenant(ACME, 1, "leaked")
    service.store_for_tenant(ACME, "c", "c-again")

    report = service.diagnose_tenant_secret_key_drift(ACME)

    assert not report.ok
    on_compromised = [i for i in report.issues if i.code == "secret_on_compromised_key"]
    assert {(i.secret_name, i.key_version) for i in on_compromised} == {("a", 1), ("b", 1)}
    assert {(i.severity, i.repair_action) for i in on_compromised} == {
        ("error", "store-fresh-secret-value")
    }
    assert report.summary["compromised_tenant_key_count"] == 1
    with pytest.raises(SecretKeyDriftError) as raised:
        service.retrieve_for_tenant(ACME, "a")
    assert "secret_on_compromised_key" in {i.code for i in raised.value.report.issues}

    for name in ("a", "b"):
        service.store_for_tenant(ACME, name, f"{name}-again")
    assert service.diagnose_tenant_secret_key_drift(ACME).ok


def test_reencrypting_cannot_launder_values_under_a_compromised_version(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "a", "a")
    service.store_for_tenant(ACME, "b", "b")
    service.compromise_key_for_tenant(ACME, 1, "leaked")

    result = service.reencrypt_all_for_tenant(ACME)

    assert (result.success, result.failed) == (0, 2)
    assert {i.name: i.key_version for i in service.list_for_tenant(ACME)} == {"a": 1, "b": 1}
    assert len(audit(service, ACME, action="update", result="failure")) == 2


def test_compromising_a_retired_version_keeps_the_active_one(service: SecretService) -> None:
    service.store_for_tenant(ACME, "old", "old-value")
    service.rotate_key_for_tenant(ACME)
    service.store_for_tenant(ACME, "new", "new-value")

    info = service.compromise_key_for_tenant(ACME, 1, "old backup stolen")

    assert (info.version, info.status) == (1, "compromised")
    assert statuses(service, ACME) == {1: "compromised", 2: "active"}
    assert audit(service, ACME, action="rotate_key")[-1].key_version == 2  # no new rotation
    assert service.retrieve_for_tenant(ACME, "new").value == "new-value"
    with pytest.raises(DecryptionFailed):
        service.retrieve_for_tenant(ACME, "old")
    cleanup = service.cleanup_retired_keys(older_than_days=0)  # "old" is still on it
    assert [(o.version, o.outcome) for o in cleanup.keys] == [(1, "skipped")]


def test_compromising_a_version_again_changes_nothing(service: SecretService) -> None:
    service.store_for_tenant(ACME, "a", "a")
    service.compromise_key_for_tenant(ACME, 1, "leaked")
    entries = audit(service, ACME)

    again = service.compromise_key_for_tenant(ACME, 1, "leaked again")

    assert again.status == "compromised"
    assert audit(service, ACME) == entries
    assert statuses(service, ACME) == {1: "compromised", 2: "active"}


@pytest.mark.parametrize(
    ("version", "reason"),
    [(9, "no such version"), (0, "zero"), (-1, "negative"), (1, ""), (1, "   ")],
)
def test_a_compromise_needs_an_existing_version_and_a_reason(
    service: SecretService, version: int, reason: str
) -> None:
    service.store_for_tenant(ACME, "a", "a")
    entries = audit(service, ACME)

    with pytest.raises(InvalidInput):
        service.compromise_key_for_tenant(ACME, version, reason)

    assert audit(service, ACME) == entries
    assert statuses(service, ACME) == {1: "active"}


def test_compromising_a_key_of_a_tenant_without_keys_is_refused(service: SecretService) -> None:
    with pytest.raises(InvalidInput):
        service.compromise_key_for_tenant("nobody", 1, "leaked")

    assert service.list_keys("nobody") == []


def test_compromise_in_a_tenant_scope_records_the_actor(service: SecretService) -> None:
    with tenant(ACME, user_id="alice", ip_address="203.0.113.7"):
        service.store("a", "a")
        info = service.compromise_key(1, "laptop stolen")
        [entry] = service.get_audit_logs(action="compromise_key")

    assert info.status == "compromised"
    assert (entry.user_id, entry.ip_address) == ("alice", "203.0.113.7")


def test_a_service_that_cached_a_key_stops_using_it_once_another_compromised_it(
    make_service: MakeService,
) -> None:
    reader = make_service()
    reader.store_for_tenant(ACME, "token", "t")
    assert reader.retrieve_for_tenant(ACME, "token").value == "t"  # key now cached

    make_service().compromise_key_for_tenant(ACME, 1, "leaked")

    with pytest.raises(DecryptionFailed):
        reader.retrieve_for_tenant(ACME, "token")
    assert reader.store_for_tenant(ACME, "other", "o").key_version == 2


def test_reencrypting_without_a_master_key_raises_moves_nothing_and_is_audited(
    make_service: MakeService,
) -> None:
    service = make_service()
    service.store_for_tenant(ACME, "token", "t")
    service.rotate_key_for_tenant(ACME)
    keyless = make_service(master_key=None)
    entries = audit(service, ACME)

    with pytest.raises(MasterKeyUnavailable) as raised:
        keyless.reencrypt_all_for_tenant(ACME, user_id="ops")
    assert str(raised.value).startswith(f"cannot re-encrypt the secrets of tenant {ACME!r}: ")

    [*earlier, failed] = audit(service, ACME)  # oldest first
    assert earlier == entries
    assert (failed.action, failed.result, failed.user_id) == ("update", "failure", "ops")
    assert failed.details["error"] == "MasterKeyUnavailable"
    assert [s.key_version for s in service.list_for_tenant(ACME)] == [1]
    assert service.reencrypt_all_for_tenant(ACME) == ReencryptResult(success=1, failed=0)
    assert keyless.reencrypt_all_for_tenant(ACME) == ReencryptResult(success=1, failed=0)


def test_reencrypting_under_a_wrong_master_key_raises_once_and_moves_nothing(
    make_service: MakeService,
) -> None:
    """Found by review: with the wrong master key deployed, every secret failed on its
    own, one audited failure apiece, as if each were damaged."""
    service = make_service()
    for name in ("a", "b", "c"):
        service.store_for_tenant(ACME, name, "v")
    service.rotate_key_for_tenant(ACME)
    wrong = make_service(master_key=secrets.token_hex(32))
    entries = audit(service, ACME)

    with pytest.raises(MasterKeyUnavailable, match="is not configured"):
        wrong.reencrypt_all_for_tenant(ACME, user_id="ops")

    [*earlier, failed] = audit(service, ACME)
    assert earlier == entries
    assert (failed.action, failed.result, failed.secret_name) == ("update", "failure", None)
    assert [s.key_version for s in service.list_for_tenant(ACME)] == [1, 1, 1]
    assert service.reencrypt_all_for_tenant(ACME) == ReencryptResult(success=3, failed=0)


def test_a_store_under_an_unconfigured_master_key_is_master_key_unavailable_as_a_rotation_is(
    make_service: MakeService,
) -> None:
    """Found by review: a process deployed without the master key that wraps the active
    version got MasterKeyUnavailable from a rotation or a re-encryption, but
    DecryptionFailed (nothing was being decrypted) from a store, the commonest call: an
    application alerting on MasterKeyUnavailable missed every failing store."""
    service = make_service()
    service.store_for_tenant(ACME, "a", "v")
    wrong = make_service(master_key=secrets.token_hex(32))

    for call in (
        lambda: wrong.store_for_tenant(ACME, "a", "v2"),
        lambda: wrong.store_for_tenant(ACME, "new", "v"),
        lambda: wrong.rotate_key_for_tenant(ACME),
    ):
        with pytest.raises(MasterKeyUnavailable, match="which is not configured"):
            call()

    failed = audit(service, ACME)[-3:]
    assert [(e.action, e.result) for e in failed] == [
        ("update", "failure"),
        ("create", "failure"),
        ("rotate_key", "failure"),
    ]
    assert {e.details.get("error") for e in failed} == {"MasterKeyUnavailable"}
    assert service.retrieve_for_tenant(ACME, "a").value == "v"


def test_compromising_the_active_version_without_a_master_key_fails_changes_no_key_and_is_audited(
    make_service: MakeService,
) -> None:
    service = make_service()
    service.store_for_tenant(ACME, "token", "t")
    keyless = make_service(master_key=None)
    entries = audit(service, ACME)

    with pytest.raises(MasterKeyUnavailable) as raised:
        keyless.compromise_key_for_tenant(ACME, 1, "leaked", user_id="sec")
    assert str(raised.value).startswith(
        f"cannot replace the compromised active key version 1 of tenant {ACME!r}: "
    )

    assert statuses(service, ACME) == {1: "active"}
    [*earlier, failed] = audit(service, ACME)  # oldest first
    assert earlier == entries
    assert (failed.action, failed.result, failed.key_version, failed.user_id) == (
        "compromise_key",
        "failure",
        1,
        "sec",
    )
    assert failed.details["error"] == "MasterKeyUnavailable"
    assert service.compromise_key_for_tenant(ACME, 1, "leaked").status == "compromised"


# -- cleanup of retired versions --------------------------------------------------------------


def test_cleanup_skips_a_retired_version_still_in_use_and_says_why(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "token", "t")
    service.rotate_key_for_tenant(ACME)

    result = service.cleanup_retired_keys(older_than_days=0)

    assert isinstance(result, CleanupResult)
    assert (result.destroyed, result.skipped) == (0, 1)
    [outcome] = result.keys
    assert (outcome.tenant_id, outcome.version, outcome.outcome) == (ACME, 1, "skipped")
    assert outcome.reason is not None
    assert "1 live secret" in outcome.reason
    assert "version 1" in outcome.reason
    assert statuses(service, ACME) == {1: "retired", 2: "active"}
    assert material_versions(service, ACME) == [1, 2]
    assert service.retrieve_for_tenant(ACME, "token").value == "t"
    assert audit(service, ACME, action="destroy_key") == []


def test_cleanup_destroys_an_unused_retired_version_and_its_material(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "token", "t")
    service.rotate_key_for_tenant(ACME)
    service.reencrypt_all_for_tenant(ACME)

    result = service.cleanup_retired_keys(older_than_days=0, user_id="janitor")

    assert (result.destroyed, result.skipped) == (1, 0)
    [outcome] = result.keys
    assert (outcome.tenant_id, outcome.version, outcome.outcome, outcome.reason) == (
        ACME,
        1,
        "destroyed",
        None,
    )
    assert statuses(service, ACME) == {1: "destroyed", 2: "active"}
    assert material_versions(service, ACME) == [2]
    [destroyed] = audit(service, ACME, action="destroy_key")
    assert (destroyed.key_version, destroyed.user_id) == (1, "janitor")
    assert service.retrieve_for_tenant(ACME, "token").value == "t"
    assert problems(service, ACME) == []


def test_cleanup_destroys_a_compromised_version_once_no_live_secret_uses_it(
    service: SecretService,
) -> None:
    """Its material, wrapped by a master key that may leak later, decrypts the values the
    stream keeps: the runbook says to destroy it (found by review: nothing could)."""
    service.store_for_tenant(ACME, "token", "old-token")
    service.store_for_tenant(ACME, "gone", "g")
    service.compromise_key_for_tenant(ACME, 1, "leaked")

    first = service.cleanup_retired_keys(older_than_days=0)

    assert [(o.version, o.outcome) for o in first.keys] == [(1, "skipped")]
    assert "still encrypts 2 live secret(s)" in str(first.keys[0].reason)
    assert material_versions(service, ACME) == [1, 2]
    service.store_for_tenant(ACME, "token", "new-token")  # stored afresh, on version 2
    service.delete_for_tenant(ACME, "gone")

    second = service.cleanup_retired_keys(older_than_days=0, user_id="responder")

    assert [(o.version, o.outcome) for o in second.keys] == [(1, "destroyed")]
    assert statuses(service, ACME) == {1: "destroyed", 2: "active"}
    assert material_versions(service, ACME) == [2]
    [destroyed] = audit(service, ACME, action="destroy_key")
    assert (destroyed.key_version, destroyed.user_id) == (1, "responder")
    assert service.retrieve_for_tenant(ACME, "token").value == "new-token"
    assert problems(service, ACME) == []


def test_cleanup_keeps_versions_retired_more_recently_than_the_cutoff(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.store_for_tenant(ACME, "token", "t")
    service.rotate_key_for_tenant(ACME)
    service.reencrypt_all_for_tenant(ACME)

    assert service.cleanup_retired_keys().keys == []  # default: retired 90+ days ago
    monkeypatch.setattr(service._ledger, "clock", lambda: datetime.now(UTC) + timedelta(days=89))
    assert service.cleanup_retired_keys(older_than_days=90).keys == []
    assert statuses(service, ACME) == {1: "retired", 2: "active"}
    monkeypatch.setattr(service._ledger, "clock", lambda: datetime.now(UTC) + timedelta(days=91))
    assert service.cleanup_retired_keys().destroyed == 1
    assert statuses(service, ACME) == {1: "destroyed", 2: "active"}


def test_deleted_secrets_do_not_keep_a_version_alive_but_disabled_and_expired_ones_do(
    service: SecretService,
) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    service.store_for_tenant(ACME, "deleted", "d")
    service.store_for_tenant(GLOBEX, "disabled", "d")
    service.store_for_tenant("initech", "expired", "e", expires_at=yesterday)
    with tenant(ACME):
        service.delete("deleted")
    with tenant(GLOBEX):
        service.disable("disabled")
    for tenant_id in (ACME, GLOBEX, "initech"):
        service.rotate_key_for_tenant(tenant_id)

    result = service.cleanup_retired_keys(older_than_days=0)

    outcomes = {o.tenant_id: o.outcome for o in result.keys}
    assert outcomes == {ACME: "destroyed", GLOBEX: "skipped", "initech": "skipped"}
    assert (result.destroyed, result.skipped) == (1, 2)
    with tenant(GLOBEX):
        service.enable("disabled")
    assert service.retrieve_for_tenant(GLOBEX, "disabled").value == "d"


def test_a_second_cleanup_destroys_nothing_more(service: SecretService) -> None:
    for tenant_id in (ACME, GLOBEX):
        service.store_for_tenant(tenant_id, "a", "a")
        service.rotate_key_for_tenant(tenant_id)
    service.reencrypt_all_for_tenant(ACME)
    assert service.cleanup_retired_keys(older_than_days=0).destroyed == 1

    again = service.cleanup_retired_keys(older_than_days=0)

    assert again.destroyed == 0
    assert [(o.tenant_id, o.version, o.outcome) for o in again.keys] == [(GLOBEX, 1, "skipped")]
    assert len(audit(service, action="destroy_key")) == 1


# -- the key inventory ------------------------------------------------------------------------


def test_the_key_inventory_shows_each_version_its_status_and_what_it_still_encrypts(
    service: SecretService, master_key: str
) -> None:
    for name in ("a", "b"):
        service.store_for_tenant(ACME, name, name)
    service.rotate_key_for_tenant(ACME)
    service.store_for_tenant(ACME, "c", "c")
    service.reencrypt_all_for_tenant(ACME)
    service.cleanup_retired_keys(older_than_days=0)
    service.compromise_key_for_tenant(ACME, 2, "leaked")
    service.store_for_tenant(ACME, "d", "d")
    service.store_for_tenant(GLOBEX, "g", "g")

    keys = service.list_keys(ACME)

    assert [(k.version, k.status, k.secret_count) for k in keys] == [
        (1, "destroyed", 0),
        (2, "compromised", 3),
        (3, "active", 1),
    ]
    assert {k.amk_id for k in keys} == {amk_id(master_key)}
    assert [k.retired_at is not None for k in keys] == [True, True, False]
    assert all(k.created_at <= (k.retired_at or datetime.now(UTC)) for k in keys)
    with super_admin():
        everything = service.list_keys()
    assert [(k.tenant_id, k.version) for k in everything] == [
        (ACME, 1),
        (ACME, 2),
        (ACME, 3),
        (GLOBEX, 1),
    ]


# -- the rotation policy ----------------------------------------------------------------------


def every_tenant(call: Callable[[], Any]) -> Any:
    """``call()`` inside super_admin(): the key inventory of all tenants."""
    with super_admin():
        return call()


def test_keys_due_is_scoped_like_the_key_inventory(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(key_max_age_days=1e-9))
    for tenant_id in (ACME, GLOBEX):
        service.store_for_tenant(tenant_id, "a", "a")

    with pytest.raises(TenantRequired):
        service.keys_due()
    with pytest.raises(TenantRequired):
        service.rotate_due_keys()
    with tenant(ACME):
        assert [d.tenant_id for d in service.keys_due()] == [ACME]
    assert [d.tenant_id for d in service.keys_due(GLOBEX)] == [GLOBEX]
    assert [d.tenant_id for d in every_tenant(service.keys_due)] == [ACME, GLOBEX]

    with tenant(GLOBEX):
        rotated = service.rotate_due_keys()

    assert [(k.tenant_id, k.version) for k in rotated] == [(GLOBEX, 2)]
    assert statuses(service, ACME) == {1: "active"}


def test_rotate_due_keys_records_the_ambient_actor_unless_one_is_given(
    make_service: MakeService,
) -> None:
    """Like every call that takes its tenant from tenant(...): its actor too."""
    service = make_service(settings=KeyledgerSettings(key_max_age_days=1e-9))
    service.store_for_tenant(ACME, "a", "a")
    service.store_for_tenant(GLOBEX, "g", "g")

    with tenant(ACME, user_id="alice", ip_address="203.0.113.7"):
        service.rotate_due_keys()
    with tenant(GLOBEX, user_id="alice"):
        service.rotate_due_keys(user_id="policy")
    with tenant(GLOBEX, user_id="alice"):  # a named tenant: the actor given, or system
        service.rotate_due_keys(ACME)

    in_block, named = sorted(audit(service, ACME, action="rotate_key"), key=lambda e: e.position)
    assert (in_block.user_id, in_block.ip_address) == ("alice", "203.0.113.7")
    assert named.user_id == "system"
    assert [e.user_id for e in audit(service, GLOBEX, action="rotate_key")] == ["policy"]


def test_a_key_is_due_after_the_encryption_budget_and_rotate_due_rotates_only_those(
    make_service: MakeService,
) -> None:
    service = make_service(settings=KeyledgerSettings(key_max_encryptions=2))
    service.store_for_tenant(ACME, "a", "1")
    service.store_for_tenant(ACME, "a", "2")  # an update is an encryption too
    service.store_for_tenant(GLOBEX, "g", "1")

    due = every_tenant(service.keys_due)

    assert [(d.tenant_id, d.version, d.encryptions) for d in due] == [(ACME, 1, 2)]
    [acme_due] = due
    assert isinstance(acme_due, KeyDue)
    assert acme_due.reasons == ["2 encryptions under it"]
    assert acme_due.age_days >= 0

    rotated = every_tenant(lambda: service.rotate_due_keys(user_id="policy"))

    assert [(k.tenant_id, k.version, k.status) for k in rotated] == [(ACME, 2, "active")]
    assert every_tenant(service.keys_due) == []
    assert statuses(service, GLOBEX) == {1: "active"}
    assert audit(service, ACME, action="rotate_key")[-1].user_id == "policy"
    assert service.retrieve_for_tenant(ACME, "a").value == "2"


def test_reencryptions_count_towards_the_encryption_budget(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(key_max_encryptions=2))
    service.store_for_tenant(ACME, "a", "a")
    service.store_for_tenant(ACME, "b", "b")
    every_tenant(service.rotate_due_keys)
    assert every_tenant(service.keys_due) == []

    service.reencrypt_all_for_tenant(ACME)

    assert [(d.tenant_id, d.version, d.encryptions) for d in every_tenant(service.keys_due)] == [
        (ACME, 2, 2)
    ]


def test_a_key_is_due_after_the_maximum_age(make_service: MakeService) -> None:
    service = make_service(settings=KeyledgerSettings(key_max_age_days=1e-9))
    for tenant_id in (ACME, GLOBEX):
        service.store_for_tenant(tenant_id, "a", "a")

    due = every_tenant(service.keys_due)
    rotated = every_tenant(service.rotate_due_keys)

    assert [(d.tenant_id, d.version) for d in due] == [(ACME, 1), (GLOBEX, 1)]
    assert all(d.reasons[0].startswith("older than") for d in due)
    assert [(k.tenant_id, k.version) for k in rotated] == [(ACME, 2), (GLOBEX, 2)]
    assert Counter(e.action for e in audit(service) if e.action == "rotate_key") == {
        "rotate_key": 2
    }


def test_with_the_default_policy_fresh_keys_are_not_due(service: SecretService) -> None:
    populate(service)

    assert every_tenant(service.keys_due) == []
    assert every_tenant(service.rotate_due_keys) == []


# -- decided on the stream, not on this process's cache ---------------------------------------
# Each test: service `a` has the tenant's keyring cached, another process (`b`) changes it,
# then `a` runs a lifecycle step. Before 0.10.0 these steps decided on `a`'s cached keyring.


def test_compromising_a_version_another_process_created(make_service: MakeService) -> None:
    a, b = make_service(), make_service()
    a.store_for_tenant(ACME, "token", "t")
    b.rotate_key_for_tenant(ACME)

    info = a.compromise_key_for_tenant(ACME, 2, "leaked")

    assert (info.version, info.status) == (2, "compromised")
    assert statuses(b, ACME) == {1: "retired", 2: "compromised", 3: "active"}


def test_cleanup_destroys_a_version_another_process_retired_and_emptied(
    make_service: MakeService,
) -> None:
    a, b = make_service(), make_service()
    a.store_for_tenant(ACME, "token", "t")
    b.rotate_key_for_tenant(ACME)
    b.reencrypt_all_for_tenant(ACME)

    result = a.cleanup_retired_keys(older_than_days=0)

    assert [(k.tenant_id, k.version, k.outcome) for k in result.keys] == [(ACME, 1, "destroyed")]
    assert statuses(b, ACME) == {1: "destroyed", 2: "active"}


def test_erasing_again_destroys_a_version_another_process_created_since(
    make_service: MakeService,
) -> None:
    a, b = make_service(), make_service()
    a.store_for_tenant(ACME, "old", "v")
    assert a.erase_tenant(ACME, confirm=True) == [1]
    b.store_for_tenant(ACME, "new", "fresh-value")  # a fresh active version 2

    assert a.erase_tenant(ACME, confirm=True) == [2]

    assert statuses(b, ACME) == {1: "destroyed", 2: "destroyed"}
    with pytest.raises((DecryptionFailed, SecretKeyDriftError)):
        make_service().retrieve_for_tenant(ACME, "new")


def test_a_rewrap_covers_a_version_another_process_created(
    make_service: MakeService, master_key: str, new_key: str
) -> None:
    a = rotating(make_service, new_key, master_key)
    a.store_for_tenant(ACME, "token", "t")  # version 1, wrapped by the new master key
    # A process not yet switched over: the old master key current, the new one previous.
    old = rotating(make_service, master_key, new_key)
    old.rotate_key_for_tenant(ACME)  # version 2, wrapped by the old master key

    result = a.rewrap_master_key()

    assert (result.rewrapped, result.already_current, result.failed) == (1, 1, 0)
    assert {k.version: k.amk_id for k in a.list_keys(ACME)} == {
        1: amk_id(new_key),
        2: amk_id(new_key),
    }


def test_a_rewrap_that_fails_at_commit_leaves_no_plain_data_key_in_its_traceback(
    tmp_path: Any,
) -> None:
    """Error trackers record the local variables of every frame of a traceback: a
    rewrap whose commit fails (the write lock held elsewhere) must not hold the
    unwrapped data key in any of them."""
    old_key, new_key = secrets.token_hex(32), secrets.token_hex(32)
    path = tmp_path / "k.db"
    with SecretService.create(f"sqlite:///{path}", master_key=old_key) as first:
        first.store_for_tenant("acme", "db", "value")
    blocker = sqlite3.connect(path, isolation_level=None)
    (wrapped,) = blocker.execute("SELECT wrapped FROM kl_key_material").fetchone()
    plain = MasterKey(bytes.fromhex(old_key)).unwrap("acme", 1, bytes(wrapped))
    settings = KeyledgerSettings(lock_timeout_seconds=1)
    with SecretService.create(
        f"sqlite:///{path}", master_key=new_key, previous_master_keys=[old_key], settings=settings
    ) as service:
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageError) as raised:
                service.rewrap_master_key()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    frames, trace = [], raised.value.__traceback__.tb_next  # after this test's own frame
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    assert len(frames) > 3
    holding = [f.f_code.co_qualname for f in frames if plain in f.f_locals.values()]
    assert holding == []
