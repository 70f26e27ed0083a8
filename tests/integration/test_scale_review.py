"""Costs that must not grow with what they do not depend on: the memory of cached
secrets, key-inventory counts, a long audit trail."""

from __future__ import annotations

import pytest

from conftest import MakeService
from keyledger import InvalidInput, SecretService, super_admin, tenant
from keyledger.application.caches import LRUCache
from keyledger.infrastructure.settings import KeyledgerSettings


def test_the_secrets_a_process_caches_stay_within_their_byte_budget(
    make_service: MakeService,
) -> None:
    """A count alone let 20,000 secrets of 64 KiB values hold 2 GB."""
    service = make_service(settings=KeyledgerSettings(cache_megabytes=1))
    value = b"x" * 60_000
    for i in range(60):
        service.store_for_tenant("acme", f"s{i}", value)
        service.retrieve_for_tenant("acme", f"s{i}")

    cache = service._ledger._secrets
    assert cache.weight <= 2**20
    assert 5 <= len(cache) <= 17
    assert service.retrieve_for_tenant("acme", "s0").value == value  # evicted, reloaded


def test_a_weighted_cache_accounts_for_replacements_evictions_and_clearing() -> None:
    cache: LRUCache[str, str] = LRUCache(10, max_weight=10, weigh=len)
    cache.put("a", "xxxx")
    cache.put("b", "xxxx")
    cache.put("a", "xx")  # replaced: 2 + 4
    assert (cache.weight, len(cache)) == (6, 2)
    cache.put("c", "xxxxx")  # 11 > 10: the least recently used ("b") goes
    assert cache.get("b") is None
    assert (cache.weight, len(cache)) == (7, 2)
    cache.evict("a")
    assert cache.weight == 5
    cache.put("huge", "x" * 50)  # alone over the budget: kept (the one just used)
    assert (cache.get("huge"), len(cache)) == ("x" * 50, 1)
    cache.clear()
    assert (cache.weight, len(cache)) == (0, 0)


def test_the_key_inventory_counts_each_versions_secrets(service: SecretService) -> None:
    for i in range(6):
        service.store_for_tenant("acme", f"s{i}", "v")
    service.rotate_key_for_tenant("acme")
    for i in range(2):
        service.store_for_tenant("acme", f"s{i}", "v2")
    service.delete_for_tenant("acme", "s5")
    service.rotate_key_for_tenant("acme")
    service.store_for_tenant("other", "x", "v")

    counts = [(k.version, k.status, k.secret_count) for k in service.list_keys("acme")]
    with super_admin():
        every_tenant = service.list_keys()

    assert counts == [(1, "retired", 3), (2, "retired", 2), (3, "active", 0)]
    assert [(k.tenant_id, k.secret_count) for k in every_tenant] == [
        ("acme", 3),
        ("acme", 2),
        ("acme", 0),
        ("other", 1),
    ]


def test_a_long_audit_trail_pages_oldest_first(service: SecretService) -> None:
    with tenant("acme"):
        service.store("s", "v")
        for _ in range(9):
            service.retrieve("s")
        whole = service.audit_trail("s")
        pages = [service.audit_trail("s", limit=4, offset=n) for n in (0, 4, 8)]
        with pytest.raises(InvalidInput):
            service.audit_trail("s", limit=-1)

    assert len(whole) == 10
    assert [e.position for page in pages for e in page] == [e.position for e in whole]
    assert [len(page) for page in pages] == [4, 4, 2]
