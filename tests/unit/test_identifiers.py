"""Identifiers: the one-match fast path accepts exactly what the full rules accept."""

from __future__ import annotations

import random
import unicodedata

import pytest

from keyledger.errors import InvalidInput
from keyledger.validation import check_identifier


def _valid_by_the_rules(value: str) -> bool:
    """The documented rules, spelled out independently of the implementation."""
    return (
        0 < len(value) <= 200
        and not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value)
        and value == value.strip()
    )


EDGES = [
    "a",
    "~",
    " a",
    "a ",
    "a b",
    "x" * 199,
    "x" * 200,
    "x" * 201,
    " " + "x" * 199,
    "x" * 199 + " ",
    "",
    " ",
    "a\tb",
    "a\x7fb",
    "a\x85b",
    "\u00a0a",
    "a\u2003",
    "nämé",
    "日本",
    "a\ud800",
    "tenant-1/prod:db@eu+x",
]


def _random_identifiers(count: int) -> list[str]:
    rng = random.Random(20261130)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\x00", "\x9f", "é", "\u00a0"]
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.choice([1, 2, 3, 8, 199, 200, 201])))
        for _ in range(count)
    ]


@pytest.mark.parametrize("value", EDGES + _random_identifiers(400))
def test_check_identifier_accepts_exactly_what_the_rules_accept(value: str) -> None:
    if _valid_by_the_rules(value):
        assert check_identifier("name", value) == value
    else:
        with pytest.raises(InvalidInput):
            check_identifier("name", value)


def test_a_str_subclass_is_checked_by_the_full_rules() -> None:
    class Name(str):
        pass

    assert check_identifier("name", Name("db")) == "db"
    with pytest.raises(InvalidInput):
        check_identifier("name", Name(" db"))
