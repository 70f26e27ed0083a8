"""Group commit: concurrent callers share one write transaction.

Every successful retrieve appends its read event before the value is returned, and all
writers are serialised by the store's write lock. Under concurrency, callers therefore
queue their writes; one of them (the leader) writes everything queued so far in a single
transaction, wakes the others, and hands leadership to the next caller still waiting.
Each caller returns only after the transaction holding its write has finished (or
raises that write's own error), so reads stay fail-closed. With one caller there is no
waiting at all: it leads a batch of one.
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
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending[T]] = []
        self._leader_busy = False

    def submit(self, item: T) -> None:
        """Block until ``item`` is finished; raise its own error if it failed."""
        pending = _Pending(item)
        with self._lock:
            self._queue.append(pending)
            if not self._leader_busy:
                self._leader_busy = pending.lead = True
        if not pending.lead:
            pending.wake.acquire()  # until our write finished, or until it is our turn to lead
        if not pending.finished:
            self._lead()  # a leader's own item is first in its batch
        if pending.error is not None:
            raise pending.error

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        try:
            errors: Sequence[BaseException | None]
            try:
                errors = self._write([p.item for p in batch])
                if len(errors) != len(batch):
                    raise RuntimeError(f"{len(errors)} outcomes for {len(batch)} writes")
            except BaseException as failure:
                errors = [failure] * len(batch)
            for pending, error in zip(batch, errors, strict=True):
                pending.error, pending.finished = error, True
        finally:  # whatever happened, leadership passes on and every caller wakes
            with self._lock:
                # Hand over before waking anyone: the next waiter leads the next batch.
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].wake.release()
                else:
                    self._leader_busy = False
            for pending in batch:
                if not pending.finished:
                    pending.error, pending.finished = RuntimeError("write interrupted"), True
                if pending.wake.locked():
                    pending.wake.release()
