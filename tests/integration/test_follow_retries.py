"""The projection worker's loop (``follow``) tries a lost database again, also while idle.

A ``StorageError`` from a catch-up was tried again after 1, 2 and 4 s, but one from the
idle wait (the LISTEN on PostgreSQL, which needs a connection of the pool) ended the
worker at once: a flaky end-to-end test showed a worker whose database went away exit
without a retry when the cut landed between a catch-up and its wait.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import MakeService
from keyledger import StorageError
from keyledger.application import read_models

LOST = "PostgreSQL unavailable or lock timeout: couldn't get a connection after 5.00 sec"


@pytest.fixture(autouse=True)
def _short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_models, "FOLLOW_RETRY_DELAY", 0.01)


def follow_with_waits(
    service: Any, waits: list[BaseException | None], rounds: int, retries: list[float]
) -> None:
    """Run the worker loop for ``rounds`` idle waits, each raising what ``waits`` gives
    in turn (None: a wait that returns); the retry pauses it announces go to ``retries``."""
    seen: list[int] = []

    def wait(seconds: float) -> None:
        seen.append(1)
        failure = waits.pop(0) if waits else None
        if failure is not None:
            raise failure

    vars(service._ledger)["wait_for_events"] = wait
    service.follow_read_models(
        stop=lambda: len(seen) >= rounds,
        idle_seconds=0.01,
        seal=False,
        on_retry=lambda error, pause: retries.append(pause),
    )


def test_a_wait_that_cannot_reach_the_database_is_tried_again(make_service: MakeService) -> None:
    service = make_service()
    service.store_for_tenant("acme", "a", "v")

    retries: list[float] = []

    follow_with_waits(service, [StorageError(LOST)], rounds=3, retries=retries)

    assert retries == [0.01]  # announced, paused, and the worker went on


def test_a_wait_that_never_reaches_the_database_ends_the_worker(make_service: MakeService) -> None:
    service = make_service()
    service.store_for_tenant("acme", "a", "v")
    retries: list[float] = []

    with pytest.raises(StorageError, match="couldn't get a connection"):
        follow_with_waits(service, [StorageError(LOST)] * 10, rounds=10, retries=retries)

    assert retries == [0.01, 0.02, 0.04]  # three tries, then the error
