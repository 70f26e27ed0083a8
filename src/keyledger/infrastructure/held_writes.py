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
held by writers waiting for that very lock. And one block at a time per store in a
process (``ExclusiveGate``): only one can hold the lock anyway, and blocks that each held
a reader while waiting for the pool's next connection could use up the pool between them.

A thread in a block must not open another transaction of its own: its reads go to the
pinned connection one at a time, and a write elsewhere would wait for its own lock (or,
on SQLite, roll the held transaction back). The recorders refuse such a write
(``WRITE_OUTSIDE``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from keyledger.errors import KeyledgerError, StorageError

T = TypeVar("T")

SAVEPOINT = "kl_write"
WRITE_OUTSIDE = (
    "a write outside the write transaction this thread holds was refused (a keyledger "
    "bug: please report it)"
)


class HeldTransaction(threading.local):
    """The write transaction this thread holds (its cursor), if any, and the first event
    written in it (looked up when its COMMIT's answer is lost)."""

    cursor: Any = None
    first_event: Any = None


class HoldsWrites:
    """What a recorder keeps for the write transactions its threads hold."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held = HeldTransaction()
        self._gate = ExclusiveGate()


class PinnedReader(threading.local):
    """The connection this thread's reads use while it holds a write transaction."""

    conn: Any = None


class ExclusiveGate:
    """Lets one thread of the process at a time hold a store's write transaction.

    A forked child starts with every gate free: it has only the thread that forked. (On
    SQLite a ``fork()`` first waits for every call in progress, a held block's included:
    see ``sqlite_store._before_fork``.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _GATES.add(self)

    @contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        """The gate, or ``StorageError`` after ``timeout`` seconds (the store's lock
        timeout: a wait for another thread's locked attempt is a wait for the lock)."""
        if not self._lock.acquire(timeout=timeout):
            raise StorageError(
                f"lock timeout: another thread's write under the store's lock took over "
                f"{timeout:g} s"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _reset(self) -> None:
        self._lock = threading.Lock()


_GATES: weakref.WeakSet[ExclusiveGate] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for gate in list(_GATES):
        gate._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


@contextmanager
def holding(
    held: HeldTransaction,
    pinned: PinnedReader,
    cursor: Any,
    reader: Any,
    commit: Callable[[], BaseException | None],
) -> Iterator[bool]:
    """The block of a recorder's ``exclusively()``, once its reader is taken and its
    transaction open: this thread's writes go to ``cursor`` and its reads to ``reader``
    until the block ends; then ``commit()`` (None, or why the transaction did not
    commit), also when the block raised. A failed COMMIT is raised in place of the
    block's own error when that was a refusal (not found, disabled, ...): it was audited
    in the transaction that failed, and is never reported as decided without its audit
    entry. A storage failure, or anything else, stands."""
    held.cursor, pinned.conn = cursor, reader
    try:
        yield True
    except BaseException as error:
        held.cursor = pinned.conn = None
        failure = commit()
        refusal = isinstance(error, KeyledgerError) and not isinstance(error, StorageError)
        if failure is not None and refusal:
            raise failure from error
        raise
    finally:
        held.cursor = pinned.conn = None
    failure = commit()
    if failure is not None:
        raise failure
