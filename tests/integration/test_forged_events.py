"""Events forged in the store by anyone who can insert rows (found by review).

**Copied under another aggregate's id.**
Anyone who can insert rows into the events table (the documented application role on
PostgreSQL, any writer of a SQLite file) could copy globex's keyring and secret events
under the ids of a tenant ``evil``: ``evil/loot`` then replayed as an aggregate that
carried globex's tenant and name, its envelope decrypted with globex's key (the AAD
binds what the events carry), and a retrieve of ``evil/loot`` returned globex's value,
audited under ``evil``. A copy under another name of the same tenant did the same.

**A topic outside keyledger.** The library imports whatever module a stored topic names:
a row with the topic ``antigravity:geohash`` opened a web browser from `audit log`.
"""

from __future__ import annotations

import sys
from uuid import UUID, uuid4

import pytest

from conftest import MakeService
from keyledger import AuditTampered, SecretService, super_admin, tenant
from keyledger.domain.ids import keyring_id, secret_id

VALUE = "globex-top-secret"


def copy_events(service: SecretService, source: UUID, target: UUID) -> None:
    """Insert ``source``'s events again, byte for byte, as ``target``'s."""
    store = service._ledger.store
    table = store.events_table_name
    with store.projecting() as cur:
        cur.execute(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
            f"SELECT ?, originator_version, topic, state FROM {table} WHERE originator_id = ? "
            "ORDER BY originator_version",
            (store.id_param(target), store.id_param(source)),
        )


def test_a_secret_copied_to_another_tenant_is_refused_not_decrypted(
    service: SecretService,
) -> None:
    with tenant("globex"):
        service.store("gamma", VALUE)
    copy_events(service, keyring_id("globex"), keyring_id("evil"))
    copy_events(service, secret_id("globex", "gamma"), secret_id("evil", "loot"))

    with tenant("evil"), pytest.raises(AuditTampered) as raised:
        service.retrieve("loot")

    assert "belong to another" in str(raised.value)
    assert VALUE not in str(raised.value)
    with tenant("globex"):  # the original is untouched
        assert service.retrieve("gamma").value == VALUE


def test_a_secret_copied_under_another_name_of_its_tenant_is_refused(
    service: SecretService,
) -> None:
    with tenant("acme"):
        service.store("alpha", VALUE)
    copy_events(service, secret_id("acme", "alpha"), secret_id("acme", "other-name"))

    with tenant("acme"), pytest.raises(AuditTampered):
        service.retrieve("other-name")


def test_a_keyring_copied_to_another_tenant_is_refused(service: SecretService) -> None:
    with tenant("globex"):
        service.store("gamma", VALUE)
    copy_events(service, keyring_id("globex"), keyring_id("evil"))

    with tenant("evil"), pytest.raises(AuditTampered) as raised:
        service.store("new", "v")

    assert "another keyring" in str(raised.value)


@pytest.mark.parametrize("topic", ["this:s", "os:system", "builtins:dict"])
def test_a_row_naming_a_module_outside_keyledger_is_tampering_and_imports_nothing(
    service: SecretService, topic: str
) -> None:
    """(``this`` prints the Zen of Python when it is imported.)"""
    with tenant("acme"):
        service.store("alpha", VALUE)
    store = service._ledger.store
    state = b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-12-02T13:40:00+00:00"}}'
    with store.projecting() as cur:
        cur.execute(
            f"INSERT INTO {store.events_table_name} "
            "(originator_id, originator_version, topic, state) VALUES (?, 1, ?, ?)",
            (store.id_param(uuid4()), topic, state),
        )
    imported_before = "this" in sys.modules

    with tenant("acme"), pytest.raises(AuditTampered):
        service.get_audit_logs()

    assert ("this" in sys.modules) == imported_before


def test_an_event_inserted_at_a_chosen_position_stops_the_audit_queries(
    service: SecretService, backend: str
) -> None:
    """PostgreSQL: a row inserted with ``notification_id`` 1,000,000 (any role with
    INSERT can) took the audit model there, and every event appended after it, numbered
    below it by the sequence, was missing from the audit log, the trail, `projections
    status` and a resumed export."""
    if backend != "postgres":
        pytest.skip("positions come from a sequence on PostgreSQL only")
    with tenant("acme"):
        service.store("alpha", VALUE)
        service.retrieve("alpha")
    store = service._ledger.store
    table = store.events_table_name
    with store.projecting() as cur:
        cur.execute(
            f"INSERT INTO {table} (notification_id, originator_id, originator_version, "
            f"topic, state) SELECT 1000000, ?, 1, topic, state FROM {table} "
            "ORDER BY notification_id DESC LIMIT 1",
            (store.id_param(uuid4()),),
        )
    with tenant("acme"):
        service.store("later", "v")
        with pytest.raises(AuditTampered, match="position the store never assigned"):
            service.get_audit_logs()
    with pytest.raises(AuditTampered):
        service.read_model_status()
    with super_admin(), pytest.raises(AuditTampered):
        list(service.export_audit(after_position=1000000))


def test_a_snapshot_naming_an_aggregate_outside_keyledger_is_replayed_around(
    make_service: MakeService,
) -> None:
    """A snapshot's own topic is the library's; the aggregate's, inside it, was imported
    when the snapshot was used, which nothing vouches for without an audit key (found by
    review: `secrets disable` printed the Zen of Python). Now it is passed over, as any
    snapshot that cannot be vouched for: the secret is replayed from its events."""
    make_service().store_for_tenant("acme", "alpha", VALUE)
    keyless = make_service(master_key=None)  # no master key: no audit key either
    recorder = keyless._ledger.snapshots.recorder  # type: ignore[union-attr]
    table = recorder.events_table_name
    state = (
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-12-02T13:40:00+00:00"},'
        b'"topic":"this:s","state":{}}'
    )
    store = keyless._ledger.store
    with store.projecting() as cur:
        cur.execute(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
            "VALUES (?, 1000, 'eventsourcing.domain:Snapshot', ?)",
            (store.id_param(secret_id("acme", "alpha")), state),
        )
    imported_before = "this" in sys.modules

    keyless.disable_for_tenant("acme", "alpha")

    assert ("this" in sys.modules) == imported_before
    assert keyless.list_for_tenant("acme", status=None)[0].status == "disabled"


def test_a_replay_refuses_a_secret_copied_under_another_name(service: SecretService) -> None:
    """`audit replay` listed the copy as a second secret named like the original (found
    by review): a retrieve refused it, the replay of the tenant's stream did not."""
    with tenant("acme"):
        service.store("alpha", VALUE)
    copy_events(service, secret_id("acme", "alpha"), secret_id("acme", "other-name"))

    with pytest.raises(AuditTampered):
        service.state_as_of("acme", position=1_000)
