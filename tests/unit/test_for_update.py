"""``Ledger.for_update`` copies shallowly: every other attribute must be immutable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from keyledger import SecretService, tenant
from keyledger.application.ledger import MUTABLE_ATTRIBUTES, Ledger
from keyledger.domain.keyring import KeyVersion

IMMUTABLE = (str, bytes, int, float, bool, datetime, UUID, KeyVersion, type(None))


def _aggregates(service: SecretService) -> list[object]:
    ledger = service._ledger
    return [ledger.secret("acme", "db"), ledger.keyring("acme")]


def test_every_attribute_but_the_listed_ones_is_immutable(master_key: str) -> None:
    with SecretService.create("memory:", master_key=master_key) as service:
        with tenant("acme"):
            service.store(
                "db",
                "value",
                category="c",
                description="d",
                metadata={"k": "v"},
                expires_at=datetime.now(UTC) + timedelta(days=1),
            )
            service.rotate_key()
            service.disable("db")
        for aggregate in _aggregates(service):
            for name, value in vars(aggregate).items():
                if name in MUTABLE_ATTRIBUTES:
                    continue
                assert isinstance(value, IMMUTABLE), (type(aggregate).__name__, name, value)


def test_a_copy_for_update_shares_nothing_mutable_with_the_cached_one(master_key: str) -> None:
    with SecretService.create("memory:", master_key=master_key) as service:
        with tenant("acme"):
            service.store("db", "value", metadata={"k": "v"})
        ledger = service._ledger
        cached = ledger.secret("acme", "db")
        keyring = ledger.keyring("acme")
        assert cached is not None
        assert keyring is not None
        secret_copy = Ledger.for_update(cached)
        secret_copy.metadata["k"] = "changed"
        secret_copy.disable({"user_id": "u", "ip_address": None, "user_agent": None})
        assert cached.metadata == {"k": "v"}
        assert not cached.disabled
        assert cached.collect_events() == []
        keyring_copy = Ledger.for_update(keyring)
        keyring_copy.rotate("k2", keyring.keys[1].amk_id, {"user_id": "u"})
        assert sorted(keyring.keys) == [1]
        assert keyring.collect_events() == []
