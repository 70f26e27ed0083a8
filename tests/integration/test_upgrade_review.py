"""Stores written by releases before 0.12, which accepted invisible characters in tenant
ids and secret names and direction-changing ones in free text: after the upgrade, what
they stored stays reachable, while no new name of that kind can enter the stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import MakeService
from keyledger import InvalidInput, SecretService, super_admin, tenant
from keyledger.application import keys, secrets

LEGACY_TENANT = "ac\u200bme"  # a zero-width space: invisible in every listing
LEGACY_NAME = "api\u00adkey"  # a soft hyphen
LEGACY_USER = "u\u202eser"  # a right-to-left override, in free text


@contextmanager
def an_older_release(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Writes as releases before 0.12 made them: no check for invisible characters."""
    with monkeypatch.context() as patched:
        patched.setattr(secrets, "is_new_identifier", lambda value: True)
        patched.setattr(secrets, "check_new_identifier", lambda field, value: None)
        patched.setattr(keys, "check_new_identifier", lambda field, value: None)
        patched.setattr("keyledger.service.check_optional_text", _any_text)
        patched.setattr("keyledger.context.check_optional_text", _any_text)
        patched.setattr("keyledger.context.check_label", _any_text)
        yield


def _any_text(field: str, value: object, max_length: int = 4096) -> str | None:
    return None if value is None else str(value)


def _stream_length(service: SecretService) -> int:
    with super_admin():
        return len(service.get_audit_logs(limit=10_000))


@pytest.fixture
def legacy(service: SecretService, monkeypatch: pytest.MonkeyPatch) -> SecretService:
    with an_older_release(monkeypatch):
        service.store_for_tenant(LEGACY_TENANT, "token", "v1", user_id=LEGACY_USER)
        service.store_for_tenant("acme", LEGACY_NAME, "v2")
        service.store_for_tenant("acme", "plain", "v3")
    return service


def test_names_an_older_release_stored_stay_reachable(legacy: SecretService) -> None:
    service = legacy
    assert service.retrieve_for_tenant(LEGACY_TENANT, "token").value == "v1"
    assert service.retrieve_for_tenant("acme", LEGACY_NAME).value == "v2"
    assert service.store_for_tenant("acme", LEGACY_NAME, "v2b").version == 2  # an update
    assert service.store_for_tenant(LEGACY_TENANT, "second", "v4").version == 1
    assert [s.name for s in service.list_for_tenant("acme")] == [LEGACY_NAME, "plain"]
    with tenant(LEGACY_TENANT):
        assert service.exists("token")
        assert service.rotate_key().version == 2
    assert service.list_keys(LEGACY_TENANT)[-1].version == 2
    with super_admin():
        assert len(service.get_audit_logs(tenant_id=LEGACY_TENANT, secret_name="token")) == 2
        assert len(service.get_audit_logs(tenant_id=LEGACY_TENANT, user_id=LEGACY_USER)) == 2
    report = service.diagnose_tenant_secret_key_drift(LEGACY_TENANT)
    assert [i for i in report.issues if i.severity == "error"] == []
    assert service.delete_for_tenant("acme", LEGACY_NAME) is True
    assert [s.name for s in service.list_for_tenant("acme")] == ["plain"]
    assert service.erase_tenant(LEGACY_TENANT, confirm=True) == [1, 2]


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.store_for_tenant("acme", "new\u200bname", "v"),
        lambda s: s.store_for_tenant("acme", "ops\u034f-alice", "v"),  # (not a format char)
        lambda s: s.store_for_tenant("acme", "x", "v", category="api\ufe0f"),
        lambda s: s.store_for_tenant("new\u200btenant", "name", "v"),
        lambda s: s.store_for_tenant(LEGACY_TENANT, "new\u2066name", "v"),
        lambda s: s.retrieve_for_tenant("acme", "missing\u200b"),
        lambda s: s.retrieve_for_tenant("unknown\u200b", "name"),
        lambda s: s.disable_for_tenant("acme", "missing\u00ad"),
        lambda s: s.delete_for_tenant("unknown\u202e", "name"),
    ],
    ids=[
        "new name",
        "new name with a combining grapheme joiner",
        "category with a variation selector",
        "new tenant",
        "new name in a legacy tenant",
        "read of an unknown name",
        "read in an unknown tenant",
        "disable of an unknown name",
        "delete in an unknown tenant",
    ],
)
def test_no_new_invisible_name_enters_the_stream(legacy: SecretService, write: object) -> None:
    service = legacy
    before = _stream_length(service)
    with pytest.raises(InvalidInput, match="invisible"):
        write(service)  # type: ignore[operator]
    assert _stream_length(service) == before


def test_rotating_the_key_of_a_new_invisible_tenant_is_refused(service: SecretService) -> None:
    with tenant("new\u200btenant"), pytest.raises(InvalidInput, match="invisible"):
        service.rotate_key()
    assert service.list_keys("new\u200btenant") == []


def test_a_store_that_fails_audits_no_new_invisible_name(make_service: MakeService) -> None:
    """Without a master key a store fails and is audited as failed; under a name that
    could not be created it is refused instead, and nothing is written."""
    keyed = make_service()
    keyed.store_for_tenant("acme", "plain", "v")
    keyless = make_service(master_key=None)
    before = _stream_length(keyed)

    for tenant_id, name in (("acme", "db\u200bpassword"), ("new\u200btenant", "name")):
        with pytest.raises(InvalidInput, match="invisible"):
            keyless.store_for_tenant(tenant_id, name, "v")

    assert _stream_length(keyed) == before


def test_a_deleted_invisible_name_is_not_stored_again(
    legacy: SecretService,
) -> None:
    """Deleted, it names nothing: storing it again would create a new secret under it."""
    service = legacy
    assert service.delete_for_tenant("acme", LEGACY_NAME) is True
    before = _stream_length(service)

    with pytest.raises(InvalidInput, match="invisible"):
        service.store_for_tenant("acme", LEGACY_NAME, "again")

    assert _stream_length(service) == before
    assert [s.name for s in service.list_for_tenant("acme")] == ["plain"]


DECOMPOSED = "cafe\u0301"  # "café" with its accent as a combining character (NFD)
COMPOSED = "caf\u00e9"  # the same text composed (NFC): it looks the same in any listing


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.store_for_tenant("acme", DECOMPOSED, "v"),
        lambda s: s.store_for_tenant("t-" + DECOMPOSED, "name", "v"),
        lambda s: s.retrieve_for_tenant("acme", DECOMPOSED),
        lambda s: s.disable_for_tenant("acme", DECOMPOSED),
    ],
    ids=["new name", "new tenant", "read of an unknown name", "disable of an unknown name"],
)
def test_a_new_name_not_in_nfc_is_refused_beside_its_look_alike(
    service: SecretService, write: object
) -> None:
    """Found by review: "café" composed and decomposed were two secrets that list alike."""
    service.store_for_tenant("acme", COMPOSED, "composed")
    before = _stream_length(service)
    with pytest.raises(InvalidInput, match="NFC"):
        write(service)  # type: ignore[operator]
    assert _stream_length(service) == before
    assert [s.name for s in service.list_for_tenant("acme")] == [COMPOSED]


def test_a_name_not_in_nfc_stored_by_an_older_release_stays_reachable(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    with an_older_release(monkeypatch):
        service.store_for_tenant("acme", DECOMPOSED, "v1")
    assert service.retrieve_for_tenant("acme", DECOMPOSED).value == "v1"
    assert service.store_for_tenant("acme", DECOMPOSED, "v2").version == 2
    assert service.delete_for_tenant("acme", DECOMPOSED) is True
