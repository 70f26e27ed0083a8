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
