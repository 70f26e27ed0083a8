"""What a decoded event must hold: every field its class declares, of the declared type.

Stored events are read back from a database that someone may have altered. The library's
mapper builds an event from whatever its stored JSON holds: a field renamed or missing, or
a value of another type, would only fail later and far from the cause, as an
``AttributeError`` in a projection, a ``TypeError`` in a replay or an ``OverflowError`` in
SQLite (found by fuzzing a stream's rows). Checking each decoded event against its class's
annotations turns all of that into one error at decoding, which every reader of the stream
reports as tampering (``AuditTampered``), and ``audit verify`` locates.

A class's checks are built once, from its dataclass fields and type hints: ``str``, ``bytes``,
``bool``, ``UUID`` by type; ``int`` also by range (what SQLite and PostgreSQL store as
BIGINT); ``datetime`` also by its offset (see ``is_instant``); unions, ``dict[K, V]``,
``list[T]``, ``tuple[T, ...]`` and ``Literal`` by their parts. A type variable or ``Any``
accepts anything.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

Check = Callable[[object], bool]

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class EventShapeError(ValueError):
    """A decoded event lacks a declared field, or holds a value of another type."""


def _anything(value: object) -> bool:
    return True


def is_int64(value: object) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX  # (a bool is no int here)


def is_instant(value: object) -> bool:
    """Whether ``value`` is an aware datetime that converts to UTC: one the read models
    can hold as microseconds since the epoch (every UTC datetime, years 1 to 9999, fits
    a BIGINT), and one the domain can compare with the clock.

    Every event keyledger writes carries one in UTC. A stored time edited to a naive one
    failed ``secrets get`` and the projections with a ``TypeError`` (naive against aware),
    and one whose offset takes it out of the years 1 to 9999 (0001-01-01T00:00:00+14:00)
    was projected into a row no audit query could read back, "run projections rebuild"
    answering every query after a rebuild that succeeded (found by review)."""
    if not isinstance(value, datetime):
        return False
    if value.tzinfo is UTC:  # (the common case: what keyledger writes decodes to it)
        return True
    try:
        if value.utcoffset() is None:  # naive
            return False
        value.astimezone(UTC)
    except (OverflowError, ValueError, TypeError):  # beyond the years 1 to 9999 in UTC
        return False
    return True


def _is_bool(value: object) -> bool:
    return value is True or value is False


def _instance_of(cls: type) -> Check:
    return lambda value: isinstance(value, cls)


def _any_of(checks: list[Check]) -> Check:
    return lambda value: any(check(value) for check in checks)


def _mapping_of(key: Check, item: Check) -> Check:
    if key is _anything and item is _anything:
        return _instance_of(dict)
    return lambda value: (
        isinstance(value, dict) and all(key(k) and item(v) for k, v in value.items())
    )


def _sequence_of(cls: type[Iterable[object]], item: Check) -> Check:
    if item is _anything:
        return _instance_of(cls)
    return lambda value: isinstance(value, cls) and all(item(v) for v in value)


def _one_of(allowed: tuple[object, ...]) -> Check:
    return lambda value: any(value == a and type(value) is type(a) for a in allowed)


def checker(hint: Any) -> Check:
    """The check of a value against type ``hint`` (see the module doc)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return _anything
    if hint is type(None) or hint is None:
        return lambda value: value is None
    if hint is int:
        return is_int64
    if hint is bool:
        return _is_bool
    if hint is datetime:
        return is_instant
    if origin is typing.Union or origin is types.UnionType:
        return _any_of([checker(arg) for arg in args])
    if origin is typing.Literal:
        return _one_of(args)
    if origin is dict:
        return _mapping_of(*(checker(arg) for arg in args)) if args else _instance_of(dict)
    if origin in (list, set, frozenset):
        return _sequence_of(origin, checker(args[0]) if args else _anything)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _sequence_of(tuple, checker(args[0]))
        return _instance_of(tuple)  # (fixed-length tuples are not stored by keyledger)
    if isinstance(origin, type):
        return _instance_of(origin)
    if isinstance(hint, type):
        return _instance_of(hint)
    return _anything


def exact_types(hint: Any) -> frozenset[type]:
    """Types whose values satisfy ``hint`` without a closer look: the fast path of
    ``check_shape`` (an ``int`` always gets one, for its range; a ``datetime`` for its
    offset)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return frozenset({type(None)})
    if origin is typing.Union or origin is types.UnionType:
        return frozenset().union(*(exact_types(arg) for arg in args))
    if origin is dict and all(arg is Any for arg in args):
        return frozenset({dict})
    if isinstance(hint, type) and hint not in (int, datetime) and origin is None:
        return frozenset({hint})
    return frozenset()


Field = tuple[str, frozenset[type], Check]
_SHAPES: dict[type, tuple[Field, ...]] = {}
_MISSING = object()


def _shape(cls: type) -> tuple[Field, ...]:
    shape = _SHAPES.get(cls)
    if shape is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        shape = _SHAPES[cls] = tuple(
            (field.name, exact_types(hint), checker(hint))
            for field in fields
            if (hint := hints.get(field.name, Any)) is not Any
            and not isinstance(hint, typing.TypeVar)
        )
    return shape


def check_shape(event: object) -> None:
    """Raise ``EventShapeError`` unless ``event`` holds every field its class declares,
    each of its declared type."""
    state = vars(event)
    for name, exact, check in _shape(type(event)):
        value = state.get(name, _MISSING)
        if type(value) in exact:
            continue
        if value is _MISSING:
            raise EventShapeError(f"{type(event).__name__} has no {name!r}")
        if not check(value):
            raise EventShapeError(f"{type(event).__name__}.{name} {_unlike(value)}")


def _unlike(value: object) -> str:
    """How ``value`` departs from its declared type (its type, never the value itself)."""
    if isinstance(value, datetime) and not is_instant(value):
        return "holds a datetime that is no UTC instant (naive, or beyond the years 1 to 9999)"
    return f"holds a {type(value).__name__}, not what the class declares"
