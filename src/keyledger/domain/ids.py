"""Deterministic aggregate ids: the (tenant, name) pair IS the identity of a secret."""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any
from uuid import UUID, uuid5

KEYLEDGER_NAMESPACE = UUID("6f1f3d1e-4b8a-5c2e-9d7a-2b6c1e0f4a91")

ActorDict = dict[str, Any]


@lru_cache(maxsize=65536)
def keyring_id(tenant_id: str) -> UUID:
    """The id of a tenant's keyring aggregate."""
    return uuid5(KEYLEDGER_NAMESPACE, "keyring\x00" + tenant_id)


@lru_cache(maxsize=65536)
def secret_id(tenant_id: str, name: str) -> UUID:
    """The id of the secret ``name`` of ``tenant_id`` (0x00 cannot occur in either)."""
    return uuid5(KEYLEDGER_NAMESPACE, "secret\x00" + tenant_id + "\x00" + name)


def time_ordered_id() -> UUID:
    """A random UUIDv7 (RFC 9562): millisecond time prefix, 74 random bits.

    One-event audit records get these ids so their index entries append at the end of the
    events table's primary key instead of landing on random pages.
    """
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 62 & 0xFFF
    rand_b = rand & (1 << 62) - 1
    value = (millis & (1 << 48) - 1) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return UUID(int=value)
