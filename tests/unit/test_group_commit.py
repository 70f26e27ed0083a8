"""GroupCommitter: concurrent callers share writes, and each sees only its own outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from keyledger.application import group_commit
from keyledger.application.group_commit import GroupCommitter


class RecordingWriter:
    """A fake store: records batches, fails the items it is told to, can be slow."""

    def __init__(self, delay: float = 0.0, failing: frozenset[int] = frozenset()) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.failing = failing
        self.broken = False

    def __call__(self, items: list[int]) -> Sequence[BaseException | None]:
        if self.broken:
            raise ConnectionError("store down")
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [ValueError(item) if item in self.failing else None for item in items]


def test_a_lone_caller_writes_a_batch_of_one_and_returns() -> None:
    writer = RecordingWriter()
    committer = GroupCommitter(writer)

    committer.submit(1)
    committer.submit(2)

    assert writer.batches == [[1], [2]]


def test_concurrent_callers_share_transactions_and_every_item_is_written_once() -> None:
    writer = RecordingWriter(delay=0.005)
    committer = GroupCommitter(writer)
    threads = [
        threading.Thread(target=lambda k=k: [committer.submit(k * 100 + i) for i in range(20)])
        for k in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    written = [item for batch in writer.batches for item in batch]
    assert sorted(written) == sorted(k * 100 + i for k in range(8) for i in range(20))
    assert len(writer.batches) < len(written)  # some transactions carried several reads


def test_each_caller_returns_only_after_its_own_item_was_written() -> None:
    writer = RecordingWriter(delay=0.002)
    committer = GroupCommitter(writer)
    seen_written: list[bool] = []

    def call(item: int) -> None:
        committer.submit(item)
        seen_written.append(any(item in batch for batch in writer.batches))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert seen_written == [True] * 16


def test_an_item_that_fails_raises_in_its_own_caller_only() -> None:
    writer = RecordingWriter(failing=frozenset({7}))
    committer = GroupCommitter(writer)

    with pytest.raises(ValueError, match="7"):
        committer.submit(7)
    committer.submit(8)

    assert writer.batches == [[7], [8]]


def test_a_failed_transaction_fails_its_whole_batch_and_the_next_batch_can_lead() -> None:
    writer = RecordingWriter()
    committer = GroupCommitter(writer)
    writer.broken = True
    with pytest.raises(ConnectionError):
        committer.submit(1)

    writer.broken = False
    committer.submit(2)

    assert writer.batches == [[2]]


def test_a_writer_answering_for_the_wrong_number_of_items_fails_only_that_batch() -> None:
    calls: list[list[int]] = []

    def broken_then_fine(items: list[int]) -> Sequence[BaseException | None]:
        calls.append(items)
        return [] if len(calls) == 1 else [None] * len(items)

    committer = GroupCommitter(broken_then_fine)
    with pytest.raises(RuntimeError, match="0 outcomes for 1 writes"):
        committer.submit(1)

    committer.submit(2)  # leadership was handed back: no hang

    assert calls == [[1], [2]]


# -- arrivals: a leader waits briefly for callers on their way ------------------------------


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits long enough that a loaded CI machine never ends one by its deadline."""
    monkeypatch.setattr(group_commit, "ARRIVAL_WAIT", 5.0)
    monkeypatch.setattr(group_commit, "RETURN_GRACE", 5.0)


def _announced_then(committer: GroupCommitter[int], go: threading.Event, item: int | None) -> None:
    """Announce, wait for ``go``, then submit ``item`` (None: leave without submitting)."""
    with committer.arriving():
        go.wait(timeout=30)
        if item is not None:
            committer.submit(item)


def _with_announced_caller(
    item: int | None,
) -> tuple[RecordingWriter, GroupCommitter[int], threading.Event, threading.Thread]:
    """A committer and a caller announced to it in another thread, held there until ``go``
    is set, then submitting ``item`` (None: leaving without submitting)."""
    writer = RecordingWriter()
    committer = GroupCommitter(writer)
    go = threading.Event()
    other = threading.Thread(target=_announced_then, args=(committer, go, item))
    other.start()
    _until(lambda: bool(committer._arriving))
    return writer, committer, go, other


@pytest.mark.usefixtures("patient")
def test_a_leader_waits_for_an_announced_caller_and_writes_both_in_one_batch() -> None:
    writer, committer, go, other = _with_announced_caller(2)

    leader = threading.Thread(target=committer.submit, args=(1,))
    leader.start()
    _until(lambda: committer.waits == 1)  # the leader waits instead of writing [1]
    assert writer.batches == []
    go.set()
    leader.join(timeout=30)
    other.join(timeout=30)

    assert writer.batches == [[1, 2]]


@pytest.mark.usefixtures("patient")
def test_a_caller_that_leaves_without_submitting_releases_the_waiting_leader() -> None:
    writer, committer, go, other = _with_announced_caller(None)

    leader = threading.Thread(target=committer.submit, args=(1,))
    started = time.monotonic()
    leader.start()
    _until(lambda: committer.waits == 1)
    go.set()  # it leaves (a refusal, an error) instead of submitting
    leader.join(timeout=30)
    other.join(timeout=30)

    assert writer.batches == [[1]]
    assert time.monotonic() - started < 2.5  # released, not timed out (ARRIVAL_WAIT is 5 s)


def test_a_leader_waits_no_longer_than_the_arrival_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_commit, "ARRIVAL_WAIT", 0.05)
    writer, committer, go, other = _with_announced_caller(2)

    committer.submit(1)  # returns although the announced caller has not come

    assert writer.batches == [[1]]
    go.set()
    other.join(timeout=30)
    assert writer.batches == [[1], [2]]


def test_a_lone_caller_that_announces_itself_never_waits() -> None:
    writer = RecordingWriter()
    committer = GroupCommitter(writer)
    for item in range(20):
        with committer.arriving():
            committer.submit(item)

    assert writer.batches == [[item] for item in range(20)]
    assert committer.waits == 0


@pytest.mark.usefixtures("patient")
def test_two_threads_taking_turns_share_their_transactions() -> None:
    """Without arrivals two callers alternate in batches of one: each is still preparing
    its next item while the other's batch is written. The leader now waits for the one
    that just got its answer back."""
    writer = RecordingWriter(delay=0.002)
    committer = GroupCommitter(writer)

    def caller(k: int) -> None:
        for i in range(30):
            with committer.arriving():
                time.sleep(0.0005)  # validating, decrypting, encoding
                committer.submit(k * 100 + i)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(item for batch in writer.batches for item in batch) == sorted(
        k * 100 + i for k in range(2) for i in range(30)
    )
    assert len(writer.batches) <= 32  # 60 items: pairs, give or take the first and last


@pytest.mark.usefixtures("patient")
def test_the_next_leader_waits_for_a_caller_whose_write_just_finished() -> None:
    """The caller whose batch just finished is usually back at once with its next item
    (before it has even announced it): the next leader counts it as on its way."""
    release = threading.Event()
    batches: list[list[int]] = []

    def writer(items: list[int]) -> Sequence[BaseException | None]:
        if items == [1]:
            release.wait(timeout=30)
        batches.append(list(items))
        return [None] * len(items)

    committer = GroupCommitter(writer)
    again = threading.Event()

    def first_caller() -> None:
        committer.submit(1)
        again.wait(timeout=30)
        with committer.arriving():
            committer.submit(3)

    first = threading.Thread(target=first_caller)
    first.start()
    _until(lambda: committer._leader_busy)  # it leads [1], held in the writer
    second = threading.Thread(target=committer.submit, args=(2,))
    second.start()
    _until(lambda: len(committer._queue) == 1)  # 2 waits for the next batch
    release.set()
    _until(lambda: committer.waits == 1)  # 2 leads, and waits for the first caller
    assert batches == [[1]]
    again.set()
    first.join(timeout=30)
    second.join(timeout=30)

    assert batches == [[1], [2, 3]]


class _InterruptedWait(threading.Condition):
    """A condition whose wait is interrupted (Ctrl-C reaches a waiting leader)."""

    def wait(self, timeout: float | None = None) -> bool:
        raise KeyboardInterrupt


def test_a_leader_interrupted_while_waiting_fails_its_batch_and_hands_leadership_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_commit, "ARRIVAL_WAIT", 5.0)
    monkeypatch.setattr(group_commit, "RETURN_GRACE", 0.0)  # nobody waits for the leader
    writer, committer, go, other = _with_announced_caller(2)
    committer._arrived = _InterruptedWait(committer._lock)

    with pytest.raises(KeyboardInterrupt):
        committer.submit(1)
    committer._arrived = threading.Condition(committer._lock)
    go.set()
    other.join(timeout=30)

    assert not other.is_alive()  # the next caller led its own batch: nothing hangs
    assert writer.batches == [[2]]  # 1 was never written
