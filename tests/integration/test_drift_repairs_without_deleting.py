"""Repairs that delete nothing: a key read model out of step, secrets on retired keys."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

from keyledger import SecretService


def _service(tmp_path: Path) -> tuple[SecretService, Path]:
    path = tmp_path / "k.db"
    return SecretService.create(f"sqlite:///{path}", master_key=secrets.token_hex(32)), path


def test_a_key_read_model_out_of_step_with_the_stream_is_diagnosed_and_rebuilt(
    tmp_path: Path,
) -> None:
    service, path = _service(tmp_path)
    with service:
        service.store_for_tenant("acme", "token", "value")
        with sqlite3.connect(path) as db:
            db.execute("UPDATE kl_keys SET status='destroyed' WHERE tenant_id='acme'")

        report = service.diagnose_tenant_secret_key_drift("acme")
        codes = {issue.code for issue in report.issues}
        assert "read_model_inconsistent_with_stream" in codes
        assert not report.ok

        result = service.repair_tenant_secret_key_drift("acme")  # no confirmation needed

        assert (result.deleted_secrets, result.deleted_tenant_encryption_keys) == (0, 0)
        assert [key.status for key in service.list_keys("acme")] == ["active"]
        assert service.diagnose_tenant_secret_key_drift("acme").ok
        assert service.retrieve_for_tenant("acme", "token").value == "value"


def test_a_repair_moves_secrets_off_retired_keys(tmp_path: Path) -> None:
    service, _ = _service(tmp_path)
    with service:
        service.store_for_tenant("acme", "a", "1")
        service.store_for_tenant("acme", "b", "2")
        service.rotate_key_for_tenant("acme")
        before = service.diagnose_tenant_secret_key_drift("acme")
        assert {i.secret_name for i in before.issues if i.code == "secret_on_retired_key"} == {
            "a",
            "b",
        }

        service.repair_tenant_secret_key_drift("acme")

        after = service.diagnose_tenant_secret_key_drift("acme")
        assert not [i for i in after.issues if i.code == "secret_on_retired_key"]
        assert {service.retrieve_for_tenant("acme", n).key_version for n in ("a", "b")} == {2}
