"""What one write transaction carries besides the events: checks, key material, outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from keyledger.projections.projector import Outcome


@dataclass(frozen=True)
class KeyMaterialRow:
    """A wrapped TDEK to insert in the same transaction as the event that announces it."""

    tenant_id: str
    version: int
    key_id: str
    amk_id: str
    wrapped: bytes
    created_at: int


@dataclass
class WriteUnit:
    """One atomic write: events, checks, key-material changes, projection outcome.

    ``expected`` names aggregates that a decision was based on without being written: the
    write commits only if each is still at that version (0: no events), checked under the
    write lock, so a decision made on cached state is never committed when stale.
    """

    expected: dict[UUID, int] = field(default_factory=dict)
    key_material: list[KeyMaterialRow] = field(default_factory=list)
    # (tenant, version, key_id): material rows deleted (crypto-shredding); a key_id of
    # None deletes every row of the version.
    material_deletions: list[tuple[str, int, str | None]] = field(default_factory=list)
    # Rows whose wrapped key and AMK id are replaced (master-key rewrap).
    material_rewraps: list[KeyMaterialRow] = field(default_factory=list)
    # (tenant, version) that must have no live secret, checked under the write lock.
    require_unused: list[tuple[str, int]] = field(default_factory=list)
    domain_events: list[Any] = field(default_factory=list)
    outcome: Outcome = field(default_factory=Outcome)


class StaleStateError(Exception):
    """An aggregate a decision was based on changed before the write: reload and retry."""
