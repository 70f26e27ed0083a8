"""A catalog row edited around keyledger never gets a healthy secret deleted, on every store.

Found by review: after one column of kl_catalog was edited (``envelope_version`` set to
NULL, or ``key_version`` to a version that does not exist), the diagnosis called a healthy
secret unrecoverable from that row alone, and ``drift repair --yes`` deleted it and
reported no issue left. The diagnosis now confirms what the catalog marks unrecoverable
against the secret's aggregate: a row that disagrees makes the read models inconsistent,
which the repair rebuilds before it plans, so the secret is kept and its row is right
again. A secret the stream itself shows unrecoverable is still deleted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from conftest import run_around
from keyledger import DriftReport, SecretService, super_admin
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]

ACME = "acme"
INCONSISTENT = "read_model_inconsistent_with_stream"
DELETE_SECRET = "delete-unrecoverable-secret"
EVERYTHING = 1_000_000
# Without the data-key cache a service notices key material changed underneath it at once.
UNCACHED = KeyledgerSettings(key_cache_seconds=0)


def execute(service: SecretService, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """One statement on the service's database, as an operator's hand edit would run."""
    return run_around(service, statement, params)


def catalog_row(service: SecretService, name: str) -> tuple[Any, ...]:
    """(key version, envelope's key version, value version, deleted) of a catalog row."""
    [row] = execute(
        service,
        "SELECT key_version, envelope_version, version, deleted FROM kl_catalog "
        "WHERE tenant_id=? AND name=?",
        (ACME, name),
    )
    return tuple(row)


def audit_actions(service: SecretService) -> Counter[str]:
    with super_admin():
        return Counter(e.action for e in service.get_audit_logs(tenant_id=ACME, limit=EVERYTHING))


def doomed(report: DriftReport) -> set[str | None]:
    return {i.secret_name for i in report.issues if i.repair_action == DELETE_SECRET}


EDITS = {
    "envelope_version-null": "envelope_version=NULL",
    "key_version-7": "key_version=7",
    "both-7": "key_version=7, envelope_version=7",
}


@pytest.mark.parametrize("edit", list(EDITS.values()), ids=list(EDITS))
def test_an_edited_catalog_column_is_diagnosed_as_inconsistent_and_deletes_nothing(
    service: SecretService, edit: str
) -> None:
    service.store_for_tenant(ACME, "alpha", "value-a")
    service.store_for_tenant(ACME, "beta", "value-b")
    healthy = catalog_row(service, "beta")
    assert healthy == (1, 1, 1, 0)
    before = audit_actions(service)
    execute(service, f"UPDATE kl_catalog SET {edit} WHERE tenant_id=? AND name=?", (ACME, "beta"))

    report = service.diagnose_tenant_secret_key_drift(ACME)
    dry = service.repair_tenant_secret_key_drift(ACME, dry_run=True)

    assert not report.ok
    assert doomed(report) == set()
    [inconsistent] = [i for i in report.issues if i.code == INCONSISTENT]
    assert inconsistent.repair_action == "rebuild-read-models"
    assert inconsistent.details["read_model"] == "catalog"
    assert inconsistent.details["secret_names"] == ["beta"]
    assert "value-b" not in inconsistent.message
    assert (dry.secret_names, dry.would_delete_secrets) == ([], 0)

    result = service.repair_tenant_secret_key_drift(
        ACME, confirm_delete_unrecoverable_data=True, confirmed_plan=dry
    )

    assert (result.secret_names, result.deleted_secrets) == ([], 0)
    assert (result.key_versions, result.deleted_tenant_encryption_keys) == ([], 0)
    assert [i for i in result.remaining_issues if i.severity == "error"] == []
    assert catalog_row(service, "beta") == healthy
    assert service.retrieve_for_tenant(ACME, "beta").value == "value-b"
    assert service.retrieve_for_tenant(ACME, "alpha").value == "value-a"
    assert [s.name for s in service.list_for_tenant(ACME)] == ["alpha", "beta"]
    assert service.diagnose_tenant_secret_key_drift(ACME).ok
    assert (audit_actions(service) - before)["delete"] == 0


def test_a_catalog_row_that_revives_a_deleted_secret_is_rebuilt_not_acted_on(
    service: SecretService,
) -> None:
    service.store_for_tenant(ACME, "alpha", "value-a")
    service.store_for_tenant(ACME, "gone", "old")
    service.delete_for_tenant(ACME, "gone")
    execute(
        service,
        "UPDATE kl_catalog SET deleted=0, envelope_version=NULL WHERE tenant_id=? AND name=?",
        (ACME, "gone"),
    )

    report = service.diagnose_tenant_secret_key_drift(ACME)
    result = service.repair_tenant_secret_key_drift(ACME, confirm_delete_unrecoverable_data=True)

    assert doomed(report) == set()
    [inconsistent] = [i for i in report.issues if i.code == INCONSISTENT]
    assert inconsistent.details["columns"] == {"gone": ["deleted"]}
    assert report.summary["active_secret_count"] == 1
    assert (result.secret_names, result.deleted_secrets) == ([], 0)
    assert catalog_row(service, "gone")[3] == 1
    assert [s.name for s in service.list_for_tenant(ACME)] == ["alpha"]
    assert service.diagnose_tenant_secret_key_drift(ACME).ok


def test_a_secret_the_stream_shows_unrecoverable_is_still_deleted_under_an_edited_row(
    make_service: MakeService,
) -> None:
    """Its catalog row edited as well, the secret is judged by its aggregate: the dry run
    names it, and the confirmed repair, on the rebuilt catalog, deletes it."""
    service = make_service(settings=UNCACHED)
    service.store_for_tenant(ACME, "lost", "on-v1")
    service.rotate_key_for_tenant(ACME)
    service.store_for_tenant(ACME, "kept", "on-v2")
    execute(service, "DELETE FROM kl_key_material WHERE tenant_id=? AND version=1", (ACME,))
    execute(
        service,
        "UPDATE kl_catalog SET envelope_version=NULL WHERE tenant_id=? AND name=?",
        (ACME, "lost"),
    )

    report = service.diagnose_tenant_secret_key_drift(ACME)
    dry = service.repair_tenant_secret_key_drift(ACME, dry_run=True)
    result = service.repair_tenant_secret_key_drift(
        ACME, confirm_delete_unrecoverable_data=True, confirmed_plan=dry
    )

    assert INCONSISTENT in {i.code for i in report.issues}
    [unrecoverable] = [i for i in report.issues if i.repair_action == DELETE_SECRET]
    assert (unrecoverable.code, unrecoverable.secret_name) == (
        "secret_envelope_unwrap_failed",
        "lost",
    )
    assert unrecoverable.key_version == 1
    assert (dry.secret_names, dry.key_versions) == (["lost"], [1])
    assert (result.secret_names, result.deleted_secrets) == (["lost"], 1)
    assert [s.name for s in service.list_for_tenant(ACME)] == ["kept"]
    assert service.retrieve_for_tenant(ACME, "kept").value == "on-v2"
    assert [i for i in result.remaining_issues if i.severity == "error"] == []
