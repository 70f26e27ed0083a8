"""In-process caches: aggregates (validated against the stream at write time) and data keys."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A thread-safe bounded mapping that forgets the least recently used entries: past
    ``maxsize`` entries, and (given ``weigh``, an item's approximate size in bytes) past
    ``max_weight`` bytes in all."""

    def __init__(
        self,
        maxsize: int,
        *,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        self._maxsize = maxsize
        # Each item with its weight (0 unweighed): one lookup of the key a call.
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        _LOCK_HOLDERS.add(self)
        self._weigh = weigh if max_weight is not None else None
        self._max_weight = max_weight or 0
        self.weight = 0  # the items' total weight (0 without ``weigh``)

    def get(self, key: K) -> V | None:
        # Under the lock, hits too: OrderedDict.move_to_end calls back into Python (a
        # UUID key's __eq__), and a clear() in another thread meanwhile crashes CPython.
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: K, item: V) -> None:
        weigh = self._weigh
        weight = weigh(item) if weigh is not None else 0
        with self._lock:
            items = self._items
            replaced = items.get(key)
            items[key] = (item, weight)
            items.move_to_end(key)
            self.weight += weight - (replaced[1] if replaced is not None else 0)
            while len(items) > self._maxsize or (
                weigh is not None and self.weight > self._max_weight and len(items) > 1
            ):
                self.weight -= items.popitem(last=False)[1][1]

    def evict(self, key: K) -> None:
        with self._lock:
            entry = self._items.pop(key, None)
            if entry is not None:
                self.weight -= entry[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.weight = 0

    def __len__(self) -> int:
        return len(self._items)


class ExpiringCache(Generic[K, V]):
    """A thread-safe mapping whose entries expire ``ttl`` seconds after they were put,
    also when nobody asks for them again: a sweeper thread forgets expired entries within
    a second (a data key unwrapped once used to stay in memory until 10,000 others pushed
    it out; found by review). Past ``maxsize`` entries, the oldest go first."""

    def __init__(
        self, ttl: float, maxsize: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._maxsize = maxsize
        self._clock = clock
        # By deadline (put order: one ttl for all), each item with its deadline.
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        _LOCK_HOLDERS.add(self)

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._items[key]
                return None
            return entry[1]

    def put(self, key: K, item: V) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            items = self._items
            items[key] = (self._clock() + self._ttl, item)
            items.move_to_end(key)
            while len(items) > self._maxsize:
                items.popitem(last=False)
        _SWEEPER.watch(self)

    def evict(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def sweep(self) -> bool:
        """Forget the expired entries; whether any are left."""
        with self._lock:
            items, now = self._items, self._clock()
            while items and next(iter(items.values()))[0] <= now:
                items.popitem(last=False)
            return bool(items)

    def __len__(self) -> int:
        return len(self._items)


class _Sweeper:
    """One daemon thread a process, running while some ``ExpiringCache`` holds entries,
    that sweeps them every ``INTERVAL`` seconds."""

    INTERVAL = 1.0

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[ExpiringCache[object, object]] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._running = False

    def watch(self, cache: ExpiringCache[K, V]) -> None:
        # (Always under the lock, which the thread's last pass holds while it decides to
        # stop: a put seen as running without it could be left to a thread that stopped;
        # found by review. A put is a cache miss: rare.)
        with self._lock:
            self._caches.add(cache)  # type: ignore[arg-type]
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="keyledger-key-expiry", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.INTERVAL)
            with self._lock:
                left = [cache for cache in list(self._caches) if cache.sweep()]
                if not left:  # (a put after this starts a new thread)
                    self._running = False
                    return

    def after_fork_in_child(self) -> None:
        """The thread does not exist in a child: one if inherited entries are left."""
        self._lock = threading.Lock()
        self._running = False
        for cache in list(self._caches):
            if len(cache):
                self.watch(cache)


_SWEEPER = _Sweeper()


class AppendedEvents:
    """The events this process appended, by position, until the audit model catches up
    with them (``Ledger.appended``): at most ``max_count`` of them, and those that carry
    an envelope at most about ``max_weight`` bytes (their envelopes and texts). Events
    beyond either are not kept; the catch-up reads those back from the stream. A count
    alone let 1,500 stores of 60 KiB values hold 90 MiB outside the cache budget (found
    by review). Reads' events, small and the most frequent, are counted, not weighed."""

    def __init__(self, max_count: int, max_weight: int) -> None:
        self.max_count = max_count
        self.max_weight = max_weight
        # The weighed events' total. Threads append at once, and an update can be lost
        # (no lock: a lock doubled the cost of remembering): each catch-up sums it anew.
        self.weight = 0
        self._events: dict[int, object] = {}
        self._weights: dict[int, int] = {}  # of the weighed events, by position
        self._lock = threading.Lock()  # (taken to forget)
        _LOCK_HOLDERS.add(self)

    def remember(self, appended: Iterable[tuple[int, object]]) -> None:
        events = self._events
        for position, event in appended:
            if len(events) >= self.max_count:
                return
            envelope = getattr(event, "envelope", None)
            if envelope is not None:
                weight = 512 + len(envelope)
                description = getattr(event, "description", None)
                metadata = getattr(event, "metadata", None)
                if description or metadata:  # (no call for the common bare secret)
                    weight += texts_weight(description, metadata)
                if self.weight + weight > self.max_weight:
                    return
                self.weight += weight
                self._weights[position] = weight
            events[position] = event

    def remember_read(self, position: int, view: object) -> None:
        """A read's event (small: counted, not weighed)."""
        if len(self._events) < self.max_count:
            self._events[position] = view

    def forget_through(self, reached: int) -> None:
        """Drop the events at positions up to ``reached``."""
        events, weights = self._events, self._weights
        with self._lock:
            for position in [p for p in list(events) if p <= reached]:
                events.pop(position, None)
                weights.pop(position, None)
            self.weight = sum(list(weights.values()))

    def run(self, first: int, last: int) -> list[tuple[int, object]]:
        """The events at every position from ``first`` to ``last``; ``KeyError`` when
        one of them is not here."""
        events = self._events
        return [(p, events[p]) for p in range(first, last + 1)]

    def __getitem__(self, position: int) -> object:
        return self._events[position]

    def __contains__(self, position: object) -> bool:
        return position in self._events

    def __len__(self) -> int:
        return len(self._events)


# Everything here with a ``_lock``: a lock a parent's thread held at a fork is renewed in
# the child, which has only the thread that forked.
_LOCK_HOLDERS: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_LOCK_HOLDERS):
        holder._lock = threading.Lock()
    _SWEEPER.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def text_weight(text: str) -> int:
    """About the bytes a str holds: its object, and up to 4 bytes a character."""
    return 49 + (len(text) if text.isascii() else 4 * len(text))


def texts_weight(description: str | None, metadata: dict[str, str] | None) -> int:
    """About the bytes a secret's description and metadata hold."""
    weight = text_weight(description) if description else 0
    if metadata:
        weight += sum(text_weight(k) + text_weight(v) for k, v in metadata.items())
    return weight
