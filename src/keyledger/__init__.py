"""keyledger: per-tenant secrets with envelope encryption on an event-sourced audit stream."""

import os as _os

if not hasattr(_os, "register_at_fork"):  # (its modules register fork hooks at import)
    raise ImportError(
        "keyledger needs a POSIX system (Linux, macOS): it keeps its database connections "
        "safe across fork() with os.register_at_fork, which this platform lacks"
    )

from keyledger._version import __version__
from keyledger.application.lifecycle import RewrapResult
from keyledger.application.schema_check import SchemaStatus
from keyledger.context import Actor, TenantScope, super_admin, tenant
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
    ShredIncomplete,
    StorageError,
    TenantRequired,
)
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.models import (
    AuditEntry,
    Checkpoint,
    CleanupKeyOutcome,
    CleanupResult,
    DriftIssue,
    DriftReport,
    KeyDue,
    KeyVersionAsOf,
    ReadModelCheck,
    ReadModelDifference,
    ReencryptResult,
    RepairResult,
    SealResult,
    Secret,
    SecretInfo,
    TableComparison,
    TamperFinding,
    TenantKeyInfo,
    TenantState,
    VerifyReport,
)
from keyledger.service import SecretService

__all__ = [
    "Actor",
    "AuditEntry",
    "AuditTampered",
    "Checkpoint",
    "CleanupKeyOutcome",
    "CleanupResult",
    "ConfirmationRequired",
    "DecryptionFailed",
    "DriftIssue",
    "DriftReport",
    "InvalidInput",
    "InvalidMasterKey",
    "KeyDue",
    "KeyInUse",
    "KeyVersionAsOf",
    "KeyledgerError",
    "KeyledgerSettings",
    "MasterKeyUnavailable",
    "ReadModelCheck",
    "ReadModelDifference",
    "ReencryptResult",
    "RepairResult",
    "RewrapResult",
    "SchemaStatus",
    "SealResult",
    "Secret",
    "SecretDisabled",
    "SecretExpired",
    "SecretInfo",
    "SecretKeyDriftError",
    "SecretNotFound",
    "SecretService",
    "ShredIncomplete",
    "StorageError",
    "TableComparison",
    "TamperFinding",
    "TenantKeyInfo",
    "TenantRequired",
    "TenantScope",
    "TenantState",
    "VerifyReport",
    "__version__",
    "super_admin",
    "tenant",
]
