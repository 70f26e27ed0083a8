"""DDL of the read models, their tracking table and the key-material table."""

from __future__ import annotations

READ_MODEL_TABLES = ("kl_catalog", "kl_audit", "kl_keys")
TRACKED_READ_MODELS = ("audit",)

READ_MODEL_DDL = (
    """CREATE TABLE IF NOT EXISTS kl_catalog (
        secret_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        disabled INTEGER NOT NULL,
        expired INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        category TEXT,
        description TEXT,
        metadata TEXT NOT NULL,
        version INTEGER NOT NULL,
        key_version INTEGER NOT NULL,
        expires_at INTEGER,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        access_count INTEGER NOT NULL,
        last_accessed_at INTEGER,
        PRIMARY KEY (tenant_id, name)) WITHOUT ROWID""",
    # No secondary indexes on the catalog: key counts and expiry scans read one tenant's
    # primary-key range, while every store would pay for each index in its commit.
    """CREATE TABLE IF NOT EXISTS kl_audit (
        position INTEGER PRIMARY KEY,
        timestamp INTEGER NOT NULL,
        tenant_id TEXT NOT NULL,
        secret_name TEXT,
        action TEXT NOT NULL,
        result TEXT NOT NULL,
        user_id TEXT NOT NULL,
        ip_address TEXT,
        user_agent TEXT,
        key_version INTEGER,
        details TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS kl_audit_by_tenant ON kl_audit (tenant_id, position)",
    "CREATE INDEX IF NOT EXISTS kl_audit_by_secret ON kl_audit (tenant_id, secret_name, position)",
    """CREATE TABLE IF NOT EXISTS kl_keys (
        tenant_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        amk_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        retired_at INTEGER,
        PRIMARY KEY (tenant_id, version))""",
)

SUPPORT_DDL = (
    """CREATE TABLE IF NOT EXISTS kl_tracking (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL)""",
    # Wrapped TDEKs live here, apart from the immutable stream, so destroying one is real.
    # Keyed by key_id too: a rotation that loses a race never overwrites the winner's row.
    """CREATE TABLE IF NOT EXISTS kl_key_material (
        tenant_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        amk_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, version, key_id))""",
)

SEED_TRACKING = tuple(
    f"INSERT OR IGNORE INTO kl_tracking (name, position) VALUES ('{name}', 0)"
    for name in TRACKED_READ_MODELS
)
