"""TenantKeyring: a tenant's data-key versions; the one place that keeps one version active."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from keyledger.domain.ids import ActorDict, keyring_id
from keyledger.domain.instant import event_timestamp


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

        create_timestamp = staticmethod(event_timestamp)  # the write's instant
        tenant_id: str
        key_id: str
        amk_id: str
        actor: ActorDict

    class Event(Aggregate.Event):
        create_timestamp = staticmethod(event_timestamp)  # the write's instant
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

    class KeyCompromised(Event):
        """The version must never be used again; its secrets fail until stored afresh."""

        version: int
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.set_status(self.version, "compromised", self.timestamp)

    class KeyDestroyed(Event):
        """The version's material was destroyed: every value under it is unrecoverable."""

        version: int
        reason: str

        def apply(self, aggregate: Any) -> None:
            aggregate.set_status(self.version, "destroyed", self.timestamp)

    class KeyRewrapped(Event):
        """The version's material was wrapped again, under another master key."""

        version: int
        amk_id: str
        previous_amk_id: str

        def apply(self, aggregate: Any) -> None:
            key = aggregate.keys[self.version]
            aggregate.keys[self.version] = replace(key, amk_id=self.amk_id)

    class TenantErased(Event):
        """Every version was destroyed: nothing the tenant stored can be decrypted again."""

        versions: list[int]
        reason: str

        def apply(self, aggregate: Any) -> None:
            for version in self.versions:
                aggregate.set_status(version, "destroyed", self.timestamp)

    class DriftRepaired(Event):
        """A drift repair ran: what it found and what it deleted (the deletions themselves
        are their own SecretDeleted and KeyDestroyed events, in the same transaction)."""

        issue_codes: list[str]
        deleted_secrets: list[str]
        destroyed_versions: list[int]

        def apply(self, aggregate: Any) -> None:
            pass

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

    def compromise(self, version: int, reason: str, actor: ActorDict) -> None:
        """Mark a version compromised (rotate first when it is the active one)."""
        self.trigger_event(
            self.KeyCompromised,
            tenant_id=self.tenant_id,
            version=version,
            reason=reason,
            actor=actor,
        )

    def destroy(self, version: int, reason: str, actor: ActorDict) -> None:
        """Record the destruction of a version's material."""
        self.trigger_event(
            self.KeyDestroyed,
            tenant_id=self.tenant_id,
            version=version,
            reason=reason,
            actor=actor,
        )

    def rewrap(self, version: int, amk_id: str, actor: ActorDict) -> None:
        """Record that a version's material is now wrapped by ``amk_id``."""
        self.trigger_event(
            self.KeyRewrapped,
            tenant_id=self.tenant_id,
            version=version,
            amk_id=amk_id,
            previous_amk_id=self.keys[version].amk_id,
            actor=actor,
        )

    def erase(self, reason: str, actor: ActorDict) -> list[int]:
        """Destroy every version not yet destroyed; returns them."""
        versions = sorted(v for v, key in self.keys.items() if key.status != "destroyed")
        self.trigger_event(
            self.TenantErased,
            tenant_id=self.tenant_id,
            versions=versions,
            reason=reason,
            actor=actor,
        )
        return versions

    def record_repair(
        self,
        issue_codes: list[str],
        deleted_secrets: list[str],
        destroyed_versions: list[int],
        actor: ActorDict,
    ) -> None:
        """Record a drift repair (and the versions it destroyed)."""
        self.trigger_event(
            self.DriftRepaired,
            tenant_id=self.tenant_id,
            issue_codes=issue_codes,
            deleted_secrets=deleted_secrets,
            destroyed_versions=destroyed_versions,
            actor=actor,
        )

    def set_status(self, version: int, status: str, at: datetime) -> None:
        key = self.keys[version]
        retired_at = key.retired_at or (at if key.status == "active" else None)
        self.keys[version] = replace(key, status=status, retired_at=retired_at)

    def apply_rotation(self, event: KeyRotated) -> None:
        if event.retired_version is not None:
            old = self.keys[event.retired_version]
            self.keys[old.version] = replace(old, status="retired", retired_at=event.timestamp)
        self.keys[event.version] = KeyVersion(
            event.version, event.key_id, event.amk_id, "active", event.timestamp
        )
