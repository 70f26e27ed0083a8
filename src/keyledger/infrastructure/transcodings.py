"""Extra JSON transcodings for event state."""

from __future__ import annotations

from base64 import b64decode, b64encode
from typing import Any

from eventsourcing.persistence import JSONTranscoder, Transcoding

from keyledger._json import compact_encoder


class BytesAsBase64(Transcoding):
    """Ciphertext envelopes travel in events as base64 text."""

    type = bytes
    name = "bytes_b64"

    def encode(self, obj: bytes) -> str:
        return b64encode(obj).decode("ascii")

    def decode(self, data: str) -> bytes:
        return b64decode(data)


class ReusedEncoderTranscoder(JSONTranscoder):
    """The library's ``JSONTranscoder``, writing the same bytes with one JSON encoder
    built once instead of on every call.

    ``json.JSONEncoder.encode`` builds a fresh C encoder (and a circular-reference memo)
    for each object: a sixth of a store's Python time. The encoder kept here has the same
    settings (compact separators, UTF-8 kept as is, the transcodings as ``default``) and no
    memo, so threads can share it: event states are built from validated input and never
    hold a reference cycle. Without CPython's C accelerator, it is the library's path.
    """

    def __init__(self) -> None:
        super().__init__()
        self._encode_text = compact_encoder(self._encode_obj, ensure_ascii=False, sort_keys=False)

    def encode(self, obj: Any) -> bytes:
        return self._encode_text(obj).encode("utf8")
