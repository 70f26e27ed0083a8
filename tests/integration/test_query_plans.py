"""Operator queries whose cost must follow their answer, not the size of the store.

A scale review found two that did not: the encryption count of `keys due` scanned the
whole audit model once per active key on PostgreSQL (the two tables' tenant ids sort by
different collations, so the audit index could not serve the comparison), and a
rewrap's material lookup scanned every tenant's material once per tenant on SQLite. The
plans are read with sequential scans priced out on PostgreSQL, so a small store shows
what a large one gets.
"""

from __future__ import annotations

from typing import Any

import pytest

from keyledger import SecretService
from keyledger.application.queries import USABLE_KEY_MATERIAL_OF_TENANT, active_key_usage_sql


def _plan(service: SecretService, sql: str) -> str:
    literal = sql.replace("?", "'acme'")
    with service._ledger.reading() as cur:
        postgres = getattr(cur, "dialect", "sqlite") == "postgres"
        if postgres:
            cur.execute("SET LOCAL enable_seqscan = off")
            cur.execute("EXPLAIN " + literal)
            return " ".join(str(row[0]) for row in cur.fetchall())
        cur.execute("EXPLAIN QUERY PLAN " + literal)
        return " ".join(str(row[-1]) for row in cur.fetchall())


def _dialect(service: SecretService) -> str:
    with service._ledger.reading() as cur:
        dialect: Any = getattr(cur, "dialect", "sqlite")
    return str(dialect)


@pytest.mark.parametrize("one_tenant", [True, False], ids=["one tenant", "every tenant"])
def test_the_encryption_count_of_keys_due_uses_the_audit_index(
    service: SecretService, one_tenant: bool
) -> None:
    for tenant_id in ("acme", "globex"):
        service.store_for_tenant(tenant_id, "db", "v")
    service.catch_up_read_models()

    plan = _plan(service, active_key_usage_sql(_dialect(service), one_tenant))

    assert "kl_audit_by_" in plan, plan  # (by tenant, or by tenant and secret)
    assert "Seq Scan on kl_audit" not in plan, plan
    assert "SCAN a" not in plan, plan
    usage = service._queries.active_key_usage("acme" if one_tenant else None)
    assert {(tenant_id, encryptions) for tenant_id, _, _, encryptions in usage} == (
        {("acme", 1)} if one_tenant else {("acme", 1), ("globex", 1)}
    )


def test_one_tenants_usable_key_material_is_a_search_not_a_scan(service: SecretService) -> None:
    for tenant_id in ("acme", "globex"):
        service.store_for_tenant(tenant_id, "db", "v")

    plan = _plan(service, USABLE_KEY_MATERIAL_OF_TENANT)

    assert "Seq Scan on kl_key_material" not in plan, plan
    assert "SCAN m" not in plan, plan
    assert [row.tenant_id for row in service._queries.usable_key_material("acme")] == ["acme"]
