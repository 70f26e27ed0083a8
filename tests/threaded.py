"""A call run in a helper thread, and what it did: for tests that must not block."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Outcome:
    """What a call run in a helper thread did within its time limit."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.value: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None  # how long the call took, once it returned
        self.hung = False  # still running when its time limit passed

    def __repr__(self) -> str:
        return f"<{self.label}: {self.seconds} s, error {self.error!r}>"


def start(call: Callable[[], Any], label: str = "") -> tuple[Outcome, threading.Thread]:
    """Run ``call`` in a daemon thread (it may outlive the test's patience)."""
    outcome = Outcome(label)

    def run() -> None:
        started = time.monotonic()
        try:
            outcome.value = call()
        except BaseException as error:
            outcome.error = error
        outcome.seconds = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True, name=f"test-{label or 'call'}")
    thread.start()
    return outcome, thread


def timed(label: str, call: Callable[[], Any], limit: float) -> Outcome:
    """Run ``call`` in a daemon thread; wait up to ``limit`` seconds for it (it may go on)."""
    outcome, thread = start(call, label)
    thread.join(limit)
    outcome.hung = thread.is_alive()
    return outcome


def reads_out_of_order(
    service: Any, monkeypatch: Any, tenant_id: str, name: str
) -> tuple[Any, Any]:
    """Two retrieves of one secret, the first timed first but committed second (its thread
    held between deciding and committing while the second goes through), as a thread
    descheduled there, or another process, would do. Returns (first, second) results."""
    ledger = service._ledger
    commit_read = ledger.commit_read
    timed = threading.Event()
    later_done = threading.Event()

    def held_back(read: Any) -> None:
        if threading.current_thread().name == "timed-first":
            timed.set()
            assert later_done.wait(timeout=30)  # the later read commits meanwhile
        commit_read(read)

    monkeypatch.setattr(ledger, "commit_read", held_back)
    first: dict[str, Any] = {}
    thread = threading.Thread(
        name="timed-first",
        target=lambda: first.update(result=service.retrieve_for_tenant(tenant_id, name)),
    )
    thread.start()
    assert timed.wait(timeout=30)
    second = service.retrieve_for_tenant(tenant_id, name)
    later_done.set()
    thread.join(timeout=30)
    return first["result"], second
