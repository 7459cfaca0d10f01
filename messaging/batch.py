"""Items written to Redis together (task-sent events, acknowledgements)."""

from __future__ import annotations

import threading
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class Batch(Generic[T]):
    """Items written to Redis together (events, acknowledgements): ``add`` answers "now" for
    the ``limit``-th item (write the batch at once), "later" for the first of a batch (write
    it after a delay), else None; ``take`` empties it. Safe across threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: list[T] = []
        self._due = False
        self._lock = threading.Lock()

    def add(self, item: T) -> Literal["now", "later"] | None:
        with self._lock:
            self._items.append(item)
            if len(self._items) >= self.limit:
                return "now"
            if self._due:
                return None
            self._due = True
            return "later"

    def take(self) -> list[T]:
        # A write still due after a full batch was written finds nothing to write.
        with self._lock:
            items, self._items, self._due = self._items, [], False
        return items
