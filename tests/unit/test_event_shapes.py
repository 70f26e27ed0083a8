"""The checks a decoded event passes before anything reads it (event_shapes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal
from uuid import uuid4

import pytest

from keyledger.domain.secret import Secret
from keyledger.infrastructure.event_shapes import EventShapeError, check_shape, checker


@pytest.mark.parametrize(
    ("hint", "good", "bad"),
    [
        (int, [0, -5, 2**63 - 1], [True, 1.0, "1", 2**63, None]),
        (bool, [True, False], [0, 1, None]),
        (str, ["", "x"], [b"x", 1, None]),
        (bytes, [b"", b"x"], ["x", bytearray(b"x")]),
        (datetime, [datetime.now(UTC)], ["2026-01-01", {"_type_": "datetime_iso"}]),
        (str | None, ["x", None], [1]),
        (dict[str, str], [{}, {"k": "v"}], [{"k": 1}, {1: "v"}, [("k", "v")]]),
        (dict[str, Any], [{"k": object()}], [[], "x"]),
        (list[int], [[], [1, 2]], [[1, "2"], (1,)]),
        (tuple[int, ...], [(), (1, 2)], [[1], (1, "x")]),
        (Literal["a", 1], ["a", 1], ["b", True, 2]),
        (Any, [None, object()], []),
    ],
)
def test_checker_accepts_the_declared_type_only(hint: Any, good: list[Any], bad: list[Any]) -> None:
    check = checker(hint)
    assert all(check(value) for value in good)
    assert not any(check(value) for value in bad)


def created() -> Secret.SecretCreated:
    secret = Secret.create(
        tenant_id="t1",
        name="s1",
        envelope=b"sealed",
        key_version=1,
        category=None,
        description=None,
        metadata={"owner": "ops"},
        expires_at=None,
        actor={"user_id": "system", "ip_address": None, "user_agent": None},
    )
    (event,) = secret.collect_events()
    assert isinstance(event, Secret.SecretCreated)
    return event


def test_an_event_as_made_passes() -> None:
    check_shape(created())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 424242),
        ("key_version", "sk_live_lookalike"),
        ("metadata", {"owner": 17}),
        ("timestamp", "2026-12-01T00:00:00"),
    ],
)
def test_a_field_of_another_type_is_refused_without_showing_its_value(
    field: str, value: object
) -> None:
    event = created()
    vars(event)[field] = value
    with pytest.raises(EventShapeError, match=f"SecretCreated.{field} holds") as raised:
        check_shape(event)
    assert repr(value) not in str(raised.value)


def test_a_missing_field_is_refused() -> None:
    event = created()
    del vars(event)["envelope"]
    with pytest.raises(EventShapeError, match="has no 'envelope'"):
        check_shape(event)


def test_originator_ids_are_not_checked_by_type() -> None:
    event = created()
    vars(event)["originator_id"] = uuid4()
    check_shape(event)
