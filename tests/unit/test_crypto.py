"""AES-256-GCM envelopes and key wrapping: binding, tampering, nonces, reprs, AMK parsing."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import secrets
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyledger import DecryptionFailed, InvalidMasterKey, SecretService, tenant
from keyledger.infrastructure.crypto import (
    DataKey,
    Envelope,
    MasterKey,
    MasterKeyring,
    generate_data_key,
    parse_master_key,
)

TENANT = "tenant-crypto"
NAME = "stripe-api-key"
VALUE = "sk_live_crypto-test-value-3f9a1c"


def _leak_forms(raw: bytes) -> list[str]:
    """Every textual form a key could leak in: hex (both cases), base64, bytes repr."""
    return [
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        repr(raw),
    ]


def _assert_text_free_of(text: str, forbidden: list[str]) -> None:
    for item in forbidden:
        assert item not in text, f"{item!r} leaked into {text!r}"


def _flip(blob: bytes, index: int, mask: int = 0x01) -> bytes:
    changed = bytearray(blob)
    changed[index] ^= mask
    return bytes(changed)


def _relabel(blob: bytes, key_version: int) -> bytes:
    """The envelope with its header's key version replaced (nonce and ciphertext kept)."""
    return blob[:2] + struct.pack(">I", key_version) + blob[6:]


@pytest.fixture
def tdek() -> bytes:
    return generate_data_key()


@pytest.fixture
def data_key(tdek: bytes) -> DataKey:
    return DataKey(TENANT, 1, tdek)


@pytest.fixture
def amk_raw() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def master_key(amk_raw: bytes) -> MasterKey:
    return MasterKey(amk_raw)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "plain ascii", "ünïcödé ✓ 秘密", "x" * 70_000],
    ids=["empty", "ascii", "unicode", "large"],
)
def test_a_str_value_decrypts_to_the_same_str(data_key: DataKey, value: str) -> None:
    blob = data_key.encrypt(NAME, value)
    decrypted = data_key.decrypt(NAME, blob)
    assert isinstance(decrypted, str)
    assert decrypted == value


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00\x01\xff binary", os.urandom(4096), b"s" + b"looks like a str kind"],
    ids=["empty", "binary", "random", "kind-prefix"],
)
def test_a_bytes_value_decrypts_to_the_same_bytes(data_key: DataKey, value: bytes) -> None:
    blob = data_key.encrypt(NAME, value)
    decrypted = data_key.decrypt(NAME, blob)
    assert isinstance(decrypted, bytes)
    assert decrypted == value


def test_a_bytearray_value_decrypts_as_bytes(data_key: DataKey) -> None:
    blob = data_key.encrypt(NAME, bytearray(b"mutable"))
    assert data_key.decrypt(NAME, blob) == b"mutable"


def test_the_envelope_records_format_algorithm_key_version_and_nonce(tdek: bytes) -> None:
    key = DataKey(TENANT, 7, tdek)
    blob = key.encrypt(NAME, VALUE)
    envelope = Envelope.parse(blob)
    assert blob[0] == 1
    assert blob[1] == 1
    assert envelope.key_version == 7
    assert len(envelope.nonce) == 12
    assert envelope.header == blob[:6]
    assert VALUE.encode() not in blob


def test_the_envelope_never_embeds_the_tdek_or_its_wrapped_form(
    tdek: bytes, master_key: MasterKey
) -> None:
    key = DataKey(TENANT, 1, tdek)
    wrapped = master_key.wrap(TENANT, 1, tdek)
    blob = key.encrypt(NAME, VALUE)
    assert tdek not in blob
    assert wrapped not in blob
    assert wrapped[12:] not in blob


def test_a_wrapped_tdek_unwraps_to_the_same_key(master_key: MasterKey, tdek: bytes) -> None:
    wrapped = master_key.wrap(TENANT, 3, tdek)
    assert len(wrapped) == 12 + 32 + 16
    assert tdek not in wrapped
    assert master_key.unwrap(TENANT, 3, wrapped) == tdek


# -- AAD binding of secret envelopes -------------------------------------------------------


def test_an_envelope_moved_to_another_secret_name_fails_to_decrypt(data_key: DataKey) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        data_key.decrypt("another-secret", blob)


def test_an_envelope_moved_to_a_name_differing_only_in_case_fails_to_decrypt(
    data_key: DataKey,
) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME.upper(), blob)


def test_an_envelope_moved_to_another_tenant_with_the_same_key_bytes_fails_to_decrypt(
    tdek: bytes,
) -> None:
    blob = DataKey(TENANT, 1, tdek).encrypt(NAME, VALUE)
    other_tenant = DataKey("tenant-other", 1, tdek)
    with pytest.raises(DecryptionFailed):
        other_tenant.decrypt(NAME, blob)


def test_separators_make_tenant_and_name_boundaries_unambiguous(tdek: bytes) -> None:
    # ("ab", "c") and ("a", "bc") must not share an AAD.
    blob = DataKey("ab", 1, tdek).encrypt("c", VALUE)
    with pytest.raises(DecryptionFailed):
        DataKey("a", 1, tdek).decrypt("bc", blob)


def test_an_envelope_relabelled_to_another_key_version_fails_even_with_the_same_key_bytes(
    tdek: bytes,
) -> None:
    blob = DataKey(TENANT, 1, tdek).encrypt(NAME, VALUE)
    relabelled = _relabel(blob, 2)
    assert Envelope.parse(relabelled).key_version == 2
    with pytest.raises(DecryptionFailed):
        DataKey(TENANT, 2, tdek).decrypt(NAME, relabelled)


def test_an_envelope_relabelled_to_another_key_version_fails_under_its_original_key(
    data_key: DataKey,
) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME, _relabel(blob, 2))


def test_an_envelope_decrypted_with_another_tenants_key_fails(data_key: DataKey) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        DataKey(TENANT, 1, generate_data_key()).decrypt(NAME, blob)


# -- AAD binding of wrapped TDEKs ----------------------------------------------------------


def test_a_wrapped_tdek_moved_to_another_tenant_fails_to_unwrap(
    master_key: MasterKey, tdek: bytes
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    with pytest.raises(DecryptionFailed):
        master_key.unwrap("tenant-other", 1, wrapped)


def test_a_wrapped_tdek_moved_to_another_key_version_fails_to_unwrap(
    master_key: MasterKey, tdek: bytes
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    with pytest.raises(DecryptionFailed):
        master_key.unwrap(TENANT, 2, wrapped)


def test_a_wrapped_tdek_is_bound_to_the_amk_id_that_wrapped_it(amk_raw: bytes, tdek: bytes) -> None:
    wrapped = MasterKey(amk_raw).wrap(TENANT, 1, tdek)
    relabelled = MasterKey(amk_raw)
    relabelled.amk_id = "0000000000000000"
    with pytest.raises(DecryptionFailed):
        relabelled.unwrap(TENANT, 1, wrapped)


def test_a_wrapped_tdek_fails_to_unwrap_under_another_master_key(
    master_key: MasterKey, tdek: bytes
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    with pytest.raises(DecryptionFailed):
        MasterKey(secrets.token_bytes(32)).unwrap(TENANT, 1, wrapped)


def test_an_unwrap_failure_message_names_no_key_material(
    master_key: MasterKey, amk_raw: bytes, tdek: bytes
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    with pytest.raises(DecryptionFailed) as caught:
        master_key.unwrap(TENANT, 2, wrapped)
    text = str(caught.value) + repr(caught.value)
    _assert_text_free_of(text, _leak_forms(amk_raw) + _leak_forms(tdek) + _leak_forms(wrapped))
    assert caught.value.__cause__ is None


# -- tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_single_byte_of_an_envelope_fails_to_decrypt(
    data_key: DataKey, mask: int
) -> None:
    blob = data_key.encrypt(NAME, "short value")
    survivors = []
    for index in range(len(blob)):
        try:
            data_key.decrypt(NAME, _flip(blob, index, mask))
        except DecryptionFailed:
            continue
        survivors.append(index)
    assert survivors == []


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_single_byte_of_a_wrapped_tdek_fails_to_unwrap(
    master_key: MasterKey, tdek: bytes, mask: int
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    survivors = []
    for index in range(len(wrapped)):
        try:
            master_key.unwrap(TENANT, 1, _flip(wrapped, index, mask))
        except DecryptionFailed:
            continue
        survivors.append(index)
    assert survivors == []


@pytest.mark.parametrize("cut", [0, 1, 6, 17, 18, 33, -1])
def test_a_truncated_envelope_fails_to_decrypt(data_key: DataKey, cut: int) -> None:
    blob = data_key.encrypt(NAME, "a value long enough to cut")
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME, blob[:cut])


def test_an_envelope_with_bytes_appended_fails_to_decrypt(data_key: DataKey) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME, blob + b"\x00")


@pytest.mark.parametrize("cut", [0, 11, 12, 59])
def test_a_truncated_wrapped_tdek_fails_to_unwrap(
    master_key: MasterKey, tdek: bytes, cut: int
) -> None:
    wrapped = master_key.wrap(TENANT, 1, tdek)
    with pytest.raises(DecryptionFailed):
        master_key.unwrap(TENANT, 1, wrapped[:cut])


def test_an_envelope_with_an_unknown_format_or_algorithm_fails_to_decrypt(
    data_key: DataKey,
) -> None:
    blob = data_key.encrypt(NAME, VALUE)
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME, b"\x02" + blob[1:])
    with pytest.raises(DecryptionFailed):
        data_key.decrypt(NAME, blob[:1] + b"\x02" + blob[2:])


# -- nonces --------------------------------------------------------------------------------


def test_envelope_nonces_never_repeat_over_many_encryptions(data_key: DataKey) -> None:
    count = 20_000
    nonces = {Envelope.parse(data_key.encrypt(NAME, VALUE)).nonce for _ in range(count)}
    assert len(nonces) == count


def test_the_same_value_encrypts_to_a_different_ciphertext_each_time(data_key: DataKey) -> None:
    blobs = {data_key.encrypt(NAME, VALUE) for _ in range(100)}
    assert len(blobs) == 100


def test_wrapping_nonces_never_repeat_over_many_wraps(master_key: MasterKey, tdek: bytes) -> None:
    count = 10_000
    nonces = {master_key.wrap(TENANT, 1, tdek)[:12] for _ in range(count)}
    assert len(nonces) == count


# -- reprs and pickling --------------------------------------------------------------------


def test_a_master_key_repr_and_str_show_only_its_id(master_key: MasterKey, amk_raw: bytes) -> None:
    for text in (repr(master_key), str(master_key), f"{master_key}", f"{master_key!r}"):
        _assert_text_free_of(text, _leak_forms(amk_raw))
        assert master_key.amk_id in text


def test_a_data_key_repr_and_str_show_no_key_bytes(data_key: DataKey, tdek: bytes) -> None:
    for text in (repr(data_key), str(data_key), f"{data_key}"):
        _assert_text_free_of(text, _leak_forms(tdek))
        assert TENANT in text


def test_a_master_keyring_repr_shows_only_amk_ids() -> None:
    current_raw, previous_raw = secrets.token_bytes(32), secrets.token_bytes(32)
    ring = MasterKeyring(MasterKey(current_raw), [MasterKey(previous_raw)])
    text = repr(ring) + str(ring)
    _assert_text_free_of(text, _leak_forms(current_raw) + _leak_forms(previous_raw))
    assert MasterKey(current_raw).amk_id in text
    assert MasterKey(previous_raw).amk_id in text


def test_a_secret_service_repr_shows_no_master_key() -> None:
    current_hex, previous_hex = secrets.token_hex(32), secrets.token_hex(32)
    service = SecretService.create(
        "memory:", master_key=current_hex, previous_master_keys=[previous_hex]
    )
    try:
        text = repr(service) + str(service)
        forms = _leak_forms(bytes.fromhex(current_hex)) + _leak_forms(bytes.fromhex(previous_hex))
        _assert_text_free_of(text, forms)
    finally:
        service.close()


@pytest.mark.parametrize("value", ["sk_live_repr-check-9b1e4d", b"\x8f\x00repr-bytes-check\xfe"])
def test_a_retrieved_secret_repr_and_str_never_show_the_value(value: str | bytes) -> None:
    service = SecretService.create("memory:", master_key=secrets.token_hex(32))
    try:
        with tenant(TENANT):
            service.store(NAME, value)
            secret = service.retrieve(NAME)
    finally:
        service.close()
    assert secret.value == value
    shown = value if isinstance(value, str) else value.decode("latin-1")
    for text in (repr(secret), str(secret), f"{secret}"):
        assert shown not in text
        assert repr(value) not in text
        assert "repr-" not in text
        assert NAME in text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_a_master_key_raises_type_error(master_key: MasterKey, protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(master_key, protocol=protocol)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_a_data_key_raises_type_error(data_key: DataKey, protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(data_key, protocol=protocol)


def test_copying_master_and_data_keys_raises_type_error(
    master_key: MasterKey, data_key: DataKey
) -> None:
    for key in (master_key, data_key):
        with pytest.raises(TypeError):
            copy.copy(key)
        with pytest.raises(TypeError):
            copy.deepcopy(key)


def test_pickling_a_master_keyring_raises_type_error(master_key: MasterKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(MasterKeyring(master_key, []))


def test_master_and_data_keys_have_no_instance_dict_to_dump(
    master_key: MasterKey, data_key: DataKey
) -> None:
    for key in (master_key, data_key):
        assert not hasattr(key, "__dict__")


# -- AMK parsing ---------------------------------------------------------------------------

_DISTINCT_HEX = "3c9f" * 16  # 64 hex characters, recognisable in any message


@pytest.mark.parametrize(
    "text",
    [
        _DISTINCT_HEX[:62],  # too short, even
        _DISTINCT_HEX + "3c",  # too long, even
        _DISTINCT_HEX[:63],  # odd
        _DISTINCT_HEX + "3",  # odd, too long
        _DISTINCT_HEX[:60] + "3c9g",  # non-hex
        _DISTINCT_HEX[:62] + "zz",  # non-hex
        _DISTINCT_HEX[:31] + " " + _DISTINCT_HEX[32:],  # inner whitespace
        "0x" + _DISTINCT_HEX[:62],  # a prefix is not hex
        "0" * 64,  # all zero
        "",
    ],
    ids=[
        "short",
        "long",
        "odd",
        "odd-long",
        "non-hex-g",
        "non-hex-z",
        "inner-space",
        "0x-prefix",
        "all-zero",
        "empty",
    ],
)
def test_a_malformed_master_key_is_invalid_and_the_message_never_contains_it(text: str) -> None:
    with pytest.raises(InvalidMasterKey) as caught:
        parse_master_key(text, "KEYLEDGER_MASTER_KEY")
    message = str(caught.value) + repr(caught.value)
    if text:
        assert text not in message
        assert text[:16] not in message
    assert "KEYLEDGER_MASTER_KEY" in message
    assert caught.value.__cause__ is None


_SPACED_HEX = "3c 9f " + _DISTINCT_HEX[4:62]  # 64 characters, only 62 of them hex digits


def test_a_64_character_master_key_with_inner_spaces_is_invalid() -> None:
    assert len(_SPACED_HEX) == 64
    with pytest.raises(InvalidMasterKey):
        parse_master_key(_SPACED_HEX, "KEYLEDGER_MASTER_KEY")


def test_a_master_key_with_inner_spaces_given_to_the_service_is_invalid_master_key() -> None:
    with pytest.raises(InvalidMasterKey):
        SecretService.create("memory:", master_key=_SPACED_HEX)


@pytest.mark.parametrize("text", ["0" * 64, "00" * 32, "0" * 64 + "\n"])
def test_an_all_zero_master_key_is_invalid(text: str) -> None:
    with pytest.raises(InvalidMasterKey):
        parse_master_key(text, "test")


def test_a_malformed_master_key_given_to_the_service_fails_at_creation() -> None:
    with pytest.raises(InvalidMasterKey) as caught:
        SecretService.create("memory:", master_key=_DISTINCT_HEX[:62])
    assert _DISTINCT_HEX[:62] not in str(caught.value)


def test_an_uppercase_master_key_is_accepted_as_the_same_key() -> None:
    lower = secrets.token_hex(32)
    upper = lower.upper()
    assert (
        parse_master_key(upper, "test") == parse_master_key(lower, "test") == bytes.fromhex(lower)
    )
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(lower))
    assert parse_master_key(mixed, "test") == bytes.fromhex(lower)


def test_an_uppercase_master_key_works_in_the_service() -> None:
    upper = secrets.token_hex(32).upper()
    service = SecretService.create("memory:", master_key=upper)
    try:
        with tenant(TENANT):
            service.store(NAME, VALUE)
            assert service.retrieve(NAME).value == VALUE
    finally:
        service.close()


def test_the_amk_id_is_deterministic_per_key() -> None:
    raw = secrets.token_bytes(32)
    assert MasterKey(raw).amk_id == MasterKey(raw).amk_id
    hex_text = raw.hex()
    from_lower = MasterKey(parse_master_key(hex_text, "a")).amk_id
    from_upper = MasterKey(parse_master_key(hex_text.upper(), "b")).amk_id
    assert from_lower == from_upper == MasterKey(raw).amk_id


def test_the_amk_id_differs_between_keys() -> None:
    ids = {MasterKey(secrets.token_bytes(32)).amk_id for _ in range(200)}
    assert len(ids) == 200


def test_the_amk_id_is_a_short_fingerprint_that_reveals_no_key_bytes() -> None:
    raw = secrets.token_bytes(32)
    amk_id = MasterKey(raw).amk_id
    assert 8 <= len(amk_id) <= 32
    assert amk_id not in raw.hex()
    assert amk_id.lower() not in raw.hex()


def test_the_amk_id_recorded_by_the_service_matches_the_configured_key() -> None:
    hex_text = secrets.token_hex(32)
    service = SecretService.create("memory:", master_key=hex_text)
    try:
        with tenant(TENANT):
            service.store(NAME, VALUE)
            keys = service.list_keys()
    finally:
        service.close()
    assert [key.amk_id for key in keys] == [MasterKey(bytes.fromhex(hex_text)).amk_id]


def test_the_value_aad_is_the_documented_layout_so_stored_envelopes_keep_decrypting(
    tdek: bytes,
) -> None:
    """Known answer, independent of the implementation: an envelope of key version 3 opens
    under AES-GCM with header || "keyledger:secret:v1" 0x00 tenant 0x00 name 0x00 "3", and
    an envelope sealed that way by hand decrypts through ``DataKey``."""
    key = DataKey(TENANT, 3, tdek)
    header = struct.pack(">BBI", 1, 1, 3)
    aad = header + b"\x00".join((b"keyledger:secret:v1", TENANT.encode(), "nämé".encode(), b"3"))
    blob = key.encrypt("nämé", VALUE)

    assert blob[:6] == header
    opened = AESGCM(tdek).decrypt(blob[6:18], blob[18:], aad)
    assert opened == b"s" + VALUE.encode()
    nonce = os.urandom(12)
    sealed = header + nonce + AESGCM(tdek).encrypt(nonce, b"b\x00\x01", aad)
    assert key.decrypt("nämé", sealed) == b"\x00\x01"


def test_an_envelope_given_as_memoryview_or_bytearray_decrypts(data_key: DataKey) -> None:
    blob = data_key.encrypt(NAME, VALUE)

    assert data_key.decrypt(NAME, memoryview(blob)) == VALUE  # type: ignore[arg-type]
    assert data_key.decrypt(NAME, bytearray(blob)) == VALUE  # type: ignore[arg-type]


def test_a_data_key_of_a_version_no_header_can_hold_decrypts_nothing(tdek: bytes) -> None:
    """Built as before (a drift probe may build one from a hand-made keyring); nothing
    decrypts under it and encrypting fails as packing its header always did."""
    key = DataKey(TENANT, 1 << 32, tdek)
    blob = DataKey(TENANT, 1, tdek).encrypt(NAME, VALUE)

    with pytest.raises(DecryptionFailed, match="under key version 1, not 4294967296"):
        key.decrypt(NAME, blob)
    with pytest.raises(struct.error):
        key.encrypt(NAME, VALUE)
