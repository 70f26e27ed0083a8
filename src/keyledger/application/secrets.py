"""Commands on secrets: store, retrieve, disable, enable, delete."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from keyledger.application.drift import diagnose
from keyledger.application.ledger import Conflict, DecideUnlocked, Ledger
from keyledger.application.row_errors import UNREADABLE_ROW
from keyledger.context import Actor
from keyledger.domain.access import AuditRecord
from keyledger.domain.ids import ActorDict, secret_id
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret
from keyledger.errors import (
    DecryptionFailed,
    KeyledgerError,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretExpired,
    SecretKeyDriftError,
    SecretNotFound,
)
from keyledger.infrastructure.crypto import DataKey
from keyledger.infrastructure.write_unit import KeyMaterialRow, WriteUnit
from keyledger.models import Secret as SecretModel
from keyledger.models import SecretInfo, trusted
from keyledger.projections.timeutil import optional_datetime
from keyledger.validation import check_new_identifier, is_new_identifier

logger = logging.getLogger(__name__)


def actor_dict(actor: Actor) -> ActorDict:
    return {
        "user_id": actor.user_id,
        "ip_address": actor.ip_address,
        "user_agent": actor.user_agent,
    }


class StoreOptions(NamedTuple):
    """Store options; None means "left out: keep the old value" (see README). A named
    tuple: immutable, and built at a fraction of a frozen dataclass's cost on every store."""

    category: str | None = None
    description: str | None = None
    expires_at: datetime | None = None
    clear_expiry: bool = False
    metadata: dict[str, str] | None = None


def info_fields(
    secret: Secret, now: datetime, access_count: int, last_accessed_at: datetime | None
) -> dict[str, Any]:
    """The SecretInfo fields of an aggregate (validated, typed state), in the model's
    order: ``trusted`` takes the dict as it is (tests hold the order)."""
    return {
        "name": secret.name,
        "category": secret.category,
        "description": secret.description,
        "metadata": dict(secret.metadata),
        "status": secret.status_at(now),
        "version": secret.value_version,
        "key_version": secret.key_version,
        "expires_at": secret.expires_at,
        "created_at": secret.created_at,
        "updated_at": secret.updated_at,
        "access_count": access_count,
        "last_accessed_at": last_accessed_at,
    }


def secret_info(
    secret: Secret, now: datetime, access_count: int, last_accessed_at: int | None
) -> SecretInfo:
    """The info of a secret just stored, with the access count and time its catalog row
    returned. The store has committed: a row edited to hold something unreadable there
    must not make it look failed (its caller would store again), so such a count or time
    is reported as none, and logged."""
    try:
        accessed = optional_datetime(last_accessed_at)
    except UNREADABLE_ROW as error:
        logger.warning("unreadable last access time in the catalog: %s", type(error).__name__)
        accessed = None
    if type(access_count) is not int:
        logger.warning("unreadable access count in the catalog")
        access_count = 0
    return trusted(SecretInfo, info_fields(secret, now, access_count, accessed))


def secret_model(
    secret: Secret,
    now: datetime,
    access_count: int,
    last_accessed_at: datetime | None,
    value: str | bytes,
) -> SecretModel:
    """The retrieved secret: its info fields, then its value (the model's order)."""
    fields = info_fields(secret, now, access_count, last_accessed_at)
    fields["value"] = value
    return trusted(SecretModel, fields)


class SecretCommands:
    """The write side for secrets; every outcome, refused or failed, is an event."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # -- store --------------------------------------------------------------------------

    def store(
        self, tenant_id: str, name: str, value: str | bytes, options: StoreOptions, actor: Actor
    ) -> SecretInfo:
        who = actor_dict(actor)
        try:
            try:  # attempt 0 inline: the common case, without the retry loop's layers
                return self._store_once(tenant_id, name, value, options, who, fresh=False)
            except Conflict:
                pass
            return self.ledger.retrying(
                lambda n: self._store_once(tenant_id, name, value, options, who, fresh=True),
                first=1,
                escalate=True,
            )
        except (MasterKeyUnavailable, DecryptionFailed) as error:
            existing = self.ledger.secret(tenant_id, name, fresh=True)
            action = "create" if existing is None or existing.deleted else "update"
            if action == "create":  # a name that could not be created is refused, not
                self._refuse_unknown_lookalikes(tenant_id, name)  # audited
            record_failure(self.ledger, tenant_id, name, action, error, None, who)
            if isinstance(error, MasterKeyUnavailable):
                context = f"cannot store secret {name!r} of tenant {tenant_id!r}"
                raise unavailable(error, context) from None
            raise

    def _active_data_key(
        self, tenant_id: str, who: ActorDict, fresh: bool
    ) -> tuple[TenantKeyring | None, TenantKeyring | None, DataKey, list[KeyMaterialRow]]:
        """(keyring read, keyring written, active data key, material to insert)."""
        keyring = self.ledger.keyring(tenant_id, fresh=fresh)
        if keyring is None:
            check_new_identifier("tenant_id", tenant_id)
            data_key, row = self.ledger.new_data_key(tenant_id, 1)
            created = TenantKeyring.create(tenant_id, data_key.fingerprint, row.amk_id, who)
            return None, created, data_key, [row]
        active = keyring.active
        if active is None:
            rotated = self.ledger.for_update(keyring)
            data_key, row = self.ledger.new_data_key(tenant_id, rotated.next_version)
            rotated.rotate(data_key.fingerprint, row.amk_id, who)
            return keyring, rotated, data_key, [row]
        try:
            return keyring, None, self.ledger.data_key(tenant_id, active), []
        except (DecryptionFailed, MasterKeyUnavailable):
            if not fresh:  # failures are decided on fresh state only: the cached keyring
                raise Conflict from None  # may name a version destroyed since (a cleanup)
            # The keyring and its material are two reads: an erasure or cleanup committed
            # between them leaves the material gone under a keyring read before. Once the
            # keyring is seen unmoved after the material was looked for, the failure is
            # real (found by review: a store racing an erasure failed, audited as drift).
            again = self.ledger.keyring(tenant_id, fresh=True)
            if again is None or again.version != keyring.version:
                raise Conflict from None
            master_keys = self.ledger.master_keys
            if master_keys.current is not None and not master_keys.knows(active.amk_id):
                # What rotate and re-encrypt raise for it: an application alerting on
                # MasterKeyUnavailable ("a key not deployed") saw DecryptionFailed from
                # the commonest call of a misdeployment (found by review).
                raise MasterKeyUnavailable(
                    f"the active key version {active.version} of tenant {tenant_id!r} is "
                    f"wrapped by master key {active.amk_id}, which is not configured; add "
                    "it to KEYLEDGER_PREVIOUS_MASTER_KEYS"
                ) from None
            raise

    def _store_once(
        self,
        tenant_id: str,
        name: str,
        value: str | bytes,
        options: StoreOptions,
        who: ActorDict,
        *,
        fresh: bool,
    ) -> SecretInfo:
        keyring, written_keyring, data_key, material = self._active_data_key(tenant_id, who, fresh)
        # A keyring written with the secret (its first key, or a rotation to an active
        # one): both events of the write take one instant (domain/instant.py). Passed on
        # explicitly: the first attempt runs outside one_instant(), which every store
        # would pay for, though few write a keyring.
        instant = written_keyring.modified_on if written_keyring is not None else None
        envelope = data_key.encrypt(name, value)
        # A name not in the cache is presumed new: if it exists after all, appending its
        # version 1 conflicts, and the retry loads it. New names thus cost one transaction.
        if fresh or not is_new_identifier(name):  # (such a name must exist: see below)
            cached = self.ledger.secret(tenant_id, name, fresh=True)
        else:
            cached = self.ledger.cached_secret(tenant_id, name)
        if cached is None:
            check_new_identifier("name", name)
            secret = Secret.create(
                tenant_id=tenant_id,
                name=name,
                envelope=envelope,
                key_version=data_key.version,
                category=options.category or None,
                description=options.description or None,
                metadata=options.metadata or {},
                expires_at=None if options.clear_expiry else options.expires_at,
                actor=who,
                timestamp=instant,
            )
        else:
            if cached.deleted:  # stored again: a new secret under that name
                check_new_identifier("name", name)
            secret = self.ledger.for_update(cached)
            keep = not secret.deleted
            expires_at = options.expires_at
            if expires_at is None and keep and not options.clear_expiry:
                expires_at = secret.expires_at
            secret.store(
                envelope=envelope,
                key_version=data_key.version,
                category=_choose(options.category, secret.category, keep),
                description=_choose(options.description, secret.description, keep),
                metadata=(
                    options.metadata
                    if options.metadata is not None
                    else (dict(secret.metadata) if keep else {})
                ),
                expires_at=expires_at,
                now=self.ledger.clock(),
                actor=who,
                timestamp=instant,
            )
        unit = WriteUnit(key_material=material)
        if keyring is not None and written_keyring is None:
            unit.expected[keyring.id] = keyring.version
        written = [written_keyring] if written_keyring is not None else []
        self.ledger.commit(*written, secret, unit=unit)
        if material:
            self.ledger.remember_data_key(data_key)
        outcome = unit.outcome
        return secret_info(
            secret, self.ledger.clock(), outcome.access_count or 0, outcome.last_accessed_at
        )

    # -- retrieve -----------------------------------------------------------------------

    def retrieve(self, tenant_id: str, name: str, actor: Actor) -> SecretModel:
        who = actor_dict(actor)
        try:  # attempt 0 outside the retry loop: the common case, with fewer layers
            return self._announced_retrieve(tenant_id, name, who, 0)
        except Conflict:
            pass
        return self.ledger.retrying(
            lambda n: self._announced_retrieve(tenant_id, name, who, n),
            first=1,
            escalate=True,
        )

    def _announced_retrieve(self, tenant_id: str, name: str, who: ActorDict, n: int) -> SecretModel:
        """One attempt, announced to the group commit (not the back-off between two)."""
        with self.ledger.read_coming():
            return self._retrieve_once(tenant_id, name, who, n > 0)

    def _retrieve_once(self, tenant_id: str, name: str, who: ActorDict, fresh: bool) -> SecretModel:
        now = self.ledger.clock()
        secret = self.ledger.secret(tenant_id, name, fresh=fresh)
        keyring = self.ledger.keyring(tenant_id, fresh=fresh)
        if secret is None or secret.deleted:
            if not fresh:
                raise Conflict  # refusals are decided on fresh state only
            self._refuse_missing(tenant_id, name, secret, who)
        assert secret is not None
        status = secret.status_at(now)
        if status != "active":
            if not fresh:
                raise Conflict
            self._refuse(secret, keyring, status, who)
        try:  # held out of sight until the read is recorded (see _Withheld)
            value = _Withheld(self._decrypt(secret, keyring))
        except (DecryptionFailed, MasterKeyUnavailable) as error:
            if not fresh:
                raise Conflict from None
            if self.ledger.holding_exclusively and isinstance(error, DecryptionFailed):
                raise DecideUnlocked from None  # (its diagnosis reads the whole tenant)
            raised = self._explain(error, tenant_id, name)
            record_failure(
                self.ledger,
                tenant_id,
                name,
                "read",
                raised,
                secret.key_version,
                who,
                expected=_versions(secret, keyring),
            )
            if isinstance(raised, MasterKeyUnavailable):
                raised = unavailable(raised, f"cannot read secret {name!r} of tenant {tenant_id!r}")
            raise raised from None
        read = self.ledger.reads.read(
            tenant_id,
            name,
            secret.value_version,
            secret.key_version,
            who,
            expected=_versions(secret, keyring),
        )
        self.ledger.commit_read(read)
        # The read's own instant (read.at), when it counted, as the datetime it came from.
        accessed = read.view.timestamp if read.last_accessed_at is not None else None
        return secret_model(secret, now, read.access_count or 0, accessed, value.value)

    def _explain(self, error: KeyledgerError, tenant_id: str, name: str) -> KeyledgerError:
        """A decryption failure that a drift diagnosis explains becomes SecretKeyDriftError."""
        if not isinstance(error, DecryptionFailed):
            return error
        report = diagnose(self.ledger, tenant_id, [name])
        if report.ok:
            return error
        errors = [issue for issue in report.issues if issue.severity == "error"]
        # The secret's own issue says most (its key version destroyed, say), then the tenant's.
        cause = next((issue for issue in errors if issue.secret_name == name), errors[0])
        return SecretKeyDriftError(
            f"secret {name!r} of tenant {tenant_id!r} cannot be decrypted: {cause.message}"
            f" ({', '.join(sorted({issue.code for issue in errors}))})",
            report,
        )

    def _decrypt(self, secret: Secret, keyring: TenantKeyring | None) -> str | bytes:
        key = keyring.keys.get(secret.key_version) if keyring is not None else None
        if key is None:
            raise DecryptionFailed(
                f"secret {secret.name!r} of tenant {secret.tenant_id!r} names key version "
                f"{secret.key_version}, which does not exist"
            )
        data_key = self.ledger.data_key(secret.tenant_id, key)
        return data_key.decrypt(secret.name, secret.envelope)

    def _refuse_missing(
        self, tenant_id: str, name: str, secret: Secret | None, who: ActorDict
    ) -> None:
        self._refuse_unknown_lookalikes(tenant_id, name)
        expected = {secret_id(tenant_id, name): secret.version if secret is not None else 0}
        error = SecretNotFound(f"no secret {name!r} in tenant {tenant_id!r}")
        record_failure(self.ledger, tenant_id, name, "read", error, None, who, expected=expected)
        raise error

    def _refuse_unknown_lookalikes(self, tenant_id: str, name: str) -> None:
        """A failure is audited under the names asked for. A name that could not name
        anything new (``is_new_identifier``) and names nothing is refused instead
        (``InvalidInput``, nothing written): such names reach the stream only where a
        release before 0.12 made them, never from a mistyped or hostile request."""
        check_new_identifier("name", name)
        if not is_new_identifier(tenant_id) and self.ledger.keyring(tenant_id) is None:
            check_new_identifier("tenant_id", tenant_id)

    def _refuse(
        self, secret: Secret, keyring: TenantKeyring | None, status: str, who: ActorDict
    ) -> None:
        where = f"secret {secret.name!r} of tenant {secret.tenant_id!r}"
        error: KeyledgerError
        written: list[Secret] = []
        if status == "expired":
            error = SecretExpired(f"{where} has expired")
            if not secret.expired:
                expiring = self.ledger.for_update(secret)
                expiring.expire(who)
                written.append(expiring)
        else:
            error = SecretDisabled(f"{where} is disabled")
        record = AuditRecord.denied(secret.tenant_id, secret.name, status, secret.key_version, who)
        unit = WriteUnit(expected=_versions(secret, keyring))
        if written:
            del unit.expected[secret.id]
        self.ledger.commit(*written, record, unit=unit)
        raise error

    # -- status changes -----------------------------------------------------------------

    def change(self, tenant_id: str, name: str, action: str, actor: Actor) -> bool:
        """Run ``disable``, ``enable`` or ``delete``; False when no such live secret."""
        who = actor_dict(actor)

        def attempt(n: int) -> bool:
            secret = self.ledger.secret(tenant_id, name, fresh=n > 0)
            if secret is None or secret.deleted:
                if n == 0:
                    raise Conflict
                self._refuse_unknown_lookalikes(tenant_id, name)
                expected = {secret_id(tenant_id, name): secret.version if secret else 0}
                error = SecretNotFound(f"no secret {name!r} in tenant {tenant_id!r}")
                record_failure(self.ledger, tenant_id, name, action, error, None, who, expected)
                return False
            changed = self.ledger.for_update(secret)
            getattr(changed, action)(who)
            self.ledger.commit(changed)
            return True

        return self.ledger.retrying(attempt, escalate=True)


def unavailable(error: MasterKeyUnavailable, context: str) -> MasterKeyUnavailable:
    """``error`` with what could not be done, naming the tenant and the secret or key."""
    return MasterKeyUnavailable(f"{context}: {error}")


def record_failure(
    ledger: Ledger,
    tenant_id: str,
    name: str | None,
    action: str,
    error: Exception,
    key_version: int | None,
    who: ActorDict,
    expected: dict[UUID, int] | None = None,
) -> None:
    """Audit ``action`` as failed with ``error`` (its class name), checked against
    ``expected`` versions when the failure was decided on them."""
    record = AuditRecord.failed(tenant_id, name, action, type(error).__name__, key_version, who)
    ledger.commit(record, unit=WriteUnit(expected=dict(expected or {})))


def _choose(given: str | None, old: str | None, keep: bool) -> str | None:
    if given is not None:
        return given or None
    return old if keep else None


def _versions(secret: Secret, keyring: TenantKeyring | None) -> dict[UUID, int]:
    versions = {secret.id: secret.version}
    if keyring is not None:
        versions[keyring.id] = keyring.version
    return versions


class _Withheld:
    """A decrypted value between its decryption and the commit of its read event.

    If that commit fails, its traceback holds the frame that decrypted, and error
    trackers record a frame's locals by their ``repr``: this holder's shows nothing, so
    a report of a failed read never carries the value the caller did not get."""

    __slots__ = ("value",)

    def __init__(self, value: str | bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<withheld>"
