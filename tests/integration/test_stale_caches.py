"""Two services on one store, as two processes: what one caches goes stale when the other
rotates, re-encrypts and destroys retired versions (the routine key hygiene). Decisions
made on a stale cache are retried on fresh state, never reported as failures."""

from __future__ import annotations

import contextlib

import pytest

from conftest import MakeService
from keyledger import SecretService, ShredIncomplete, super_admin
from keyledger.infrastructure.settings import KeyledgerSettings


def _hygiene(operator: SecretService) -> None:
    """Rotate, move everything onto the new version, destroy the retired one."""
    operator.rotate_key_for_tenant("acme")
    operator.reencrypt_all_for_tenant("acme")
    # (ShredIncomplete: destroyed, but a transaction elsewhere kept the old rows' pages)
    with contextlib.suppress(ShredIncomplete):
        operator.cleanup_retired_keys(older_than_days=0)
    assert operator.list_keys("acme")[0].status == "destroyed"  # material and all


@pytest.fixture
def app_and_operator(make_service: MakeService) -> tuple[SecretService, SecretService]:
    """``app`` keeps no unwrapped key (as after its cache expired), and caches the rest."""
    app = make_service(settings=KeyledgerSettings(key_cache_seconds=0))
    operator = make_service()
    app.store_for_tenant("acme", "x", "1")
    app.store_for_tenant("acme", "k", "2")
    return app, operator


def _failures(service: SecretService) -> list[str]:
    with super_admin():
        return [e.action for e in service.get_audit_logs(tenant_id="acme", result="failure")]


def test_a_store_after_another_process_destroyed_the_cached_active_version(
    app_and_operator: tuple[SecretService, SecretService],
) -> None:
    app, operator = app_and_operator
    _hygiene(operator)

    stored = app.store_for_tenant("acme", "x", "1b")

    assert stored.key_version == 2
    assert app.retrieve_for_tenant("acme", "x").value == "1b"
    assert _failures(app) == []


def test_a_reencryption_after_another_process_destroyed_the_cached_secrets_version(
    app_and_operator: tuple[SecretService, SecretService],
) -> None:
    app, operator = app_and_operator
    _hygiene(operator)
    operator.rotate_key_for_tenant("acme")  # version 3: app's cache says "on version 1"

    result = app.reencrypt_all_for_tenant("acme")

    assert (result.success, result.failed) == (2, 0)
    assert {s.name: s.key_version for s in app.list_for_tenant("acme")} == {"k": 3, "x": 3}
    assert {app.retrieve_for_tenant("acme", n).value for n in ("x", "k")} == {"1", "2"}
    assert _failures(app) == []


def test_a_repair_deletes_what_it_diagnosed_though_its_cached_copy_is_older(
    make_service: MakeService,
) -> None:
    """The app read "a" at value version 1 and cached it; another process stored version 2
    and erased the tenant. The app's repair deletes "a" as its plan said, instead of
    skipping it as "stored afresh since the diagnosis" on the strength of its cache."""
    app, operator = make_service(), make_service()
    app.store_for_tenant("acme", "a", "1")
    app.store_for_tenant("acme", "keep", "2")
    app.retrieve_for_tenant("acme", "a")
    operator.store_for_tenant("acme", "a", "1b")
    operator.erase_tenant("acme", confirm=True)

    plan = app.repair_tenant_secret_key_drift("acme", dry_run=True)
    result = app.repair_tenant_secret_key_drift("acme", confirm_delete_unrecoverable_data=True)

    assert sorted(plan.secret_names) == ["a", "keep"]
    assert result.deleted_secrets == 2
    assert app.list_for_tenant("acme") == []
    assert [i for i in result.remaining_issues if i.severity == "error"] == []
