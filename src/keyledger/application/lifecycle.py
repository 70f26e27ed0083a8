"""The key lifecycle: compromise, cleanup of retired versions, master-key rewrap, erasure.

Each step is one atomic write (events and key-material changes in one transaction), so
an operation killed at any point leaves either the old or the new state of each key
version, and running it again completes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from keyledger.application.keys import refuse_an_unknown_master_key
from keyledger.application.ledger import Ledger
from keyledger.application.queries import Queries
from keyledger.application.row_errors import read_model_errors
from keyledger.application.secrets import actor_dict, record_failure, unavailable
from keyledger.application.stream import secret_ids_in_stream
from keyledger.context import Actor
from keyledger.domain.ids import ActorDict
from keyledger.domain.keyring import TenantKeyring
from keyledger.errors import (
    ConfirmationRequired,
    DecryptionFailed,
    InvalidInput,
    KeyInUse,
    MasterKeyUnavailable,
    ShredIncomplete,
)
from keyledger.infrastructure.crypto import MasterKey
from keyledger.infrastructure.write_unit import KeyMaterialRow, WriteUnit
from keyledger.models import CleanupKeyOutcome, CleanupResult, TenantKeyInfo
from keyledger.projections.timeutil import to_micros

Progress = Callable[[int], None]


RewrapFailureReason = Literal["unknown_master_key", "does_not_unwrap"]


class RewrapFailure(BaseModel):
    """A key version a rewrap could not re-wrap: the master key that wraps it is not
    configured (``unknown_master_key``), or it does not unwrap with it."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    version: int
    amk_id: str
    reason: RewrapFailureReason

    @classmethod
    def of(
        cls, tenant_id: str, version: int, amk_id: str, reason: RewrapFailureReason
    ) -> RewrapFailure:
        return cls(tenant_id=tenant_id, version=version, amk_id=amk_id, reason=reason)

    def describe(self) -> str:
        where = f"tenant {self.tenant_id!r} key version {self.version}"
        if self.reason == "unknown_master_key":
            return f"{where}: wrapped by unknown master key {self.amk_id}"
        return f"{where}: does not unwrap with master key {self.amk_id}"


class RewrapResult(BaseModel):
    """What a master-key rewrap did. ``failures`` says each failure in words,
    ``failed_versions`` the same as data (found by review: scripts had to parse text)."""

    model_config = ConfigDict(frozen=True)

    amk_id: str
    rewrapped: int
    already_current: int
    failed: int
    failures: list[str]
    failed_versions: list[RewrapFailure] = []


# The statuses whose versions a cleanup destroys once no live secret uses them.
CLEANED_UP = ("retired", "compromised")


class KeyLifecycle:
    """Operator-level key operations (see docs/operations.md for the runbooks)."""

    def __init__(self, ledger: Ledger, queries: Queries) -> None:
        self.ledger = ledger
        self.queries = queries

    def _keyring(self, tenant_id: str) -> TenantKeyring:
        """The tenant's keyring as the stream has it now. Lifecycle steps decide on the
        stream, never on this process's cache: another process may have rotated, erased
        or rewrapped since, and a refusal or a "nothing to do" decided on a cached keyring
        would go unchecked (only a write's version check catches a stale decision)."""
        keyring = self.ledger.keyring(tenant_id, fresh=True)
        if keyring is None:
            raise InvalidInput(f"tenant {tenant_id!r} has no keys")
        return keyring

    def _info(self, tenant_id: str, version: int) -> TenantKeyInfo:
        return next(k for k in self.queries.key_infos(tenant_id) if k.version == version)

    # -- compromise ---------------------------------------------------------------------

    def compromise(self, tenant_id: str, version: int, reason: str, actor: Actor) -> TenantKeyInfo:
        """Never use ``version`` again; a compromised active version is replaced at once."""
        who = actor_dict(actor)

        def attempt(n: int) -> None:
            keyring = self._keyring(tenant_id)
            key = keyring.keys.get(version)
            if key is None:
                raise InvalidInput(f"tenant {tenant_id!r} has no key version {version}")
            if key.status in ("compromised", "destroyed"):
                return  # already out of use: nothing to record
            changed = self.ledger.for_update(keyring)
            changed.compromise(version, reason, who)
            unit = WriteUnit()
            if key.status == "active":  # (its replacement: wrapped under a known key)
                refuse_an_unknown_master_key(
                    self.ledger, keyring, fresh=True, doing="replace a compromised version"
                )
                data_key, row = self.ledger.new_data_key(tenant_id, changed.next_version)
                changed.rotate(data_key.fingerprint, row.amk_id, who)
                unit.key_material.append(row)
            self.ledger.commit(changed, unit=unit)

        try:
            self.ledger.retrying(attempt)
        except MasterKeyUnavailable as error:  # an active version's replacement needs one
            record_failure(self.ledger, tenant_id, None, "compromise_key", error, version, who)
            raise unavailable(
                error,
                f"cannot replace the compromised active key version {version} of tenant "
                f"{tenant_id!r}",
            ) from None
        self.ledger.forget_data_keys()
        return self._info(tenant_id, version)

    # -- cleanup ------------------------------------------------------------------------

    def cleanup_retired(
        self, older_than_days: int, actor: Actor, progress: Progress | None = None
    ) -> CleanupResult:
        """Destroy retired versions retired at or before now - N days, unless still in use,
        and compromised versions likewise: a compromised version's material, wrapped by a
        master key that may leak later, is what decrypts the values the stream keeps
        (found by review: nothing could destroy it, although the runbook said to)."""
        who = actor_dict(actor)
        # N = 0 is every retired version (SPEC section 3), whatever its time says: a host
        # whose clock runs ahead records a retirement "in the future" of this one's.
        cutoff = (
            to_micros(self.ledger.clock() - timedelta(days=older_than_days))
            if older_than_days
            else None
        )
        outcomes: list[CleanupKeyOutcome] = []
        users_by_tenant: dict[str, Counter[int]] = {}
        for tenant_id, version in self._retired_keys(cutoff):
            outcome, reason = self._destroy_retired(tenant_id, version, who, users_by_tenant)
            outcomes.append(
                CleanupKeyOutcome(
                    tenant_id=tenant_id, version=version, outcome=outcome, reason=reason
                )
            )
            if progress is not None:
                progress(1)
        destroyed = sum(o.outcome == "destroyed" for o in outcomes)
        if destroyed:
            self.ledger.forget_data_keys()
        result = CleanupResult(
            destroyed=destroyed, skipped=len(outcomes) - destroyed, keys=outcomes
        )
        if destroyed or self.ledger.shred_pending():  # (pending: a run stopped before it)
            shred_reporting(self.ledger, result)  # ShredIncomplete names `keyledger db shred`
        return result

    @read_model_errors
    def _retired_keys(self, cutoff: int | None) -> list[tuple[str, int]]:
        """The versions the key inventory lists as retired (or compromised) by ``cutoff``,
        every row checked before any version is destroyed. A version edited to text in
        kl_keys failed the cleanup with a pydantic traceback (its outcome could not be
        built), after destroying whatever versions were listed before it (found by
        review): now it fails first, as ``StorageError`` naming the rebuild that repairs it."""
        rows = self.queries.retired_keys(cutoff)
        for tenant_id, version in rows:
            if type(tenant_id) is not str or type(version) is not int:
                raise TypeError("a key inventory row of another type")
        return rows

    def _destroy_retired(
        self, tenant_id: str, version: int, who: ActorDict, users_by_tenant: dict[str, Counter[int]]
    ) -> tuple[Literal["destroyed", "skipped"], str | None]:
        def attempt(n: int) -> tuple[Literal["destroyed", "skipped"], str | None]:
            keyring = self._keyring(tenant_id)
            key = keyring.keys.get(version)
            if key is None:  # the key inventory lists a version the stream does not have
                return "skipped", "not in the tenant's keyring (run drift diagnose)"
            if key.status not in CLEANED_UP:
                return "skipped", f"no longer retired ({key.status})"
            if n == 0:  # (a retired version gains no users: checked once, outside the lock)
                listed = self.queries.key_users(tenant_id, version)
                if listed:
                    return "skipped", str(KeyInUse.of(tenant_id, version, listed))
                users = self._users_in_stream(tenant_id, users_by_tenant)[version]
                if users:
                    return "skipped", str(KeyInUse.of(tenant_id, version, users)) + (
                        " by its events, which the catalog does not show: run "
                        "`keyledger projections rebuild` and `keyledger audit verify`"
                    )
            changed = self.ledger.for_update(keyring)
            changed.destroy(version, "cleanup of retired key versions", who)
            unit = WriteUnit(
                require_unused=[(tenant_id, version)],
                material_deletions=[(tenant_id, version, None)],
            )
            try:
                self.ledger.commit(changed, unit=unit)
            except KeyInUse as error:
                return "skipped", str(error)
            return "destroyed", None

        return self.ledger.retrying(attempt)

    def _users_in_stream(self, tenant_id: str, known: dict[str, Counter[int]]) -> Counter[int]:
        """The live secrets of the tenant by key version, by their events, not by the
        catalog: the catalog is a read model that anyone who can write the database can
        edit, and a row changed to another key version (or removed) would let the
        destruction of a key still in use through (found by review). Asked only where
        the catalog shows a retired version unused, once per tenant and cleanup
        (``known``)."""
        users = known.get(tenant_id)
        if users is None:
            users = known[tenant_id] = Counter()
            for aggregate_id in secret_ids_in_stream(self.ledger, tenant_id):
                secret = self.ledger.secret_by_id(aggregate_id, fresh=True)  # (not cached:
                # another process may have moved it to another key since)
                if secret is not None and secret.tenant_id == tenant_id and not secret.deleted:
                    users[secret.key_version] += 1  # (an id prefix another tenant shares)
        return users

    # -- erasure ------------------------------------------------------------------------

    def erase_tenant(self, tenant_id: str, confirm: bool, actor: Actor) -> list[int]:
        """Destroy every key version of the tenant; its values become unrecoverable."""
        if not confirm:
            raise ConfirmationRequired(
                f"erasing tenant {tenant_id!r} destroys every value it stored: confirm it"
            )
        who = actor_dict(actor)

        def attempt(n: int) -> list[int]:
            keyring = self.ledger.keyring(tenant_id, fresh=True)  # (see _keyring)
            if keyring is None or all(k.status == "destroyed" for k in keyring.keys.values()):
                return []  # nothing left to destroy: erasing again records nothing
            changed = self.ledger.for_update(keyring)
            versions = changed.erase("tenant erasure", who)
            unit = WriteUnit(
                material_deletions=[(tenant_id, v, None) for v in sorted(keyring.keys)]
            )
            self.ledger.commit(changed, unit=unit)
            return versions

        versions = self.ledger.retrying(attempt)
        self.ledger.forget_data_keys()
        shred_reporting(self.ledger, versions)
        return versions

    # -- master-key rewrap --------------------------------------------------------------

    def rewrap(
        self,
        actor: Actor,
        progress: Progress | None = None,
        tenant_id: str | None = None,
        *,
        shred: bool = True,
    ) -> RewrapResult:
        """Wrap every usable key version under the current AMK; resumable, values untouched.
        Then shred the store (``shred=False``: the caller does, as a drift repair)."""
        who = actor_dict(actor)
        amk = self.ledger.current_master_key()
        rows_by_tenant: dict[str, list[KeyMaterialRow]] = {}
        for row in self.queries.usable_key_material(tenant_id):
            rows_by_tenant.setdefault(row.tenant_id, []).append(row)
        rewrapped = current = 0
        failures: list[RewrapFailure] = []
        for tenant_id, rows in rows_by_tenant.items():
            done, fresh_ok, failed = self._rewrap_tenant(tenant_id, amk.amk_id, who)
            rewrapped, current = rewrapped + done, current + fresh_ok
            failures += failed
            if progress:
                progress(len(rows))
        result = RewrapResult(
            amk_id=amk.amk_id,
            rewrapped=rewrapped,
            already_current=current,
            failed=len(failures),
            failures=[failure.describe() for failure in failures],
            failed_versions=failures,
        )
        # The copies wrapped by the old master key leave the files (also those of a run
        # stopped between its commit and its shred).
        if shred and (rewrapped or self.ledger.shred_pending()):
            shred_reporting(self.ledger, result)
        return result

    def _rewrap_tenant(
        self, tenant_id: str, amk_id: str, who: ActorDict
    ) -> tuple[int, int, list[RewrapFailure]]:
        amk = self.ledger.current_master_key()

        def attempt(n: int) -> tuple[int, int, list[RewrapFailure]]:
            keyring = self._keyring(tenant_id)
            changed = self.ledger.for_update(keyring)
            unit = WriteUnit()
            current, failures = 0, list[RewrapFailure]()
            # The tenant's material as it is now, not as the run found it at its start:
            # a version destroyed meanwhile (an erasure, a cleanup) or re-wrapped by
            # another run is not re-wrapped again (the keyring's version, checked at the
            # commit, keeps the two in step).
            for row in self.queries.usable_key_material(tenant_id):
                key = keyring.keys.get(row.version)
                if key is None or key.key_id != row.key_id:
                    continue  # orphaned material: left to the drift repair
                if key.status not in ("active", "retired"):
                    continue  # compromised or destroyed since: nothing to re-wrap
                if row.amk_id == amk_id and key.amk_id == amk_id:
                    current += 1
                    continue
                old = self.ledger.master_keys.get(row.amk_id)
                wrapped: bytes | None = None
                reason: RewrapFailureReason = "unknown_master_key"
                if old is not None:
                    try:
                        wrapped = _rewrapped(old, amk, tenant_id, row.version, row.wrapped)
                    except DecryptionFailed:
                        reason = "does_not_unwrap"
                if wrapped is None:
                    failures.append(
                        RewrapFailure(
                            tenant_id=tenant_id,
                            version=row.version,
                            amk_id=row.amk_id,
                            reason=reason,
                        )
                    )
                    continue
                unit.material_rewraps.append(
                    KeyMaterialRow(
                        tenant_id, row.version, row.key_id, amk_id, wrapped, row.created_at
                    )
                )
                changed.rewrap(row.version, amk_id, who)
            if unit.material_rewraps:
                self.ledger.commit(changed, unit=unit)
            return len(unit.material_rewraps), current, failures

        return self.ledger.retrying(attempt)


def shred_reporting(ledger: Ledger, result: object) -> None:
    """``ledger.shred()``; a ``ShredIncomplete`` carries ``result``, what the operation
    completed before it, so that the caller can still report it."""
    try:
        ledger.shred()
    except ShredIncomplete as error:
        error.result = result
        raise


def _rewrapped(
    old: MasterKey, new: MasterKey, tenant_id: str, version: int, wrapped: bytes
) -> bytes:
    """``wrapped`` unwrapped with ``old`` and wrapped with ``new``. The plain data key
    lives only in this frame, never in one that goes on to commit: an error there, with
    its traceback's local variables recorded (error trackers do), shows no key."""
    raw = old.unwrap(tenant_id, version, wrapped)
    return new.wrap(tenant_id, version, raw)
