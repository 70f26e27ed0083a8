"""The keyledger error hierarchy.

Messages name the tenant, the secret or the key version; never a value, a key or an AMK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keyledger.models import DriftReport


class KeyledgerError(Exception):
    """Base class of every error keyledger raises on purpose."""


class InvalidInput(KeyledgerError, ValueError):
    """A caller gave a value keyledger refuses; nothing was written."""


class TenantRequired(KeyledgerError):
    """A tenant-scoped call was made outside any ``tenant(...)`` block."""


class SecretNotFound(KeyledgerError, LookupError):
    """No live secret of that name exists in the tenant."""


class SecretDisabled(KeyledgerError):
    """The secret exists but is disabled."""


class SecretExpired(KeyledgerError):
    """The secret exists but its expiry has passed."""


class MasterKeyUnavailable(KeyledgerError):
    """No application master key is configured, and the operation needs one."""


class InvalidMasterKey(KeyledgerError):
    """A configured master key is malformed (length, hex, all zeros)."""


class DecryptionFailed(KeyledgerError):
    """A ciphertext could not be decrypted (tampered, wrong key, unusable key)."""


class SecretKeyDriftError(DecryptionFailed):
    """Decryption failed and a drift diagnosis found errors; ``report`` says which.

    ``report`` is None only in an error rebuilt from its message alone, as ``cls(*args)``
    (what Celery's JSON result backend does): keyledger always gives one."""

    # Optional so that ``cls(*error.args)`` (``args`` is the message alone) rebuilds this
    # error, not a plain Exception in its place; pickling carries the report (__reduce__).
    def __init__(self, message: str, report: DriftReport | None = None) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(
        self,
    ) -> tuple[type[SecretKeyDriftError], tuple[str, DriftReport | None], dict[str, Any]]:
        # Exceptions pickle as cls(*args): the report must travel too (multiprocessing),
        # and so must the rest of the instance's state (``add_note``'s notes, say).
        return type(self), (str(self.args[0]), self.report), dict(vars(self))


class ConfirmationRequired(KeyledgerError):
    """A destructive operation was asked for without its explicit confirmation."""


class KeyInUse(KeyledgerError):
    """A key version cannot be destroyed: live secrets are still encrypted under it."""

    @classmethod
    def of(cls, tenant_id: str, version: int, users: int) -> KeyInUse:
        return cls(
            f"key version {version} of tenant {tenant_id!r} still encrypts {users} live secret(s)"
        )


class StorageError(KeyledgerError):
    """The store failed (locked too long, disk, connection); nothing was half written."""


# The StorageError message of a call on a service whose close() was called.
STORE_CLOSED = "the store is closed: SecretService.close() was called"


class ShredIncomplete(KeyledgerError):
    """The operation completed (its destruction, erasure or rewrap is recorded and in
    force), but the store could not yet rewrite the pages that held the deleted or
    replaced key material: those bytes may stay in the database files until the store
    is shredded (``keyledger db shred``), once no reader holds an older snapshot, and on
    PostgreSQL by the owner of ``kl_key_material``. Not a ``StorageError``: something
    *was* written.

    ``result`` is what the operation returns when it completes (``erase_tenant``'s
    destroyed versions, ``cleanup_retired_keys``' or ``rewrap_master_key``'s result), or
    None: a rerun finds nothing left to do and could no longer report it (found by
    review)."""

    result: Any = None


__all__ = [
    "AuditTampered",
    "ConfirmationRequired",
    "DecryptionFailed",
    "InvalidInput",
    "InvalidMasterKey",
    "KeyInUse",
    "KeyledgerError",
    "MasterKeyUnavailable",
    "SecretDisabled",
    "SecretExpired",
    "SecretKeyDriftError",
    "SecretNotFound",
    "ShredIncomplete",
    "StorageError",
    "TenantRequired",
]


class AuditTampered(KeyledgerError):
    """The audit stream is not what was sealed (a malformed checkpoint stops sealing);
    ``keyledger audit verify`` names every finding."""
