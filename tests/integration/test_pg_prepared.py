"""Statements run on libpq's prepared-statement interface (``pg_prepared``) behave as
psycopg's own execution does: values and NULLs both ways, server errors as psycopg's
exception classes on a connection that stays usable, a statement the server lost is
prepared again, and a lost connection reads as broken."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from conftest import POSTGRES_URL
from keyledger.infrastructure.pg_arrays import array_elements, int8_array, uuid_array
from keyledger.infrastructure.pg_prepared import PreparedCall, bool_value, int8, int8_value

pytestmark = pytest.mark.postgres

ECHO = PreparedCall(
    "kl_test_echo",
    "SELECT $1::uuid IS NULL, $2::bigint + 1, $3::text || '!', length($4::bytea)::bigint, "
    "NULL::bigint",
)
DIVIDE = PreparedCall("kl_test_divide", "SELECT 1 / $1::bigint")


@pytest.fixture
def conn(_postgres_server: None) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as opened:
        yield opened


def test_values_and_nulls_travel_in_binary_both_ways(conn: psycopg.Connection[Any]) -> None:
    some = uuid.uuid4()

    is_null, plus_one, text, length, null = ECHO.run(conn, (None, int8(41), b"h\xc3\xa9", b"abc"))
    assert bool_value(is_null) is True
    assert int8_value(plus_one) == 42
    assert text == "hé!".encode()
    assert int8_value(length) == 3
    assert int8_value(null) is None

    is_null, plus_one, *_ = ECHO.run(conn, (some.bytes, int8(-5), b"", b""))
    assert bool_value(is_null) is False
    assert int8_value(plus_one) == -4


def test_a_server_error_is_psycopgs_and_the_connection_stays_usable(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        DIVIDE.run(conn, (int8(0),))

    assert int8_value(DIVIDE.run(conn, (int8(1),))[0]) == 1
    assert conn.execute("SELECT 7").fetchone() == (7,)  # psycopg's own use goes on


def test_a_statement_the_server_lost_is_prepared_again(conn: psycopg.Connection[Any]) -> None:
    assert int8_value(DIVIDE.run(conn, (int8(1),))[0]) == 1
    conn.execute("DEALLOCATE ALL")

    assert int8_value(DIVIDE.run(conn, (int8(1),))[0]) == 1


def test_each_connection_prepares_its_own(conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as other:
        assert int8_value(DIVIDE.run(conn, (int8(1),))[0]) == 1
        assert int8_value(DIVIDE.run(other, (int8(2),))[0]) == 0
        names = other.execute(
            "SELECT name FROM pg_prepared_statements WHERE name = 'kl_test_divide'"
        ).fetchall()
        assert names == [("kl_test_divide",)]


def test_a_lost_connection_raises_operational_error_and_reads_as_broken(
    conn: psycopg.Connection[Any],
) -> None:
    DIVIDE.run(conn, (int8(1),))
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    with pytest.raises(psycopg.OperationalError):
        DIVIDE.run(conn, (int8(1),))
    assert conn.broken


ARRAYS = PreparedCall(
    "kl_test_arrays",
    "SELECT $1::bigint[], ARRAY[1, NULL, 3]::bigint[], ARRAY['a', 'é', '']::text[], "
    "'{}'::bigint[], NULL::bigint[], $2::uuid[]",
)


def test_arrays_travel_in_binary_both_ways(conn: psycopg.Connection[Any]) -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]

    echoed, with_null, texts, empty, null, uuids = ARRAYS.run(
        conn, (int8_array([5, -6, 2**40]).data, uuid_array(ids).data)
    )

    assert [int8_value(v) for v in array_elements(echoed)] == [5, -6, 2**40]
    assert [int8_value(v) for v in array_elements(with_null)] == [1, None, 3]
    assert array_elements(texts) == [b"a", "é".encode(), b""]
    assert array_elements(empty) == []
    assert array_elements(null) == []
    assert [uuid.UUID(bytes=v) for v in array_elements(uuids) if v is not None] == ids
