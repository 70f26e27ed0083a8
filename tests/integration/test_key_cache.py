"""KEYLEDGER_KEY_CACHE_SECONDS with a positive value, on the stores two services can share.

What it promises (README, Configuration; docs/architecture.md): "how long an unwrapped data
key stays in memory (0: never cached)", per (tenant, version, key fingerprint); and "a key
version's status is read from the keyring on every use, so a key that stops being usable is
refused at once". So a change another service makes to a key's *material* (a master-key
rewrap) reaches a service only when its cached key expires, while a change of a key's
*status* (a compromise) reaches it at once, cache or not.

The cache's clock is replaced by one the test moves, so expiry is exact, not a race.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable

import pytest

from conftest import BACKENDS
from keyledger import DecryptionFailed, SecretService, ShredIncomplete
from keyledger.infrastructure.crypto import MasterKey
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]
SHARED = [param for param in BACKENDS if param.id != "memory"]  # memory: no second service
TTL = 1.0  # KEYLEDGER_KEY_CACHE_SECONDS under test


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def controlled_clock(service: SecretService, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Make ``service``'s data-key cache tell time by a clock the test moves."""
    clock = Clock()
    monkeypatch.setattr(service._ledger._data_keys, "_clock", clock)
    return clock


@pytest.fixture
def new_key() -> str:
    return secrets.token_hex(32)


@pytest.mark.parametrize("backend", SHARED, indirect=True)
def test_a_rewrap_by_another_service_reaches_a_cached_key_when_it_expires_not_before(
    make_service: MakeService,
    master_key: str,
    new_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_KEY_CACHE_SECONDS", str(TTL))
    cached = make_service()  # settings from the environment, as an application has them
    assert cached._settings.key_cache_seconds == TTL
    clock = controlled_clock(cached, monkeypatch)
    cached.store_for_tenant("acme", "s", "value")  # its new data key goes into the cache
    assert cached.retrieve_for_tenant("acme", "s").value == "value"

    # Another service moves the master key on: the material is now wrapped by a master
    # key the first service does not have.
    rotated = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )
    assert rotated.rewrap_master_key().rewrapped == 1
    with pytest.raises(DecryptionFailed, match=MasterKey(bytes.fromhex(new_key)).amk_id):
        make_service().retrieve_for_tenant("acme", "s")  # uncached: it sees the change

    clock.now += TTL * 0.9  # the key is still in memory: the change is not seen yet
    assert cached.retrieve_for_tenant("acme", "s").value == "value"

    clock.now += TTL * 0.1  # expired: unwrapping again meets the new master key
    with pytest.raises(DecryptionFailed, match=MasterKey(bytes.fromhex(new_key)).amk_id):
        cached.retrieve_for_tenant("acme", "s")
    assert rotated.retrieve_for_tenant("acme", "s").value == "value"


@pytest.mark.parametrize("backend", SHARED, indirect=True)
def test_a_key_compromised_by_another_service_is_refused_at_once_despite_the_cache(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYLEDGER_KEY_CACHE_SECONDS", str(TTL))
    cached = make_service()
    clock = controlled_clock(cached, monkeypatch)
    cached.store_for_tenant("acme", "s", "value")
    assert cached.retrieve_for_tenant("acme", "s").value == "value"  # key and keyring cached

    other = make_service()
    other.compromise_key_for_tenant("acme", 1, "leaked")

    clock.now += TTL * 0.1  # well within the cache's lifetime
    with pytest.raises(DecryptionFailed, match="compromised"):
        cached.retrieve_for_tenant("acme", "s")
    # A store goes to the replacement version, which the first service learns of as well.
    assert cached.store_for_tenant("acme", "t", "new").key_version == 2
    assert other.retrieve_for_tenant("acme", "t").value == "new"


@pytest.mark.parametrize("backend", SHARED, indirect=True)
def test_a_cached_key_expires_by_the_wall_clock_too(
    make_service: MakeService, master_key: str, new_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same expiry on the cache's own clock: sleep just past it (only the side that
    cannot race is checked: after the expiry the change must be seen)."""
    monkeypatch.setenv("KEYLEDGER_KEY_CACHE_SECONDS", "0.5")
    cached = make_service()
    cached.store_for_tenant("acme", "s", "value")
    cached_at = time.monotonic()
    rotated = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )
    assert rotated.rewrap_master_key().rewrapped == 1
    time.sleep(max(0.0, cached_at + 0.6 - time.monotonic()))
    with pytest.raises(DecryptionFailed, match=MasterKey(bytes.fromhex(new_key)).amk_id):
        cached.retrieve_for_tenant("acme", "s")


def test_a_key_being_unwrapped_while_keys_are_forgotten_is_not_cached(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destruction forgets every unwrapped key; a key another thread was unwrapping at
    that moment must not be cached once it is done (it would stay in memory for
    KEYLEDGER_KEY_CACHE_SECONDS after its destruction)."""
    service = make_service()
    service.store_for_tenant("acme", "api-key", "v")
    ledger = service._ledger
    ledger.forget_data_keys()
    key_material = ledger.key_material

    def destroyed_meanwhile(*args: object) -> tuple[str, bytes] | None:
        found = key_material(*args)  # type: ignore[arg-type]
        ledger.forget_data_keys()  # another thread's destruction, mid-unwrap
        return found

    monkeypatch.setattr(ledger, "key_material", destroyed_meanwhile)
    assert service.retrieve_for_tenant("acme", "api-key").value == "v"
    assert len(ledger._data_keys) == 0  # nothing kept

    monkeypatch.setattr(ledger, "key_material", key_material)
    assert service.retrieve_for_tenant("acme", "api-key").value == "v"
    assert len(ledger._data_keys) == 1  # an undisturbed unwrap is cached


@pytest.mark.parametrize("backend", SHARED, indirect=True)
def test_a_key_destroyed_by_another_service_leaves_memory_when_this_one_next_uses_the_tenant(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destroying service drops every unwrapped key at once; another one drops a
    destroyed version's key when it next decides anything for the tenant (the
    destruction moved the keyring on, so that decision loads it), not minutes later
    when its cache would have expired the key."""
    monkeypatch.setenv("KEYLEDGER_KEY_CACHE_SECONDS", "300")
    cached = make_service()
    cached.store_for_tenant("acme", "s", "value")
    assert cached.retrieve_for_tenant("acme", "s").value == "value"
    ledger = cached._ledger
    keyring = ledger.keyring("acme")
    assert keyring is not None
    version_1 = ("acme", 1, keyring.keys[1].key_id)
    assert ledger._data_keys.get(version_1) is not None  # the unwrapped key, in memory

    other = make_service()
    other.rotate_key_for_tenant("acme")
    other.reencrypt_all_for_tenant("acme")
    with contextlib.suppress(ShredIncomplete):  # (destroyed; see test_stale_caches)
        other.cleanup_retired_keys(older_than_days=0)
    assert [key.status for key in other.list_keys("acme")] == ["destroyed", "active"]

    assert cached.retrieve_for_tenant("acme", "s").value == "value"  # (on version 2)
    assert ledger._data_keys.get(version_1) is None


def test_closing_a_service_drops_the_keys_it_unwrapped(make_service: MakeService) -> None:
    """Keys of a closed service used to stay in memory until they expired (found by
    review)."""
    service = make_service()
    service.store_for_tenant("acme", "api-key", "v")
    assert service.retrieve_for_tenant("acme", "api-key").value == "v"
    data_keys = service._ledger._data_keys
    assert len(data_keys) == 1

    service.close()

    assert len(data_keys) == 0
