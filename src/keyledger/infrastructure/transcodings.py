"""Extra JSON transcodings for event state."""

from __future__ import annotations

from base64 import b64decode, b64encode

from eventsourcing.persistence import Transcoding


class BytesAsBase64(Transcoding):
    """Ciphertext envelopes travel in events as base64 text."""

    type = bytes
    name = "bytes_b64"

    def encode(self, obj: bytes) -> str:
        return b64encode(obj).decode("ascii")

    def decode(self, data: str) -> bytes:
        return b64decode(data)
