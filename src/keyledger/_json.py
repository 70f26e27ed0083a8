"""Compact JSON encoders built once, for the hot paths that encode many small objects.

``json.JSONEncoder.encode`` builds a new C encoder, and a circular-reference memo, on
every call. The encoders here are built once with the same settings and no memo, so
threads can share them; they may only be given objects built by keyledger from
validated input, which never hold a reference cycle. Without CPython's C accelerator
they are the library's own ``encode``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as json_encoder
from typing import Any


def compact_encoder(
    default: Callable[[Any], Any] | None = None, *, ensure_ascii: bool, sort_keys: bool
) -> Callable[[Any], str]:
    """``json.JSONEncoder(separators=(",", ":"), ...).encode``, with its C encoder kept."""
    fallback = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=ensure_ascii, sort_keys=sort_keys, default=default
    )
    make = getattr(json_encoder, "c_make_encoder", None)
    if make is None:
        return fallback.encode
    chunks = make(
        None,  # markers: no cycle check (see above)
        fallback.default,  # raises TypeError, or the given ``default``
        json_encoder.encode_basestring_ascii if ensure_ascii else json_encoder.encode_basestring,
        None,  # indent
        ":",  # key separator
        ",",  # item separator
        sort_keys,
        False,  # skipkeys
        True,  # allow_nan
    )

    def encode(obj: Any) -> str:
        if isinstance(obj, str):  # the library's shortcut, kept for identical output
            return fallback.encode(obj)
        return "".join(chunks(obj, 0))

    return encode
