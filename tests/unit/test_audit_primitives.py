"""The audit primitives: seal position encoding, audit keys, event tag trailers, and the
KEYLEDGER_AUDIT_KEY setting (which key tags and seals, which keys verify)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import pickle
import random
import secrets
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eventsourcing.compressor import ZlibCompressor
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Mapper,
    StoredEvent,
    UUIDAsHex,
)

from keyledger import (
    InvalidMasterKey,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretService,
    tenant,
)
from keyledger.context import make_actor
from keyledger.domain.access import AuditRecord
from keyledger.domain.ids import SEAL_CHAIN_ID
from keyledger.domain.seal import decode_positions, encode_positions
from keyledger.infrastructure.audit_keys import KEY_ID_BYTES, AuditKey, AuditKeyring
from keyledger.infrastructure.event_tags import (
    MAGIC,
    TAG_BYTES,
    TRAILER_BYTES,
    TaggingMapper,
    event_tag,
    split_trailer,
)
from keyledger.infrastructure.transcodings import BytesAsBase64

# -- positions ---------------------------------------------------------------------------


def _positions(rng: random.Random, after: int) -> list[int]:
    """Strictly increasing positions after ``after``: mostly contiguous, some small gaps,
    a few huge ones."""
    positions, current = [], after
    for _ in range(rng.randrange(0, 400)):
        kind = rng.random()
        if kind < 0.8:
            step = 1
        elif kind < 0.95:
            step = rng.randrange(2, 300)
        else:
            step = rng.randrange(2**7, 2 ** rng.choice((14, 21, 35, 56)))
        current += step
        positions.append(current)
    return positions


@pytest.mark.parametrize("seed", range(40))
def test_positions_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    after = rng.choice((0, rng.randrange(1, 10_000), rng.randrange(2**40, 2**62)))
    positions = _positions(rng, after)

    blob = encode_positions(after, positions)

    assert decode_positions(after, blob) == positions, f"seed {seed}"
    assert len(blob) >= len(positions)


def test_contiguous_positions_take_one_byte_each() -> None:
    assert encode_positions(10, [11, 12, 13]) == b"\x01\x01\x01"
    assert encode_positions(0, []) == b""
    assert decode_positions(123, b"") == []


@pytest.mark.parametrize(
    ("delta", "encoded"),
    [
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**14, b"\x80\x80\x01"),
        (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    ],
)
def test_gaps_are_unsigned_leb128(delta: int, encoded: bytes) -> None:
    assert encode_positions(5, [5 + delta]) == encoded
    assert decode_positions(5, encoded) == [5 + delta]


def test_a_huge_gap_between_contiguous_runs_round_trips() -> None:
    positions = [1, 2, 3, 2**50, 2**50 + 1, 2**62, 2**62 + 1, 2**62 + 2]

    blob = encode_positions(0, positions)

    assert decode_positions(0, blob) == positions
    assert decode_positions(7, encode_positions(7, [8, 2**40])) == [8, 2**40]


# -- audit keys --------------------------------------------------------------------------

RAW = bytes(range(1, 33))
AMK = bytes.fromhex("7f" * 32)


def test_an_audit_key_is_hmac_sha256_and_its_id_is_public() -> None:
    key = AuditKey(RAW)
    rng = random.Random(7)
    for size in (0, 1, 31, 32, 55, 63, 64, 65, 127, 128, 1000, 70_000):
        message = rng.randbytes(size)
        assert key.mac(message) == hmac.new(RAW, message, hashlib.sha256).digest(), size
    assert key.key_id == hmac.digest(RAW, b"keyledger:audit-key-id:v1", "sha256")[:KEY_ID_BYTES]
    assert AuditKey(RAW).mac(b"x") == key.mac(b"x")  # no state carried between MACs
    assert key.mac(b"x") == key.mac(b"x")


@pytest.mark.parametrize("seed", range(5))
def test_random_keys_mac_like_the_standard_library(seed: int) -> None:
    rng = random.Random(seed)
    raw = rng.randbytes(32)
    message = rng.randbytes(rng.randrange(0, 5000))

    assert AuditKey(raw).mac(message) == hmac.new(raw, message, hashlib.sha256).digest()


def test_deriving_from_an_amk_is_deterministic_hkdf_and_differs_per_amk() -> None:
    expected_raw = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"keyledger:audit-key:v1"
    ).derive(AMK)

    first, second = AuditKey.derive(AMK), AuditKey.derive(AMK)
    other = AuditKey.derive(bytes.fromhex("80" * 32))

    assert first.key_id == second.key_id == AuditKey(expected_raw).key_id
    assert first.mac(b"m") == second.mac(b"m") == AuditKey(expected_raw).mac(b"m")
    assert other.key_id != first.key_id
    assert other.mac(b"m") != first.mac(b"m")
    assert first.key_id != AuditKey(AMK).key_id  # derived, not the AMK itself


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_an_audit_key_is_exactly_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AuditKey(bytes(size))


def test_an_audit_key_never_shows_its_bytes() -> None:
    derived_raw = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"keyledger:audit-key:v1"
    ).derive(AMK)
    for key, raw in ((AuditKey(RAW), RAW), (AuditKey.derive(AMK), derived_raw)):
        shown = repr(key) + str(key) + f"{key}" + repr(AuditKeyring(key, [key]))
        assert key.key_id.hex() in shown
        for form in (raw.hex(), raw.hex().upper(), repr(raw), AMK.hex()):
            assert form not in shown
        # No attribute keeps the raw key (slots only, nothing a debugger dump would print).
        assert not hasattr(key, "__dict__")
        for name in type(key).__slots__:
            assert getattr(key, name) != raw


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_an_audit_key_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(AuditKey(RAW), protocol=protocol)


def test_an_audit_key_cannot_be_copied_either() -> None:
    with pytest.raises(TypeError):
        copy.copy(AuditKey(RAW))
    with pytest.raises(TypeError):
        copy.deepcopy(AuditKeyring(AuditKey(RAW), []))


def test_the_keyring_finds_every_key_by_id_and_seals_with_the_current_one() -> None:
    current, old = AuditKey(RAW), AuditKey.derive(AMK)

    keyring = AuditKeyring(current, [old])

    assert keyring.current is current
    assert keyring.get(current.key_id) is current
    assert keyring.get(old.key_id) is old
    assert keyring.get(b"\x00" * KEY_ID_BYTES) is None
    assert AuditKeyring(None, []).current is None


# -- event tag trailers ------------------------------------------------------------------


def _transcoder() -> JSONTranscoder:
    transcoder = JSONTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), BytesAsBase64()):
        transcoder.register(transcoding)
    return transcoder


def _event() -> AuditRecord.SecretRead:
    return AuditRecord.read("acme", "db", 3, 2, {"user_id": "alice", "ip_address": None})


def test_split_trailer_separates_body_tag_and_key_id() -> None:
    body = b'{"a":1}'
    tag, key_id = bytes(range(TAG_BYTES)), bytes(range(100, 100 + KEY_ID_BYTES))

    assert split_trailer(body + tag + key_id + MAGIC) == (body, tag, key_id)
    assert split_trailer(body) == (body, None, None)
    assert TAG_BYTES + KEY_ID_BYTES + len(MAGIC) == TRAILER_BYTES


def test_a_state_too_short_for_a_trailer_is_untagged() -> None:
    short = b"x" * (TRAILER_BYTES - len(MAGIC)) + MAGIC  # exactly a trailer, no body

    assert split_trailer(short) == (short, None, None)
    assert split_trailer(b"") == (b"", None, None)
    assert split_trailer(MAGIC) == (MAGIC, None, None)


def test_the_tagging_mapper_appends_a_trailer_and_strips_it_on_the_way_out() -> None:
    key = AuditKey(RAW)
    mapper = TaggingMapper(transcoder=_transcoder(), tag_key=key)
    event = _event()

    stored = mapper.to_stored_event(event)
    body, tag, key_id = split_trailer(stored.state)

    assert stored.state.endswith(MAGIC)
    assert key_id == key.key_id
    assert tag == event_tag(
        key, stored.originator_id, stored.originator_version, stored.topic, body
    )
    assert b"\xff" not in body  # JSON never ends like a trailer
    restored = mapper.to_domain_event(stored)
    assert restored == event
    assert restored.__dict__ == event.__dict__
    # A mapper without a key writes untagged states and still reads tagged ones.
    plain = TaggingMapper(transcoder=_transcoder())
    untagged = plain.to_stored_event(event)
    assert untagged.state == body
    assert split_trailer(untagged.state) == (body, None, None)
    assert plain.to_domain_event(stored) == event
    assert mapper.to_domain_event(untagged) == event


def test_the_tagging_mapper_writes_the_library_mappers_bytes_for_every_event(
    tmp_path: Path,
) -> None:
    """Its own ``to_stored_event`` (one StoredEvent built, not two) writes exactly what the
    library's mapper writes, trailer appended, for every kind of event a scenario makes;
    with a compressor it goes the library's way."""
    key = AuditKey(RAW)
    with SecretService.create(
        f"sqlite:///{tmp_path / 'events.db'}", master_key=secrets.token_hex(32)
    ) as service:
        service.store_for_tenant("acme", "db", "v1", category="c", metadata={"k": "v"})
        service.store_for_tenant("acme", "db", "v2", description="d")
        service.retrieve_for_tenant("acme", "db")
        service.change_for_tenant("acme", "db", "disable", make_actor("ops"))
        with pytest.raises(SecretDisabled):
            service.retrieve_for_tenant("acme", "db")
        service.change_for_tenant("acme", "db", "enable", make_actor("ops"))
        service.rotate_key_for_tenant("acme")
        service.reencrypt_all_for_tenant("acme")
        service.change_for_tenant("acme", "db", "delete", make_actor("ops"))
        ledger = service._ledger
        events = [
            ledger.mapper.to_domain_event(stored)
            for stored in ledger.recorder.select_notifications(start=1, limit=1000)
        ]
    assert len({type(event) for event in events}) >= 9
    library = Mapper(transcoder=_transcoder())
    ours = TaggingMapper(transcoder=_transcoder(), tag_key=key)
    for event in events:
        plain = library.to_stored_event(event)
        tag = event_tag(
            key, plain.originator_id, plain.originator_version, plain.topic, plain.state
        )
        assert ours.to_stored_event(event) == StoredEvent(
            plain.originator_id,
            plain.originator_version,
            plain.topic,
            plain.state + tag + key.key_id + MAGIC,
        )
    compressed = TaggingMapper(transcoder=_transcoder(), compressor=ZlibCompressor(), tag_key=key)
    stored = compressed.to_stored_event(events[0])
    assert compressed.to_domain_event(stored) == events[0]


def test_the_tag_binds_identity_version_topic_and_bytes() -> None:
    key = AuditKey(RAW)
    stored = TaggingMapper(transcoder=_transcoder(), tag_key=key).to_stored_event(_event())
    body, tag, _ = split_trailer(stored.state)
    oid, version, topic = stored.originator_id, stored.originator_version, stored.topic

    assert event_tag(key, oid, version, topic, body) == tag
    assert event_tag(key, str(oid), version, topic, body) == tag  # ids as text work too
    assert len(tag or b"") == TAG_BYTES
    variants = [
        event_tag(key, SEAL_CHAIN_ID, version, topic, body),
        event_tag(key, oid, version + 1, topic, body),
        event_tag(key, oid, version, topic + "x", body),
        event_tag(key, oid, version, topic, body + b" "),
        event_tag(AuditKey.derive(AMK), oid, version, topic, body),
    ]
    assert tag not in variants
    assert len(set(variants)) == len(variants)
    # topic and body are separated: moving a byte from one to the other changes the tag
    assert event_tag(key, oid, version, topic[:-1], topic[-1:].encode() + body) != tag


def test_a_stored_event_copy_with_another_identity_keeps_a_tag_that_no_longer_fits() -> None:
    key = AuditKey(RAW)
    stored = TaggingMapper(transcoder=_transcoder(), tag_key=key).to_stored_event(_event())
    forged = StoredEvent(SEAL_CHAIN_ID, 1, stored.topic, stored.state)
    body, tag, _ = split_trailer(forged.state)

    assert event_tag(key, forged.originator_id, 1, forged.topic, body) != tag


# -- KEYLEDGER_AUDIT_KEY -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_audit_key_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYLEDGER_AUDIT_KEY", raising=False)
    monkeypatch.delenv("KEYLEDGER_AUDIT_SEAL_EVERY", raising=False)


@pytest.mark.parametrize(
    "value",
    ["not-hex", "ab" * 31, "ab" * 33, "abc", "00" * 32, "zz" * 32, "ab" * 31 + "a"],
    ids=["not hex", "short", "long", "odd", "all zero", "bad digits", "odd length"],
)
def test_a_malformed_audit_key_is_refused_at_create_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", value)

    with pytest.raises(InvalidMasterKey, match="KEYLEDGER_AUDIT_KEY") as raised:
        SecretService.create("memory:", master_key=secrets.token_hex(32))

    if len(value) > 4:
        assert value not in str(raised.value)


def _key_ids_in(path: Path) -> list[tuple[str, bytes | None]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT topic, state FROM stored_events ORDER BY rowid").fetchall()
    return [(topic, split_trailer(bytes(state))[2]) for topic, state in rows]


def _open(path: Path, master_key: str | None) -> SecretService:
    return SecretService.create(f"sqlite:///{path}", master_key=master_key)


def test_with_an_audit_key_set_tags_and_checkpoints_use_its_key_id(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    audit_hex, amk = secrets.token_hex(32), secrets.token_hex(32)
    audit_id = AuditKey(bytes.fromhex(audit_hex)).key_id
    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", audit_hex)
    path = tmp_path / "k.db"

    with _open(path, amk) as service:
        service.store_for_tenant("acme", "db", "v")
        service.retrieve_for_tenant("acme", "db")
        [checkpoint] = service.seal_audit().checkpoints
        assert service.verify_audit().intact

    assert checkpoint.key_id == audit_id.hex()
    assert checkpoint.key_id != AuditKey.derive(bytes.fromhex(amk)).key_id.hex()
    ids = _key_ids_in(path)
    assert len(ids) == 4
    assert {key_id for _, key_id in ids} == {audit_id}


def test_an_amk_alone_cannot_verify_what_an_independent_audit_key_sealed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The audit key is independent of the AMK: whoever holds only the AMK must get
    # "unverifiable", never "intact" and never "modified".
    amk = secrets.token_hex(32)
    path = tmp_path / "k.db"
    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", secrets.token_hex(32))
    with _open(path, amk) as service:
        service.store_for_tenant("acme", "db", "v")
        service.seal_audit()
        service.retrieve_for_tenant("acme", "db")  # an unsealed, tagged event
    monkeypatch.delenv("KEYLEDGER_AUDIT_KEY")

    with _open(path, amk) as amk_only:
        report = amk_only.verify_audit()
        seal = amk_only.seal_audit()

    assert not report.intact
    assert {f.kind for f in report.findings} == {"unverifiable"}
    # The checkpoint (its seal and its own tag) and the tail event.
    assert sorted({f.position for f in report.findings}) == [3, 4]
    # Sealing with the AMK-derived key stops at the first event it cannot vouch for.
    assert seal.checkpoints == []
    assert seal.stopped_at == 3


def test_introducing_an_audit_key_keeps_what_the_amk_sealed_verifiable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    amk, audit_hex = secrets.token_hex(32), secrets.token_hex(32)
    path = tmp_path / "k.db"
    with _open(path, amk) as before:
        before.store_for_tenant("acme", "db", "v")
        before.seal_audit()
        before.retrieve_for_tenant("acme", "db")

    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", audit_hex)
    with _open(path, amk) as after:
        after.retrieve_for_tenant("acme", "db")
        sealed = after.seal_audit()
        report = after.verify_audit(anchor=after.audit_checkpoints())

    assert sealed.stopped_at is None
    assert report.intact, report.findings
    assert report.checkpoints == 2
    derived = AuditKey.derive(bytes.fromhex(amk)).key_id
    audit_id = AuditKey(bytes.fromhex(audit_hex)).key_id
    assert [key_id for _, key_id in _key_ids_in(path)] == [derived] * 4 + [audit_id] * 2


def test_without_any_master_key_the_audit_key_still_tags_and_seals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    amk, audit_hex = secrets.token_hex(32), secrets.token_hex(32)
    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", audit_hex)
    path = tmp_path / "k.db"
    with _open(path, amk) as keyed:
        keyed.store_for_tenant("acme", "db", "v")

    with _open(path, None) as keyless:
        with tenant("acme"), pytest.raises(MasterKeyUnavailable):
            keyless.retrieve("db")
        assert keyless.verify_audit().intact  # the failure event is tagged, not untagged
        assert keyless.seal_audit().stopped_at is None
        assert keyless.verify_audit().intact

    audit_id = AuditKey(bytes.fromhex(audit_hex)).key_id
    assert {key_id for _, key_id in _key_ids_in(path)} == {audit_id}


def test_a_replaced_audit_key_leaves_older_checkpoints_unverifiable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # There is no setting for previous audit keys (only previous AMKs): once
    # KEYLEDGER_AUDIT_KEY changes, what the old one sealed can no longer be verified.
    amk = secrets.token_hex(32)
    path = tmp_path / "k.db"
    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", secrets.token_hex(32))
    with _open(path, amk) as first:
        first.store_for_tenant("acme", "db", "v")
        first.seal_audit()

    monkeypatch.setenv("KEYLEDGER_AUDIT_KEY", secrets.token_hex(32))
    with _open(path, amk) as second:
        report = second.verify_audit()

    assert not report.intact
    assert {f.kind for f in report.findings} == {"unverifiable"}
