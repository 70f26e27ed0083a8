"""GroupCommitter: concurrent callers share writes, and each sees only its own outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

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


class ConcurrencyProbe:
    """A writer that records how many calls overlap; slow, and failing some items."""

    def __init__(self, delay: float, failing: frozenset[int] = frozenset()) -> None:
        self.delay = delay
        self.failing = failing
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.written: list[int] = []

    def __call__(self, items: list[int]) -> Sequence[BaseException | None]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
            self.written.extend(items)
        return [ValueError(item) if item in self.failing else None for item in items]


@pytest.mark.parametrize("leaders", [1, 2, 3])
def test_with_several_leaders_every_item_is_written_once_and_answered_to_its_caller(
    leaders: int,
) -> None:
    failing = frozenset(range(0, 2000, 7))
    writer = ConcurrencyProbe(delay=0.003, failing=failing)
    committer = GroupCommitter(writer, max_leaders=leaders)
    outcomes: dict[int, str] = {}
    written_before_return: list[bool] = []

    def client(k: int) -> None:
        for i in range(40):
            item = k * 100 + i
            try:
                committer.submit(item)
                outcomes[item] = "ok"
            except ValueError:
                outcomes[item] = "failed"
            with writer.lock:
                written_before_return.append(item in writer.written)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not any(thread.is_alive() for thread in threads), "a caller never returned"
    items = [k * 100 + i for k in range(12) for i in range(40)]
    assert sorted(writer.written) == items
    assert outcomes == {item: "failed" if item in failing else "ok" for item in items}
    assert all(written_before_return)
    assert writer.most_active == leaders  # never more batches in flight than allowed


def test_two_leaders_overlap_their_batches() -> None:
    writer = ConcurrencyProbe(delay=0.01)
    committer = GroupCommitter(writer, max_leaders=2)
    threads = [threading.Thread(target=committer.submit, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert writer.most_active == 2
    assert sorted(writer.written) == [0, 1]
