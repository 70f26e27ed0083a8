"""The audit log: every action/result pair, the filters, ordering and scope (SPEC 3 and 4)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from keyledger import (
    AuditEntry,
    InvalidInput,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretExpired,
    SecretNotFound,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]
LAST_YEAR = datetime.now(UTC) - timedelta(days=365)


@pytest.fixture
def acme(service: SecretService):
    with tenant("acme", user_id="alice", ip_address="203.0.113.7", user_agent="billing/2.1"):
        yield service


def pairs(entries: list[AuditEntry]) -> list[tuple[str | None, str, str]]:
    """(secret_name, action, result), oldest first."""
    return [(e.secret_name, e.action, e.result) for e in reversed(entries)]


def test_first_store_is_audited_as_create_key_then_create(acme: SecretService) -> None:
    acme.store("token", "v")

    assert pairs(acme.get_audit_logs()) == [
        (None, "create_key", "success"),
        ("token", "create", "success"),
    ]
    create = acme.get_audit_logs(action="create")[0]
    assert (create.tenant_id, create.key_version) == ("acme", 1)


def test_every_entry_records_the_actor_ip_address_and_user_agent(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.retrieve("token")
    acme.disable("nope")

    actors = {(e.user_id, e.ip_address, e.user_agent) for e in acme.get_audit_logs()}

    assert actors == {("alice", "203.0.113.7", "billing/2.1")}


def test_an_update_and_a_read_are_audited_with_their_key_version(acme: SecretService) -> None:
    acme.store("token", "v1")
    acme.store("token", "v2")
    acme.retrieve("token")

    entries = acme.get_audit_logs(secret_name="token")

    assert [(e.action, e.result, e.key_version) for e in entries] == [
        ("read", "success", 1),
        ("update", "success", 1),
        ("create", "success", 1),
    ]


def test_reading_an_unknown_name_is_audited_as_a_failure(acme: SecretService) -> None:
    with pytest.raises(SecretNotFound):
        acme.retrieve("nope")

    [entry] = acme.get_audit_logs()
    assert (entry.secret_name, entry.action, entry.result) == ("nope", "read", "failure")
    assert "SecretNotFound" in entry.details.values()


def test_disabled_secret_is_refused_and_audited_as_denied(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.disable("token")
    with pytest.raises(SecretDisabled):
        acme.retrieve("token")

    assert pairs(acme.get_audit_logs(secret_name="token")) == [
        ("token", "create", "success"),
        ("token", "disable", "success"),
        ("token", "read", "denied"),
    ]


def test_the_first_read_past_expiry_records_the_expiry_then_later_reads_only_denials(
    acme: SecretService,
) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)

    for _ in range(2):
        with pytest.raises(SecretExpired):
            acme.retrieve("token")

    assert pairs(acme.get_audit_logs(secret_name="token")) == [
        ("token", "create", "success"),
        ("token", "expire", "success"),
        ("token", "read", "denied"),
        ("token", "read", "denied"),
    ]


def test_a_disabled_secret_past_expiry_records_the_expiry_too(acme: SecretService) -> None:
    acme.store("token", "v", expires_at=LAST_YEAR)
    acme.disable("token")

    with pytest.raises(SecretExpired):
        acme.retrieve("token")

    assert pairs(acme.get_audit_logs(secret_name="token"))[-2:] == [
        ("token", "expire", "success"),
        ("token", "read", "denied"),
    ]


@pytest.mark.parametrize("action", ["disable", "enable", "delete"])
def test_a_status_change_is_audited_as_success_or_for_an_unknown_name_as_failure(
    acme: SecretService, action: str
) -> None:
    acme.store("token", "v")

    assert getattr(acme, action)("nope") is False
    assert getattr(acme, action)("token") is True

    assert pairs(acme.get_audit_logs(action=action)) == [
        ("nope", action, "failure"),
        ("token", action, "success"),
    ]


def test_restoring_a_deleted_name_is_audited_as_create(acme: SecretService) -> None:
    acme.store("token", "v1")
    acme.delete("token")
    acme.store("token", "v2")

    assert pairs(acme.get_audit_logs(secret_name="token")) == [
        ("token", "create", "success"),
        ("token", "delete", "success"),
        ("token", "create", "success"),
    ]


def test_rotation_is_audited_as_rotate_key_with_the_new_version(acme: SecretService) -> None:
    acme.store("token", "v")
    acme.rotate_key()

    [entry] = acme.get_audit_logs(action="rotate_key")
    assert (entry.secret_name, entry.result, entry.key_version) == (None, "success", 2)


def test_rotating_a_tenant_without_keys_is_audited_as_create_key(acme: SecretService) -> None:
    acme.rotate_key()

    assert pairs(acme.get_audit_logs()) == [(None, "create_key", "success")]


def test_reencryption_is_audited_as_update_per_moved_secret(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.store("b", "v")
    acme.rotate_key()
    acme.store("b", "v2")
    acme.reencrypt_all()

    updates = acme.get_audit_logs(action="update")

    assert [(e.secret_name, e.result, e.key_version) for e in updates] == [
        ("a", "success", 2),
        ("b", "success", 2),
    ]
    acme.reencrypt_all()
    assert len(acme.get_audit_logs(action="update")) == 2


def test_a_store_without_a_master_key_is_audited_as_a_failure(make_service: MakeService) -> None:
    keyless = make_service(master_key=None)
    with tenant("acme"):
        with pytest.raises(MasterKeyUnavailable, match=r"^cannot store secret 'token' of tenant"):
            keyless.store("token", "v")

        [entry] = keyless.get_audit_logs()
    assert (entry.secret_name, entry.action, entry.result) == ("token", "create", "failure")
    assert "MasterKeyUnavailable" in entry.details.values()


def test_a_rotation_without_a_master_key_is_audited_as_a_failure_and_adds_no_version(
    make_service: MakeService,
) -> None:
    make_service().store_for_tenant("acme", "token", "v")
    keyless = make_service(master_key=None)

    with tenant("acme", user_id="ops"):
        with pytest.raises(MasterKeyUnavailable, match=r"^cannot rotate the key of tenant 'acme'"):
            keyless.rotate_key()
        [entry] = keyless.get_audit_logs(limit=1)
        versions = [k.version for k in keyless.list_keys()]

    assert (entry.secret_name, entry.action, entry.result, entry.user_id) == (
        None,
        "rotate_key",
        "failure",
        "ops",
    )
    assert entry.details["error"] == "MasterKeyUnavailable"
    assert versions == [1]


def test_a_rotation_under_a_master_key_that_cannot_open_the_active_version_is_refused(
    make_service: MakeService, master_key: str
) -> None:
    """Likely the wrong master key deployed: rotating would split the tenant's keys
    between two master keys. With the old one among the previous keys, it rotates."""
    make_service().store_for_tenant("acme", "token", "v")
    other_key = secrets.token_hex(32)
    misconfigured = make_service(master_key=other_key)

    with tenant("acme"):
        with pytest.raises(MasterKeyUnavailable, match="which is not configured") as raised:
            misconfigured.rotate_key()
        [entry] = misconfigured.get_audit_logs(limit=1)
        assert [k.version for k in misconfigured.list_keys()] == [1]
    assert other_key not in str(raised.value)
    assert master_key not in str(raised.value)
    assert (entry.action, entry.result) == ("rotate_key", "failure")

    moved_on = make_service(
        master_key=other_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )
    with tenant("acme"):
        assert moved_on.rotate_key().version == 2
        assert moved_on.retrieve("token").value == "v"


def test_a_first_key_that_cannot_be_created_is_audited_as_a_failed_create_key(
    make_service: MakeService,
) -> None:
    keyless = make_service(master_key=None)

    with tenant("acme"):
        with pytest.raises(MasterKeyUnavailable):
            keyless.rotate_key()
        [entry] = keyless.get_audit_logs(limit=1)
    assert (entry.action, entry.result) == ("create_key", "failure")


def test_a_read_that_cannot_decrypt_is_audited_as_a_failure(make_service: MakeService) -> None:
    make_service().store_for_tenant("acme", "token", "v")
    keyless = make_service(master_key=None)

    with tenant("acme"):
        with pytest.raises(MasterKeyUnavailable, match=r"^cannot read secret 'token' of tenant"):
            keyless.retrieve("token")
        latest = keyless.get_audit_logs(limit=1)

    assert pairs(latest) == [("token", "read", "failure")]


def test_entries_come_newest_first(acme: SecretService) -> None:
    acme.store("a", "v")
    acme.retrieve("a")
    acme.store("b", "v")

    entries = acme.get_audit_logs()

    positions = [e.position for e in entries]
    assert positions == sorted(positions, reverse=True)
    assert len(set(positions)) == len(positions)


@pytest.fixture
def busy(acme: SecretService) -> SecretService:
    """A tenant whose log mixes secrets, actions, results and users."""
    acme.store("a", "v")
    acme.store("b", "v")
    acme.retrieve("a")
    acme.disable("b")
    with pytest.raises(SecretDisabled):
        acme.retrieve("b")
    with tenant("acme", user_id="bob"):
        acme.retrieve("a")
        acme.delete("nope")
    return acme


def test_filter_by_secret_name_action_and_result(busy: SecretService) -> None:
    b_entries = busy.get_audit_logs(secret_name="b")
    reads = busy.get_audit_logs(action="read")
    denied = busy.get_audit_logs(action="read", result="denied")
    failures = busy.get_audit_logs(result="failure")

    assert pairs(b_entries) == [
        ("b", "create", "success"),
        ("b", "disable", "success"),
        ("b", "read", "denied"),
    ]
    assert len(reads) == 3
    assert pairs(denied) == [("b", "read", "denied")]
    assert pairs(failures) == [("nope", "delete", "failure")]


def test_filter_by_user_id(busy: SecretService) -> None:
    bob = busy.get_audit_logs(user_id="bob")

    assert pairs(bob) == [("a", "read", "success"), ("nope", "delete", "failure")]
    assert {e.user_id for e in bob} == {"bob"}
    assert busy.get_audit_logs(user_id="nobody") == []


def test_since_is_inclusive_and_until_is_exclusive(busy: SecretService) -> None:
    everything = busy.get_audit_logs()
    pivot = everything[len(everything) // 2]

    since = busy.get_audit_logs(since=pivot.timestamp)
    until = busy.get_audit_logs(until=pivot.timestamp)

    assert pivot in since
    assert pivot not in until
    assert since == [e for e in everything if e.timestamp >= pivot.timestamp]
    assert until == [e for e in everything if e.timestamp < pivot.timestamp]
    window = busy.get_audit_logs(since=pivot.timestamp, until=everything[0].timestamp)
    assert window == [e for e in since if e.timestamp < everything[0].timestamp]


def test_limit_and_offset_page_through_the_log(busy: SecretService) -> None:
    everything = busy.get_audit_logs()

    pages = [busy.get_audit_logs(limit=3, offset=o) for o in range(0, len(everything), 3)]

    assert [e for page in pages for e in page] == everything
    assert all(len(page) <= 3 for page in pages)
    assert busy.get_audit_logs(offset=len(everything)) == []


def test_pages_by_position_do_not_shift_while_entries_are_added(busy: SecretService) -> None:
    """Each page starts before the last position of the one before; reads recorded
    between two pages (newest first, so at the top) move no entry into a later page."""
    everything = busy.get_audit_logs()
    pages: list[list[AuditEntry]] = []
    before: int | None = None
    while True:
        page = busy.get_audit_logs(limit=2, before_position=before, secret_name="a")
        if not page:
            break
        pages.append(page)
        before = page[-1].position
        busy.retrieve("a")  # a new entry of the filtered secret, newer than every page

    paged = [entry for page in pages for entry in page]
    assert paged == [e for e in everything if e.secret_name == "a"]
    assert len({e.position for e in paged}) == len(paged)
    assert busy.get_audit_logs(before_position=everything[-1].position) == []
    assert busy.get_audit_logs(before_position=0) == []


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_a_before_position_that_is_not_a_position_is_invalid_input(
    acme: SecretService, bad: object
) -> None:
    with pytest.raises(InvalidInput, match="before_position"):
        acme.get_audit_logs(before_position=bad)  # type: ignore[arg-type]


def test_the_default_limit_is_one_hundred_entries(acme: SecretService) -> None:
    acme.store("token", "v")
    for _ in range(105):
        acme.retrieve("token")

    assert len(acme.get_audit_logs()) == 100
    assert len(acme.get_audit_logs(limit=1000)) == 107


def test_audit_logs_only_show_the_current_tenant(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "a")
    service.store_for_tenant("globex", "token", "g")

    with tenant("globex"):
        entries = service.get_audit_logs()

    assert {e.tenant_id for e in entries} == {"globex"}
    assert len(entries) == 2


def test_a_tenant_id_filter_outside_super_admin_is_invalid_input(acme: SecretService) -> None:
    with pytest.raises(InvalidInput):
        acme.get_audit_logs(tenant_id="acme")
    with pytest.raises(InvalidInput):
        acme.get_audit_logs(tenant_id="globex")


def test_super_admin_reads_one_tenant_or_all_tenants(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "a")
    service.store_for_tenant("globex", "token", "g")

    with super_admin():
        everyone = service.get_audit_logs()
        globex = service.get_audit_logs(tenant_id="globex")
        with tenant("acme"):
            still_everyone = service.get_audit_logs()

    assert {e.tenant_id for e in everyone} == {"acme", "globex"}
    assert len(everyone) == 4
    assert {e.tenant_id for e in globex} == {"globex"}
    assert globex == [e for e in everyone if e.tenant_id == "globex"]
    assert still_everyone == everyone
