"""The composition root: settings -> master keys -> store -> ledger."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit
from uuid import uuid4

from keyledger.application.ledger import Ledger
from keyledger.errors import InvalidInput
from keyledger.infrastructure.master_keys import load_master_keyring
from keyledger.infrastructure.settings import KeyledgerSettings


def sqlite_db_name(database_url: str) -> str:
    """The SQLite database name for a ``memory:`` or ``sqlite:///path`` URL."""
    if database_url in ("memory:", "memory://", "sqlite:///:memory:"):
        # A private shared-cache in-memory database: one per service, visible to its pool.
        return f"file:keyledger-{uuid4().hex}?mode=memory&cache=shared"
    parts = urlsplit(database_url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path:
        raise InvalidInput(
            "unsupported database URL: use memory:, sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    path = Path(unquote(parts.path[1:]))
    if path.parent and not path.parent.exists():
        raise InvalidInput(f"directory of the SQLite database does not exist: {path.parent}")
    return str(path)


def build_ledger(
    settings: KeyledgerSettings,
    *,
    database_url: str | None = None,
    master_key: str | None = None,
    previous_master_keys: list[str] | None = None,
) -> Ledger:
    """Validate the master keys first (InvalidMasterKey), then open the store."""
    master_keys = load_master_keyring(settings, master_key, previous_master_keys)
    url = database_url or settings.database_url
    if url.startswith(("postgresql:", "postgres:")):
        raise InvalidInput("PostgreSQL is not supported by this version of keyledger yet")
    return Ledger(
        db_name=sqlite_db_name(url),
        master_keys=master_keys,
        key_cache_seconds=settings.key_cache_seconds,
        lock_timeout_seconds=settings.lock_timeout_seconds,
    )
