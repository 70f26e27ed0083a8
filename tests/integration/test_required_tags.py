"""KEYLEDGER_REQUIRE_EVENT_TAGS: every event loaded must carry a tag that verifies.

By default tags are checked by `audit verify` and the seals, not on load: processes
without an audit key write untagged events, and keyledger acts on those. Anyone who can
insert rows in the events table but holds no audit key (the documented PostgreSQL
application role, any writer of a SQLite file) could append an event keyledger then
acted on until `audit verify` flagged it. With the setting, such an event is refused
(``AuditTampered``) wherever it is loaded: deciding on a secret or keyring, the read
models' catch-up, replays and exports. `audit verify` still reports it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from conftest import MakeService
from keyledger import (
    AuditTampered,
    InvalidInput,
    SecretDisabled,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.domain.ids import secret_id
from keyledger.infrastructure.settings import KeyledgerSettings

ACME = "acme"
REQUIRED = KeyledgerSettings(require_event_tags=True)


def disabled_by_a_process_without_the_audit_key(make_service: MakeService) -> None:
    """acme/db stored (tagged), then disabled by a process holding no audit key: its
    SecretDisabled event is untagged."""
    make_service().store_for_tenant(ACME, "db", "v1")
    keyless = make_service(master_key=None)
    assert keyless.disable_for_tenant(ACME, "db")


def test_an_untagged_event_is_refused_on_load_when_tags_are_required(
    make_service: MakeService,
) -> None:
    disabled_by_a_process_without_the_audit_key(make_service)

    with pytest.raises(SecretDisabled):  # the default: acted on until audit verify
        make_service().retrieve_for_tenant(ACME, "db")
    strict = make_service(settings=REQUIRED)
    with pytest.raises(AuditTampered) as refused:
        strict.retrieve_for_tenant(ACME, "db")

    assert "carries no tag" in str(refused.value)
    assert str(secret_id(ACME, "db")) in str(refused.value)
    assert "audit verify" in str(refused.value)
    with pytest.raises(AuditTampered):  # nor is it decided upon by a write
        strict.enable_for_tenant(ACME, "db")


def test_an_untagged_event_stops_the_audit_queries_at_its_position(
    make_service: MakeService,
) -> None:
    disabled_by_a_process_without_the_audit_key(make_service)
    strict = make_service(settings=REQUIRED)
    report = strict.verify_audit()  # reported there, not raised
    assert not report.intact
    (position,) = [finding.position for finding in report.findings]

    with pytest.raises(AuditTampered) as refused, tenant(ACME):
        strict.get_audit_logs()

    assert f"at position {position} carries no tag" in str(refused.value)


def test_an_event_copied_within_its_aggregate_is_refused_when_tags_are_required(
    make_service: MakeService,
) -> None:
    """A writer of the table appends the newest event of a secret again, one version
    on: its tag binds the version it was made for, and no longer matches."""
    writer = make_service()
    writer.store_for_tenant(ACME, "db", "v1")
    writer.store_for_tenant(ACME, "db", "v2")
    store = writer._ledger.store
    table, aggregate = store.events_table_name, store.id_param(secret_id(ACME, "db"))
    with store.projecting() as cur:
        cur.execute(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
            f"SELECT originator_id, originator_version + 1, topic, state FROM {table} "
            "WHERE originator_id = ? AND originator_version = 2",
            (aggregate,),
        )

    with pytest.raises(AuditTampered) as refused:
        make_service(settings=REQUIRED).retrieve_for_tenant(ACME, "db")

    assert "version 3 carries a tag that does not match its contents" in str(refused.value)
    assert "v2" not in str(refused.value)


def test_tags_made_with_a_previous_audit_key_verify(make_service: MakeService) -> None:
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    make_service(settings=KeyledgerSettings(audit_key=old)).store_for_tenant(ACME, "db", "v1")

    rotated = KeyledgerSettings(audit_key=new, previous_audit_keys=old, require_event_tags=True)
    assert make_service(settings=rotated).retrieve_for_tenant(ACME, "db").value == "v1"
    forgotten = KeyledgerSettings(audit_key=new, require_event_tags=True)
    with pytest.raises(AuditTampered) as refused:
        make_service(settings=forgotten).retrieve_for_tenant(ACME, "db")
    assert "not one configured" in str(refused.value)


def test_everything_keyledger_writes_itself_is_accepted(make_service: MakeService) -> None:
    """Stores, reads, rotations, re-encryption, lifecycle and seals under the setting,
    read back by another strict process: nothing of its own is refused."""
    strict = make_service(settings=REQUIRED)
    with tenant(ACME):
        strict.store("db", "v1", category="database")
        strict.retrieve("db")
        strict.rotate_key()
        strict.reencrypt_all()
        strict.disable("db")
        strict.enable("db")
        strict.store("db", "v2")
    with super_admin():
        strict.seal_audit()

    other = make_service(settings=REQUIRED)
    assert other.retrieve_for_tenant(ACME, "db").value == "v2"
    with tenant(ACME):
        assert [info.name for info in other.list()] == ["db"]
        actions = [entry.action for entry in other.get_audit_logs()]
    assert actions == [  # newest first; the re-encryption is the update after the rotation
        *("read", "update", "enable", "disable", "update", "rotate_key"),
        *("read", "create", "create_key"),
    ]
    assert other.verify_audit().intact


def test_requiring_tags_without_an_audit_key_is_refused_before_the_store_is_opened(
    tmp_path: Path,
) -> None:
    path = tmp_path / "never.db"

    with pytest.raises(InvalidInput) as refused:
        SecretService.create(f"sqlite:///{path}", master_key=None, settings=REQUIRED)

    assert "KEYLEDGER_MASTER_KEY or KEYLEDGER_AUDIT_KEY" in str(refused.value)
    assert not path.exists()


def test_after_a_master_key_rotation_verify_and_seal_find_what_they_find_without_it(
    make_service: MakeService,
) -> None:
    """Checkpoints were decoded through the requiring check: one sealed under a master
    key since dropped "did not decode" in a strict process, which reported tampering
    (and stopped sealing) where a default one reports an unverifiable segment (found by
    review). Loads of events tagged under the dropped key say it may have been retired."""
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    first = make_service(master_key=old)
    first.store_for_tenant(ACME, "db", "v1")
    with super_admin():
        first.seal_audit()
    rewrapping = KeyledgerSettings(previous_master_keys=old)
    rotated = make_service(master_key=new, settings=rewrapping)
    rotated.rewrap_master_key()
    with super_admin():
        rotated.seal_audit()

    default = make_service(master_key=new)
    strict = make_service(master_key=new, settings=REQUIRED)
    expected = [(f.kind, f.position) for f in default.verify_audit().findings]
    assert expected  # the segment sealed under the dropped key
    assert [(f.kind, f.position) for f in strict.verify_audit().findings] == expected
    strict.store_for_tenant("beta", "x", "y")
    with super_admin():
        assert strict.seal_audit().stopped_reason is None
    with pytest.raises(AuditTampered) as refused:
        strict.retrieve_for_tenant(ACME, "db")
    assert "KEYLEDGER_PREVIOUS_MASTER_KEYS" in str(refused.value)
