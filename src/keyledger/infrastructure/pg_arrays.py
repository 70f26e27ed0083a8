"""One-dimensional PostgreSQL arrays in their binary wire format, built directly.

The read function takes nine arrays per call. psycopg's generic list dumper looks up a
dumper for the list and for its elements and sizes them on every call, which was a fifth
of a retrieve's client CPU; the arrays here are a few known element types, so they are
packed with ``struct`` and handed to psycopg as ready-made bytes of the right type.

The format is PostgreSQL's ``array_send``: dimensions (1, or 0 when empty), a has-nulls
flag, the element type's oid, the length and lower bound (1) of the dimension, then each
element as a 4-byte length and its binary form (-1: NULL). ``array_elements`` reads an
array result back in that format.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from uuid import UUID

from psycopg import adapters
from psycopg.adapt import Dumper
from psycopg.pq import Format

_HEADER = struct.Struct("!iiIii")
_EMPTY = struct.Struct("!iiI")
_INT8 = struct.Struct("!iq")
_LENGTH = struct.Struct("!i")


class PackedArray:
    """An array already in binary wire format; subclasses name the type."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class UUIDArray(PackedArray):
    __slots__ = ()


class Int8Array(PackedArray):
    __slots__ = ()


class TextArray(PackedArray):
    __slots__ = ()


class ByteaArray(PackedArray):
    __slots__ = ()


def _header(element_oid: int, count: int) -> bytes:
    if count == 0:
        return _EMPTY.pack(0, 0, element_oid)
    return _HEADER.pack(1, 0, element_oid, count, 1)


def uuid_array(values: Sequence[UUID]) -> UUIDArray:
    parts = [_header(2950, len(values))]
    for value in values:
        parts.append(b"\x00\x00\x00\x10")
        parts.append(value.bytes)
    return UUIDArray(b"".join(parts))


def int8_array(values: Sequence[int]) -> Int8Array:
    parts = [_header(20, len(values))]
    parts.extend(_INT8.pack(8, value) for value in values)
    return Int8Array(b"".join(parts))


def text_array(values: Sequence[str]) -> TextArray:
    return TextArray(_varlena(25, [value.encode() for value in values]))


def bytea_array(values: Sequence[bytes]) -> ByteaArray:
    return ByteaArray(_varlena(17, values))


def _varlena(element_oid: int, values: Sequence[bytes]) -> bytes:
    parts = [_header(element_oid, len(values))]
    for value in values:
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def array_elements(data: bytes | None) -> list[bytes | None]:
    """The elements of a one-dimensional array in binary wire format, each in its own
    binary form (None for a NULL element; an empty list for a NULL array)."""
    if data is None:
        return []
    ndim, _, _ = _EMPTY.unpack_from(data)
    if ndim == 0:
        return []
    if ndim != 1:
        raise ValueError(f"a {ndim}-dimensional array where one dimension was expected")
    _, _, _, count, _ = _HEADER.unpack_from(data)
    elements: list[bytes | None] = []
    offset = _HEADER.size
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length < 0:
            elements.append(None)
            continue
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def _dumper(array_oid: int) -> type[Dumper]:
    class PackedDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: PackedArray) -> bytes:
            return obj.data

    return PackedDumper


for _kind, _oid in ((UUIDArray, 2951), (Int8Array, 1016), (TextArray, 1009), (ByteaArray, 1001)):
    adapters.register_dumper(_kind, _dumper(_oid))
