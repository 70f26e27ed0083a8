"""Key-drift diagnosis and repair (SPEC section 5), on every store.

The scenarios of the TypeScript package (an empty tenant, keys removed underneath live
secrets, a missing master key, a changed master key) plus the failure modes this design
adds (orphaned or leftover key material, material missing for a retired version, a lagging
audit model). Drift is made the way it happens in production: rows deleted or inserted
around keyledger with plain SQL, or a service started with the wrong master key.
"""

from __future__ import annotations

import os
import pickle
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from conftest import run_around
from keyledger import (
    ConfirmationRequired,
    DecryptionFailed,
    DriftReport,
    InvalidInput,
    MasterKeyUnavailable,
    RepairResult,
    SecretKeyDriftError,
    SecretService,
    TenantRequired,
    super_admin,
    tenant,
)
from keyledger.infrastructure.crypto import MasterKey
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]

ACME = "acme"
GLOBEX = "globex"
EVERYTHING = 1_000_000
DESTRUCTIVE = {"delete-unrecoverable-secret", "delete-unusable-tenant-encryption-key"}
# Without the data-key cache a service notices key material changed underneath it at once.
UNCACHED = KeyledgerSettings(key_cache_seconds=0)


class Database:
    """The service's database reached around keyledger, as an operator or a bad restore would."""

    def __init__(self, service: SecretService) -> None:
        self.service = service

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders) and return its rows, if any."""
        return run_around(self.service, statement, params)

    def material(self, tenant_id: str) -> list[tuple[int, str, str, bytes]]:
        rows = self.execute(
            "SELECT version, key_id, amk_id, wrapped FROM kl_key_material WHERE tenant_id=? "
            "ORDER BY version, key_id",
            (tenant_id,),
        )
        return [(row[0], row[1], row[2], bytes(row[3])) for row in rows]

    def insert_material(
        self, tenant_id: str, version: int, key_id: str, amk_id: str, wrapped: bytes
    ) -> None:
        self.execute(
            "INSERT INTO kl_key_material (tenant_id, version, key_id, amk_id, wrapped, created_at)"
            " VALUES (?,?,?,?,?,?)",
            (tenant_id, version, key_id, amk_id, wrapped, 0),
        )

    def delete_material(self, tenant_id: str, version: int | None = None) -> None:
        if version is None:
            self.execute("DELETE FROM kl_key_material WHERE tenant_id=?", (tenant_id,))
        else:
            self.execute(
                "DELETE FROM kl_key_material WHERE tenant_id=? AND version=?", (tenant_id, version)
            )


def amk_id(hex_key: str) -> str:
    return MasterKey(bytes.fromhex(hex_key)).amk_id


def codes(report: DriftReport | list[Any]) -> Counter[str]:
    issues = report.issues if isinstance(report, DriftReport) else report
    return Counter(issue.code for issue in issues)


def problems(report: DriftReport) -> Counter[str]:
    """Codes of the issues that are not merely informational."""
    return Counter(issue.code for issue in report.issues if issue.severity != "info")


def audit(service: SecretService, tenant_id: str) -> list[Any]:
    """Every audit entry of the tenant, oldest first."""
    with super_admin():
        return service.get_audit_logs(tenant_id=tenant_id, limit=EVERYTHING)[::-1]


def values(service: SecretService, tenant_id: str) -> dict[str, str | bytes]:
    return {
        info.name: service.retrieve_for_tenant(tenant_id, info.name).value
        for info in service.list_for_tenant(tenant_id)
    }


def state(service: SecretService, tenant_id: str) -> tuple[Any, ...]:
    """What a user can see of a tenant without reading values."""
    return (
        service.list_for_tenant(tenant_id, status=None, include_expired=True),
        service.list_keys(tenant_id),
        audit(service, tenant_id),
    )


def fill(service: SecretService) -> dict[str, str]:
    """acme: two secrets under version 1 (now retired), two under the active version 2;
    globex: one secret. Returns acme's values."""
    stored = {"db-password": "pw-1", "api-token": "tok-1"}
    for name, value in stored.items():
        service.store_for_tenant(ACME, name, value)
    service.rotate_key_for_tenant(ACME)
    later = {"stripe-key": "sk_live_2", "smtp-password": "smtp-2"}
    for name, value in later.items():
        service.store_for_tenant(ACME, name, value)
    service.store_for_tenant(GLOBEX, "db-password", "globex-pw")
    return {**stored, **later}


@pytest.fixture
def uncached(make_service: MakeService) -> SecretService:
    return make_service(settings=UNCACHED)


# -- an empty tenant -------------------------------------------------------------------------


def test_diagnosing_a_tenant_that_stored_nothing_finds_nothing(service: SecretService) -> None:
    report = service.diagnose_tenant_secret_key_drift("nobody")

    assert report.ok
    assert report.issues == []
    assert report.tenant_id == "nobody"
    assert report.summary["active_secret_count"] == 0
    assert report.summary["tenant_key_count"] == 0


def test_repairing_a_tenant_that_stored_nothing_needs_no_confirmation_and_returns_nothing(
    service: SecretService,
) -> None:
    result = service.repair_tenant_secret_key_drift("nobody")

    assert isinstance(result, RepairResult)
    assert result.tenant_id == "nobody"
    assert not result.dry_run
    assert result.issues_before == []
    assert result.remaining_issues == []
    assert (result.would_delete_secrets, result.would_delete_tenant_encryption_keys) == (0, 0)
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert (result.secret_names, result.key_versions) == ([], [])
    assert audit(service, "nobody") == []


def test_repairing_an_empty_tenant_beside_busy_ones_touches_nobody(service: SecretService) -> None:
    fill(service)
    before = state(service, ACME)

    result = service.repair_tenant_secret_key_drift(
        "nobody", confirm_delete_unrecoverable_data=True
    )

    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert [issue for issue in result.remaining_issues if issue.severity != "info"] == []
    assert audit(service, "nobody") == []
    assert state(service, ACME) == before


def test_a_healthy_tenant_is_ok_and_its_repair_deletes_nothing(service: SecretService) -> None:
    stored = fill(service)

    report = service.diagnose_tenant_secret_key_drift(ACME)
    result = service.repair_tenant_secret_key_drift(ACME)

    assert report.ok
    assert problems(report) == Counter()
    assert report.summary["active_secret_count"] == 4
    assert report.summary["tenant_key_count"] == 2
    assert report.summary["active_tenant_key_count"] == 1
    assert report.summary["usable_active_tenant_key_count"] == 1
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert values(service, ACME) == stored


# -- keys removed underneath live secrets ------------------------------------------------------


def test_key_material_deleted_underneath_live_secrets_is_diagnosed_as_errors(
    uncached: SecretService,
) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)

    report = uncached.diagnose_tenant_secret_key_drift(ACME)

    assert not report.ok
    found = problems(report)
    assert found["active_tenant_encryption_key_unwrap_failed"] == 1
    assert found["active_secrets_without_usable_active_key"] == 1
    assert found["tenant_encryption_key_material_missing"] == 1
    assert found["secret_envelope_unwrap_failed"] == 4
    unwrap = next(
        i for i in report.issues if i.code == "active_tenant_encryption_key_unwrap_failed"
    )
    assert (unwrap.severity, unwrap.key_version) == ("error", 2)
    assert unwrap.repair_action == "delete-unusable-tenant-encryption-key"
    assert "missing" in unwrap.message
    missing = next(i for i in report.issues if i.code == "tenant_encryption_key_material_missing")
    assert (missing.severity, missing.key_version) == ("error", 1)
    per_secret = {
        i.secret_name: (i.key_version, i.repair_action)
        for i in report.issues
        if i.code == "secret_envelope_unwrap_failed"
    }
    assert per_secret == {
        "db-password": (1, "delete-unrecoverable-secret"),
        "api-token": (1, "delete-unrecoverable-secret"),
        "stripe-key": (2, "delete-unrecoverable-secret"),
        "smtp-password": (2, "delete-unrecoverable-secret"),
    }
    assert report.summary["usable_active_tenant_key_count"] == 0
    assert uncached.diagnose_tenant_secret_key_drift(GLOBEX).ok


def test_reading_a_secret_whose_key_was_deleted_raises_a_drift_error_with_the_report(
    uncached: SecretService,
) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)

    with pytest.raises(SecretKeyDriftError) as raised:
        uncached.retrieve_for_tenant(ACME, "stripe-key")

    assert isinstance(raised.value, DecryptionFailed)
    report = raised.value.report
    assert isinstance(report, DriftReport)
    assert not report.ok
    assert report.tenant_id == ACME
    assert "secret_envelope_unwrap_failed" in codes(report)
    assert {i.secret_name for i in report.issues if i.secret_name} == {"stripe-key"}
    assert "stripe-key" in str(raised.value)
    copy = pickle.loads(pickle.dumps(raised.value))  # noqa: S301 (our own bytes, just made)
    assert (type(copy), str(copy), copy.report) == (SecretKeyDriftError, str(raised.value), report)
    [failure] = [e for e in audit(uncached, ACME) if e.result == "failure"]
    assert (failure.action, failure.secret_name) == ("read", "stripe-key")
    assert failure.details["error"] == "SecretKeyDriftError"


def test_repair_refuses_to_delete_without_confirmation_and_changes_nothing(
    uncached: SecretService,
) -> None:
    fill(uncached)
    database = Database(uncached)
    database.delete_material(ACME)
    before = state(uncached, ACME)

    with pytest.raises(ConfirmationRequired, match="confirm_delete_unrecoverable_data"):
        uncached.repair_tenant_secret_key_drift(ACME)

    assert state(uncached, ACME) == before
    assert not uncached.diagnose_tenant_secret_key_drift(ACME).ok


def test_a_dry_run_counts_what_a_repair_would_delete_and_deletes_nothing(
    uncached: SecretService,
) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)
    before = state(uncached, ACME)

    result = uncached.repair_tenant_secret_key_drift(
        ACME, dry_run=True, confirm_delete_unrecoverable_data=True
    )

    assert result.dry_run
    assert result.would_delete_secrets == 4
    assert result.would_delete_tenant_encryption_keys == 2
    assert result.secret_names == ["api-token", "db-password", "smtp-password", "stripe-key"]
    assert result.key_versions == [1, 2]
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert result.remaining_issues == result.issues_before
    assert state(uncached, ACME) == before


def test_a_confirmed_repair_deletes_the_unrecoverable_secrets_and_keys_and_audits_it(
    uncached: SecretService,
) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)
    seen = len(audit(uncached, ACME))

    result = uncached.repair_tenant_secret_key_drift(
        ACME, confirm_delete_unrecoverable_data=True, user_id="ops"
    )

    assert not result.dry_run
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (4, 2)
    assert [i for i in result.remaining_issues if i.severity == "error"] == []
    assert uncached.list_for_tenant(ACME, status=None, include_expired=True) == []
    assert {k.version: k.status for k in uncached.list_keys(ACME)} == {
        1: "destroyed",
        2: "destroyed",
    }
    new = audit(uncached, ACME)[seen:]
    assert Counter(e.action for e in new) == {"repair": 1, "delete": 4, "destroy_key": 2}
    assert {e.user_id for e in new} == {"ops"}
    assert {e.secret_name for e in new if e.action == "delete"} == set(result.secret_names)
    assert sorted(e.key_version for e in new if e.action == "destroy_key") == [1, 2]
    [repaired] = [e for e in new if e.action == "repair"]
    assert repaired.details["deleted_secrets"] == result.secret_names
    assert repaired.details["destroyed_versions"] == [1, 2]
    assert "secret_envelope_unwrap_failed" in repaired.details["issue_codes"]
    assert uncached.diagnose_tenant_secret_key_drift(ACME).ok
    assert values(uncached, GLOBEX) == {"db-password": "globex-pw"}


def test_a_repaired_tenant_stores_fresh_values_at_once_on_a_new_key_version(
    uncached: SecretService,
) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)
    uncached.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    info = uncached.store_for_tenant(ACME, "db-password", "fresh-pw")

    assert info.key_version == 3  # versions 1 and 2 are destroyed, never reused
    assert uncached.retrieve_for_tenant(ACME, "db-password").value == "fresh-pw"
    assert [(k.version, k.status) for k in uncached.list_keys(ACME)] == [
        (1, "destroyed"),
        (2, "destroyed"),
        (3, "active"),
    ]
    report = uncached.diagnose_tenant_secret_key_drift(ACME)
    assert report.ok
    assert problems(report) == Counter()


def test_material_missing_for_a_retired_version_deletes_only_the_secrets_under_it(
    uncached: SecretService,
) -> None:
    stored = fill(uncached)
    Database(uncached).delete_material(ACME, version=1)

    report = uncached.diagnose_tenant_secret_key_drift(ACME)
    with pytest.raises(ConfirmationRequired):
        uncached.repair_tenant_secret_key_drift(ACME)
    result = uncached.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert problems(report) == {
        "tenant_encryption_key_material_missing": 1,
        "secret_envelope_unwrap_failed": 2,
    }
    assert (result.secret_names, result.key_versions) == (["api-token", "db-password"], [1])
    assert {k.version: k.status for k in uncached.list_keys(ACME)} == {
        1: "destroyed",
        2: "active",
    }
    assert values(uncached, ACME) == {
        "stripe-key": stored["stripe-key"],
        "smtp-password": stored["smtp-password"],
    }
    assert uncached.diagnose_tenant_secret_key_drift(ACME).ok


def test_tampered_key_material_is_diagnosed_as_not_unwrapping_with_the_known_master_key(
    uncached: SecretService, master_key: str
) -> None:
    fill(uncached)
    database = Database(uncached)
    [(version, key_id, amk, wrapped)] = [row for row in database.material(ACME) if row[0] == 2]
    database.delete_material(ACME, version=2)
    database.insert_material(ACME, version, key_id, amk, wrapped[:-1] + bytes([wrapped[-1] ^ 1]))

    report = uncached.diagnose_tenant_secret_key_drift(ACME)

    [unwrap] = [i for i in report.issues if i.code == "active_tenant_encryption_key_unwrap_failed"]
    assert unwrap.key_version == 2
    assert unwrap.details["unknown_master_key"] is False
    assert amk_id(master_key) in unwrap.message
    assert "KEYLEDGER_PREVIOUS_MASTER_KEYS" not in unwrap.message
    assert {i.secret_name for i in report.issues if i.code == "secret_envelope_unwrap_failed"} == {
        "stripe-key",
        "smtp-password",
    }
    with pytest.raises(SecretKeyDriftError):
        uncached.retrieve_for_tenant(ACME, "stripe-key")
    assert uncached.retrieve_for_tenant(ACME, "db-password").value == "pw-1"  # version 1


def test_key_material_swapped_for_another_key_is_caught_by_its_fingerprint(
    uncached: SecretService, master_key: str
) -> None:
    fill(uncached)
    database = Database(uncached)
    [(version, key_id, amk, _)] = [row for row in database.material(ACME) if row[0] == 2]
    impostor = MasterKey(bytes.fromhex(master_key)).wrap(ACME, 2, os.urandom(32))
    database.delete_material(ACME, version=2)
    database.insert_material(ACME, version, key_id, amk, impostor)

    report = uncached.diagnose_tenant_secret_key_drift(ACME)

    [unwrap] = [i for i in report.issues if i.code == "active_tenant_encryption_key_unwrap_failed"]
    assert "fingerprint" in unwrap.message
    assert not report.ok
    with pytest.raises(SecretKeyDriftError):
        uncached.retrieve_for_tenant(ACME, "smtp-password")


# -- the master key missing -------------------------------------------------------------------


def test_without_a_master_key_the_diagnosis_says_so_and_marks_nothing_destructive(
    make_service: MakeService,
) -> None:
    fill(make_service())
    keyless = make_service(master_key=None)

    report = keyless.diagnose_tenant_secret_key_drift(ACME)

    assert not report.ok
    [unavailable] = [i for i in report.issues if i.code == "amk_unavailable"]
    assert (unavailable.severity, unavailable.repair_action) == ("error", "none")
    assert [i for i in report.issues if i.repair_action in DESTRUCTIVE] == []
    assert [i.code for i in report.issues if i.severity == "error"] == ["amk_unavailable"]
    assert report.summary["active_secret_count"] == 4
    assert report.summary["usable_active_tenant_key_count"] == 0


def test_without_a_master_key_a_tenant_without_an_active_key_is_still_reported(
    make_service: MakeService,
) -> None:
    """Whether an active key version exists needs no master key to tell: the diagnosis
    reports it keyless as with the key, only the destructive codes are left out."""
    keyed = make_service()
    fill(keyed)
    keyed.erase_tenant(ACME, confirm=True)
    with_key = codes(keyed.diagnose_tenant_secret_key_drift(ACME))

    report = make_service(master_key=None).diagnose_tenant_secret_key_drift(ACME)

    assert with_key["missing_active_tenant_encryption_key"] == 1
    assert codes(report)["missing_active_tenant_encryption_key"] == 1
    assert codes(report)["active_secrets_without_usable_active_key"] == 1
    assert codes(report)["amk_unavailable"] == 1
    assert [i for i in report.issues if i.repair_action in DESTRUCTIVE] == []


def test_without_a_master_key_even_a_confirmed_repair_deletes_nothing(
    make_service: MakeService,
) -> None:
    stored = fill(make_service())
    keyless = make_service(master_key=None)
    database = Database(keyless)
    material = database.material(ACME)
    listed = keyless.list_for_tenant(ACME, status=None, include_expired=True)
    keys = keyless.list_keys(ACME)

    dry = keyless.repair_tenant_secret_key_drift(ACME, dry_run=True)
    unconfirmed = keyless.repair_tenant_secret_key_drift(ACME)
    confirmed = keyless.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    for result in (dry, unconfirmed, confirmed):
        assert (result.would_delete_secrets, result.would_delete_tenant_encryption_keys) == (0, 0)
        assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
        assert (result.secret_names, result.key_versions) == ([], [])
    assert keyless.list_for_tenant(ACME, status=None, include_expired=True) == listed
    assert keyless.list_keys(ACME) == keys
    assert database.material(ACME) == material
    assert not any(e.action in ("delete", "destroy_key") for e in audit(keyless, ACME))
    with pytest.raises(MasterKeyUnavailable):
        keyless.retrieve_for_tenant(ACME, "db-password")

    restored = make_service()
    assert values(restored, ACME) == stored
    assert restored.diagnose_tenant_secret_key_drift(ACME).ok


# -- the master key changed -------------------------------------------------------------------


def test_with_another_master_key_both_unwrap_codes_name_the_missing_master_key(
    make_service: MakeService, master_key: str
) -> None:
    fill(make_service())
    old_id = amk_id(master_key)
    changed = make_service(master_key=secrets.token_hex(32))

    report = changed.diagnose_tenant_secret_key_drift(ACME)

    assert not report.ok
    found = problems(report)
    assert found["active_tenant_encryption_key_unwrap_failed"] == 1
    assert found["secret_envelope_unwrap_failed"] == 4
    assert found["active_secrets_without_usable_active_key"] == 1
    unwrap_issues = [
        i
        for i in report.issues
        if i.code in ("active_tenant_encryption_key_unwrap_failed", "secret_envelope_unwrap_failed")
    ]
    for issue in unwrap_issues:
        assert issue.severity == "error"
        assert old_id in issue.message
        assert "KEYLEDGER_PREVIOUS_MASTER_KEYS" in issue.message
        assert issue.details["amk_id"] == old_id
        assert issue.details["unknown_master_key"] is True
    assert master_key not in str(report.model_dump())


def test_with_another_master_key_reads_raise_a_drift_error_naming_the_cause(
    make_service: MakeService, master_key: str
) -> None:
    fill(make_service())
    changed = make_service(master_key=secrets.token_hex(32))

    with pytest.raises(SecretKeyDriftError) as raised:
        changed.retrieve_for_tenant(ACME, "db-password")

    report = raised.value.report
    assert not report.ok
    assert "secret_envelope_unwrap_failed" in codes(report)
    assert amk_id(master_key) in str(raised.value)
    assert master_key not in str(raised.value)


def test_with_another_master_key_repair_refuses_without_confirmation_and_changes_nothing(
    make_service: MakeService,
) -> None:
    fill(make_service())
    changed = make_service(master_key=secrets.token_hex(32))
    material = Database(changed).material(ACME)
    before = state(changed, ACME)

    with pytest.raises(ConfirmationRequired):
        changed.repair_tenant_secret_key_drift(ACME)

    assert state(changed, ACME) == before
    assert Database(changed).material(ACME) == material


def test_with_another_master_key_a_dry_run_counts_every_secret_and_version(
    make_service: MakeService,
) -> None:
    fill(make_service())
    changed = make_service(master_key=secrets.token_hex(32))
    before = state(changed, ACME)

    result = changed.repair_tenant_secret_key_drift(ACME, dry_run=True)

    assert result.dry_run
    assert result.would_delete_secrets == 4
    assert result.secret_names == ["api-token", "db-password", "smtp-password", "stripe-key"]
    assert result.key_versions == [1, 2]  # the active version and the retired one
    assert result.would_delete_tenant_encryption_keys == len(result.key_versions)
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert state(changed, ACME) == before


def test_with_another_master_key_a_confirmed_repair_deletes_audits_and_stores_fresh_at_once(
    make_service: MakeService,
) -> None:
    fill(make_service())
    new_key = secrets.token_hex(32)
    changed = make_service(master_key=new_key)
    seen = len(audit(changed, ACME))

    result = changed.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert result.deleted_secrets == 4
    assert 2 in result.key_versions
    assert result.deleted_tenant_encryption_keys == len(result.key_versions)
    new = audit(changed, ACME)[seen:]
    assert Counter(e.action for e in new) == {
        "repair": 1,
        "delete": 4,
        "destroy_key": len(result.key_versions),
    }
    assert sorted(e.key_version for e in new if e.action == "destroy_key") == result.key_versions
    assert changed.list_for_tenant(ACME, status=None, include_expired=True) == []
    remaining = {row[0] for row in Database(changed).material(ACME)}
    assert remaining.isdisjoint(result.key_versions)

    info = changed.store_for_tenant(ACME, "db-password", "fresh")
    assert info.key_version == 3
    assert changed.retrieve_for_tenant(ACME, "db-password").value == "fresh"
    [active] = [k for k in changed.list_keys(ACME) if k.status == "active"]
    assert (active.version, active.amk_id) == (3, amk_id(new_key))
    assert changed.diagnose_tenant_secret_key_drift(ACME).ok
    # globex was not repaired: it still waits for its master key, untouched.
    assert "secret_envelope_unwrap_failed" in codes(
        changed.diagnose_tenant_secret_key_drift(GLOBEX)
    )
    assert values(make_service(), GLOBEX) == {"db-password": "globex-pw"}


def test_with_another_master_key_a_confirmed_repair_leaves_no_version_of_the_lost_key(
    make_service: MakeService,
) -> None:
    fill(make_service())
    changed = make_service(master_key=secrets.token_hex(32))

    dry = changed.repair_tenant_secret_key_drift(ACME, dry_run=True)
    changed.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert dry.key_versions == [1, 2]
    assert {k.version: k.status for k in changed.list_keys(ACME)} == {
        1: "destroyed",
        2: "destroyed",
    }
    rewrap = changed.rewrap_master_key()  # globex still waits for the old master key
    assert [failure for failure in rewrap.failures if repr(ACME) in failure] == []


def test_adding_the_old_master_key_as_previous_recovers_every_value_and_a_rewrap_clears_the_rest(
    make_service: MakeService, master_key: str
) -> None:
    original = make_service()
    stored = {f"secret-{i}": f"value-{i}" for i in range(5)}
    for name, value in stored.items():
        original.store_for_tenant(ACME, name, value)
    new_key = secrets.token_hex(32)
    recovered = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )

    report = recovered.diagnose_tenant_secret_key_drift(ACME)

    assert values(recovered, ACME) == stored
    assert report.ok
    [mismatch] = [i for i in report.issues if i.severity != "info"]
    assert mismatch.code == "active_tenant_encryption_key_amk_mismatch"
    assert (mismatch.severity, mismatch.repair_action, mismatch.key_version) == (
        "warning",
        "rewrap-tenant-encryption-key",
        1,
    )
    assert mismatch.details["amk_id"] == amk_id(master_key)
    assert mismatch.details["current_amk_id"] == amk_id(new_key)

    rewrapped = recovered.rewrap_master_key()

    assert rewrapped.rewrapped == 1
    assert problems(recovered.diagnose_tenant_secret_key_drift(ACME)) == Counter()
    assert values(make_service(master_key=new_key), ACME) == stored


def test_a_repair_rewraps_a_key_left_under_a_previous_master_key_without_confirmation(
    make_service: MakeService, master_key: str
) -> None:
    stored = fill(make_service())
    new_key = secrets.token_hex(32)
    recovered = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )

    result = recovered.repair_tenant_secret_key_drift(ACME)

    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert "active_tenant_encryption_key_amk_mismatch" in codes(result.issues_before)
    assert "active_tenant_encryption_key_amk_mismatch" not in codes(result.remaining_issues)
    assert {k.amk_id for k in recovered.list_keys(ACME)} == {amk_id(new_key)}
    assert values(make_service(master_key=new_key), ACME) == stored


# -- key material without a key, or a key without its material ---------------------------------


def test_orphaned_key_material_is_reported_and_removed_by_a_repair_without_confirmation(
    uncached: SecretService,
) -> None:
    stored = fill(uncached)
    database = Database(uncached)
    genuine = database.material(ACME)
    database.insert_material(ACME, 7, "0" * 16, genuine[0][2], os.urandom(60))

    report = uncached.diagnose_tenant_secret_key_drift(ACME)
    result = uncached.repair_tenant_secret_key_drift(ACME)

    [orphan] = [i for i in report.issues if i.code == "orphaned_key_material"]
    assert (orphan.severity, orphan.repair_action) == ("warning", "delete-orphaned-key-material")
    assert orphan.key_version == 7
    assert report.ok
    assert (result.would_delete_secrets, result.would_delete_tenant_encryption_keys) == (0, 0)
    assert "orphaned_key_material" not in codes(result.remaining_issues)
    assert database.material(ACME) == genuine
    assert values(uncached, ACME) == stored


def test_stray_material_beside_a_live_version_is_removed_and_the_real_key_kept(
    uncached: SecretService,
) -> None:
    stored = fill(uncached)
    database = Database(uncached)
    genuine = database.material(ACME)
    # The loser of a rotation race: same version as the active key, another fingerprint.
    database.insert_material(ACME, 2, "f" * 16, genuine[0][2], os.urandom(60))

    report = uncached.diagnose_tenant_secret_key_drift(ACME)
    uncached.repair_tenant_secret_key_drift(ACME)

    assert [i.key_version for i in report.issues if i.code == "orphaned_key_material"] == [2]
    assert database.material(ACME) == genuine
    assert values(uncached, ACME) == stored
    assert "orphaned_key_material" not in codes(uncached.diagnose_tenant_secret_key_drift(ACME))


def test_material_restored_for_a_destroyed_version_is_an_error_that_a_repair_removes(
    uncached: SecretService,
) -> None:
    stored = fill(uncached)
    uncached.reencrypt_all_for_tenant(ACME)
    database = Database(uncached)
    [old] = [row for row in database.material(ACME) if row[0] == 1]
    assert uncached.cleanup_retired_keys(older_than_days=0).destroyed == 1
    database.insert_material(ACME, *old)  # a backup restored over the shredded store

    report = uncached.diagnose_tenant_secret_key_drift(ACME)
    result = uncached.repair_tenant_secret_key_drift(ACME)

    [present] = [i for i in report.issues if i.code == "destroyed_key_material_present"]
    assert (present.severity, present.key_version) == ("error", 1)
    assert present.repair_action == "delete-orphaned-key-material"
    assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
    assert [row[0] for row in database.material(ACME)] == [2]
    assert uncached.diagnose_tenant_secret_key_drift(ACME).ok
    assert values(uncached, ACME) == stored


# -- read models and scope --------------------------------------------------------------------


def test_a_lagging_audit_model_is_reported_as_projection_behind_until_it_catches_up(
    service: SecretService,
) -> None:
    fill(service)

    behind = service.diagnose_tenant_secret_key_drift(ACME)
    audit(service, ACME)  # an audit query catches the model up
    current = service.diagnose_tenant_secret_key_drift(ACME)

    [lag] = [i for i in behind.issues if i.code == "projection_behind"]
    assert (lag.severity, lag.details["read_model"]) == ("info", "audit")
    assert lag.details["position"] < lag.details["head"]
    assert behind.ok
    assert "projection_behind" not in codes(current)


def test_a_repair_catches_a_lagging_audit_model_up(service: SecretService) -> None:
    fill(service)

    result = service.repair_tenant_secret_key_drift(ACME)

    assert "projection_behind" in codes(result.issues_before)
    assert "projection_behind" not in codes(result.remaining_issues)


def test_secrets_left_on_a_retired_version_are_reported_until_reencrypted(
    service: SecretService,
) -> None:
    fill(service)

    before = service.diagnose_tenant_secret_key_drift(ACME)
    service.reencrypt_all_for_tenant(ACME)
    after = service.diagnose_tenant_secret_key_drift(ACME)

    retired = [i for i in before.issues if i.code == "secret_on_retired_key"]
    assert {(i.secret_name, i.key_version) for i in retired} == {
        ("db-password", 1),
        ("api-token", 1),
    }
    assert {(i.severity, i.repair_action) for i in retired} == {("info", "reencrypt")}
    assert before.ok
    assert "secret_on_retired_key" not in codes(after)


def test_a_diagnosis_of_some_secrets_reports_only_those(uncached: SecretService) -> None:
    fill(uncached)
    Database(uncached).delete_material(ACME)

    report = uncached.diagnose_tenant_secret_key_drift(ACME, secret_names=["api-token"])

    assert {i.secret_name for i in report.issues if i.secret_name} == {"api-token"}
    assert report.summary["active_secret_count"] == 1


def test_the_current_tenant_diagnosis_needs_a_tenant_and_matches_the_explicit_one(
    service: SecretService,
) -> None:
    fill(service)

    with pytest.raises(TenantRequired):
        service.diagnose_current_tenant_secret_key_drift()
    with tenant(ACME):
        current = service.diagnose_current_tenant_secret_key_drift()
    explicit = service.diagnose_tenant_secret_key_drift(ACME)

    assert current.tenant_id == ACME
    assert current.issues == explicit.issues
    assert current.summary == explicit.summary


def test_a_diagnosis_reads_no_value_and_writes_nothing(uncached: SecretService) -> None:
    fill(uncached)
    Database(uncached).delete_material(GLOBEX)
    before = state(uncached, ACME), state(uncached, GLOBEX)

    for tenant_id in (ACME, GLOBEX):
        uncached.diagnose_tenant_secret_key_drift(tenant_id)

    assert (state(uncached, ACME), state(uncached, GLOBEX)) == before


# -- repairs and diagnoses racing other clients --------------------------------------------


def test_a_repair_keeps_a_value_stored_afresh_after_its_diagnosis(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drift error tells clients to store a fresh value: one stored between the
    repair's diagnosis and its deletions is not unrecoverable and must survive."""
    from keyledger.application import repair as repair_module

    service = make_service(settings=UNCACHED)
    client = make_service()
    service.store_for_tenant(ACME, "db-password", "lost")  # on version 1
    service.rotate_key_for_tenant(ACME)
    Database(service).delete_material(ACME, version=1)
    real_diagnose = repair_module.diagnose
    stored: list[int] = []

    def diagnose_then_a_client_stores(*args: Any) -> DriftReport:
        report = real_diagnose(*args)
        if not stored:  # right after the repair planned its deletions
            stored.append(client.store_for_tenant(ACME, "db-password", "fresh").key_version)
        return report

    monkeypatch.setattr(repair_module, "diagnose", diagnose_then_a_client_stores)
    result = service.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert stored == [2]
    assert (result.would_delete_secrets, result.deleted_secrets) == (1, 0)
    assert result.key_versions == [1]
    assert service.retrieve_for_tenant(ACME, "db-password").value == "fresh"
    assert [e.action for e in audit(service, ACME)].count("delete") == 0
    assert service.diagnose_tenant_secret_key_drift(ACME).ok


def test_a_repair_that_destroys_the_active_version_leaves_the_healthy_secrets_drift_free(
    uncached: SecretService,
) -> None:
    """Secrets on a healthy retired version outlive the unusable active one: the repair
    gives the tenant a fresh active version and re-encrypts them onto it, instead of
    auditing each as a failed re-encryption and leaving the tenant in error."""
    uncached.store_for_tenant(ACME, "old", "on-v1")
    uncached.rotate_key_for_tenant(ACME)
    uncached.store_for_tenant(ACME, "new", "on-v2")
    Database(uncached).delete_material(ACME, version=2)
    seen = len(audit(uncached, ACME))

    result = uncached.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert (result.secret_names, result.key_versions, result.deleted_secrets) == (["new"], [2], 1)
    assert problems_of(result.remaining_issues) == Counter()
    assert {k.version: k.status for k in uncached.list_keys(ACME)} == {
        1: "retired",
        2: "destroyed",
        3: "active",
    }
    assert [(s.name, s.key_version) for s in uncached.list_for_tenant(ACME)] == [("old", 3)]
    assert uncached.retrieve_for_tenant(ACME, "old").value == "on-v1"
    new = audit(uncached, ACME)[seen:]
    assert [e.result for e in new if e.action == "update"] == ["success"]
    assert Counter(e.action for e in new if e.action != "read") == {
        "repair": 1,
        "delete": 1,
        "destroy_key": 1,
        "rotate_key": 1,
        "update": 1,
    }


def test_a_diagnosis_during_rotations_elsewhere_reports_no_drift(
    make_service: MakeService,
) -> None:
    """The key read model and the keyring are compared at one stream position: a key
    rotated between reading one and loading the other is not drift (before 0.11.0, a
    third to a half of these diagnoses reported read_model_inconsistent_with_stream)."""
    service = make_service()
    other = make_service()
    service.store_for_tenant(ACME, "s", "v")
    stop = threading.Event()
    rotations = 0

    def rotate_until_stopped() -> None:
        nonlocal rotations
        while not stop.is_set():
            other.rotate_key_for_tenant(ACME)
            rotations += 1

    rotator = threading.Thread(target=rotate_until_stopped)
    rotator.start()
    found: list[Counter[str]] = []
    deadline = time.monotonic() + 120
    try:
        # At least 60 diagnoses, and enough of them for 20 rotations to land in between:
        # on a loaded machine the rotator can get few turns in 60 diagnoses.
        while len(found) < 60 or (rotations < 20 and time.monotonic() < deadline):
            found.append(problems(service.diagnose_tenant_secret_key_drift(ACME)))
    finally:
        stop.set()
        rotator.join()

    assert rotations >= 20
    assert [count for count in found if count] == []


def test_a_dry_run_on_a_key_inventory_that_contradicts_the_stream_plans_by_the_stream(
    service: SecretService,
) -> None:
    """A dry run must announce what the confirmed repair does; the repair rebuilds a read
    model that contradicts the stream first, so the plan goes by the stream's keys."""
    for name in ("a", "b"):
        service.store_for_tenant(ACME, name, "v")
    Database(service).execute("UPDATE kl_keys SET status='destroyed' WHERE tenant_id=?", (ACME,))

    dry = service.repair_tenant_secret_key_drift(ACME, dry_run=True)
    real = service.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert "read_model_inconsistent_with_stream" in codes(dry.issues_before)
    assert (dry.secret_names, dry.key_versions) == ([], [])
    assert (real.secret_names, real.deleted_secrets) == ([], 0)
    assert values(service, ACME) == {"a": "v", "b": "v"}


def problems_of(issues: list[Any]) -> Counter[str]:
    return Counter(issue.code for issue in issues if issue.severity != "info")


def test_a_repair_bounded_by_a_confirmed_plan_refuses_to_delete_what_it_did_not_name(
    uncached: SecretService,
) -> None:
    """`drift repair` shows a dry run and asks; the tenant may change before the answer.
    The repair given that plan deletes nothing beyond it (and nothing at all then)."""
    fill(uncached)
    database = Database(uncached)
    database.delete_material(ACME, version=1)
    plan = uncached.repair_tenant_secret_key_drift(ACME, dry_run=True)
    assert (plan.secret_names, plan.key_versions) == (["api-token", "db-password"], [1])
    database.delete_material(ACME, version=2)  # meanwhile, the active version goes too
    before = state(uncached, ACME)

    with pytest.raises(ConfirmationRequired, match="did not name"):
        uncached.repair_tenant_secret_key_drift(
            ACME, confirm_delete_unrecoverable_data=True, confirmed_plan=plan
        )

    assert state(uncached, ACME) == before
    fresh_plan = uncached.repair_tenant_secret_key_drift(ACME, dry_run=True)
    result = uncached.repair_tenant_secret_key_drift(
        ACME, confirm_delete_unrecoverable_data=True, confirmed_plan=fresh_plan
    )
    assert result.deleted_secrets == 4
    with pytest.raises(InvalidInput):
        uncached.repair_tenant_secret_key_drift(ACME, confirmed_plan="yes")  # type: ignore[arg-type]


def test_two_repairs_at_once_record_each_destruction_once(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the repair that lost the race destroyed nothing more, but its
    repair entry and its result named the versions the other had destroyed (and the
    secrets it had deleted), as if it had done it too."""
    from keyledger.application import repair as repair_module

    first = make_service(settings=KeyledgerSettings(key_cache_seconds=0))
    second = make_service(settings=KeyledgerSettings(key_cache_seconds=0))
    fill(first)
    Database(first).delete_material(ACME)
    record = repair_module._record
    raced: list[object] = []

    def after_the_other_repair(*args: Any, **kwargs: Any) -> Any:
        if not raced:  # the other repair runs between this one's diagnosis and its write
            raced.append(True)
            second.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)
        return record(*args, **kwargs)

    monkeypatch.setattr(repair_module, "_record", after_the_other_repair)
    late = first.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert raced
    assert (late.deleted_secrets, late.deleted_tenant_encryption_keys) == (0, 0)
    assert (late.secret_names, late.key_versions) == ([], [])
    entries = audit(first, ACME)
    assert Counter(e.action for e in entries if e.action in ("destroy_key", "delete")) == {
        "destroy_key": 2,
        "delete": 4,
    }
    repairs = [e.details["destroyed_versions"] for e in entries if e.action == "repair"]
    assert sorted(repairs) == [[], [1, 2]]
