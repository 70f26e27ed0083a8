"""The public header of a secret envelope (the full layout is in infrastructure/crypto.py).

    format (1) = 0x01 || algorithm (1) = 0x01 (AES-256-GCM) || key_version (4, big-endian)
    || nonce (12) || ciphertext+tag (>= 16)

Read models keep the key version the header names, so drift diagnosis can check every
envelope against the key inventory without holding or decrypting any ciphertext.
"""

from __future__ import annotations

import struct

ENVELOPE_FORMAT = 1
ALGORITHM_AES256GCM = 1
HEADER = struct.Struct(">BBI")
NONCE_BYTES = 12
TAG_BYTES = 16


def envelope_key_version(blob: bytes) -> int | None:
    """The key version the envelope's header names; None when the envelope is not valid."""
    if len(blob) < HEADER.size + NONCE_BYTES + TAG_BYTES:
        return None
    fmt, algorithm, key_version = HEADER.unpack_from(blob)
    if fmt != ENVELOPE_FORMAT or algorithm != ALGORITHM_AES256GCM:
        return None
    return int(key_version)
