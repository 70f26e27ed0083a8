"""A thread's writes held in one write transaction taken before it decides.

Every write is optimistic: it is decided on state read without a lock, and commits only if
that state has not moved on (``WriteUnit.expected``). A decision that keeps losing that
race (a secret stored back to back by other writers starves its readers) is made once
more with the store's write lock taken first: nothing can move on while the lock is
held, so that attempt commits. ``Ledger.exclusively`` opens such a transaction through
its recorder's ``exclusively()``; until it ends, the recorder sends this thread's writes
into it (``HeldTransaction.cursor``), each in a savepoint of its own, so that a write
that fails leaves the others as they would be had each committed alone.

The block reads on a connection of its own (``PinnedReader``), taken from the pool
*before* the lock: one taken after it could wait for a pool whose every connection is
held by writers waiting for that very lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from keyledger.errors import KeyledgerError, StorageError

T = TypeVar("T")

SAVEPOINT = "kl_write"


class HeldTransaction(threading.local):
    """The write transaction this thread holds (its cursor), if any, and the first event
    written in it (looked up when its COMMIT's answer is lost)."""

    cursor: Any = None
    first_event: Any = None


class PinnedReader(threading.local):
    """The connection this thread's reads use while it holds a write transaction."""

    conn: Any = None


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


def commit_failure_replaces(error: BaseException) -> bool:
    """Whether a held transaction's failed COMMIT is what its block's caller gets
    instead of ``error``, the block's own: a refusal (not found, disabled, ...) was
    audited in the transaction that failed, and is never reported as decided without
    its audit entry. A storage failure, or anything else, stands."""
    return isinstance(error, KeyledgerError) and not isinstance(error, StorageError)
