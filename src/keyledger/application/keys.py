"""Commands on a tenant's keys: rotation and re-encryption under the active version."""

from __future__ import annotations

from collections.abc import Callable

from keyledger.application.ledger import Conflict, Ledger
from keyledger.application.queries import Queries
from keyledger.application.secrets import actor_dict, record_failure, unavailable
from keyledger.context import Actor
from keyledger.domain.access import AuditRecord
from keyledger.domain.ids import ActorDict
from keyledger.domain.instant import one_instant
from keyledger.domain.keyring import KeyVersion, TenantKeyring
from keyledger.domain.secret import Secret
from keyledger.errors import DecryptionFailed, KeyledgerError, MasterKeyUnavailable
from keyledger.infrastructure.crypto import DataKey
from keyledger.infrastructure.write_unit import WriteUnit
from keyledger.models import ReencryptResult, TenantKeyInfo
from keyledger.validation import check_new_identifier

REENCRYPT_BATCH = 200

Progress = Callable[[int], None]


class KeyCommands:
    """Rotation and re-encryption; both are safe to interrupt and rerun."""

    def __init__(self, ledger: Ledger, queries: Queries) -> None:
        self.ledger = ledger
        self.queries = queries

    def rotate(self, tenant_id: str, actor: Actor) -> TenantKeyInfo:
        """Create version N+1 as active and retire N, in one event; never two active."""
        info = self._rotate(tenant_id, actor, None)
        assert info is not None  # (only a conditional rotation can be without effect)
        return info

    def rotate_from(self, tenant_id: str, version: int, actor: Actor) -> TenantKeyInfo | None:
        """Rotate only while ``version`` is still the active one, as decided on the
        keyring the write commits against; None (no rotation) when another rotation came
        first (two runs of ``keys rotate --due`` at once, say)."""
        return self._rotate(tenant_id, actor, version)

    def _rotate(self, tenant_id: str, actor: Actor, only_from: int | None) -> TenantKeyInfo | None:
        who = actor_dict(actor)
        action = "rotate_key"  # a tenant's first version is audited as create_key

        def attempt(n: int) -> KeyVersion | None:
            nonlocal action
            keyring = self.ledger.keyring(tenant_id, fresh=n > 0)
            if only_from is not None:
                active = keyring.active if keyring is not None else None
                if active is None or active.version != only_from:
                    if n == 0:
                        raise Conflict  # decided on fresh state only
                    return None
            action = "create_key" if keyring is None else "rotate_key"
            if keyring is None:
                check_new_identifier("tenant_id", tenant_id)
                data_key, row = self.ledger.new_data_key(tenant_id, 1)
                rotated = TenantKeyring.create(tenant_id, data_key.fingerprint, row.amk_id, who)
            else:
                refuse_an_unknown_master_key(self.ledger, keyring, fresh=n > 0, doing="rotate")
                rotated = self.ledger.for_update(keyring)
                data_key, row = self.ledger.new_data_key(tenant_id, rotated.next_version)
                rotated.rotate(data_key.fingerprint, row.amk_id, who)
            self.ledger.commit(rotated, unit=WriteUnit(key_material=[row]))
            self.ledger.remember_data_key(data_key)
            return rotated.keys[data_key.version]

        try:
            version = self.ledger.retrying(attempt)
        except MasterKeyUnavailable as error:  # no master key to wrap a new version with
            record_failure(self.ledger, tenant_id, None, action, error, None, who)
            raise unavailable(error, f"cannot rotate the key of tenant {tenant_id!r}") from None
        if version is None:
            return None
        # The new version as the rotation committed it: the read model may already show
        # a later rotation (or a cleanup) of another process or thread.
        return TenantKeyInfo(
            tenant_id=tenant_id,
            version=version.version,
            status="active",
            amk_id=version.amk_id,
            created_at=version.created_at,
            retired_at=None,
            secret_count=0,  # nothing is encrypted under a version before it exists
        )

    def reencrypt_all(
        self, tenant_id: str, actor: Actor, progress: Progress | None = None
    ) -> ReencryptResult:
        """Move every live secret onto the active key version, in batched appends."""
        who = actor_dict(actor)
        keyring = self.ledger.keyring(tenant_id, fresh=True)
        live = self.queries.live_secret_versions(tenant_id)
        if keyring is None or not live:
            return ReencryptResult(success=0, failed=0)
        active = keyring.active
        todo = [name for name, version in live if active is None or version != active.version]
        if todo:  # no master key is a configuration fault, not a failure of each secret
            try:  # (SPEC section 1: the first operation that needs it raises)
                self.ledger.current_master_key()
                # ... and so is a master key that cannot open the active version (the
                # wrong one deployed): each secret failed, one audited failure apiece
                # (found by review).
                refuse_an_unknown_master_key(
                    self.ledger, keyring, fresh=True, doing="re-encrypt onto it"
                )
            except MasterKeyUnavailable as error:
                record_failure(self.ledger, tenant_id, None, "update", error, None, who)
                context = f"cannot re-encrypt the secrets of tenant {tenant_id!r}"
                raise unavailable(error, context) from None
        success, failed = len(live) - len(todo), 0
        if progress and success:
            progress(success)
        for start in range(0, len(todo), REENCRYPT_BATCH):
            batch = todo[start : start + REENCRYPT_BATCH]
            try:
                with one_instant():  # (a batch is one write: its events share a time)
                    ok, bad = self._batch(tenant_id, batch, who, fresh=False)
            except Conflict:
                ok, bad = self._one_by_one(tenant_id, batch, who)
            success, failed = success + ok, failed + bad
            if progress:
                progress(len(batch))
        return ReencryptResult(success=success, failed=failed)

    def _one_by_one(self, tenant_id: str, names: list[str], who: ActorDict) -> tuple[int, int]:
        ok = bad = 0
        for name in names:

            def attempt(n: int, name: str = name) -> tuple[int, int]:
                return self._batch(tenant_id, [name], who, fresh=n > 0)

            a, b = self.ledger.retrying(attempt)
            ok, bad = ok + a, bad + b
        return ok, bad

    def _batch(
        self, tenant_id: str, names: list[str], who: ActorDict, *, fresh: bool
    ) -> tuple[int, int]:
        keyring = self.ledger.keyring(tenant_id, fresh=fresh)
        assert keyring is not None
        active = keyring.active
        target: DataKey | None = None
        written: list[Secret | AuditRecord.OperationFailed] = []
        ok = bad = 0
        for name in names:
            secret = self.ledger.secret(tenant_id, name, fresh=fresh)
            if secret is None or secret.deleted:
                if not fresh:  # the catalog listed it live: the cached copy may be stale
                    raise Conflict
                continue  # deleted since it was listed
            if active is not None and secret.key_version == active.version:
                ok += 1
                continue
            try:
                if active is None:
                    raise DecryptionFailed(f"tenant {tenant_id!r} has no active key version")
                target = target or self.ledger.data_key(tenant_id, active)
                old = keyring.keys.get(secret.key_version)
                if old is None:
                    raise DecryptionFailed(
                        f"secret {name!r} names missing key version {secret.key_version}"
                    )
                old_key = self.ledger.data_key(tenant_id, old)
                envelope = _reencrypted(old_key, target, name, secret.envelope)
            except (DecryptionFailed, MasterKeyUnavailable) as error:
                if not fresh:  # decided on cached secrets, which may name a version
                    raise Conflict from None  # destroyed since: look again, one by one
                written.append(_failure(tenant_id, name, secret.key_version, error, who))
                bad += 1
                continue
            moved = self.ledger.for_update(secret)
            moved.reencrypt(envelope, target.version, who)
            written.append(moved)
            ok += 1
        if written:
            unit = WriteUnit(expected={keyring.id: keyring.version})
            self.ledger.commit(*written, unit=unit)
        return ok, bad


def _reencrypted(old: DataKey, new: DataKey, name: str, envelope: bytes) -> bytes:
    """``envelope`` decrypted with ``old`` and encrypted with ``new``. The plaintext lives
    only in this frame, never in one that is still running when the batch commits (a
    failed commit's traceback would show it to error trackers)."""
    return new.encrypt(name, old.decrypt(name, envelope))


def _failure(
    tenant_id: str, name: str, key_version: int, error: KeyledgerError, who: ActorDict
) -> AuditRecord.OperationFailed:
    return AuditRecord.failed(tenant_id, name, "update", type(error).__name__, key_version, who)


def refuse_an_unknown_master_key(
    ledger: Ledger, keyring: TenantKeyring, *, fresh: bool, doing: str
) -> None:
    """A new key version is wrapped under the configured master key: when that key
    cannot open the active version (wrapped under a master key that is neither the
    current one nor a previous one), the configuration is most likely wrong, and a new
    version would leave the tenant's keys split between two master keys, the rest of the
    fleet unable to use the active one. The way on when the old master key is lost for
    good is ``drift repair``, not a new version (``doing``: what is refused)."""
    active, master_keys = keyring.active, ledger.master_keys
    if active is None or master_keys.current is None or master_keys.knows(active.amk_id):
        return  # (no master key at all: making the version fails for that)
    if not fresh:
        raise Conflict  # decided on the cached keyring: look again (a rewrap, say)
    raise MasterKeyUnavailable(
        f"the active key version {active.version} is wrapped by master key "
        f"{active.amk_id}, which is not configured: refusing to {doing} under a master "
        "key that may be the wrong one; add it to KEYLEDGER_PREVIOUS_MASTER_KEYS (or, if "
        "it is lost for good, see `keyledger drift diagnose`)"
    )
