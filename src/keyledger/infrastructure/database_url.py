"""Database URLs to eventsourcing persistence settings. Passwords never reach a repr."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import uuid4

from eventsourcing.utils import get_topic
from pydantic import SecretStr

from keyledger.errors import InvalidInput
from keyledger.infrastructure.sqlite_store import KeyledgerSQLiteFactory

# The PostgreSQL factory by its topic: importing it imports psycopg and its pool (a tenth
# of a second or more), which a SQLite deployment never needs. A test holds it equal to
# ``get_topic(KeyledgerPostgresFactory)``.
POSTGRES_FACTORY_TOPIC = "keyledger.infrastructure.postgres_store:KeyledgerPostgresFactory"

_POSTGRES_OPTIONS: dict[str, tuple[str, type]] = {
    # URL query option -> (library setting, value type)
    "schema": ("POSTGRES_SCHEMA", str),
    "pool_size": ("POSTGRES_POOL_SIZE", int),
    "max_overflow": ("POSTGRES_MAX_OVERFLOW", int),
    "connect_timeout": ("POSTGRES_CONNECT_TIMEOUT", int),
    "lock_timeout": ("POSTGRES_LOCK_TIMEOUT", int),
    "max_waiting": ("POSTGRES_MAX_WAITING", int),
    "conn_max_age": ("POSTGRES_CONN_MAX_AGE", float),
}
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(//)?")


def password_from_environment() -> str:
    """The password libpq would take from PGPASSWORD (used when the URL has none)."""
    return os.environ.get("PGPASSWORD", "")


def redact(database_url: str) -> str:
    """The URL with everything between its scheme and its last ``@`` masked.

    The user info ends at an ``@``, but a password holding an unencoded ``/``, ``?`` or
    ``#`` fools URL parsers about which one; none after the last ``@`` can belong to it.
    """
    head, at, tail = database_url.rpartition("@")
    if not at:
        return database_url  # no user info, so no password
    scheme = _SCHEME.match(head)
    return f"{scheme.group() if scheme else ''}***@{tail}"


def persistence_env(
    database_url: str | SecretStr, *, lock_timeout_seconds: int, create_tables: bool
) -> dict[str, str]:
    """The eventsourcing environment for ``memory:``, ``sqlite:///`` or ``postgresql://``."""
    url = _plain(database_url)
    if url.startswith(("postgresql:", "postgres:")):
        env = _postgres_env(url, lock_timeout_seconds)
    else:
        env = {
            "PERSISTENCE_MODULE": get_topic(KeyledgerSQLiteFactory),
            "SQLITE_DBNAME": sqlite_db_name(url),
            "SQLITE_LOCK_TIMEOUT": str(lock_timeout_seconds),
        }
    env["CREATE_TABLE"] = "y" if create_tables else "n"
    return env


def sqlite_db_name(database_url: str | SecretStr) -> str:
    """The SQLite database name for a ``memory:`` or ``sqlite:///path`` URL."""
    url = _plain(database_url)
    if url in ("memory:", "memory://", "sqlite:///:memory:"):
        # A private shared-cache in-memory database: one per service, visible to its pool.
        return f"file:keyledger-{uuid4().hex}?mode=memory&cache=shared"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "Invalid IPv6 URL"
        parts = None
    if parts is None or parts.scheme != "sqlite" or parts.netloc or not parts.path:
        raise InvalidInput(_UNSUPPORTED)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # Not silently dropped: "?mode=ro" would otherwise open the file for writing.
        raise InvalidInput(
            "a SQLite URL takes no options (?...) or fragment (#...): keyledger sets the "
            "connection's options itself; percent-encode ? and # in the path (%3F, %23)"
        )
    path = Path(unquote(parts.path[1:]))
    if "\x00" in str(path):
        raise InvalidInput("the SQLite database path holds a NUL character (%00)")
    if path.parent and not path.parent.exists():
        # An "@" suggests a mistyped server URL with a password in it: do not echo that.
        where = "" if "@" in str(path.parent) else f": {path.parent}"
        raise InvalidInput(f"directory of the SQLite database does not exist{where}")
    return str(path)


_UNSUPPORTED = (
    "unsupported database URL: use memory:, sqlite:///relative/path.db, "
    "sqlite:////absolute/path.db or postgresql://user:password@host:port/dbname"
)
_MALFORMED_POSTGRES = (
    "malformed PostgreSQL URL: expected postgresql://user:password@host:port/dbname with a "
    "port from 0 to 65535; percent-encode any of / ? # @ : % [ ] in the user name and password"
)


def _plain(database_url: str | SecretStr) -> str:
    url = database_url.get_secret_value() if isinstance(database_url, SecretStr) else database_url
    if not isinstance(url, str):
        raise InvalidInput(f"the database URL must be a str, not {type(url).__name__}")
    return url


@dataclass(frozen=True, repr=False)
class _PostgresTarget:
    """What a PostgreSQL URL names; no generated repr, as it holds the password."""

    host: str | None
    port: int | None
    user: str | None
    password: str | None
    path: str
    query: str


def _postgres_parts(database_url: str) -> _PostgresTarget:
    """The URL's parts; any doubt about where the user info ends is ``InvalidInput``.

    No message here quotes the URL or any part of it: whatever a parser took for the host,
    port or path may be the tail of a password.
    """
    target: _PostgresTarget | None = None
    try:
        parts = urlsplit(database_url)
        target = _PostgresTarget(
            host=parts.hostname,
            port=parts.port,  # raises for a non-numeric or out-of-range port
            user=parts.username,
            password=parts.password,
            path=parts.path,
            query=parts.query,
        )
    except ValueError:  # the port, or "Invalid IPv6 URL": its message quotes the URL
        pass
    if target is None:  # raised outside the handler, so without the ValueError as context
        raise InvalidInput(_MALFORMED_POSTGRES)
    # A "/", "?" or "#" in the password ends the netloc early and pushes the rest of the
    # password, and its "@", into the path, query or fragment.
    if "#" in database_url or "@" in parts.path + parts.query:
        raise InvalidInput(_MALFORMED_POSTGRES)
    return target


def _postgres_env(database_url: str, lock_timeout_seconds: int) -> dict[str, str]:
    parts = _postgres_parts(database_url)
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise InvalidInput("PostgreSQL URL names no database (postgresql://.../dbname)")
    env = {
        "PERSISTENCE_MODULE": POSTGRES_FACTORY_TOPIC,
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": parts.host or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": unquote(parts.user or "postgres"),
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


# The largest value each numeric URL option accepts: beyond these a setting is a typo (a
# pool of millions of connections is spun up before failing; PostgreSQL refuses a lock
# timeout over 24 days only when the first connection is made).
_OPTION_LIMITS: dict[str, float] = {
    "pool_size": 1000,
    "max_overflow": 1000,
    "connect_timeout": 3600,
    "lock_timeout": 86_400,
    "max_waiting": 1_000_000,
    "conn_max_age": 7 * 86_400,
}


def _checked_option(option: str, value: str, kind: type) -> str:
    if kind is str:
        return value
    try:
        number = kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise InvalidInput(f"URL option {option} must be {expected}") from None
    if not math.isfinite(number):
        raise InvalidInput(f"URL option {option} must be a finite number")
    if number < 0 or (option in ("lock_timeout", "pool_size", "connect_timeout") and number == 0):
        raise InvalidInput(f"URL option {option} must be positive")
    limit = _OPTION_LIMITS.get(option)
    if limit is not None and number > limit:
        raise InvalidInput(f"URL option {option} must be at most {limit:g}")
    return value
