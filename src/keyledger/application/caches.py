"""In-process caches: aggregates (validated against the stream at write time) and data keys."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

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
    """A thread-safe mapping whose entries expire ``ttl`` seconds after they were put."""

    def __init__(
        self, ttl: float, maxsize: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._items: LRUCache[K, tuple[float, V]] = LRUCache(maxsize)

    def get(self, key: K) -> V | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        deadline, item = entry
        if self._clock() >= deadline:
            self._items.evict(key)
            return None
        return item

    def put(self, key: K, item: V) -> None:
        if self._ttl > 0:
            self._items.put(key, (self._clock() + self._ttl, item))

    def evict(self, key: K) -> None:
        self._items.evict(key)

    def clear(self) -> None:
        self._items.clear()
