"""Aggregate ids: every id starts with its tenant's 48-bit prefix.

All ids are UUIDv8 (RFC 9562, custom layout)::

    bits 0-47    tenant prefix: the first 6 bytes of SHA-256("keyledger-tenant" 0x00 tenant)
    bits 48-51   version (8)
    bits 52-63   12 bits  \
    bits 64-65   variant   > 74 bits: a hash of (kind, tenant, name) for keyrings and
    bits 66-127  62 bits  /  secrets; milliseconds + randomness for one-event audit records

The (tenant, name) pair IS the identity of a secret, and a tenant's aggregates all sit in
one contiguous range of the events table's primary key: the tenant's part of the stream is
read with one index range scan (``tenant_id_range``), with no tenant column or side index.
Audit records are time-ordered within their tenant, so their index entries append at the
end of the tenant's range instead of landing on random pages. The seal chain, which belongs
to no tenant, has a fixed id outside every tenant's range only by the odds of SHA-256.
"""

from __future__ import annotations

import hashlib
import random
import time
from functools import lru_cache
from typing import Any
from uuid import UUID

ActorDict = dict[str, Any]

_LOW_74 = (1 << 74) - 1
_LOW_80 = (1 << 80) - 1


@lru_cache(maxsize=65536)
def tenant_prefix(tenant_id: str) -> int:
    """The 48-bit prefix shared by every aggregate id of ``tenant_id``."""
    digest = hashlib.sha256(b"keyledger-tenant\x00" + tenant_id.encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _v8(prefix: int, rest: int) -> UUID:
    """A UUIDv8 from a 48-bit prefix and 74 bits of payload."""
    high, low = rest >> 62 & 0xFFF, rest & (1 << 62) - 1
    return UUID(int=prefix << 80 | 0x8 << 76 | high << 64 | 0b10 << 62 | low)


def _hashed(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:10], "big") & _LOW_74


@lru_cache(maxsize=65536)
def keyring_id(tenant_id: str) -> UUID:
    """The id of a tenant's keyring aggregate."""
    return _v8(tenant_prefix(tenant_id), _hashed("keyring", tenant_id))


@lru_cache(maxsize=65536)
def secret_id(tenant_id: str, name: str) -> UUID:
    """The id of the secret ``name`` of ``tenant_id`` (0x00 cannot occur in either)."""
    return _v8(tenant_prefix(tenant_id), _hashed("secret", tenant_id, name))


def audit_record_id(tenant_id: str) -> UUID:
    """A fresh id for a one-event audit record: tenant prefix, 44-bit milliseconds, 30
    random bits. Two records of one tenant in one millisecond collide with odds of 2^-30;
    the append then fails on the primary key and the read is retried with a new id.
    The bits need to be unpredictable to nobody, only distinct: the process's PRNG (which
    ``random`` reseeds in a forked child) instead of a getrandom call per record."""
    millis = time.time_ns() // 1_000_000 & (1 << 44) - 1
    return _v8(tenant_prefix(tenant_id), millis << 30 | random.getrandbits(30))


def tenant_id_range(tenant_id: str) -> tuple[UUID, UUID]:
    """The first and last possible aggregate id of ``tenant_id`` (inclusive)."""
    prefix = tenant_prefix(tenant_id) << 80
    return UUID(int=prefix), UUID(int=prefix | _LOW_80)


SEAL_CHAIN_ID = UUID("6f1f3d1e-4b8a-8c2e-9d7a-2b6c1e0f4a91")
"""The id of the audit seal chain (one aggregate, one checkpoint per version)."""
