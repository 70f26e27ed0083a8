"""Tenant erasure (crypto-shredding, SPEC section 6), on every store.

Erasing a tenant destroys all its key versions: every value it ever stored becomes
unrecoverable while the audit stream stays complete. The scans at the end check that for
real: they take every envelope the tenant ever wrote from the event stream (and the
snapshots), every key the database still holds (unwrapped with the master key, as an
attacker who also stole the master key could), and find that no key opens any envelope;
on a SQLite file they also search every byte of every database file for the tenant's
wrapped keys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import StoredEvent

from conftest import run_around
from keyledger import (
    ConfirmationRequired,
    DecryptionFailed,
    SecretKeyDriftError,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.domain.envelope import envelope_key_version
from keyledger.infrastructure.crypto import DataKey, MasterKey

MakeService = Callable[..., SecretService]

DOOMED = "doomed"
KEPT = "kept"
EVERYTHING = 1_000_000
ERASURE_CODES = {
    "missing_active_tenant_encryption_key",
    "active_secrets_without_usable_active_key",
    "secret_envelope_missing_tenant_encryption_key",
}


class Database:
    """The service's database read around keyledger (``?`` placeholders)."""

    def __init__(self, service: SecretService) -> None:
        self.service = service
        self.env = service._ledger.env
        self.schema = self.env.get("POSTGRES_SCHEMA")
        self.events_table = service._ledger.store.events_table_name
        snapshots = service._ledger.snapshots
        assert snapshots is not None
        self.snapshots_table = snapshots.recorder.events_table_name  # type: ignore[attr-defined]

    def rows(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return run_around(self.service, statement, params)

    def material(self, tenant_id: str | None = None) -> list[tuple[str, int, str, bytes]]:
        """(tenant, version, amk_id, wrapped) of every key-material row (of one tenant)."""
        rows = self.rows("SELECT tenant_id, version, amk_id, wrapped FROM kl_key_material")
        return [
            (row[0], row[1], row[2], bytes(row[3]))
            for row in rows
            if tenant_id is None or row[0] == tenant_id
        ]

    def stored(self) -> list[StoredEvent]:
        """Every stored event and snapshot, as stored."""
        found = []
        for table in (self.events_table, self.snapshots_table):
            for row in self.rows(
                f"SELECT originator_id, originator_version, topic, state FROM {table}"
            ):
                originator = row[0] if isinstance(row[0], UUID) else UUID(str(row[0]))
                found.append(StoredEvent(originator, row[1], row[2], bytes(row[3])))
        return found

    def sqlite_files(self) -> dict[str, bytes]:
        """Every file in the directory of a SQLite database file."""
        directory = Path(str(self.env.get("SQLITE_DBNAME"))).parent
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def envelopes(service: SecretService, tenant_id: str) -> list[tuple[str, bytes]]:
    """(name, envelope) of every value the tenant ever stored, from the stream and snapshots."""
    found = []
    for stored in Database(service).stored():
        event = service._ledger.mapper.to_domain_event(stored)
        fields = getattr(event, "state", None) or vars(event)
        if fields.get("tenant_id") == tenant_id and fields.get("envelope") is not None:
            found.append((fields["name"], bytes(fields["envelope"])))
    return found


def unwrapped_keys(master_key: str, material: list[tuple[str, int, str, bytes]]) -> list[bytes]:
    """Every stored data key that the master key unwraps (whatever tenant it belongs to)."""
    amk = MasterKey(bytes.fromhex(master_key))
    keys = []
    for tenant_id, version, amk_id, wrapped in material:
        if amk_id == amk.amk_id:
            keys.append(amk.unwrap(tenant_id, version, wrapped))
    return keys


def opened(
    tenant_id: str, sealed: list[tuple[str, bytes]], keys: list[bytes]
) -> list[tuple[str, str | bytes]]:
    """(name, value) of every envelope that some key decrypts."""
    found = []
    for name, envelope in sealed:
        version = envelope_key_version(envelope)
        assert version is not None
        for raw in keys:
            try:
                found.append((name, DataKey(tenant_id, version, raw).decrypt(name, envelope)))
            except DecryptionFailed:
                continue
            break
    return found


def populate(service: SecretService) -> dict[str, dict[str, str]]:
    """DOOMED: values under three key versions, updates, a re-encryption, a disabled and a
    deleted secret; KEPT: a few values under two versions. Returns the live values."""
    doomed = {f"secret-{i}": f"doomed-value-{i}" for i in range(8)}
    for name, value in doomed.items():
        service.store_for_tenant(DOOMED, name, f"first-{value}")
        service.store_for_tenant(DOOMED, name, value)
    service.rotate_key_for_tenant(DOOMED)
    service.reencrypt_all_for_tenant(DOOMED)
    doomed["late"] = "doomed-late"
    service.store_for_tenant(DOOMED, "late", doomed["late"])
    service.rotate_key_for_tenant(DOOMED)
    doomed["latest"] = "doomed-latest"
    service.store_for_tenant(DOOMED, "latest", doomed["latest"])
    service.store_for_tenant(DOOMED, "gone", "doomed-deleted")
    with tenant(DOOMED):
        service.delete("gone")
        service.disable("secret-0")
    kept = {"db-password": "kept-pw", "token": "kept-token"}
    service.store_for_tenant(KEPT, "db-password", kept["db-password"])
    service.rotate_key_for_tenant(KEPT)
    service.store_for_tenant(KEPT, "token", kept["token"])
    return {DOOMED: doomed, KEPT: kept}


def audit(service: SecretService, tenant_id: str | None = None) -> list[Any]:
    """Audit entries of one tenant (or all), oldest first."""
    with super_admin():
        return service.get_audit_logs(tenant_id=tenant_id, limit=EVERYTHING)[::-1]


def view(service: SecretService, tenant_id: str) -> tuple[Any, ...]:
    return (
        service.list_for_tenant(tenant_id, status=None, include_expired=True),
        service.list_keys(tenant_id),
    )


def values(service: SecretService, tenant_id: str) -> dict[str, str | bytes]:
    return {
        info.name: service.retrieve_for_tenant(tenant_id, info.name).value
        for info in service.list_for_tenant(tenant_id)
    }


# -- confirmation ---------------------------------------------------------------------------


@pytest.mark.parametrize("confirm", [False, None, "yes", 1])
def test_erasing_a_tenant_needs_explicit_confirmation_and_otherwise_changes_nothing(
    service: SecretService, confirm: Any
) -> None:
    stored = populate(service)
    entries = audit(service)
    before = view(service, DOOMED)

    with pytest.raises(ConfirmationRequired, match=DOOMED):
        service.erase_tenant(DOOMED, confirm=confirm)
    with pytest.raises(ConfirmationRequired):
        service.erase_tenant(DOOMED)

    assert audit(service) == entries
    assert view(service, DOOMED) == before
    assert values(service, DOOMED) == {k: v for k, v in stored[DOOMED].items() if k != "secret-0"}


# -- what erasure does ------------------------------------------------------------------------


def test_after_erasure_no_value_of_the_tenant_can_be_read(service: SecretService) -> None:
    stored = populate(service)

    destroyed = service.erase_tenant(DOOMED, confirm=True)

    assert destroyed == [1, 2, 3]
    with tenant(DOOMED):
        service.enable("secret-0")
    for name, value in stored[DOOMED].items():
        with pytest.raises(DecryptionFailed) as raised:
            service.retrieve_for_tenant(DOOMED, name)
        assert value not in str(raised.value)


def test_erasure_destroys_every_key_version_and_its_key_material(service: SecretService) -> None:
    populate(service)

    service.erase_tenant(DOOMED, confirm=True)

    assert {k.version: k.status for k in service.list_keys(DOOMED)} == {
        1: "destroyed",
        2: "destroyed",
        3: "destroyed",
    }
    assert Database(service).material(DOOMED) == []
    assert service.rewrap_master_key().failed == 0


def test_erasure_keeps_every_earlier_audit_entry_and_adds_exactly_one(
    service: SecretService,
) -> None:
    populate(service)
    before = audit(service)

    service.erase_tenant(DOOMED, confirm=True, user_id="dpo")

    after = audit(service)
    assert after[:-1] == before
    erased = after[-1]
    assert (erased.tenant_id, erased.action, erased.result, erased.user_id) == (
        DOOMED,
        "erase_tenant",
        "success",
        "dpo",
    )
    assert erased.details["versions"] == [1, 2, 3]
    with tenant(DOOMED):
        assert len(service.get_audit_logs(limit=EVERYTHING)) == len(audit(service, DOOMED))


def test_erasure_leaves_other_tenants_untouched(service: SecretService) -> None:
    stored = populate(service)
    before = view(service, KEPT)
    report = service.diagnose_tenant_secret_key_drift(KEPT)

    service.erase_tenant(DOOMED, confirm=True)

    assert view(service, KEPT) == before
    assert values(service, KEPT) == stored[KEPT]
    after = service.diagnose_tenant_secret_key_drift(KEPT)
    assert after.ok
    assert [i for i in after.issues if i.code != "projection_behind"] == [
        i for i in report.issues if i.code != "projection_behind"
    ]
    assert {row[1] for row in Database(service).material(KEPT)} == {1, 2}


def test_an_erased_tenants_secrets_stay_listed_and_the_diagnosis_calls_them_unrecoverable(
    service: SecretService,
) -> None:
    populate(service)
    listed = service.list_for_tenant(DOOMED, status=None)

    service.erase_tenant(DOOMED, confirm=True)

    assert service.list_for_tenant(DOOMED, status=None) == listed
    report = service.diagnose_tenant_secret_key_drift(DOOMED)
    assert not report.ok
    found = Counter(i.code for i in report.issues if i.severity != "info")
    assert found == {
        "missing_active_tenant_encryption_key": 1,
        "active_secrets_without_usable_active_key": 1,
        "secret_envelope_missing_tenant_encryption_key": len(listed),
    }
    missing = [
        i for i in report.issues if i.code == "secret_envelope_missing_tenant_encryption_key"
    ]
    assert {i.secret_name for i in missing} == {info.name for info in listed}
    assert all("destroyed" in i.message for i in missing)
    assert report.summary["destroyed_tenant_key_count"] == 3
    with pytest.raises(SecretKeyDriftError) as raised:
        service.retrieve_for_tenant(DOOMED, "latest")
    assert "secret_envelope_missing_tenant_encryption_key" in {
        i.code for i in raised.value.report.issues
    }
    # The message leads with the secret's own cause, not the tenant's missing active key.
    assert str(raised.value).startswith(
        f"secret 'latest' of tenant {DOOMED!r} cannot be decrypted: secret 'latest' names "
        "key version"
    )
    assert "which was destroyed" in str(raised.value)


def test_a_confirmed_repair_clears_an_erased_tenant_which_then_starts_on_a_new_version(
    service: SecretService,
) -> None:
    populate(service)
    service.erase_tenant(DOOMED, confirm=True)
    names = [info.name for info in service.list_for_tenant(DOOMED, status=None)]

    with pytest.raises(ConfirmationRequired):
        service.repair_tenant_secret_key_drift(DOOMED)
    result = service.repair_tenant_secret_key_drift(DOOMED, confirm_delete_unrecoverable_data=True)

    assert result.secret_names == sorted(names)
    assert result.key_versions == []  # every version is already destroyed
    assert service.list_for_tenant(DOOMED, status=None) == []
    assert service.diagnose_tenant_secret_key_drift(DOOMED).ok
    assert service.store_for_tenant(DOOMED, "latest", "reborn").key_version == 4
    assert service.retrieve_for_tenant(DOOMED, "latest").value == "reborn"


def test_erasing_a_tenant_that_stored_nothing_destroys_nothing(service: SecretService) -> None:
    populate(service)
    entries = audit(service)

    assert service.erase_tenant("nobody", confirm=True) == []

    assert audit(service) == entries


def test_erasing_a_tenant_again_destroys_nothing_more(service: SecretService) -> None:
    populate(service)
    service.erase_tenant(DOOMED, confirm=True)
    keys = service.list_keys(DOOMED)

    assert service.erase_tenant(DOOMED, confirm=True) == []

    assert service.list_keys(DOOMED) == keys
    erasures = [e.details["versions"] for e in audit(service, DOOMED) if e.action == "erase_tenant"]
    assert erasures[0] == [1, 2, 3]
    assert all(versions == [] for versions in erasures[1:])


def test_a_service_that_cached_the_tenants_keys_cannot_read_after_another_erased_it(
    make_service: MakeService,
) -> None:
    reader = make_service()
    stored = populate(reader)
    readable = values(reader, DOOMED)  # every data key is now cached in the reader

    make_service().erase_tenant(DOOMED, confirm=True)

    for name in readable:
        with pytest.raises(DecryptionFailed):
            reader.retrieve_for_tenant(DOOMED, name)
    assert values(reader, KEPT) == stored[KEPT]


# -- scanning the database for anything that still opens the tenant's values -------------------


def test_nothing_left_in_the_database_decrypts_any_value_the_erased_tenant_ever_stored(
    service: SecretService, master_key: str
) -> None:
    stored = populate(service)
    database = Database(service)
    sealed = envelopes(service, DOOMED)
    wrapped = [row[3] for row in database.material(DOOMED)]
    # The scan can find values: before erasure the stored keys open every envelope.
    everything = opened(DOOMED, sealed, unwrapped_keys(master_key, database.material()))
    assert len(everything) == len(sealed) >= 2 * len(stored[DOOMED])
    assert set(stored[DOOMED].items()) <= set(everything)

    service.erase_tenant(DOOMED, confirm=True)

    assert envelopes(service, DOOMED) == sealed  # the stream itself is untouched
    remaining = database.material()
    assert {row[0] for row in remaining} == {KEPT}
    assert opened(DOOMED, sealed, unwrapped_keys(master_key, remaining)) == []
    # ...while those same remaining keys still open the kept tenant's values.
    kept = opened(KEPT, envelopes(service, KEPT), unwrapped_keys(master_key, remaining))
    assert set(stored[KEPT].items()) <= set(kept)
    states = [event.state for event in database.stored()]
    for blob in wrapped:
        assert all(blob not in row[3] for row in remaining)
        assert all(blob not in state for state in states)
    if database.schema is None and not str(database.env.get("SQLITE_DBNAME")).startswith("file:"):
        files = database.sqlite_files()
        assert "k.db" in files
        assert [
            name for name, content in files.items() for blob in wrapped if blob in content
        ] == []


def test_an_erased_tenants_snapshotted_secret_is_unrecoverable_too(
    service: SecretService, master_key: str, backend: str, request: pytest.FixtureRequest
) -> None:
    for i in range(1, 106):  # past the snapshot interval of 100 versions
        service.store_for_tenant(DOOMED, "busy", f"busy-value-{i}")
    service.store_for_tenant(KEPT, "token", "kept-token")
    database = Database(service)
    snapshots = database.rows(f"SELECT state FROM {database.snapshots_table}")
    assert snapshots, "no snapshot was taken"
    sealed = envelopes(service, DOOMED)
    assert len(opened(DOOMED, sealed, unwrapped_keys(master_key, database.material()))) == len(
        sealed
    )

    service.erase_tenant(DOOMED, confirm=True)

    assert opened(DOOMED, sealed, unwrapped_keys(master_key, database.material())) == []


def test_no_wrapped_key_of_an_erased_tenant_with_many_versions_survives_anywhere(
    service: SecretService, master_key: str, backend: str, request: pytest.FixtureRequest
) -> None:
    service.store_for_tenant(KEPT, "token", "kept-token")
    for i in range(100):  # enough key material to fill whole database pages
        service.store_for_tenant(DOOMED, f"secret-{i}", f"value-{i}")
        service.rotate_key_for_tenant(DOOMED)
    service.store_for_tenant(KEPT, "other", "kept-other")
    database = Database(service)
    old_material = database.material(DOOMED)
    sealed = envelopes(service, DOOMED)

    service.erase_tenant(DOOMED, confirm=True)

    assert opened(DOOMED, sealed, unwrapped_keys(master_key, database.material())) == []
    if database.schema is None and not str(database.env.get("SQLITE_DBNAME")).startswith("file:"):
        content = b"".join(database.sqlite_files().values())
        survivors = [row for row in old_material if row[3] in content]
        # Anyone holding the master key and the file could open these values again:
        assert opened(DOOMED, sealed, unwrapped_keys(master_key, survivors)) == []
        assert survivors == []


def test_a_store_racing_an_erasure_is_retried_not_failed_as_drift(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring and its material are two reads: an erasure committed between them
    left the store with a keyring whose active material was gone. Found by review: the
    store failed with DecryptionFailed and was audited as a failure, which reads as
    drift. It is a stale decision: the store is tried again and succeeds on a new key."""
    storer = make_service()
    eraser = make_service()
    storer.store_for_tenant(DOOMED, "s", "v1")
    eraser.erase_tenant(DOOMED, confirm=True)
    eraser.store_for_tenant(DOOMED, "other", "v")  # a new active version, 2
    ledger = storer._ledger
    looked_up = ledger.key_material
    erased = []

    def erasure_between_the_two_reads(tenant_id: str, version: int, key_id: str) -> Any:
        if not erased:  # the erasure commits after the keyring was read, before this
            erased.append(eraser.erase_tenant(DOOMED, confirm=True))
        return looked_up(tenant_id, version, key_id)

    monkeypatch.setattr(ledger, "key_material", erasure_between_the_two_reads)
    info = storer.store_for_tenant(DOOMED, "s", "v2")

    assert erased  # (the race was run)
    assert info.key_version == 3
    assert storer.retrieve_for_tenant(DOOMED, "s").value == "v2"
    with super_admin():
        failures = storer.get_audit_logs(tenant_id=DOOMED, result="failure")
    assert failures == []
