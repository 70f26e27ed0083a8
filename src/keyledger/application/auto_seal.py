"""Automatic sealing in the background: writers ask, one daemon thread per ledger seals.

A writer that crosses its ``seal_every`` threshold only sets an event; the sealer thread
does the reading, tagging and appending, so no request pays for a seal in its latency.
A seal interrupted by the process ending (the thread is a daemon) leaves nothing behind:
each checkpoint is one append, and the next seal starts from the newest committed one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from types import MethodType

logger = logging.getLogger(__name__)


QUIET_SECONDS = 0.2
MAX_DELAY_SECONDS = 5.0


class BackgroundSealer:
    """Runs ``seal()`` on a daemon thread each time ``request()`` is called (coalesced).

    A requested seal waits for a quiet moment (no ``activity()`` for ``QUIET_SECONDS``),
    at most ``MAX_DELAY_SECONDS``: sealing is never urgent, and sealing while writers are
    busy would only compete with them for the interpreter and the write lock.

    A bound method ``seal`` is held weakly, so that the thread does not keep its object
    (the ledger, with its connections) alive: an application that never closes its
    service still has it collected, and the thread then ends.
    """

    def __init__(
        self,
        seal: Callable[[], None],
        *,
        quiet_seconds: float = QUIET_SECONDS,
        max_delay_seconds: float = MAX_DELAY_SECONDS,
    ) -> None:
        self._seal: Callable[[], Callable[[], None] | None]
        if isinstance(seal, MethodType):
            self._seal = weakref.WeakMethod(seal)
            weakref.finalize(seal.__self__, self.close, 0)
        else:
            self._seal = lambda: seal
        self._quiet = quiet_seconds
        self._max_delay = max_delay_seconds
        self._last_activity = 0.0
        self._closed = False
        self._start_afresh()

    def _start_afresh(self) -> None:
        """No thread yet, new synchronisation objects, owned by this process."""
        self._pid = os.getpid()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Ask for a seal soon; returns at once.

        A forked child inherits this object but not its thread (nor, safely, its lock,
        which another thread may have held at the fork): its first request starts
        afresh. A thread that ended (it survives any Exception, not a SystemExit) is
        replaced."""
        if self._pid != os.getpid():
            self._start_afresh()
        with self._lock:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="keyledger-auto-seal", daemon=True
                )
                self._thread.start()
            self._idle.clear()
            self._wake.set()

    def activity(self) -> None:
        """Note that the process is writing (postpones a requested seal a little)."""
        self._last_activity = time.monotonic()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no requested seal is pending or running; False on timeout."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the seal it may be running (waiting ``timeout`` seconds
        for it; not when called on the thread itself)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                self._idle.set()
                return
            self._wait_for_quiet()
            if self._closed:
                self._idle.set()
                return
            seal = self._seal()
            if seal is None:  # its object was collected (and the finalizer closes this)
                self._idle.set()
                return
            try:
                seal()
            except Exception:  # the thread must survive any one failure
                logger.exception("automatic audit seal failed")
            del seal  # not held while the thread waits
            if not self._wake.is_set():
                self._idle.set()

    def _wait_for_quiet(self) -> None:
        deadline = time.monotonic() + self._max_delay
        while not self._closed:
            now = time.monotonic()
            quiet_at = self._last_activity + self._quiet
            if now >= quiet_at or now >= deadline:
                return
            time.sleep(min(quiet_at, deadline) - now)
