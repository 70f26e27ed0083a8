"""Bad input: each is a typed error and nothing is written (SPEC sections 2 and 3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyledger import (
    InvalidInput,
    KeyledgerError,
    SecretService,
    TenantRequired,
    super_admin,
    tenant,
)
from keyledger.infrastructure.settings import KeyledgerSettings

MakeService = Callable[..., SecretService]
NEXT_YEAR = datetime.now(UTC) + timedelta(days=365)
NAIVE = datetime(2099, 1, 1, 12, 0)

BAD_IDENTIFIERS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 201, id="201-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x7fb", id="delete-char"),
    pytest.param("\tname", id="leading-tab"),
    pytest.param(" name", id="leading-space"),
    pytest.param("name ", id="trailing-space"),
    pytest.param("a\ud800b", id="lone-surrogate"),  # e.g. undecodable bytes in argv
    pytest.param(None, id="none"),
    pytest.param(42, id="int"),
]


def raw_counts(service: SecretService) -> tuple[int, int, int]:
    """(newest event position, events, kl_key_material rows), read from the tables: a write
    the read models do not show (a seal checkpoint, a snapshot's event, an orphan wrapped
    key) changes these."""
    store = service._ledger.store
    with store.reading() as cur:
        cur.execute(
            f"SELECT coalesce(max({store.position_column}), 0), count(*) "
            f"FROM {store.events_table_name}"
        )
        head, events = cur.fetchone()[:2]
        cur.execute("SELECT count(*) FROM kl_key_material")
        material = cur.fetchone()[0]
    return int(head), int(events), int(material)


def snapshot(service: SecretService) -> tuple[list[Any], list[Any], tuple[int, int, int]]:
    """Everything a write could change: the whole audit stream, the tenant's secrets, and
    the event and key material tables themselves (on every backend)."""
    with super_admin():
        audit = service.get_audit_logs(limit=100_000)
    secrets = service.list_for_tenant("acme", status=None, include_expired=True)
    return audit, secrets, raw_counts(service)


@pytest.fixture
def acme(service: SecretService) -> Iterator[SecretService]:
    """Tenant acme with one secret, 'token', so that updates can be tried too."""
    with tenant("acme"):
        service.store("token", "original", category="c", metadata={"k": "v"})
        yield service


@pytest.fixture
def unchanged(acme: SecretService) -> Iterator[None]:
    """Asserts after the test that nothing at all was written."""
    before = snapshot(acme)
    yield
    assert snapshot(acme) == before
    assert acme.retrieve("token").value == "original"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("name", BAD_IDENTIFIERS)
def test_an_invalid_secret_name_is_refused_by_every_call(acme: SecretService, name: Any) -> None:
    for call in (
        lambda: acme.store(name, "v"),
        lambda: acme.retrieve(name),
        lambda: acme.exists(name),
        lambda: acme.disable(name),
        lambda: acme.enable(name),
        lambda: acme.delete(name),
    ):
        with pytest.raises(InvalidInput):
            call()
    if name is not None:  # None is "no filter"
        with pytest.raises(InvalidInput):
            acme.get_audit_logs(secret_name=name)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("tenant_id", BAD_IDENTIFIERS)
def test_an_invalid_tenant_id_is_refused_everywhere(acme: SecretService, tenant_id: Any) -> None:
    with pytest.raises(InvalidInput), tenant(tenant_id):
        pytest.fail("entered a tenant block with an invalid tenant id")
    for call in (
        lambda: acme.store_for_tenant(tenant_id, "token", "v"),
        lambda: acme.retrieve_for_tenant(tenant_id, "token"),
        lambda: acme.list_for_tenant(tenant_id),
        lambda: acme.rotate_key_for_tenant(tenant_id),
        lambda: acme.reencrypt_all_for_tenant(tenant_id),
    ):
        with pytest.raises(InvalidInput):
            call()
    if tenant_id is not None:  # None is "all tenants"
        with super_admin(), pytest.raises(InvalidInput):
            acme.get_audit_logs(tenant_id=tenant_id)


def test_identifiers_at_the_limits_are_accepted(service: SecretService) -> None:
    longest = "x" * 200
    with tenant(longest):
        service.store(longest, "v")
        service.store("inner spaces are fine", "v")
        service.store("ünïcödé-秘密", "v")

        assert service.retrieve(longest).value == "v"
        assert len(service.list()) == 3


def test_invalid_input_is_also_a_value_error_and_a_keyledger_error() -> None:
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(InvalidInput, KeyledgerError)
    assert issubclass(TenantRequired, KeyledgerError)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("existing", [False, True], ids=["new-name", "update"])
def test_a_naive_expiry_is_refused(acme: SecretService, existing: bool) -> None:
    name = "token" if existing else "fresh"

    with pytest.raises(InvalidInput, match="expires_at"):
        acme.store(name, "v", expires_at=NAIVE)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("field", ["since", "until"])
def test_naive_audit_bounds_are_refused(acme: SecretService, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        acme.get_audit_logs(**{field: NAIVE})


@pytest.mark.usefixtures("unchanged")
def test_giving_both_an_expiry_and_clear_expiry_is_refused(acme: SecretService) -> None:
    with pytest.raises(InvalidInput):
        acme.store("token", "v", expires_at=NEXT_YEAR, clear_expiry=True)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "value",
    [
        pytest.param("x" * 65537, id="str-over-default"),
        pytest.param(b"x" * 65537, id="bytes-over-default"),
        pytest.param("é" * 32769, id="multibyte-str-over-default"),
    ],
)
def test_a_value_over_the_default_limit_is_refused(acme: SecretService, value: Any) -> None:
    with pytest.raises(InvalidInput):
        acme.store("token", value)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        pytest.param(b"0123456789", True, id="10-bytes"),
        pytest.param("0123456789", True, id="10-chars"),
        pytest.param(b"0123456789A", False, id="11-bytes"),
        pytest.param("ééééé" + "x", False, id="6-chars-11-bytes"),
    ],
)
def test_the_value_limit_counts_bytes_and_comes_from_settings(
    make_service: MakeService, value: str | bytes, accepted: bool
) -> None:
    small = make_service(settings=KeyledgerSettings(max_value_bytes=10))
    with tenant("acme"):
        if accepted:
            small.store("token", value)
            assert small.retrieve("token").value == value
        else:
            with pytest.raises(InvalidInput):
                small.store("token", value)
            assert small.list(status=None, include_expired=True) == []
            assert small.get_audit_logs() == []


@pytest.mark.usefixtures("unchanged")
def test_a_str_value_that_is_not_valid_unicode_is_refused_without_quoting_it(
    acme: SecretService,
) -> None:
    with pytest.raises(InvalidInput) as raised:
        acme.store("token", "sk_live_\udcffsecret")
    assert "sk_live" not in str(raised.value)  # unlike UnicodeEncodeError's own message
    assert "store arbitrary data as bytes" in str(raised.value)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "value", [None, 42, 4.2, ["v"], {"v": "v"}], ids=["none", "int", "float", "list", "dict"]
)
def test_a_value_that_is_neither_str_nor_bytes_is_refused(acme: SecretService, value: Any) -> None:
    with pytest.raises(InvalidInput):
        acme.store("token", value)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"nested": {"a": "b"}}, id="nested-dict"),
        pytest.param({"n": 1}, id="int-value"),
        pytest.param({1: "v"}, id="int-key"),
        pytest.param({"n": None}, id="none-value"),
        pytest.param({"l": ["a"]}, id="list-value"),
        pytest.param([("k", "v")], id="list-of-pairs"),
        pytest.param("k=v", id="string"),
    ],
)
def test_metadata_that_is_not_a_flat_dict_of_str_is_refused(
    acme: SecretService, metadata: Any
) -> None:
    with pytest.raises(InvalidInput, match="metadata"):
        acme.store("token", "v", metadata=metadata)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "options",
    [
        {"category": 7},
        {"description": ["d"]},
        {"category": "a\nb"},
        {"description": "d\udcff"},
        {"metadata": {"k": "v\ud800"}},
        {"clear_expiry": "yes"},
    ],
    ids=[
        "int-category",
        "list-description",
        "control-char-category",
        "surrogate-description",
        "surrogate-metadata",
        "str-clear-expiry",
    ],
)
def test_malformed_store_options_are_refused(acme: SecretService, options: dict) -> None:
    with pytest.raises(InvalidInput):
        acme.store("token", "v", **options)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "options",
    [
        {"status": "deleted"},
        {"limit": -1},
        {"offset": -1},
        {"limit": "10"},
        {"limit": True},
        {"include_expired": "yes"},
    ],
    ids=[
        "unknown-status",
        "negative-limit",
        "negative-offset",
        "str-limit",
        "bool-limit",
        "str-include-expired",
    ],
)
def test_malformed_list_options_are_refused(acme: SecretService, options: dict) -> None:
    with pytest.raises(InvalidInput):
        acme.list(**options)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("days", [-1, "30", None], ids=["negative", "str", "none"])
def test_malformed_expiry_windows_are_refused(acme: SecretService, days: Any) -> None:
    with pytest.raises(InvalidInput):
        acme.list_expiring(days=days)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "bad",
    [{"action": "launch"}, {"result": "maybe"}, {"limit": -1}, {"offset": -1}],
    ids=["action", "result", "limit", "offset"],
)
def test_unknown_audit_filter_values_are_refused(acme: SecretService, bad: dict) -> None:
    with pytest.raises(InvalidInput):
        acme.get_audit_logs(**bad)


TENANT_SCOPED_CALLS: dict[str, Callable[[SecretService], object]] = {
    "store": lambda s: s.store("token", "v"),
    "retrieve": lambda s: s.retrieve("token"),
    "list": lambda s: s.list(),
    "exists": lambda s: s.exists("token"),
    "categories": lambda s: s.categories(),
    "list_expiring": lambda s: s.list_expiring(),
    "disable": lambda s: s.disable("token"),
    "enable": lambda s: s.enable("token"),
    "delete": lambda s: s.delete("token"),
    "rotate_key": lambda s: s.rotate_key(),
    "reencrypt_all": lambda s: s.reencrypt_all(),
    "get_audit_logs": lambda s: s.get_audit_logs(),
    "list_keys": lambda s: s.list_keys(),
}


@pytest.mark.parametrize("call", list(TENANT_SCOPED_CALLS.values()), ids=list(TENANT_SCOPED_CALLS))
def test_a_tenant_scoped_call_outside_any_tenant_raises_and_writes_nothing(
    service: SecretService, call: Callable[[SecretService], object]
) -> None:
    service.store_for_tenant("acme", "token", "original", category="c", metadata={"k": "v"})
    before = snapshot(service)

    with pytest.raises(TenantRequired):
        call(service)

    assert snapshot(service) == before


def test_super_admin_alone_is_not_a_tenant(service: SecretService) -> None:
    with super_admin(), pytest.raises(TenantRequired):
        service.store("token", "v")
    with super_admin():
        assert service.get_audit_logs() == []
