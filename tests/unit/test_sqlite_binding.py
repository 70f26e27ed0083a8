"""keyledger registers identity adapters for None and bytes with the sqlite3 module (see
``sqlite_store._bind_none_and_bytes_directly``): values bind exactly as before, in every
connection of the process, and an adapter the application registered is kept."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import keyledger.infrastructure.sqlite_store  # noqa: F401  (registers the adapters)


def test_none_and_bytes_still_bind_as_null_and_blob_in_any_connection() -> None:
    conn = sqlite3.connect(":memory:")
    blob = bytes(range(256)) * 3
    conn.execute("CREATE TABLE t (a, b)")
    conn.execute("INSERT INTO t VALUES (?, ?)", (None, blob))
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(b"", None), (b"\x00", b"x")])
    rows = conn.execute("SELECT a, typeof(a), b, typeof(b) FROM t ORDER BY rowid").fetchall()
    assert rows == [
        (None, "null", blob, "blob"),
        (b"", "blob", None, "null"),
        (b"\x00", "blob", b"x", "blob"),
    ]


def test_an_adapter_the_application_registered_first_is_kept() -> None:
    script = (
        "import sqlite3\n"
        "mine = lambda value: b'adapted'\n"
        "sqlite3.register_adapter(bytes, mine)\n"
        "import keyledger.infrastructure.sqlite_store\n"
        "assert sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)] is mine\n"
        "conn = sqlite3.connect(':memory:')\n"
        "print(conn.execute('SELECT ?', (b'raw',)).fetchone()[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout == "b'adapted'\n"
