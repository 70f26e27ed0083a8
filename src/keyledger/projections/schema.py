"""DDL of the read models, their tracking table and the key-material table.

One definition for both stores; only column types and table options differ.
"""

from __future__ import annotations

from typing import Any, Literal

Dialect = Literal["sqlite", "postgres"]

READ_MODEL_TABLES = ("kl_catalog", "kl_audit", "kl_keys")
TRACKED_READ_MODELS = ("audit",)

# ``sorted_text`` is text that listings sort by and page over: by code point on every
# store. SQLite compares text bytewise; PostgreSQL would use the database's locale, and
# listings would come in another order, different from one server to the next.
_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "blob": "BLOB",
        "bigint": "INTEGER",
        "without_rowid": " WITHOUT ROWID",
        "sorted_text": "TEXT",
    },
    "postgres": {
        "blob": "BYTEA",
        "bigint": "BIGINT",
        "without_rowid": "",
        "sorted_text": 'TEXT COLLATE "C"',
    },
}

_TABLES = (
    # No secondary indexes on the catalog: key counts and expiry scans read one tenant's
    # primary-key range, while every store would pay for each index in its commit.
    """CREATE TABLE IF NOT EXISTS kl_catalog{suffix} (
        secret_id TEXT NOT NULL,
        tenant_id {sorted_text} NOT NULL,
        name {sorted_text} NOT NULL,
        disabled INTEGER NOT NULL,
        expired INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        category {sorted_text},
        description TEXT,
        metadata TEXT NOT NULL,
        version INTEGER NOT NULL,
        key_version INTEGER NOT NULL,
        envelope_version INTEGER,
        expires_at {bigint},
        created_at {bigint} NOT NULL,
        updated_at {bigint} NOT NULL,
        access_count {bigint} NOT NULL,
        last_accessed_at {bigint},
        PRIMARY KEY (tenant_id, name)){without_rowid}""",
    """CREATE TABLE IF NOT EXISTS kl_audit{suffix} (
        position {bigint} PRIMARY KEY,
        timestamp {bigint} NOT NULL,
        tenant_id TEXT NOT NULL,
        secret_name TEXT,
        action TEXT NOT NULL,
        result TEXT NOT NULL,
        user_id TEXT NOT NULL,
        ip_address TEXT,
        user_agent TEXT,
        key_version INTEGER,
        details TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS kl_keys{suffix} (
        tenant_id {sorted_text} NOT NULL,
        version INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        amk_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at {bigint} NOT NULL,
        retired_at {bigint},
        PRIMARY KEY (tenant_id, version))""",
    """CREATE TABLE IF NOT EXISTS kl_tracking{suffix} (
        name TEXT PRIMARY KEY,
        position {bigint} NOT NULL)""",
    *(
        f"INSERT INTO kl_tracking{{suffix}} (name, position) VALUES ('{name}', 0) "
        "ON CONFLICT (name) DO NOTHING"
        for name in TRACKED_READ_MODELS
    ),
)

# Each read-model table's key columns, then its other columns, as the DDL above has them
# (a test holds the two equal): what `projections check` compares, row by row.
READ_MODEL_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kl_catalog": (
        ("tenant_id", "name"),
        (
            *("secret_id", "disabled", "expired", "deleted", "category", "description"),
            *("metadata", "version", "key_version", "envelope_version", "expires_at"),
            *("created_at", "updated_at", "access_count", "last_accessed_at"),
        ),
    ),
    "kl_keys": (
        ("tenant_id", "version"),
        ("key_id", "amk_id", "status", "created_at", "retired_at"),
    ),
    "kl_audit": (
        ("position",),
        (
            *("timestamp", "tenant_id", "secret_name", "action", "result", "user_id"),
            *("ip_address", "user_agent", "key_version", "details"),
        ),
    ),
}

# The audit model's secondary indexes, by name: their columns.
_AUDIT_INDEXES = {
    "kl_audit_by_tenant": ("tenant_id", "position"),
    "kl_audit_by_secret": ("tenant_id", "secret_name", "position"),
}
INDEX_NAMES = tuple(_AUDIT_INDEXES)

_SUPPORT = (
    # Wrapped TDEKs live here, apart from the immutable stream, so destroying one is real.
    # Keyed by key_id too: a rotation that loses a race never overwrites the winner's row.
    """CREATE TABLE IF NOT EXISTS kl_key_material (
        tenant_id {sorted_text} NOT NULL,
        version INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        amk_id TEXT NOT NULL,
        wrapped {blob} NOT NULL,
        created_at {bigint} NOT NULL,
        PRIMARY KEY (tenant_id, version, key_id))""",
)

# The tables a rebuild builds aside (kl_tracking included: its copy holds the replay's position).
REBUILT_TABLES = (*READ_MODEL_TABLES, "kl_tracking")


def schema_statements(dialect: Dialect) -> list[str]:
    """The statements that create every keyledger table (idempotent); on PostgreSQL with
    the audit indexes (on SQLite they come from ``sqlite_index_statements``)."""
    return [
        *read_model_table_statements(dialect),
        *(index_statements() if dialect == "postgres" else []),
        *(statement.format(**_TYPES[dialect]) for statement in _SUPPORT),
    ]


def tracking_table_statement(dialect: Dialect) -> str:
    """The CREATE TABLE IF NOT EXISTS of kl_tracking (no rows)."""
    (statement,) = (
        s for s in read_model_table_statements(dialect) if "TABLE IF NOT EXISTS kl_tracking" in s
    )
    return statement


def read_model_table_statements(dialect: Dialect, suffix: str = "") -> list[str]:
    """The read-model tables (and tracking), named with ``suffix`` for a rebuild."""
    return [statement.format(suffix=suffix, **_TYPES[dialect]) for statement in _TABLES]


def index_statements() -> list[str]:
    """The audit model's secondary indexes, by their names (PostgreSQL)."""
    return [
        f"CREATE INDEX IF NOT EXISTS {name} ON kl_audit ({', '.join(columns)})"
        for name, columns in _AUDIT_INDEXES.items()
    ]


def sqlite_index_statements(cur: Any, table: str = "kl_audit", name_suffix: str = "") -> list[str]:
    """The audit indexes that ``table`` lacks on SQLite, judged by their columns.

    SQLite cannot rename an index, so a rebuild's copy keeps the names it was indexed
    under after the switch renames the table: the live model's indexes may be called
    ``kl_audit_by_tenant_rebuild_all`` (or ``..._2``, the next rebuild of that set). Each
    missing index gets the first such name no other schema object has.
    """
    cur.execute("SELECT name FROM pragma_index_list(?) WHERE origin = 'c'", (table,))
    present = set()
    for (index,) in cur.fetchall():
        cur.execute("SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,))
        present.add(tuple(row[0] for row in cur.fetchall()))
    cur.execute("SELECT name FROM sqlite_master")
    taken = {row[0] for row in cur.fetchall()}
    statements = []
    for base, columns in _AUDIT_INDEXES.items():
        if columns in present:
            continue
        name, n = base + name_suffix, 2
        while name in taken:
            name, n = f"{base}{name_suffix}_{n}", n + 1
        taken.add(name)
        statements.append(f"CREATE INDEX {name} ON {table} ({', '.join(columns)})")
    return statements


EVENTS_KEY = ("originator_id", "originator_version")


def has_events_key(cur: Any, table: str, postgres: bool) -> bool:
    """Whether the events table still has a unique index on (originator_id,
    originator_version), its primary key: without it, an event can be stored twice."""
    if postgres:
        cur.execute(
            "SELECT 1 FROM pg_index AS i WHERE i.indrelid = to_regclass(?) "
            "AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND ARRAY("
            "SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "ORDER BY k.n) = ARRAY[?, ?]",
            (table, *EVENTS_KEY),
        )
        return cur.fetchone() is not None
    cur.execute(
        'SELECT l.name FROM pragma_index_list(?) AS l WHERE l."unique" AND NOT l.partial',
        (table,),
    )
    for (index,) in cur.fetchall():
        cur.execute("SELECT name FROM pragma_index_info(?) ORDER BY seqno", (index,))
        if tuple(row[0] for row in cur.fetchall()) == EVENTS_KEY:
            return True
    return False


def has_table(cur: Any, table: str, postgres: bool) -> bool:
    """Whether ``table`` exists (in the current schema, on PostgreSQL)."""
    if postgres:
        cur.execute("SELECT to_regclass(?) IS NOT NULL", (table,))
        return bool(cur.fetchone()[0])
    cur.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,))
    return cur.fetchone() is not None
