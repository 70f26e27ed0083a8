"""Where the master key comes from: environment, file, previous keys, missing or wrong keys."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from keyledger import (
    DecryptionFailed,
    InvalidInput,
    InvalidMasterKey,
    MasterKeyUnavailable,
    SecretNotFound,
    SecretService,
    tenant,
)
from keyledger.infrastructure.crypto import MasterKey, parse_master_key
from keyledger.infrastructure.settings import KeyledgerSettings

TENANT = "tenant-config"
NAME = "db-password"
VALUE = "config-test-value-71c2e8d4"

KEY_A = secrets.token_hex(32)
KEY_B = secrets.token_hex(32)
KEY_C = secrets.token_hex(32)


def amk_id(hex_text: str) -> str:
    return MasterKey(bytes.fromhex(hex_text)).amk_id


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KEYLEDGER_* or SMRT_* variable of the outer environment can leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith(("KEYLEDGER_", "SMRT_")):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'keyledger.db'}"


def store_with_key(db_url: str, hex_key: str, name: str = NAME, value: str = VALUE) -> None:
    with SecretService.create(db_url, master_key=hex_key) as service, tenant(TENANT):
        service.store(name, value)


def roundtrip(service: SecretService, value: str = VALUE) -> str | bytes:
    with tenant(TENANT):
        service.store(NAME, value)
        return service.retrieve(NAME).value


def active_amk_ids(service: SecretService) -> list[str]:
    with tenant(TENANT):
        return [key.amk_id for key in service.list_keys()]


# -- where the current key comes from ------------------------------------------------------


def test_the_master_key_is_read_from_keyledger_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    with SecretService.create("memory:") as service:
        assert roundtrip(service) == VALUE
        assert active_amk_ids(service) == [amk_id(KEY_A)]


def test_an_uppercase_master_key_in_the_environment_is_the_same_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A.upper())
    with SecretService.create("memory:") as service:
        assert roundtrip(service) == VALUE
        assert active_amk_ids(service) == [amk_id(KEY_A)]


def test_smrt_secret_master_key_is_accepted_as_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMRT_SECRET_MASTER_KEY", KEY_B)
    with SecretService.create("memory:") as service:
        assert roundtrip(service) == VALUE
        assert active_amk_ids(service) == [amk_id(KEY_B)]


@pytest.mark.parametrize("variable", ["KEYLEDGER_MASTER_KEY", "KEYLEDGER_MASTER_KEY_FILE"])
def test_either_keyledger_variable_wins_over_the_smrt_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    if variable == "KEYLEDGER_MASTER_KEY_FILE":
        key_file = tmp_path / "amk.hex"
        key_file.write_text(KEY_A + "\n", encoding="ascii")
        monkeypatch.setenv(variable, str(key_file))
    else:
        monkeypatch.setenv(variable, KEY_A)
    monkeypatch.setenv("SMRT_SECRET_MASTER_KEY", KEY_B)
    with SecretService.create("memory:") as service:
        roundtrip(service)
        assert active_amk_ids(service) == [amk_id(KEY_A)]


def test_the_master_key_is_read_from_keyledger_master_key_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "amk.hex"
    key_file.write_text(KEY_C + "\n", encoding="ascii")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))
    with SecretService.create("memory:") as service:
        assert roundtrip(service) == VALUE
        assert active_amk_ids(service) == [amk_id(KEY_C)]


def test_an_explicit_master_key_argument_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    with SecretService.create("memory:", master_key=KEY_B) as service:
        roundtrip(service)
        assert active_amk_ids(service) == [amk_id(KEY_B)]


def test_the_database_url_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, db_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEYLEDGER_DATABASE_URL", db_url)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    with SecretService.create() as service:
        roundtrip(service)
    assert (tmp_path / "keyledger.db").exists()


# -- previous keys -------------------------------------------------------------------------


def test_a_secret_stored_under_an_old_key_is_readable_with_the_old_key_in_previous_keys(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    store_with_key(db_url, KEY_A)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_B)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        assert service.retrieve(NAME).value == VALUE
        # The key version stays wrapped by A: previous keys unwrap, nothing is rewrapped.
        assert [key.amk_id for key in service.list_keys()] == [amk_id(KEY_A)]


def test_previous_keys_accept_a_comma_separated_list_with_spaces(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    store_with_key(db_url, KEY_A)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_B)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", f" {KEY_C} , {KEY_A.upper()} ,")
    with SecretService.create(db_url) as service, tenant(TENANT):
        assert service.retrieve(NAME).value == VALUE


def test_previous_keys_given_as_an_argument_unwrap_old_key_versions(db_url: str) -> None:
    store_with_key(db_url, KEY_A)
    with (
        SecretService.create(db_url, master_key=KEY_B, previous_master_keys=[KEY_A]) as service,
        tenant(TENANT),
    ):
        assert service.retrieve(NAME).value == VALUE


def test_after_a_master_key_change_stores_and_rotation_keep_working(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    store_with_key(db_url, KEY_A)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_B)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        service.store("second", "second-value")
        assert service.retrieve("second").value == "second-value"
        rotated = service.rotate_key()
        assert rotated.amk_id == amk_id(KEY_B)
        service.store("third", "third-value")
        assert service.retrieve("third").value == "third-value"
        assert service.retrieve(NAME).value == VALUE
    # Without A, only what is under B's version stays readable.
    monkeypatch.delenv("KEYLEDGER_PREVIOUS_MASTER_KEYS")
    with SecretService.create(db_url) as service, tenant(TENANT):
        assert service.retrieve("third").value == "third-value"
        with pytest.raises(DecryptionFailed):
            service.retrieve(NAME)


def test_an_old_key_without_previous_keys_cannot_read_after_a_master_key_change(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    store_with_key(db_url, KEY_A)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_B)
    with SecretService.create(db_url) as service, tenant(TENANT):
        with pytest.raises(DecryptionFailed) as caught:
            service.retrieve(NAME)
        assert amk_id(KEY_A) in str(caught.value)
        assert VALUE not in str(caught.value)


# -- malformed keys fail at creation -------------------------------------------------------

MALFORMED = {
    "short": KEY_A[:62],
    "long": KEY_A + "ab",
    "odd": KEY_A[:63],
    "non-hex": KEY_A[:62] + "zz",
    "all-zero": "0" * 64,
}


@pytest.mark.parametrize("variable", ["KEYLEDGER_MASTER_KEY", "SMRT_SECRET_MASTER_KEY"])
@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_master_key_in_the_environment_fails_at_creation(
    monkeypatch: pytest.MonkeyPatch, variable: str, bad: str
) -> None:
    monkeypatch.setenv(variable, bad)
    with pytest.raises(InvalidMasterKey) as caught:
        SecretService.create("memory:")
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")  # where the bad key came from
    assert bad not in message


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_master_key_file_fails_at_creation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    key_file = tmp_path / "amk.hex"
    key_file.write_text(bad, encoding="ascii")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))
    with pytest.raises(InvalidMasterKey) as caught:
        SecretService.create("memory:")
    assert bad not in str(caught.value)


def test_a_missing_master_key_file_fails_at_creation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(tmp_path / "does-not-exist.hex"))
    with pytest.raises(InvalidMasterKey):
        SecretService.create("memory:")


@pytest.mark.parametrize("source", ["/dev/zero", "a-large-file"])
def test_an_endless_or_huge_master_key_file_fails_at_creation_without_reading_it_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    """A path naming a device read until memory ran out (found by review: MemoryError
    under a limit, the OOM killer without one): no more than a key's worth is read."""
    path = Path(source)
    if source == "a-large-file":
        path = tmp_path / "amk.hex"
        path.write_text(KEY_A + "\n" + " " * 5000, encoding="ascii")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(path))
    with pytest.raises(InvalidMasterKey, match="more than 4096 bytes"):
        SecretService.create("memory:")


def test_a_binary_master_key_file_fails_at_creation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "amk.bin"
    raw = secrets.token_bytes(32) + b"\xff"
    key_file.write_bytes(raw)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))
    with pytest.raises(InvalidMasterKey) as caught:
        SecretService.create("memory:")
    assert raw.hex() not in str(caught.value)


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_previous_master_key_fails_at_creation(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", f"{KEY_B},{bad}")
    with pytest.raises(InvalidMasterKey) as caught:
        SecretService.create("memory:")
    assert bad not in str(caught.value)
    assert KEY_B not in str(caught.value)


def test_a_malformed_previous_master_key_fails_at_creation_even_without_a_current_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", MALFORMED["non-hex"])
    with pytest.raises(InvalidMasterKey):
        SecretService.create("memory:")


def test_a_master_key_argument_given_as_bytes_is_invalid_master_key_quoting_nothing(
    tmp_path: Path,
) -> None:
    raw = bytes.fromhex(KEY_A)
    with pytest.raises(InvalidMasterKey, match="master_key argument: must be a str") as caught:
        SecretService.create(f"sqlite:///{tmp_path / 'never.db'}", master_key=raw)  # type: ignore[arg-type]
    shown = str(caught.value) + repr(caught.value)
    assert KEY_A[:16] not in shown
    assert repr(raw)[2:20] not in shown
    assert not (tmp_path / "never.db").exists()


def test_parse_master_key_refuses_what_is_not_a_str_naming_only_its_source() -> None:
    for given in (KEY_A.encode(), bytearray.fromhex(KEY_A), None, 42):
        with pytest.raises(InvalidMasterKey, match=r"^KEYLEDGER_MASTER_KEY: must be a str"):
            parse_master_key(given, "KEYLEDGER_MASTER_KEY")  # type: ignore[arg-type]


def test_a_malformed_master_key_fails_before_the_database_is_created(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", MALFORMED["short"])
    with pytest.raises(InvalidMasterKey):
        SecretService.create(f"sqlite:///{tmp_path / 'never.db'}")
    assert not (tmp_path / "never.db").exists()


# -- missing key ---------------------------------------------------------------------------


def test_a_service_without_a_master_key_opens_and_serves_read_only_queries(db_url: str) -> None:
    store_with_key(db_url, KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        assert [info.name for info in service.list()] == [NAME]
        assert service.exists(NAME)
        assert not service.exists("unknown")
        logs = service.get_audit_logs()
        assert {(entry.action, entry.result) for entry in logs} >= {("create", "success")}


def test_a_fresh_service_without_a_master_key_lists_nothing() -> None:
    with SecretService.create("memory:") as service, tenant(TENANT):
        assert service.list() == []
        assert service.get_audit_logs() == []
        assert not service.exists(NAME)


def test_store_without_a_master_key_raises_master_key_unavailable_and_writes_no_secret() -> None:
    with SecretService.create("memory:") as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable):
            service.store(NAME, VALUE)
        assert service.list() == []
        assert not service.exists(NAME)
        assert service.list_keys() == []


def test_retrieve_without_a_master_key_raises_master_key_unavailable(db_url: str) -> None:
    store_with_key(db_url, KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable) as caught:
            service.retrieve(NAME)
        assert VALUE not in str(caught.value)
        # The failed read is audited, and no read is counted.
        failures = service.get_audit_logs(secret_name=NAME, action="read", result="failure")
        assert len(failures) == 1
        assert service.list()[0].access_count == 0


def test_updating_an_existing_secret_without_a_master_key_raises_master_key_unavailable(
    db_url: str,
) -> None:
    store_with_key(db_url, KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable):
            service.store(NAME, "new-value-never-stored")
        assert service.list()[0].version == 1
    with SecretService.create(db_url, master_key=KEY_A) as service, tenant(TENANT):
        assert service.retrieve(NAME).value == VALUE


def test_rotate_key_without_a_master_key_raises_master_key_unavailable(db_url: str) -> None:
    store_with_key(db_url, KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable):
            service.rotate_key()
        keys = service.list_keys()
        assert [(key.version, key.status) for key in keys] == [(1, "active")]


def test_rotate_key_on_a_fresh_tenant_without_a_master_key_raises_master_key_unavailable() -> None:
    with SecretService.create("memory:") as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable):
            service.rotate_key()
        assert service.list_keys() == []


def test_only_previous_keys_without_a_current_key_still_make_store_unavailable(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    store_with_key(db_url, KEY_A)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", KEY_A)
    with SecretService.create(db_url) as service, tenant(TENANT):
        with pytest.raises(MasterKeyUnavailable):
            service.store("new", "value")
        with pytest.raises(MasterKeyUnavailable):
            service.rotate_key()


def test_retrieving_an_unknown_secret_without_a_master_key_is_secret_not_found() -> None:
    with (
        SecretService.create("memory:") as service,
        tenant(TENANT),
        pytest.raises(SecretNotFound),
    ):
        service.retrieve("unknown")


# -- wrong key -----------------------------------------------------------------------------


def test_a_wrong_master_key_makes_retrieve_fail_with_decryption_failed_and_an_audit_entry(
    db_url: str,
) -> None:
    store_with_key(db_url, KEY_A)
    with SecretService.create(db_url, master_key=KEY_B) as service, tenant(TENANT):
        with pytest.raises(DecryptionFailed) as caught:
            service.retrieve(NAME)
        for secret_text in (VALUE, KEY_A, KEY_B, KEY_A.upper(), KEY_B.upper()):
            assert secret_text not in str(caught.value)
        failures = service.get_audit_logs(secret_name=NAME, action="read", result="failure")
        assert len(failures) == 1
        assert failures[0].tenant_id == TENANT
        assert service.get_audit_logs(secret_name=NAME, action="read", result="success") == []
        assert service.list()[0].access_count == 0


def test_a_wrong_master_key_does_not_damage_the_data_for_the_right_key(db_url: str) -> None:
    store_with_key(db_url, KEY_A)
    with (
        SecretService.create(db_url, master_key=KEY_B) as service,
        tenant(TENANT),
        pytest.raises(DecryptionFailed),
    ):
        service.retrieve(NAME)
    with SecretService.create(db_url, master_key=KEY_A) as service, tenant(TENANT):
        assert service.retrieve(NAME).value == VALUE


@pytest.mark.parametrize("compromised", ["active", "retired"])
def test_a_wrong_master_key_compromises_no_active_key_it_cannot_replace_rightly(
    db_url: str, compromised: str
) -> None:
    """Replacing a compromised active version wraps the new one under the configured
    master key: under a wrong one, every process with the right key could no longer
    store to the tenant (found by review). Refused as a rotation is; a retired version
    needs no replacement and is compromised all the same."""
    store_with_key(db_url, KEY_A)
    if compromised == "retired":
        with SecretService.create(db_url, master_key=KEY_A) as service:
            service.rotate_key_for_tenant(TENANT)
    with SecretService.create(db_url, master_key=KEY_B) as service:
        if compromised == "active":
            with pytest.raises(MasterKeyUnavailable, match="wrong one"):
                service.compromise_key_for_tenant(TENANT, 1, "suspected")
        else:
            assert service.compromise_key_for_tenant(TENANT, 1, "suspected").status == (
                "compromised"
            )
    with SecretService.create(db_url, master_key=KEY_A) as service, tenant(TENANT):
        statuses = {key.version: key.status for key in service.list_keys()}
        if compromised == "active":
            assert statuses == {1: "active"}
        else:
            assert statuses == {1: "compromised", 2: "active"}
        service.store("fresh", "value-after")  # the right fleet stores on
        assert service.retrieve("fresh").value == "value-after"


@pytest.mark.parametrize(
    ("variable", "bad"),
    [
        ("KEYLEDGER_MAX_VALUE_BYTES", "lots-of-bytes"),
        ("KEYLEDGER_GROUP_COMMIT_WAIT_MS", "101"),
        ("KEYLEDGER_CREATE_TABLES", "perhaps-later"),
    ],
)
def test_a_malformed_setting_is_invalid_input_naming_the_variable_not_its_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, bad: str
) -> None:
    monkeypatch.setenv(variable, bad)
    with pytest.raises(InvalidInput) as caught:
        SecretService.create("memory:")
    assert str(caught.value).startswith(f"invalid configuration: {variable} (input should be")
    assert bad not in str(caught.value)


def test_a_master_key_variable_and_a_key_file_naming_different_keys_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stale KEYLEDGER_MASTER_KEY beside a new key file must not silently win: the
    rotation runbook would then re-wrap nothing and report success."""
    key_file = tmp_path / "amk.hex"
    key_file.write_text(KEY_B + "\n", encoding="ascii")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))
    with pytest.raises(InvalidMasterKey, match="name different master keys") as raised:
        SecretService.create("memory:")
    assert KEY_A not in str(raised.value)
    assert KEY_B not in str(raised.value)

    key_file.write_text(KEY_A.upper() + "\n", encoding="ascii")  # the same key: fine
    with SecretService.create("memory:") as service:
        roundtrip(service)
        assert active_amk_ids(service) == [amk_id(KEY_A)]

    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(tmp_path / "missing.hex"))
    with pytest.raises(InvalidMasterKey, match="cannot read"):
        SecretService.create("memory:")


def test_the_current_master_key_listed_again_as_previous_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", f"{KEY_B},{KEY_A}")
    with pytest.raises(InvalidMasterKey, match="also listed") as raised:
        SecretService.create("memory:")
    assert KEY_A not in str(raised.value)


@pytest.mark.parametrize(
    ("variable", "error"),
    [
        ("KEYLEDGER_MASTER_KEY_FILE", InvalidMasterKey),
        ("KEYLEDGER_AUDIT_ANCHOR_FILE", InvalidInput),
    ],
)
def test_a_file_variable_set_but_empty_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch, variable: str, error: type[Exception]
) -> None:
    """Left empty (``KEYLEDGER_MASTER_KEY_FILE=`` in a compose file), the variable once
    read as the working directory: "Is a directory" (found by review)."""
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    monkeypatch.setenv(variable, " ")
    with pytest.raises(error, match=f"{variable}.*set but empty"):
        SecretService.create("memory:")


def test_a_malformed_previous_key_is_named_by_its_place_in_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blank entries count: the operator finds the entry the error names (found by
    review: it was the index among the non-blank entries)."""
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY", KEY_A)
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", f"{KEY_B},,{MALFORMED['non-hex']}")
    with pytest.raises(InvalidMasterKey, match=r"KEYLEDGER_PREVIOUS_MASTER_KEYS\[2\]"):
        SecretService.create("memory:")
    monkeypatch.setenv("KEYLEDGER_PREVIOUS_MASTER_KEYS", f"{KEY_B}, ,")
    with SecretService.create("memory:"):  # blank entries alone are no keys, no error
        pass


SETTING_NAMES = sorted(
    "SMRT_SECRET_MASTER_KEY" if name == "smrt_master_key" else f"KEYLEDGER_{name.upper()}"
    for name in KeyledgerSettings.model_fields
)
MARKED_BAD_VALUES = ["x-MARK-1", "-7777", "1e999", "nan", "99999999999999999999999", "[9-MARK]"]


@pytest.mark.parametrize("variable", SETTING_NAMES)
def test_no_reason_given_for_a_bad_setting_quotes_what_was_given(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The reasons (what the variable must be) come from pydantic; it is asked never to
    quote the input, and this holds it to that for every setting."""
    refusals: list[tuple[str, str]] = []
    for bad in MARKED_BAD_VALUES:
        monkeypatch.setenv(variable, bad)
        try:
            KeyledgerSettings()
        except InvalidInput as error:  # (a text setting takes any of them: no refusal)
            refusals.append((bad, str(error)))
    for bad, message in refusals:
        assert bad not in message, message
        assert message.startswith(f"invalid configuration: {variable} ("), message


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o640, True), (0o600, False)])
def test_a_key_file_others_may_read_is_warned_about_without_its_path_or_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: int,
    warned: bool,
) -> None:
    """`master-key generate > FILE` under the usual umask made it 0644, and keyledger
    took it without a word (found by review). A warning, not a refusal: a mounted secret
    may be readable only inside its container."""
    key = secrets.token_hex(32)
    path = tmp_path / "master.key"
    path.write_text(key + "\n")
    path.chmod(mode)
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(path))

    service = SecretService.create("memory:")
    service.close()

    assert ("may be read by users other than its owner" in caplog.text) is warned
    assert str(path) not in caplog.text
    assert key not in caplog.text
