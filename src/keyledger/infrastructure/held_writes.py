"""A thread's writes held in one write transaction taken before it decides.

Every write is optimistic: it is decided on state read without a lock, and commits only if
that state has not moved on (``WriteUnit.expected``). A decision that keeps losing that
race (a secret stored back to back by other writers starves its readers) is made once
more with the store's write lock taken first: nothing can move on while the lock is
held, so that attempt commits. ``Ledger.exclusively`` opens such a transaction through
its recorder's ``exclusively()``; until it ends, the recorder sends this thread's writes
into it (``HeldTransaction.cursor``), each in a savepoint of its own, so that a write
that fails leaves the others as they would be had each committed alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

SAVEPOINT = "kl_write"


class HeldTransaction(threading.local):
    """The write transaction this thread holds (its cursor), if any."""

    cursor: Any = None


def in_savepoint(cursor: Any, write: Callable[[Any], T], *, errors: type[Exception]) -> T:
    """``write(cursor)`` inside a savepoint of the held transaction: undone alone when it
    raises (``errors``: the driver's, ignored when the undo itself fails because the
    connection is gone, which the transaction's end reports)."""
    cursor.execute(f"SAVEPOINT {SAVEPOINT}")
    try:
        result = write(cursor)
    except BaseException:
        try:
            cursor.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            cursor.execute(f"RELEASE SAVEPOINT {SAVEPOINT}")
        except errors:
            pass
        raise
    cursor.execute(f"RELEASE SAVEPOINT {SAVEPOINT}")
    return result
