"""The composition root: settings -> master keys -> store -> ledger."""

from __future__ import annotations

from keyledger.application.ledger import Ledger
from keyledger.application.schema_check import is_legacy_stream
from keyledger.errors import StorageError
from keyledger.infrastructure.database_url import persistence_env
from keyledger.infrastructure.master_keys import load_audit_keys, load_master_keyring
from keyledger.infrastructure.settings import KeyledgerSettings


def build_ledger(
    settings: KeyledgerSettings,
    *,
    database_url: str | None = None,
    master_key: str | None = None,
    previous_master_keys: list[str] | None = None,
) -> Ledger:
    """Validate the master keys first (InvalidMasterKey), then open the store."""
    master_keys = load_master_keyring(settings, master_key, previous_master_keys)
    audit_key, previous_audit_keys = load_audit_keys(settings)
    env = persistence_env(
        settings.database_url if database_url is None else database_url,
        lock_timeout_seconds=settings.lock_timeout_seconds,
        create_tables=settings.create_tables,
    )
    ledger = Ledger(
        env=env,
        master_keys=master_keys,
        key_cache_seconds=settings.key_cache_seconds,
        audit_key=audit_key,
        previous_audit_keys=previous_audit_keys,
        seal_every=settings.audit_seal_every,
        anchor_file=settings.audit_anchor_file,
        group_commit_wait=settings.group_commit_wait_ms / 1000,
        cache_bytes=settings.cache_megabytes * 2**20,
        require_tags=settings.require_event_tags,
    )
    if is_legacy_stream(ledger):
        ledger.close()
        raise StorageError(
            "this store was written by keyledger 0.1.0, whose aggregate ids this version "
            "cannot read (see the 0.2.0 entry of the changelog); keep using 0.1.0 with it"
        )
    return ledger
