"""Deterministic aggregate ids: the (tenant, name) pair IS the identity of a secret."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

KEYLEDGER_NAMESPACE = UUID("6f1f3d1e-4b8a-5c2e-9d7a-2b6c1e0f4a91")

ActorDict = dict[str, Any]


def keyring_id(tenant_id: str) -> UUID:
    """The id of a tenant's keyring aggregate."""
    return uuid5(KEYLEDGER_NAMESPACE, "keyring\x00" + tenant_id)


def secret_id(tenant_id: str, name: str) -> UUID:
    """The id of the secret ``name`` of ``tenant_id`` (0x00 cannot occur in either)."""
    return uuid5(KEYLEDGER_NAMESPACE, "secret\x00" + tenant_id + "\x00" + name)
