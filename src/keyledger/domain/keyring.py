"""TenantKeyring: a tenant's data-key versions; the one place that keeps one version active."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from keyledger.domain.ids import ActorDict, keyring_id


@dataclass(frozen=True)
class KeyVersion:
    """One version of a tenant data key: facts and fingerprint, never material."""

    version: int
    key_id: str
    amk_id: str
    status: str
    created_at: datetime
    retired_at: datetime | None = None


class TenantKeyring(Aggregate):
    """The versions of one tenant's data key."""

    class TenantKeyCreated(Aggregate.Created):
        """The tenant's first key version (version 1) was created."""

        tenant_id: str
        key_id: str
        amk_id: str
        actor: ActorDict

    class Event(Aggregate.Event):
        tenant_id: str
        actor: ActorDict

    class KeyRotated(Event):
        """A new version became active; the previous active version was retired."""

        version: int
        key_id: str
        amk_id: str
        retired_version: int | None

        def apply(self, aggregate: Any) -> None:
            assert isinstance(aggregate, TenantKeyring)
            aggregate.apply_rotation(self)

    @staticmethod
    def create_id(tenant_id: str) -> UUID:
        return keyring_id(tenant_id)

    def __init__(self, tenant_id: str, key_id: str, amk_id: str, actor: ActorDict) -> None:
        self.tenant_id = tenant_id
        self.keys: dict[int, KeyVersion] = {
            1: KeyVersion(1, key_id, amk_id, "active", self.created_on)
        }

    @classmethod
    def create(cls, tenant_id: str, key_id: str, amk_id: str, actor: ActorDict) -> TenantKeyring:
        """Start a tenant's keyring with its first key version."""
        return cls._create(
            cls.TenantKeyCreated, tenant_id=tenant_id, key_id=key_id, amk_id=amk_id, actor=actor
        )

    @property
    def active(self) -> KeyVersion | None:
        """The active version, if any."""
        for key in self.keys.values():
            if key.status == "active":
                return key
        return None

    @property
    def next_version(self) -> int:
        """The version a rotation creates: versions are contiguous and never reused."""
        return max(self.keys) + 1

    def rotate(self, key_id: str, amk_id: str, actor: ActorDict) -> int:
        """Make a new version active and retire the current one; returns the new version."""
        version = self.next_version
        current = self.active
        self.trigger_event(
            self.KeyRotated,
            tenant_id=self.tenant_id,
            version=version,
            key_id=key_id,
            amk_id=amk_id,
            retired_version=current.version if current else None,
            actor=actor,
        )
        return version

    def apply_rotation(self, event: KeyRotated) -> None:
        if event.retired_version is not None:
            old = self.keys[event.retired_version]
            self.keys[old.version] = replace(old, status="retired", retired_at=event.timestamp)
        self.keys[event.version] = KeyVersion(
            event.version, event.key_id, event.amk_id, "active", event.timestamp
        )
