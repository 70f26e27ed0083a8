"""Careless input a review found passing or leaking: each is now a typed error that
quotes nothing secret, carries no secret in its exception chain, and writes nothing."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyledger import InvalidInput, InvalidMasterKey, SecretService, super_admin, tenant
from keyledger.context import Actor
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.validation import MAX_COUNT


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception it carries (cause and context, however suppressed)."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _everything_said(error: BaseException) -> str:
    """All an error tracker could record of the chain: messages, reprs, arguments, and
    the ``object`` a Unicode error holds."""
    parts: list[str] = []
    for item in _chain(error):
        parts += [str(item), repr(item), repr(getattr(item, "object", ""))]
    return "\n".join(parts)


def _stream(service: SecretService) -> tuple[Any, ...]:
    with super_admin():
        audit = service.get_audit_logs(limit=MAX_COUNT)
    return audit, service.list_for_tenant("acme", status=None, include_expired=True)


# -- an actor handed in directly is checked like every other -------------------------------


@pytest.mark.parametrize(
    "actor",
    [
        pytest.param(Actor(user_id=12345), id="int-user"),  # type: ignore[arg-type]
        pytest.param(Actor(user_id="bob", ip_address=["x"]), id="list-ip"),  # type: ignore[arg-type]
        pytest.param(Actor(user_id="bob\nforged entry"), id="newline"),
        pytest.param(None, id="none"),
        pytest.param("bob", id="str"),
    ],
)
def test_a_status_change_with_a_malformed_actor_is_refused_and_the_audit_log_stays_readable(
    service: SecretService, actor: Any
) -> None:
    """The actor is recorded in the append-only stream: a malformed one written once
    would break every later audit query and rebuild, for good."""
    service.store_for_tenant("acme", "token", "v")
    before = _stream(service)

    with pytest.raises(InvalidInput):
        service.change_for_tenant("acme", "token", "disable", actor)

    assert _stream(service) == before
    service.rebuild_read_models()
    assert _stream(service) == before


def test_a_status_change_with_a_proper_actor_records_it(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "v")

    assert service.change_for_tenant("acme", "token", "disable", Actor(user_id="ops-7"))

    with super_admin():
        entry = service.get_audit_logs(tenant_id="acme", action="disable")[0]
    assert entry.user_id == "ops-7"


# -- the master key never shows up in a configuration error ---------------------------------


def test_a_master_key_put_in_the_file_variable_by_mistake_is_not_printed(
    master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", master_key)

    with pytest.raises(InvalidMasterKey, match="KEYLEDGER_MASTER_KEY_FILE") as raised:
        SecretService.create("memory:")

    assert master_key not in _everything_said(raised.value)
    assert master_key[:16] not in _everything_said(raised.value)


def test_a_key_file_that_is_not_ascii_fails_without_its_bytes_in_the_error(
    master_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "amk"
    key_file.write_bytes(master_key.encode() + "\u00e9".encode())
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))

    with pytest.raises(InvalidMasterKey, match="not ASCII") as raised:
        SecretService.create("memory:")

    assert master_key[:16] not in _everything_said(raised.value)


def test_a_key_file_saved_with_a_byte_order_mark_is_read(
    master_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Editors on Windows save text with a UTF-8 byte-order mark: the key is the rest."""
    key_file = tmp_path / "amk"
    key_file.write_bytes(b"\xef\xbb\xbf" + master_key.encode() + b"\r\n")
    monkeypatch.setenv("KEYLEDGER_MASTER_KEY_FILE", str(key_file))
    stored = SecretService.create(str_url := f"sqlite:///{tmp_path}/kl.db", master_key=master_key)
    stored.store_for_tenant("acme", "token", "v")
    stored.close()

    service = SecretService.create(str_url)
    try:
        assert service.retrieve_for_tenant("acme", "token").value == "v"
    finally:
        service.close()


@pytest.mark.parametrize(
    "field",
    ["previous_master_keys", "master_key", "audit_key", "previous_audit_keys"],
)
@pytest.mark.parametrize("shape", [list, lambda key: {"key": key}], ids=["list", "dict"])
def test_settings_given_a_key_in_the_wrong_shape_are_invalid_input_quoting_none_of_it(
    master_key: str, field: str, shape: Callable[[str], Any]
) -> None:
    with pytest.raises(InvalidInput, match=f"KEYLEDGER_{field.upper()}") as raised:
        KeyledgerSettings(**{field: shape(master_key) if shape is not list else [master_key]})

    said = _everything_said(raised.value)
    assert master_key[:8] not in said
    assert master_key[-8:] not in said


# -- nothing secret waits in an exception's context -----------------------------------------


def test_a_value_that_is_not_valid_unicode_is_refused_without_it_in_the_chain(
    service: SecretService,
) -> None:
    value = "sk_live_Zq7wKx9v\ud800"

    with pytest.raises(InvalidInput, match="lone surrogate") as raised:
        service.store_for_tenant("acme", "token", value)

    assert "Zq7wKx9v" not in _everything_said(raised.value)


def test_a_postgresql_url_with_a_hash_in_its_password_keeps_no_piece_of_it_in_the_chain(
    master_key: str,
) -> None:
    with pytest.raises(InvalidInput) as raised:
        SecretService.create("postgresql://u:Zq7w#s3cr@db:5432/kl", master_key=master_key)

    said = _everything_said(raised.value)
    assert "s3cr" not in said
    assert "Zq7w" not in said


def test_a_sqlite_path_with_a_nul_is_invalid_input(master_key: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="NUL"):
        SecretService.create(f"sqlite:///{tmp_path}/a%00b.db", master_key=master_key)
    assert list(tmp_path.iterdir()) == []


# -- bytes values serialise to JSON without quoting them ------------------------------------


def test_a_binary_value_serialises_to_json_as_base64_and_back(service: SecretService) -> None:
    raw = b"\xe9\xff\x00binary"
    service.store_for_tenant("acme", "blob", raw)
    secret = service.retrieve_for_tenant("acme", "blob")

    dumped = secret.model_dump(mode="json")
    text = secret.model_dump_json()

    assert dumped["value"] == "6f8AYmluYXJ5"  # URL-safe base64 of the bytes
    assert base64.urlsafe_b64decode(dumped["value"]) == raw
    assert '"value":"6f8AYmluYXJ5"' in text
    assert service.retrieve_for_tenant("acme", "blob").value == raw


def test_a_text_value_serialises_to_json_as_itself(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "sk_live_x")

    assert service.retrieve_for_tenant("acme", "token").model_dump(mode="json")["value"] == (
        "sk_live_x"
    )


# -- wrong argument types: typed errors, nothing written ------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.rebuild_read_models(names=5), id="rebuild-names-int"),
        pytest.param(lambda s: s.seal_audit(accept_untagged=[[1]]), id="seal-unhashable"),
        pytest.param(lambda s: s.verify_audit(anchor=5), id="verify-anchor-int"),
        pytest.param(lambda s: s.verify_audit(anchor=["x"]), id="verify-anchor-str-items"),
        pytest.param(lambda s: s.export_audit(tenant_id="acme", progress=1), id="export-progress"),
    ],
)
def test_arguments_of_the_wrong_type_are_invalid_input_and_write_nothing(
    service: SecretService, call: Callable[[SecretService], object]
) -> None:
    service.store_for_tenant("acme", "token", "v")
    before = _stream(service)

    with pytest.raises(InvalidInput):
        call(service)

    assert _stream(service) == before


def test_the_checkpoints_of_the_chain_are_an_anchor_verify_accepts(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "v")
    service.seal_audit()

    report = service.verify_audit(anchor=tuple(service.audit_checkpoints()))

    assert report.intact
    assert report.anchored_checkpoints >= 1


# -- invisible and direction-changing characters ----------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("stripe\u200b-key", id="zero-width-space"),
        pytest.param("\u202eyek-epirts", id="right-to-left-override"),
        pytest.param("stripe\u00adkey", id="soft-hyphen"),
        pytest.param("\ufeffstripe-key", id="byte-order-mark"),
        pytest.param("stripe\u2028key", id="line-separator"),
        pytest.param("stripe\U000e0041key", id="tag-character"),
    ],
)
def test_names_with_invisible_characters_are_refused_and_nothing_written(
    service: SecretService, name: str
) -> None:
    """Two names that differ by an invisible character look the same in every listing."""
    service.store_for_tenant("acme", "token", "v")
    before = _stream(service)

    with pytest.raises(InvalidInput, match="invisible") as raised:
        service.store_for_tenant("acme", name, "v")
    with pytest.raises(InvalidInput, match="invisible"):
        service.store_for_tenant(name, "token", "v")

    assert f"U+{ord(next(c for c in name if not c.isalnum() and c != '-')):04X}" in str(
        raised.value
    )
    assert _stream(service) == before


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("rotate \u202eevery\u202c week", id="override"),
        pytest.param("first\u2029second", id="paragraph-separator"),
        pytest.param("x\u2066y\u2069", id="isolate"),
    ],
)
def test_descriptions_that_break_lines_or_reorder_text_are_refused(
    service: SecretService, text: str
) -> None:
    with pytest.raises(InvalidInput, match="direction-changing"):
        service.store_for_tenant("acme", "token", "v", description=text)
    with pytest.raises(InvalidInput, match="direction-changing"):
        service.store_for_tenant("acme", "token", "v", metadata={"note": text})
    with tenant("acme"):
        assert not service.exists("token")


def test_text_in_any_script_with_joiners_and_marks_is_still_accepted(
    service: SecretService,
) -> None:
    """Only invisible characters are refused in names; free text keeps the format
    characters that writing systems and emoji need (ZWJ, the directional marks)."""
    description = "\u05e1\u05d5\u05d3 \u200f(prod) \U0001f469\u200d\U0001f4bb"
    service.store_for_tenant(
        "acme",
        "m\u00fcnchen-\u6771\u4eac-\u0645\u0641\u062a\u0627\u062d",
        "v",
        description=description,
    )

    info = service.list_for_tenant("acme")[0]
    assert info.description == description
