"""keyledger: per-tenant secrets with envelope encryption on an event-sourced audit stream."""

from keyledger._version import __version__
from keyledger.context import super_admin, tenant
from keyledger.errors import (
    AuditTampered,
    ConfirmationRequired,
    DecryptionFailed,
    InvalidInput,
    InvalidMasterKey,
    KeyInUse,
    KeyledgerError,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretExpired,
    SecretKeyDriftError,
    SecretNotFound,
    StorageError,
    TenantRequired,
)
from keyledger.models import (
    AuditEntry,
    CleanupResult,
    DriftIssue,
    DriftReport,
    KeyDue,
    ReencryptResult,
    RepairResult,
    Secret,
    SecretInfo,
    TenantKeyInfo,
)
from keyledger.service import SecretService

__all__ = [
    "AuditEntry",
    "AuditTampered",
    "CleanupResult",
    "ConfirmationRequired",
    "DecryptionFailed",
    "DriftIssue",
    "DriftReport",
    "InvalidInput",
    "InvalidMasterKey",
    "KeyDue",
    "KeyInUse",
    "KeyledgerError",
    "MasterKeyUnavailable",
    "ReencryptResult",
    "RepairResult",
    "Secret",
    "SecretDisabled",
    "SecretExpired",
    "SecretInfo",
    "SecretKeyDriftError",
    "SecretNotFound",
    "SecretService",
    "StorageError",
    "TenantKeyInfo",
    "TenantRequired",
    "__version__",
    "super_admin",
    "tenant",
]
