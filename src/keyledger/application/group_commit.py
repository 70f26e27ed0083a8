"""Group commit: concurrent callers share one write transaction.

Every successful retrieve appends its read event before the value is returned, and all
writers are serialised by the store's write lock. Under concurrency, callers therefore
queue their writes; one of them (the leader) writes everything queued so far in a single
transaction, wakes the others, and hands leadership to the next caller still waiting.
Each caller returns only after the transaction holding its write has finished (or
raises that write's own error), so reads stay fail-closed. With one caller there is no
waiting at all: it leads a batch of one.

Callers may announce a write before they submit it (``arriving``: a retrieve announces
each attempt on entry, then validates, decrypts and encodes before it submits). A leader
about to write waits, briefly, for callers on their way: those announced, and those
whose write was in the batch that just finished, if they came back promptly the last
time (a thread reading in a loop is back within ``RETURN_GRACE``; a request thread of a
web server that reads now and then is not, and is not waited for). Without that, two
threads take turns: each batch holds one write, because the other thread is still
preparing its next one while the batch is written. The leader writes once the queued
writes outnumber those still expected (so with many threads one half's batch is written
while the other half prepares), once the grace of the returning ones is over, and at
the latest after ``arrival_wait`` (KEYLEDGER_GROUP_COMMIT_WAIT_MS, 1 ms by default; 0 turns
the wait off). A lone thread never waits.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Generic, TypeVar

from keyledger.errors import StorageError

T = TypeVar("T")

MAX_BATCH = 256
# The longest a leader waits for callers on their way before it writes without them
# (the default of KEYLEDGER_GROUP_COMMIT_WAIT_MS).
ARRIVAL_WAIT = 0.001
# How long after its write finished a caller still counts as coming back.
RETURN_GRACE = 0.0005
# How long a queued caller sleeps before it checks that the leader is still at work.
WATCHDOG = 0.5


class LeaderLost(StorageError):
    """The leader of the batch holding this item stopped before saying how its write
    went (Ctrl-C landed between the write and the hand-over): the item may or may not
    have been written, so its caller fails closed."""


class _Pending(Generic[T]):
    """A queued item. ``wake`` is a lock held from birth: releasing it wakes the waiter
    (a plain lock costs a tenth of a ``threading.Event``, and each item is woken once)."""

    __slots__ = ("error", "finished", "item", "lead", "taker", "thread", "wake")

    def __init__(self, item: T, thread: int) -> None:
        self.item = item
        self.thread = thread
        self.wake = threading.Lock()
        self.wake.acquire()
        self.lead = False
        self.taker: int | None = None  # the thread whose batch took it (see _rescued)
        self.finished = False
        self.error: BaseException | None = None


class _Arrival(Generic[T]):
    """The context of ``GroupCommitter.arriving`` (a plain class: a generator-based
    context manager costs several times as much, on every retrieve)."""

    __slots__ = ("_committer", "_thread")

    def __init__(self, committer: GroupCommitter[T]) -> None:
        self._committer = committer
        self._thread = threading.get_ident()

    def __enter__(self) -> None:
        committer, thread = self._committer, self._thread
        if thread in committer._returning:
            if time.monotonic() < committer._returned_at + RETURN_GRACE:
                committer._prompt.add(thread)
            else:
                committer._prompt.discard(thread)
            committer._returning.discard(thread)
        committer._arriving.add(thread)

    def __exit__(self, *exc_info: object) -> None:
        committer, thread = self._committer, self._thread
        if thread in committer._arriving:  # left without submitting (an error, a refusal)
            committer._arriving.discard(thread)
            if committer._leader_waiting:
                with committer._lock:
                    committer._signal_leader()


class GroupCommitter(Generic[T]):
    """Batches ``submit``ted items into calls of ``write(items) -> per-item errors``."""

    def __init__(
        self,
        write: Callable[[list[T]], Sequence[BaseException | None]],
        max_batch: int = MAX_BATCH,
        arrival_wait: float | None = None,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        # Seconds a leader waits at most for callers on their way; 0: never waits.
        self.arrival_wait = ARRIVAL_WAIT if arrival_wait is None else arrival_wait
        self.rescues = 0  # leaderships taken back from a leader that stopped (for tests)
        self.waits = 0  # how often a leader waited for arrivals (for tests and tuning)
        self._start_afresh()
        _COMMITTERS.add(self)

    def _start_afresh(self) -> None:
        """No batch, no leader, nobody on the way: a new committer, or one in a forked
        child, where the threads that queued, led or were on their way do not exist (and
        the locks may have been held by them at the fork)."""
        self._lock = threading.Lock()
        self._queue: list[_Pending[T]] = []
        self._leader_busy = False
        self._leader: int | None = None  # the thread that leads (its ident), while busy
        # Threads on their way to submit (idents). Sets are changed without the lock:
        # add and discard are atomic, and a leader re-checks after every wake-up.
        self._arriving: set[int] = set()
        self._returning: set[int] = set()  # the last batch's callers, for RETURN_GRACE
        self._returned_at = 0.0
        self._prompt: set[int] = set()  # threads that came back within the grace last time
        # A waiting leader's wake-up: locked while there is no news, released by a caller
        # that arrives or leaves. The leader waits on it without holding ``_lock`` (a
        # Condition re-takes its lock after the wait, and Ctrl-C there leaves the waiter
        # without the lock it believes it holds).
        self._arrived = threading.Lock()
        self._arrived.acquire()
        self._leader_waiting = False

    def arriving(self) -> _Arrival[T]:
        """Announce that this thread will ``submit`` within the block (or leave it)."""
        return _Arrival(self)

    def submit(self, item: T) -> None:
        """Block until ``item`` is finished; raise its own error if it failed."""
        thread = threading.get_ident()
        with self._lock:
            self._arriving.discard(thread)
            self._returning.discard(thread)
            alone = not self._leader_busy and not self._arriving and not self._queue
            if alone and not self._returning_counted(time.monotonic()):
                self._leader_busy, self._leader = True, thread
            else:
                alone = False
                pending = _Pending(item, thread)
                self._queue.append(pending)
                if self._leader_waiting:
                    self._signal_leader()
                if not self._leader_busy:
                    self._leader_busy = pending.lead = True
                    self._leader = thread
        if alone:  # nobody to wait for or to batch with: write it, then pass the turn on
            self._write_alone(item, thread)
            return
        if not pending.lead:
            try:  # until our write finished, or until it is our turn to lead
                while not pending.wake.acquire(timeout=WATCHDOG):
                    if self._rescued(pending):
                        break
            except BaseException:  # interrupted (Ctrl-C): never leave a turn to lead unused
                self._abandon(pending)
                raise
        if not pending.finished:
            try:
                self._lead()  # a leader's own item is first in its batch
            except BaseException:  # Ctrl-C before _lead took the batch: pass the lead on
                self._abandon(pending)  # (a no-op once the item is in a batch)
                raise
        if pending.error is not None:
            raise pending.error

    def _write_alone(self, item: T, thread: int) -> None:
        """A batch of one, led by its own caller without queueing (what ``_lead`` does
        for a batch of one, minus the queue entry and its wake-up lock)."""
        try:
            (error,) = self._outcomes([item])
        finally:
            self._end_turn({thread})
        if error is not None:
            raise error

    def _outcomes(self, items: list[T]) -> Sequence[BaseException | None]:
        """Each item's error from one ``write`` (the failure of the write itself for all
        of them when it raised or answered for another number of items).

        Each item of a batch gets its own copy of a shared failure, without traceback,
        cause or context: one exception object raised in several threads would collect
        every caller's frames in its traceback, and a caller's error report would show
        the locals of the others (another tenant's request among them). An interruption
        (``KeyboardInterrupt``, ``SystemExit``) is not an outcome of the write: it stops
        the leader alone, and ``_lead`` fails the others closed."""
        try:
            errors = self._write(items)
            if len(errors) != len(items):
                raise RuntimeError(f"{len(errors)} outcomes for {len(items)} writes")
        except Exception as failure:
            if len(items) == 1:
                return [failure]
            return [_private_copy(failure) for _ in items]
        return errors

    def _end_turn(self, threads: set[int]) -> None:
        """After a batch: leadership passes on, and its callers count as returning."""
        with self._lock:
            self._hand_over()  # before anyone is woken
            self._prompt -= self._returning  # those that never came back
            self._returning = threads
            self._returned_at = time.monotonic()

    def _abandon(self, pending: _Pending[T]) -> None:
        """Take back the item of a caller interrupted while it waited, unless a leader
        took it into a batch already; pass leadership on if it had been handed to it."""
        with self._lock:
            if pending not in self._queue:
                return  # in a batch being written: it is finished like the others
            self._queue.remove(pending)
            pending.finished = True
            if pending.lead:
                self._hand_over()

    def _hand_over(self) -> None:
        """(Lock held.) The next waiter leads the next batch; none: nobody leads."""
        if self._queue:
            first = self._queue[0]
            first.lead, self._leader = True, first.thread
            if first.wake.locked():  # (a rescue may hand over to a waiter already woken)
                first.wake.release()
        else:
            self._leader_busy, self._leader = False, None

    def _rescued(self, pending: _Pending[T]) -> bool:
        """After ``WATCHDOG`` seconds of waiting: whether ``pending``'s wait is over
        because a leader stopped without finishing its turn.

        Python raises ``KeyboardInterrupt`` between any two bytecodes of the main thread,
        so a leader can stop between its write and its hand-over, leaving every later
        caller waiting for a turn nobody would give. A thread leading this committer is
        always inside its code, in a frame that shows it leads (``_leading``); one that
        is not has stopped. Its leadership passes on (the queued items it was to lead
        are dropped: their caller is gone), and an item of a batch whose leader stopped
        returns the outcome the leader set, or fails closed (``LeaderLost``)."""
        with self._lock:
            leader = self._leader
            if self._leader_busy and leader is not None and not self._leading(leader):
                self.rescues += 1
                for lost in [p for p in self._queue if p.lead and p.thread == leader]:
                    self._queue.remove(lost)  # woken to lead, then stopped before _lead
                    lost.error, lost.finished = LeaderLost(_LOST), True
                self._hand_over()
            if pending.finished:  # (its leader set its outcome, then stopped before waking it)
                return True
            if pending.lead and pending in self._queue:
                return True  # its turn to lead, handed over by a leader stopped before waking it
            if pending in self._queue or self._leading(pending.taker, pending):
                return False  # queued, or its batch's leader is still at it
            pending.error, pending.finished = LeaderLost(_LOST), True
            return True

    def _leading(self, thread: int | None, item: _Pending[T] | None = None) -> bool:
        """Whether ``thread`` is leading this committer now (with ``item``: leading the
        batch that holds ``item``), from the frames it is running. A rare check, made
        only after a caller waited ``WATCHDOG`` seconds. A thread that ``sys`` does not
        list (a greenlet under gevent, say) counts as leading: never rescued."""
        if thread is None:
            return False
        frames = sys._current_frames()
        if thread not in frames:
            return True
        frame: FrameType | None = frames[thread]
        while frame is not None:
            code, names = frame.f_code, frame.f_locals
            if code in _LEADING_CODE and names.get("self") is self:
                if item is None:
                    return True
                if code is _LEAD_CODE and any(p is item for p in names.get("batch", ())):
                    return True
            elif code is _SUBMIT_CODE and names.get("self") is self and item is None:
                own = names.get("pending")
                if names.get("alone") or (own is not None and own.lead and not own.finished):
                    return True  # about to write alone, or woken to lead
            frame = frame.f_back
        return False

    def _returning_counted(self, now: float) -> int:
        """How many of the last batch's callers count as on their way (lock held)."""
        if not self._returning or now >= self._returned_at + RETURN_GRACE:
            return 0
        return len(self._returning & self._prompt)

    def _worth_waiting(self) -> bool:
        """Whether as many callers are on their way as are queued (call with the lock
        held): then waiting for them at least doubles the batch. With fewer on their
        way, the leader writes now and they make up the next batch, written while
        these callers prepare their next writes."""
        expected = len(self._arriving) + self._returning_counted(time.monotonic())
        return 0 < len(self._queue) <= expected and len(self._queue) < self._max_batch

    def _signal_leader(self) -> None:
        """(Lock held.) Wake the leader waiting in ``_await_arrivals`` to look again."""
        if self._arrived.locked():
            self._arrived.release()

    def _await_arrivals(self) -> None:
        """Wait while waiting is worth it, at most ``arrival_wait``: each look under the
        lock, each wait outside it (see ``_arrived``)."""
        with self._lock:
            if self.arrival_wait <= 0 or not self._worth_waiting():
                return
            self.waits += 1
            deadline = time.monotonic() + self.arrival_wait
            self._leader_waiting = True
        while True:
            with self._lock:
                self._arrived.acquire(blocking=False)  # news seen from here on: cleared
                if not self._worth_waiting():
                    return
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    return
                if self._returning_counted(now):  # look again when their grace is over
                    remaining = min(remaining, self._returned_at + RETURN_GRACE - now)
            self._arrived.acquire(timeout=remaining)  # released by news, or times out

    def _lead(self) -> None:
        batch: list[_Pending[T]] = []
        writing = False  # from here on the batch may have been written
        try:
            try:
                self._await_arrivals()
            finally:  # interrupted while waiting, too: this batch is ours to finish
                with self._lock:
                    self._leader_waiting = False
                    n = self._max_batch  # (one statement: the batch leaves the queue at once)
                    batch, self._queue = self._queue[:n], self._queue[n:]
                    for taken in batch:
                        taken.taker = threading.get_ident()
            writing = True
            errors = self._outcomes([p.item for p in batch])
            for pending, error in zip(batch, errors, strict=True):
                pending.error, pending.finished = error, True
        finally:  # whatever happened, leadership passes on and every caller wakes
            self._end_turn({pending.thread for pending in batch})
            for pending in batch:
                if not pending.finished:  # interrupted: before the write, or after it
                    interrupted = (
                        LeaderLost(_LOST)
                        if writing
                        else StorageError("interrupted before the batch was written")
                    )
                    pending.error, pending.finished = interrupted, True
                if pending.wake.locked():
                    pending.wake.release()


def _private_copy(failure: Exception) -> Exception:
    """A copy of ``failure`` for one caller: same class, message and attributes; no
    traceback, cause or context (see ``GroupCommitter._outcomes``)."""
    try:
        private = copy.copy(failure)
    except Exception:  # a class that cannot be rebuilt from its arguments
        private = StorageError(f"the batch holding this write failed: {failure}")
    private.__traceback__ = private.__cause__ = private.__context__ = None
    private.__suppress_context__ = True
    return private


_COMMITTERS: weakref.WeakSet[GroupCommitter[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for committer in list(_COMMITTERS):
        committer._start_afresh()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_LEAD_CODE = GroupCommitter._lead.__code__
_SUBMIT_CODE = GroupCommitter.submit.__code__
# The frames a leader runs in once it has the lead (its write runs below _outcomes).
_LEADING_CODE = frozenset(
    method.__code__
    for method in (
        GroupCommitter._lead,
        GroupCommitter._write_alone,
        GroupCommitter._outcomes,
        GroupCommitter._await_arrivals,
        GroupCommitter._end_turn,
    )
)
_LOST = (
    "the thread writing this batch was interrupted before it said whether the write was "
    "made: the item may have been recorded, and its call fails closed"
)
