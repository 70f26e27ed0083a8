"""AES-256-GCM for the envelope chain: AMK wraps TDEK, TDEK encrypts values.

Byte layouts (all integers big-endian):

Wrapped TDEK (stored in the key-material table, never in the stream)::

    nonce (12) || AES-256-GCM(AMK, TDEK (32)) ciphertext+tag (48)
    AAD = b"keyledger:tdek:v1" 0x00 tenant_id 0x00 str(version) 0x00 amk_id

Secret envelope (stored in SecretStored/SecretReencrypted events)::

    format (1) = 0x01 || algorithm (1) = 0x01 (AES-256-GCM) || key_version (4)
    || nonce (12) || AES-256-GCM(TDEK, kind (1) || value) ciphertext+tag
    AAD = header (6) || b"keyledger:secret:v1" 0x00 tenant_id 0x00 name 0x00 str(key_version)

``kind`` is ``s`` for a str value (UTF-8) and ``b`` for bytes, so retrieve returns the type
that was stored. Tenant ids and names cannot contain control characters, so the 0x00
separators make the AAD unambiguous. The wrapped TDEK is never embedded in the envelope:
destroying a key version makes every value under it unrecoverable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import string
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyledger.domain.envelope import ALGORITHM_AES256GCM, ENVELOPE_FORMAT, HEADER, NONCE_BYTES
from keyledger.errors import DecryptionFailed, InvalidMasterKey
from keyledger.infrastructure.audit_keys import AuditKey, AuditKeyring

KEY_BYTES = 32
_HEADER = HEADER
_AMK_ID_LABEL = b"keyledger:amk-id:v1"
_TDEK_FINGERPRINT_LABEL = b"keyledger:tdek-fingerprint:v1"


class EnvelopeInvalid(DecryptionFailed):
    """An envelope that cannot be parsed."""


def parse_master_key(text: str, source: str) -> bytes:
    """Decode a 64-hex-character AMK; ``source`` names where it came from (never the key)."""
    if not isinstance(text, str):  # bytes, say: name the type only, never the value
        raise InvalidMasterKey(
            f"{source}: must be a str of 64 hex characters, not {type(text).__name__}"
        )
    candidate = text.strip()
    if not all(ch in string.hexdigits for ch in candidate):
        raise InvalidMasterKey(f"{source}: not hexadecimal")
    if len(candidate) % 2:
        raise InvalidMasterKey(f"{source}: odd number of hex characters")
    if len(candidate) != 2 * KEY_BYTES:
        raise InvalidMasterKey(f"{source}: expected 64 hex characters, got {len(candidate)}")
    raw = bytes.fromhex(candidate)
    if raw == bytes(KEY_BYTES):
        raise InvalidMasterKey(f"{source}: an all-zero key is not a key")
    return raw


def fingerprint(key: bytes, label: bytes) -> str:
    """A short public identifier of a key: HMAC-SHA256(key, label), 8 bytes as hex."""
    return hmac.new(key, label, hashlib.sha256).hexdigest()[:16]


class MasterKey:
    """One AMK. Holds only an AESGCM handle; cannot be printed or pickled."""

    __slots__ = ("_aead", "amk_id", "audit_key")

    def __init__(self, raw: bytes) -> None:
        self.amk_id = fingerprint(raw, _AMK_ID_LABEL)
        self._aead = AESGCM(raw)
        self.audit_key = AuditKey.derive(raw)

    def __repr__(self) -> str:
        return f"MasterKey(amk_id={self.amk_id!r})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("master keys cannot be pickled")

    def wrap(self, tenant_id: str, version: int, data_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        aad = _tdek_aad(tenant_id, version, self.amk_id)
        return nonce + self._aead.encrypt(nonce, data_key, aad)

    def unwrap(self, tenant_id: str, version: int, wrapped: bytes) -> bytes:
        aad = _tdek_aad(tenant_id, version, self.amk_id)
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed(
                f"key version {version} of tenant {tenant_id!r} does not unwrap "
                f"with master key {self.amk_id}"
            ) from None


def _tdek_aad(tenant_id: str, version: int, amk_id: str) -> bytes:
    return b"\x00".join(
        (b"keyledger:tdek:v1", tenant_id.encode(), str(version).encode(), amk_id.encode())
    )


def _secret_aad_around_name(header: bytes, tenant_id: str, key_version: int) -> tuple[bytes, bytes]:
    """A secret value's AAD is ``head + name (UTF-8) + tail``, that is
    ``header || "keyledger:secret:v1" 0x00 tenant 0x00 name 0x00 key_version (decimal)``;
    the parts around the name are the same for every secret of one data key."""
    head = header + b"keyledger:secret:v1\x00" + tenant_id.encode() + b"\x00"
    return head, b"\x00" + str(key_version).encode()


_MIN_ENVELOPE = _HEADER.size + NONCE_BYTES + 16  # header, nonce, GCM tag


@dataclass(frozen=True)
class Envelope:
    """The parsed, still encrypted form of a secret value."""

    key_version: int
    nonce: bytes
    ciphertext: bytes

    @classmethod
    def parse(cls, blob: bytes) -> Envelope:
        if len(blob) < _MIN_ENVELOPE:
            raise EnvelopeInvalid("envelope too short")
        fmt, algorithm, key_version = _HEADER.unpack_from(blob)
        if fmt != ENVELOPE_FORMAT or algorithm != ALGORITHM_AES256GCM:
            raise EnvelopeInvalid(f"unknown envelope format {fmt} / algorithm {algorithm}")
        start = _HEADER.size
        return cls(key_version, blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :])

    @property
    def header(self) -> bytes:
        return _HEADER.pack(ENVELOPE_FORMAT, ALGORITHM_AES256GCM, self.key_version)


class DataKey:
    """One unwrapped TDEK version, as an AESGCM handle; cannot be printed or pickled."""

    __slots__ = (
        "_aad_head",
        "_aad_tail",
        "_aead",
        "_header",
        "fingerprint",
        "tenant_id",
        "version",
    )

    def __init__(self, tenant_id: str, version: int, raw: bytes) -> None:
        self.tenant_id = tenant_id
        self.version = version
        self.fingerprint = fingerprint(raw, _TDEK_FINGERPRINT_LABEL)
        self._aead = AESGCM(raw)
        # What every envelope of this version starts with, and the parts of a value's AAD
        # around its name (the AAD is head + name + tail: _secret_aad_around_name).
        # (None for a version no header can hold: nothing then decrypts, and encrypting
        # raises struct.error, as packing the header always did.)
        self._header: bytes | None = None
        self._aad_head = self._aad_tail = b""
        if 0 <= version < 1 << 32:
            self._header = _HEADER.pack(ENVELOPE_FORMAT, ALGORITHM_AES256GCM, version)
            self._aad_head, self._aad_tail = _secret_aad_around_name(
                self._header, tenant_id, version
            )

    def __repr__(self) -> str:
        return f"DataKey(tenant_id={self.tenant_id!r}, version={self.version})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("data keys cannot be pickled")

    def encrypt(self, name: str, value: str | bytes) -> bytes:
        kind, raw = (b"s", value.encode()) if isinstance(value, str) else (b"b", bytes(value))
        header = self._header
        if header is None:
            header = _HEADER.pack(ENVELOPE_FORMAT, ALGORITHM_AES256GCM, self.version)  # raises
        nonce = os.urandom(NONCE_BYTES)
        aad = self._aad_head + name.encode() + self._aad_tail
        return header + nonce + self._aead.encrypt(nonce, kind + raw, aad)

    def decrypt(self, name: str, blob: bytes) -> str | bytes:
        if type(blob) is not bytes:
            blob = bytes(blob)  # a bytearray or memoryview
        header = self._header
        if header is None or len(blob) < _MIN_ENVELOPE or not blob.startswith(header):
            envelope = Envelope.parse(blob)  # raises for what is no envelope at all
            raise DecryptionFailed(
                f"secret {name!r} of tenant {self.tenant_id!r} is under key version "
                f"{envelope.key_version}, not {self.version}"
            )
        start = len(header)
        aad = self._aad_head + name.encode() + self._aad_tail
        try:
            plain = self._aead.decrypt(
                blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :], aad
            )
        except InvalidTag:
            raise DecryptionFailed(
                f"secret {name!r} of tenant {self.tenant_id!r} failed authentication "
                f"under key version {self.version}"
            ) from None
        kind, raw = plain[:1], plain[1:]
        return raw.decode() if kind == b"s" else raw


def stored_wrapped(value: object) -> bytes:
    """A wrapped data key as a database row holds it. A value of another type (a restore
    that wrote the key as hex or base64 text) is no key: empty bytes, which never unwrap,
    so it fails as undecryptable material does (``DecryptionFailed``, or the drift issue
    of a key that cannot be unwrapped)."""
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""


def generate_data_key() -> bytes:
    """A fresh random 256-bit TDEK."""
    return AESGCM.generate_key(bit_length=256)


class MasterKeyring:
    """The current AMK (may be missing) and the previous AMKs kept for unwrapping only."""

    def __init__(self, current: MasterKey | None, previous: list[MasterKey]) -> None:
        self.current = current
        self._by_id = {key.amk_id: key for key in previous}
        if current is not None:
            self._by_id[current.amk_id] = current

    def __repr__(self) -> str:
        current = self.current.amk_id if self.current else None
        return f"MasterKeyring(current={current!r}, known={sorted(self._by_id)!r})"

    def knows(self, amk_id: str) -> bool:
        return amk_id in self._by_id

    def get(self, amk_id: str) -> MasterKey | None:
        return self._by_id.get(amk_id)

    def audit_keyring(
        self, audit_key: AuditKey | None = None, previous: list[AuditKey] | None = None
    ) -> AuditKeyring:
        """The audit keys: ``audit_key`` (KEYLEDGER_AUDIT_KEY) or the current AMK's derived
        key tags and seals; it, every AMK's derived key and the ``previous`` audit keys
        (KEYLEDGER_PREVIOUS_AUDIT_KEYS) verify."""
        derived = [key.audit_key for key in self._by_id.values()]
        current = audit_key or (self.current.audit_key if self.current else None)
        independent = [*([audit_key] if audit_key else []), *(previous or [])]
        return AuditKeyring(current, derived, independent)

    @property
    def known_ids(self) -> list[str]:
        return sorted(self._by_id)
