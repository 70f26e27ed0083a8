"""A secret's audit trail, and the streamed export of the audit stream (records, filters,
resumption, CSV and JSON lines, bounded memory)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from keyledger import (
    AuditEntry,
    InvalidInput,
    KeyledgerError,
    SecretDisabled,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.application.export import EXPORT_FIELDS, write_csv, write_jsonl

EVERYTHING = 1_000_000
ALICE = {"user_id": "alice", "ip_address": "203.0.113.7", "user_agent": "trail/1"}


@pytest.fixture(autouse=True)
def _no_audit_key_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYLEDGER_AUDIT_KEY", raising=False)


def lifecycle(service: SecretService) -> None:
    """One secret's whole life (acme/db), with noise around it: another secret of the
    tenant, and the same name in another tenant."""
    with tenant("acme", **ALICE):
        service.store("db", "v1", category="database")
    service.store_for_tenant("globex", "db", "g1", user_id="gina")
    service.store_for_tenant("acme", "other", "o1", user_id="alice")
    with tenant("acme", user_id="bob", ip_address="198.51.100.2", user_agent="app/7"):
        service.retrieve("db")
        service.retrieve("db")
        service.retrieve("other")
    service.retrieve_for_tenant("globex", "db", user_id="gina")
    with tenant("acme", **ALICE):
        service.disable("db")
    with tenant("acme", user_id="carol"):
        with pytest.raises(SecretDisabled):
            service.retrieve("db")
        service.retrieve("other")
    with tenant("acme", **ALICE):
        service.enable("db")
        service.store("db", "v2")
        service.rotate_key()
        service.store("other", "o2")  # on key version 2 already: not re-encrypted
        service.reencrypt_all()
    with tenant("acme", user_id="bob"):
        service.retrieve("db")
    service.rotate_key_for_tenant("globex")
    service.reencrypt_all_for_tenant("globex")
    with tenant("acme", user_id="dave"):
        service.delete("db")
        with pytest.raises(KeyledgerError):
            service.retrieve("db")  # gone: a failure entry of the trail


def test_the_trail_of_a_secret_lists_its_whole_life_oldest_first(service: SecretService) -> None:
    lifecycle(service)

    with tenant("acme"):
        trail = service.audit_trail("db")

    positions = [e.position for e in trail]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
    assert {(e.tenant_id, e.secret_name) for e in trail} == {("acme", "db")}
    assert [(e.action, e.result, e.user_id, e.key_version) for e in trail] == [
        ("create", "success", "alice", 1),
        ("read", "success", "bob", 1),
        ("read", "success", "bob", 1),
        ("disable", "success", "alice", None),
        ("read", "denied", "carol", 1),
        ("enable", "success", "alice", None),
        ("update", "success", "alice", 1),
        ("update", "success", "alice", 2),
        ("read", "success", "bob", 2),
        ("delete", "success", "dave", None),
        ("read", "failure", "dave", None),
    ]
    create, read = trail[0], trail[1]
    assert (create.ip_address, create.user_agent) == ("203.0.113.7", "trail/1")
    assert create.details == {"version": 1}
    assert (read.ip_address, read.user_agent) == ("198.51.100.2", "app/7")
    assert trail[4].details.get("reason")
    assert trail[6].details == {"version": 2}
    assert trail[7].details == {"reencrypted": True, "previous_key_version": 1}
    assert "SecretNotFound" in trail[10].details.values()
    timestamps = [e.timestamp for e in trail]
    assert timestamps == sorted(timestamps)


def test_trail_pages_after_a_position_are_the_trail_in_order(service: SecretService) -> None:
    service.store_for_tenant("acme", "db", "v")
    for _ in range(5):
        service.retrieve_for_tenant("acme", "db")
    with tenant("acme"):
        whole = service.audit_trail("db")
        pages, after = [], None
        while page := service.audit_trail("db", limit=2, after_position=after):
            pages.append(page)
            after = page[-1].position
        with pytest.raises(InvalidInput, match="after_position"):
            service.audit_trail("db", after_position=-1)

    assert [len(page) for page in pages] == [2, 2, 2]
    assert [entry for page in pages for entry in page] == whole


def test_the_trail_is_the_tenants_own_and_super_admin_may_name_another(
    service: SecretService,
) -> None:
    lifecycle(service)

    with tenant("globex"):
        globex = service.audit_trail("db")
        with pytest.raises(InvalidInput):
            service.audit_trail("db", tenant_id="acme")
    with super_admin():
        named = service.audit_trail("db", tenant_id="globex")
        everything = service.get_audit_logs(limit=EVERYTHING)

    assert [(e.action, e.result, e.key_version) for e in globex] == [
        ("create", "success", 1),
        ("read", "success", 1),
        ("update", "success", 2),
    ]
    assert named == globex
    expected = [e for e in everything if (e.tenant_id, e.secret_name) == ("globex", "db")]
    assert globex == sorted(expected, key=lambda e: e.position)
    with tenant("acme"):
        assert service.audit_trail("never-stored") == []


# -- export ------------------------------------------------------------------------------


def export(service: SecretService, **kwargs: Any) -> list[dict[str, Any]]:
    """Every export record (a cross-tenant read: inside super_admin())."""
    with super_admin():
        return list(service.export_audit(**kwargs))


@pytest.fixture
def exported(service: SecretService) -> tuple[SecretService, list[dict[str, Any]]]:
    """The lifecycle, sealed, and more events after the seal; every record exported."""
    lifecycle(service)
    service.seal_audit()
    service.store_for_tenant("initech", "api", "i1", user_id="ivan")
    service.retrieve_for_tenant("initech", "api", user_id="ivan")
    service.seal_audit()
    service.retrieve_for_tenant("globex", "db", user_id="gina")
    return service, export(service)


def _entry_view(entry: AuditEntry) -> dict[str, Any]:
    return {
        "position": entry.position,
        "timestamp": entry.timestamp.isoformat(),
        "tenant_id": entry.tenant_id,
        "secret_name": entry.secret_name,
        "action": entry.action,
        "result": entry.result,
        "user_id": entry.user_id,
        "ip_address": entry.ip_address,
        "user_agent": entry.user_agent,
        "key_version": entry.key_version,
        "details": entry.details,
    }


def test_the_export_has_one_record_per_audit_entry_and_no_checkpoint(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported
    with super_admin():
        entries = service.get_audit_logs(limit=EVERYTHING)
    checkpoints = service.audit_checkpoints()

    assert len(records) == len(entries)
    assert len(checkpoints) == 2
    assert {r["position"] for r in records}.isdisjoint({c.position for c in checkpoints})
    assert all(tuple(record) == EXPORT_FIELDS for record in records)
    by_position = {e.position: e for e in entries}
    for record in records:
        view = {
            k: v for k, v in record.items() if k in _entry_view(by_position[record["position"]])
        }
        assert view == _entry_view(by_position[record["position"]])
    positions = [r["position"] for r in records]
    assert positions == sorted(positions)
    assert {r["event_type"] for r in records} >= {
        "Secret.SecretCreated",
        "Secret.SecretStored",
        "Secret.SecretReencrypted",
        "AuditRecord.SecretRead",
        "AuditRecord.SecretAccessDenied",
        "AuditRecord.OperationFailed",
        "TenantKeyring.KeyRotated",
    }
    reads = [r for r in records if r["event_type"] == "AuditRecord.SecretRead"]
    assert all(r["event_version"] == 1 for r in reads)
    assert len({r["event_id"] for r in reads}) == len(reads)


def test_an_export_resumes_after_the_last_position_written(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported

    fifth = records[4]["position"]
    assert export(service, after_position=fifth) == records[5:]
    assert export(service, after_position=records[-1]["position"]) == []
    assert export(service, after_position=0) == records
    with pytest.raises(InvalidInput):
        export(service, after_position=-1)


def test_since_is_inclusive_until_exclusive_and_tenant_filters(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported
    times = [datetime.fromisoformat(r["timestamp"]) for r in records]
    since, until = times[len(times) // 3], times[2 * len(times) // 3]

    assert export(service, since=since) == [
        r for r, t in zip(records, times, strict=True) if t >= since
    ]
    assert export(service, until=until) == [
        r for r, t in zip(records, times, strict=True) if t < until
    ]
    window = export(service, since=since, until=until)
    assert window == [r for r, t in zip(records, times, strict=True) if since <= t < until]
    assert window
    for tenant_id in ("acme", "globex", "initech"):
        assert export(service, tenant_id=tenant_id) == [
            r for r in records if r["tenant_id"] == tenant_id
        ]
    assert export(service, tenant_id="nobody") == []
    with pytest.raises(InvalidInput):
        export(service, since=since.replace(tzinfo=None))


def test_progress_reports_the_position_each_page_reached(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported
    reached: list[int] = []

    assert export(service, progress=reached.append) == records

    assert reached == sorted(reached)
    assert reached[-1] == service.read_model_status()["catalog"][1]


def test_csv_export_round_trips_through_a_dict_reader(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported
    out = io.StringIO()

    with super_admin():
        written = write_csv(service.export_audit(), out)

    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert written == len(records) == len(rows)
    for row, record in zip(rows, records, strict=True):
        assert tuple(row) == EXPORT_FIELDS
        assert json.loads(row["details"]) == record["details"]
        for field in EXPORT_FIELDS:
            if field != "details":
                expected = record[field]
                assert row[field] == ("" if expected is None else str(expected)), field


def test_json_lines_export_round_trips(
    exported: tuple[SecretService, list[dict[str, Any]]],
) -> None:
    service, records = exported
    out = io.StringIO()

    with super_admin():
        assert write_jsonl(service.export_audit(), out) == len(records)

    assert [json.loads(line) for line in out.getvalue().splitlines()] == records


# -- memory --------------------------------------------------------------------------------


def _read_many(service: SecretService, reads: int) -> None:
    """``reads`` reads of five secrets in each of three tenants, from eight threads."""
    counter = itertools.count()
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                n = next(counter)
            if n >= reads:
                return
            service.retrieve_for_tenant("abc"[n % 3], f"s{n % 5}", user_id=f"u{n % 7}")

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work) for _ in range(8)]:
            future.result()


def _peak_exporting(service: SecretService, after_position: int = 0) -> tuple[int, int]:
    """(records exported, peak traced memory while streaming all of them)."""
    with super_admin():
        records = service.export_audit(after_position=after_position)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            exported = sum(1 for _ in records)
            return exported, tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()


@pytest.mark.slow
def test_exporting_three_times_as_many_records_takes_no_more_memory(
    service: SecretService,
) -> None:
    # The export reads pages of 1,000 events, and while the next page is read the previous
    # one is still referenced: streaming peaks at about two pages on any stretch of the
    # stream longer than two pages. So: the last 2,100 events, then all 6,300. An export
    # that held the events or the records would peak three times higher the second time.
    for tenant_id in ("a", "b", "c"):
        for i in range(5):
            service.store_for_tenant(tenant_id, f"s{i}", f"value-{i}")
    _read_many(service, 6_300 - 18)
    head = service.read_model_status()["catalog"][1]
    with super_admin():
        warm = service.export_audit()
        assert sum(1 for _ in itertools.islice(warm, 10)) == 10

    short, short_peak = _peak_exporting(service, after_position=head - 2_100)
    long, long_peak = _peak_exporting(service)

    assert (short, long) == (2_100, 6_300)
    assert long_peak < 1.3 * short_peak, (short_peak, long_peak)
