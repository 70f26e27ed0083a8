"""Database URLs to eventsourcing persistence settings. Passwords never reach a repr."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import uuid4

from eventsourcing.utils import get_topic

from keyledger.errors import InvalidInput
from keyledger.infrastructure.postgres_store import KeyledgerPostgresFactory
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteFactory

_POSTGRES_OPTIONS: dict[str, tuple[str, type]] = {
    # URL query option -> (library setting, value type)
    "schema": ("POSTGRES_SCHEMA", str),
    "pool_size": ("POSTGRES_POOL_SIZE", int),
    "max_overflow": ("POSTGRES_MAX_OVERFLOW", int),
    "connect_timeout": ("POSTGRES_CONNECT_TIMEOUT", float),
    "lock_timeout": ("POSTGRES_LOCK_TIMEOUT", int),
    "max_waiting": ("POSTGRES_MAX_WAITING", int),
    "conn_max_age": ("POSTGRES_CONN_MAX_AGE", float),
}
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def password_from_environment() -> str:
    """The password libpq would take from PGPASSWORD (used when the URL has none)."""
    return os.environ.get("PGPASSWORD", "")


def redact(database_url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and reprs)."""
    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def persistence_env(
    database_url: str, *, lock_timeout_seconds: int, create_tables: bool
) -> dict[str, str]:
    """The eventsourcing environment for ``memory:``, ``sqlite:///`` or ``postgresql://``."""
    if database_url.startswith(("postgresql:", "postgres:")):
        env = _postgres_env(database_url, lock_timeout_seconds)
    else:
        env = {
            "PERSISTENCE_MODULE": get_topic(KeyledgerSQLiteFactory),
            "SQLITE_DBNAME": sqlite_db_name(database_url),
            "SQLITE_LOCK_TIMEOUT": str(lock_timeout_seconds),
        }
    env["CREATE_TABLE"] = "y" if create_tables else "n"
    return env


def sqlite_db_name(database_url: str) -> str:
    """The SQLite database name for a ``memory:`` or ``sqlite:///path`` URL."""
    if database_url in ("memory:", "memory://", "sqlite:///:memory:"):
        # A private shared-cache in-memory database: one per service, visible to its pool.
        return f"file:keyledger-{uuid4().hex}?mode=memory&cache=shared"
    parts = urlsplit(database_url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path:
        raise InvalidInput(
            "unsupported database URL: use memory:, sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db or postgresql://user:password@host:port/dbname"
        )
    path = Path(unquote(parts.path[1:]))
    if path.parent and not path.parent.exists():
        raise InvalidInput(f"directory of the SQLite database does not exist: {path.parent}")
    return str(path)


def _postgres_env(database_url: str, lock_timeout_seconds: int) -> dict[str, str]:
    parts = urlsplit(database_url)
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise InvalidInput(f"PostgreSQL URL names no database: {redact(database_url)}")
    env = {
        "PERSISTENCE_MODULE": get_topic(KeyledgerPostgresFactory),
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_LOCK_TIMEOUT": str(lock_timeout_seconds),
        "POSTGRES_POOL_SIZE": "5",
        "POSTGRES_MAX_OVERFLOW": "10",
        "POSTGRES_CONNECT_TIMEOUT": "5",
    }
    if parts.password is not None:
        env["POSTGRES_PASSWORD"] = unquote(parts.password)
    else:
        env["POSTGRES_GET_PASSWORD_TOPIC"] = get_topic(password_from_environment)
    for option, values in parse_qs(parts.query).items():
        if option not in _POSTGRES_OPTIONS:
            raise InvalidInput(
                f"unknown PostgreSQL URL option {option!r}; known: {', '.join(_POSTGRES_OPTIONS)}"
            )
        setting, kind = _POSTGRES_OPTIONS[option]
        env[setting] = _checked_option(option, values[-1], kind)
    if not _SCHEMA_NAME.fullmatch(env.get("POSTGRES_SCHEMA", "public")):
        raise InvalidInput("schema must be lowercase letters, digits and underscores")
    return env


def _checked_option(option: str, value: str, kind: type) -> str:
    if kind is str:
        return value
    try:
        number = kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise InvalidInput(f"URL option {option} must be {expected}") from None
    if number < 0 or (option in ("lock_timeout", "pool_size") and number == 0):
        raise InvalidInput(f"URL option {option} must be positive")
    return value
