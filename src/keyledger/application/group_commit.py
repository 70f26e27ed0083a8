"""Group commit: concurrent callers share one write transaction.

Every successful retrieve appends its read event before the value is returned, and all
writers are serialised by the store's write lock. Under concurrency, callers therefore
queue their writes; a leader writes everything queued so far in a single transaction,
wakes the callers it wrote for, and hands leadership to the next caller still waiting.
Each caller returns only after the transaction holding its write has finished (or
raises that write's own error), so reads stay fail-closed. With one caller there is no
waiting at all: it leads a batch of one.

``max_leaders`` batches may be in flight at once. On PostgreSQL two leaders keep the
server busy: while one batch commits (its WAL flush, its round trip back) the next is
already on its way, and the server's table lock still orders them. On SQLite one leader
is right: a second would only wait for the file's write lock by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_BATCH = 256


class _Pending(Generic[T]):
    """A queued item. ``wake`` is a lock held from birth: releasing it wakes the waiter
    (a plain lock costs a tenth of a ``threading.Event``, and each item is woken once)."""

    __slots__ = ("error", "finished", "item", "lead", "wake")

    def __init__(self, item: T) -> None:
        self.item = item
        self.wake = threading.Lock()
        self.wake.acquire()
        self.lead = False
        self.finished = False
        self.error: BaseException | None = None


class GroupCommitter(Generic[T]):
    """Batches ``submit``ted items into calls of ``write(items) -> per-item errors``."""

    def __init__(
        self,
        write: Callable[[list[T]], Sequence[BaseException | None]],
        max_batch: int = MAX_BATCH,
        max_leaders: int = 1,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._max_leaders = max_leaders
        self._lock = threading.Lock()
        self._queue: list[_Pending[T]] = []
        self._leaders = 0

    def submit(self, item: T) -> None:
        """Block until ``item`` is finished; raise its own error if it failed."""
        pending = _Pending(item)
        with self._lock:
            self._queue.append(pending)
            if self._leaders < self._max_leaders:
                self._leaders += 1
                pending.lead = True
        if not pending.lead:
            pending.wake.acquire()  # until our write finished, or until it is our turn to lead
        if pending.lead:
            # A leader leads even when another leader took its own item (it was still
            # queued when leadership was handed to it): others may be waiting. Then it
            # waits for that other batch to finish its item.
            self._lead()
            while not pending.finished:
                pending.wake.acquire()
        if pending.error is not None:
            raise pending.error

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        if batch:
            errors: Sequence[BaseException | None]
            try:
                errors = self._write([p.item for p in batch])
            except BaseException as failure:
                errors = [failure] * len(batch)
            for pending, error in zip(batch, errors, strict=True):
                pending.error, pending.finished = error, True
        with self._lock:
            # Hand over before waking anyone: the first waiter not yet leading leads next.
            heir = next((p for p in self._queue if not p.lead), None)
            if heir is not None:
                heir.lead = True
                heir.wake.release()
            else:
                self._leaders -= 1
        for pending in batch:
            if pending.wake.locked():
                pending.wake.release()
