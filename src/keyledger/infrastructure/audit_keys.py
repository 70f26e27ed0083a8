"""Audit keys: the HMAC keys that tag events and seal checkpoints of the audit stream.

The audit key is KEYLEDGER_AUDIT_KEY when set (64 hex characters, independent of the AMK:
the recommended production set-up), else derived from the current AMK by HKDF-SHA256
(info ``keyledger:audit-key:v1``). Each audit key is named by a public ``key_id``
(HMAC-SHA256(key, ``keyledger:audit-key-id:v1``), 8 bytes). Every tag and checkpoint
records the key_id it was made with, so verification picks the right key, including keys
derived from previous AMKs (KEYLEDGER_PREVIOUS_MASTER_KEYS): keep a retired AMK configured,
or set KEYLEDGER_AUDIT_KEY, for as long as old checkpoints must verify.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_ID_BYTES = 8
_HKDF_INFO = b"keyledger:audit-key:v1"
_KEY_ID_LABEL = b"keyledger:audit-key-id:v1"


class AuditKey:
    """One HMAC-SHA256 key. Cannot be printed or pickled; only its key_id is public."""

    __slots__ = ("_inner", "_outer", "key_id")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise ValueError("an audit key is 32 bytes")
        # RFC 2104 with the padded keys hashed once: each MAC then copies two SHA-256
        # states instead of keying HMAC afresh (half the cost of hmac.digest per event).
        padded = raw.ljust(hashlib.sha256().block_size, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self.key_id = hmac.digest(raw, _KEY_ID_LABEL, "sha256")[:KEY_ID_BYTES]

    @classmethod
    def derive(cls, master_key: bytes) -> AuditKey:
        """The audit key of an AMK (HKDF-SHA256, no salt: the AMK is uniformly random)."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_HKDF_INFO)
        return cls(hkdf.derive(master_key))

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256(key, message)."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def __repr__(self) -> str:
        return f"AuditKey(key_id={self.key_id.hex()!r})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("audit keys cannot be pickled")


class AuditKeyring:
    """The audit key that tags and seals now, and every key that can still verify."""

    def __init__(
        self,
        current: AuditKey | None,
        known: list[AuditKey],
        independent: Sequence[AuditKey] = (),
    ) -> None:
        self.current = current
        self._by_id = {key.key_id: key for key in (*known, *independent)}
        if current is not None:
            self._by_id[current.key_id] = current
        self._independent = {key.key_id for key in independent}

    def get(self, key_id: bytes) -> AuditKey | None:
        return self._by_id.get(key_id)

    @property
    def empty(self) -> bool:
        """Whether no key at all is configured (nothing can be verified)."""
        return not self._by_id

    def is_independent(self, key_id: bytes) -> bool:
        """Whether ``key_id`` names a KEYLEDGER_AUDIT_KEY (current or previous) rather than
        a key derived from a master key. Once a checkpoint is sealed with one, nothing after
        it may be vouched for by a derived key: a master-key holder could forge those."""
        return key_id in self._independent

    def __repr__(self) -> str:
        current = self.current.key_id.hex() if self.current else None
        return f"AuditKeyring(current={current!r}, known={sorted(k.hex() for k in self._by_id)})"


def digest_of(data: bytes) -> str:
    """SHA-256 hex of ``data`` (for public fingerprints of anchors)."""
    return hashlib.sha256(data).hexdigest()
