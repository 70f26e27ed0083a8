"""A statement prepared on a connection and run through libpq directly.

The hot one-call writes (a lone retrieve's ``kl_append_read_v1``) cost psycopg's cursor
machinery (query conversion, dumper lookup per parameter, result loading) about as much
client CPU as everything else of the call. Their parameters are a few fixed types, so
they are sent as binary values on psycopg's documented libpq wrapper (``psycopg.pq``),
the way psycopg itself sends a prepared statement: measured here, 28-51 against 66-95 us
of client CPU per call. libpq's ``PQexecPrepared`` runs with the GIL released.

The statement is prepared once per connection, under its own name (never one of
psycopg's ``_pg3_*`` names), and prepared again if the server lost it (psycopg sends
``DEALLOCATE ALL`` when it clears its own cache of prepared statements: then a call costs
three round trips once). Failures are
psycopg's own exceptions, built from the result as psycopg builds them, so callers handle
them exactly as before (a lost connection leaves ``conn.broken`` true).
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import error_from_result

_INT4 = struct.Struct("!i")
_INT8 = struct.Struct("!q")
_INVALID_STATEMENT_NAME = "26000"  # the server does not know the prepared statement
_DUPLICATE_STATEMENT_NAME = "42P05"  # the server knows it already (another of ours)


def int8(value: int) -> bytes:
    """A bigint parameter in binary format."""
    return _INT8.pack(value)


def binary(value: str | int | None, sql_type: str) -> bytes | None:
    """``value`` as a binary parameter of ``sql_type`` (text, integer or bigint)."""
    if value is None:
        return None
    if sql_type == "text":
        return str(value).encode()
    if sql_type == "integer":
        return _INT4.pack(value)
    if sql_type == "bigint":
        return _INT8.pack(value)
    raise ValueError(f"no binary form here for {sql_type}")


def int8_value(value: bytes | None) -> int | None:
    """A bigint result column in binary format (None for NULL)."""
    return None if value is None else int(_INT8.unpack(value)[0])


def bool_value(value: bytes | None) -> bool | None:
    """A boolean result column in binary format (None for NULL)."""
    return None if value is None else value == b"\x01"


class PreparedCall:
    """One statement, prepared on each connection the first time it runs there."""

    def __init__(self, name: str, statement: str) -> None:
        self.name = name.encode()
        self.statement = statement.encode()
        self._prepared_on: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()

    def run(self, conn: psycopg.Connection[Any], params: Sequence[bytes | None]) -> list[Any]:
        """The first row of the statement's result, its columns as binary values."""
        if conn not in self._prepared_on:
            self._prepare(conn)
        result = self._execute(conn, params)
        if result.status == pq.ExecStatus.FATAL_ERROR and (
            result.error_field(pq.DiagnosticField.SQLSTATE) == _INVALID_STATEMENT_NAME.encode()
        ):  # the server lost it (DISCARD ALL, say): prepare it again, once
            self._prepared_on.discard(conn)
            self._prepare(conn)
            result = self._execute(conn, params)
        _check(conn, result, pq.ExecStatus.TUPLES_OK)
        return [result.get_value(0, column) for column in range(result.nfields)]

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        result = conn.pgconn.prepare(self.name, self.statement)
        if result.status != pq.ExecStatus.COMMAND_OK and (
            result.error_field(pq.DiagnosticField.SQLSTATE) == _DUPLICATE_STATEMENT_NAME.encode()
        ):  # prepared on this connection by another copy of this call (a reloaded module)
            self._prepared_on.add(conn)
            return
        _check(conn, result, pq.ExecStatus.COMMAND_OK)
        self._prepared_on.add(conn)

    def _execute(
        self, conn: psycopg.Connection[Any], params: Sequence[bytes | None]
    ) -> pq.abc.PGresult:
        return conn.pgconn.exec_prepared(
            self.name,
            params,  # type: ignore[arg-type]  # None is NULL, as psycopg sends it
            param_formats=[1] * len(params),
            result_format=1,
        )


def _check(conn: psycopg.Connection[Any], result: pq.abc.PGresult, expected: int) -> None:
    if result.status == expected:
        return
    if conn.pgconn.status == pq.ConnStatus.BAD:
        reason = conn.pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(f"the connection was lost: {reason}")
    raise error_from_result(result, encoding=conn.info.encoding)
