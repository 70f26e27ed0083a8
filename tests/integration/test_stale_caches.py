"""Two services on one store, as two processes: what one caches goes stale when the other
rotates, re-encrypts and destroys retired versions (the routine key hygiene). Decisions
made on a stale cache are retried on fresh state, never reported as failures."""

from __future__ import annotations

import pytest

from conftest import MakeService
from keyledger import SecretService, super_admin
from keyledger.infrastructure.settings import KeyledgerSettings


def _hygiene(operator: SecretService) -> None:
    """Rotate, move everything onto the new version, destroy the retired one."""
    operator.rotate_key_for_tenant("acme")
    operator.reencrypt_all_for_tenant("acme")
    cleaned = operator.cleanup_retired_keys(older_than_days=0)
    assert cleaned.destroyed  # version 1 is gone, material and all


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
