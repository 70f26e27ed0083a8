"""Costs that must not grow with what they do not depend on: the memory of cached
secrets, key-inventory counts, a long audit trail."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from conftest import MakeService
from keyledger import InvalidInput, SecretService, super_admin, tenant
from keyledger.application import caches
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


def _until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_expired_data_key_nobody_asks_for_again_leaves_memory(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KEYLEDGER_KEY_CACHE_SECONDS`` is how long an unwrapped data key stays in memory:
    it used to stay until someone asked for it again, or 10,000 other keys pushed it out
    (found by review: a tenant erased by another process stayed decryptable from this
    one's memory)."""
    monkeypatch.setattr(caches._Sweeper, "INTERVAL", 0.05)
    service = make_service(settings=KeyledgerSettings(key_cache_seconds=0.3))
    service.store_for_tenant("victim", "db", "v")
    service.retrieve_for_tenant("victim", "db")
    data_keys = service._ledger._data_keys
    assert len(data_keys) == 1

    assert _until(lambda: len(data_keys) == 0)  # no call of this service meanwhile
    service.store_for_tenant("victim", "db2", "w")  # used again: cached again
    assert len(data_keys) == 1


def test_the_events_kept_for_the_audit_catch_up_stay_within_the_cache_budget(
    make_service: MakeService,
) -> None:
    """A count alone let 1,500 stores of 60 KiB values keep 90 MiB outside the cache
    budget (found by review). Events past the budget are read back by the catch-up."""
    service = make_service(settings=KeyledgerSettings(cache_megabytes=1))
    value = b"x" * 60_000
    for i in range(40):
        service.store_for_tenant("acme", f"s{i}", value)

    appended = service._ledger.appended
    assert len(appended) < 10
    assert appended.weight <= 2**20 // 4
    with super_admin():
        stored = service.get_audit_logs(tenant_id="acme", action="create", limit=100)
    assert len(stored) == 40  # the audit model is complete all the same


def test_a_secrets_non_ascii_texts_weigh_up_to_four_bytes_a_character(
    service: SecretService,
) -> None:
    metadata = {f"k{i}": "é" * 1000 for i in range(8)}
    service.store_for_tenant("acme", "s", "v", metadata=metadata)

    assert service._ledger._secrets.weight >= 8 * 4 * 1000


def test_the_keyrings_a_process_caches_stay_within_their_share_of_the_budget(
    make_service: MakeService,
) -> None:
    """A count alone let a tenant rotated thousands of times be held in full, as many
    times as there are such tenants (found by review)."""
    service = make_service(settings=KeyledgerSettings(cache_megabytes=1))
    service.store_for_tenant("rotated", "s", "v")
    for _ in range(420):  # 421 versions: about 270 KB, over a quarter of 1 MiB alone
        service.rotate_key_for_tenant("rotated")
    keyrings = service._ledger._keyrings
    assert len(keyrings) == 1  # alone over its share, the one in use is kept

    service.store_for_tenant("other", "s", "w")

    assert len(keyrings) == 1  # the rotated tenant's keyring made room
    assert keyrings.weight <= 2**20 // 4
    assert service.retrieve_for_tenant("rotated", "s").value == "v"  # reloaded
