"""A read-model table lost (a bad migration, a partial restore) and created anew.

Before, the next service that opened the store (or `keyledger db init`, which `db check`
prescribes) created it empty and the store called itself healthy: listings answered "no
secrets", the audit model claimed to be current with nothing of the past, and later
updates never brought catalog rows back (found by review). Now the table comes back with
what the stream says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from test_rebuild import answers, varied_scenario

from conftest import shared_store_url
from keyledger import SecretService, tenant
from keyledger.cli import main
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]
LOST = [
    ("kl_audit",),
    ("kl_catalog",),
    ("kl_keys",),
    ("kl_tracking",),
    ("kl_catalog", "kl_keys", "kl_audit", "kl_tracking"),
]


def drop(service: SecretService, tables: tuple[str, ...]) -> None:
    with service._ledger.store.projecting() as cur:
        for table in tables:
            cur.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("tables", LOST, ids=["+".join(t) for t in LOST])
def test_a_service_opening_the_store_restores_a_lost_read_model(
    make_service: MakeService, tables: tuple[str, ...]
) -> None:
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    operator = make_service(settings=KeyledgerSettings(create_tables=False))
    drop(operator, tables)

    reopened = make_service()  # creates the missing tables, as every service does

    assert answers(reopened) == before
    assert reopened.check_read_models().consistent
    with reopened._ledger.reading() as cur:  # the mark of a lost catalog is gone
        cur.execute("SELECT name FROM kl_tracking ORDER BY name")
        assert [row[0] for row in cur.fetchall()] == ["audit"]
    with tenant("acme"):  # and the store goes on from there
        reopened.store("db", "p4")
        assert reopened.retrieve("db").access_count == 4


@pytest.mark.parametrize("tables", [("kl_catalog",), ("kl_audit",)], ids=["catalog", "audit"])
def test_db_init_restores_a_lost_read_model(
    make_service: MakeService,
    backend: str,
    tmp_path: Any,
    master_key: str,
    tables: tuple[str, ...],
) -> None:
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    drop(service, tables)
    url = shared_store_url(backend, tmp_path)

    result = CliRunner().invoke(
        main, ["--database", url, "db", "init"], env={"KEYLEDGER_MASTER_KEY": master_key}
    )

    assert result.exit_code == 0, result.stderr
    assert answers(service) == before


def test_a_new_store_is_not_rebuilt(make_service: MakeService) -> None:
    """No event yet: empty read models are right, and nothing is marked."""
    service = make_service()
    with service._ledger.reading() as cur:
        cur.execute("SELECT name FROM kl_tracking ORDER BY name")
        assert [row[0] for row in cur.fetchall()] == ["audit"]


def test_a_rebuild_left_unfinished_is_reported_until_it_is_done(
    make_service: MakeService, caplog: pytest.LogCaptureFixture
) -> None:
    """Its process killed during the rebuild, production services (which do not create
    tables) served the empty catalog and `db check` called the store healthy (found by
    review)."""
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    with service._ledger.store.projecting() as cur:  # as a killed rebuild leaves it
        cur.execute("DELETE FROM kl_catalog")
        cur.execute("INSERT INTO kl_tracking (name, position) VALUES ('catalog_lost', 1)")

    production = make_service(settings=KeyledgerSettings(create_tables=False))

    assert "not yet rebuilt from the stream" in caplog.text
    status = production.check_schema()
    assert not status.present
    assert any(item.startswith("kl_catalog and kl_keys contents") for item in status.missing)
    production.init_schema()  # what `keyledger db init` does
    assert production.check_schema().present
    assert answers(production) == before


# -- the key material: not a read model, nothing replays it ------------------------------


def test_lost_key_material_is_reported_loudly_and_db_check_says_restore_it(
    make_service: MakeService,
    backend: str,
    tmp_path: Any,
    master_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kl_key_material dropped by a partial restore was created anew, empty, by the next
    service; `db check` then called the store healthy (it only looked for the table) and,
    before that, prescribed `db init`, which creates it empty: every secret undecryptable
    and nothing said so but a per-tenant drift diagnosis, whose repair deletes them."""
    service = make_service()
    varied_scenario(service)
    drop(service, ("kl_key_material",))
    url = shared_store_url(backend, tmp_path)
    env = {"KEYLEDGER_MASTER_KEY": master_key}

    before = CliRunner().invoke(main, ["--database", url, "db", "check"], env=env)
    assert before.exit_code == 1
    assert "restore kl_key_material from a backup" in before.stderr
    assert "db init`" not in before.stderr  # (it would create the table empty)

    reopened = make_service()  # creates it anew, as every service does
    assert "kl_key_material was missing" in caplog.text
    status = reopened.check_schema()
    live_versions = sum(
        key.status != "destroyed"
        for tenant_id in ("acme", "globex")
        for key in reopened.list_keys(tenant_id)
    )
    assert status.present
    assert not status.ok
    assert status.keys_without_material == live_versions > 0

    after = CliRunner().invoke(main, ["--database", url, "db", "check"], env=env)
    assert after.exit_code == 1
    assert f"MISSING for {live_versions} key version(s)" in after.stdout
    assert "restore kl_key_material from a backup" in after.stderr
    again = CliRunner().invoke(main, ["--database", url, "db", "init"], env=env)
    assert again.exit_code == 1
    assert "restore kl_key_material" in again.stderr


def test_db_check_says_every_key_version_has_its_material(
    make_service: MakeService, backend: str, tmp_path: Any, master_key: str
) -> None:
    service = make_service()
    varied_scenario(service)
    assert service.check_schema().keys_without_material == 0
    url = shared_store_url(backend, tmp_path)
    result = CliRunner().invoke(
        main, ["--database", url, "db", "check"], env={"KEYLEDGER_MASTER_KEY": master_key}
    )
    assert result.exit_code == 0, result.stderr
    assert "Key material:        present for every key version" in result.stdout
