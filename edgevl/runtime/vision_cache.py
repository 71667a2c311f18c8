"""Image features kept for images seen again (the next question about the same picture).

Keyed by a fingerprint of the decoded pixels and the size they were resized to, so the same
bytes at another pixel budget are a different entry. Bounded by entry count, least recently
used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class ImageFeatures:
    embeds: np.ndarray  # (n_tokens, hidden)
    deepstack: np.ndarray  # (n_deepstack, n_tokens, hidden)

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + self.deepstack.nbytes


class VisionCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            f = self._items.get(key)
            if f is not None:
                self._items.move_to_end(key)
            return f

    def put(self, key: str, features: ImageFeatures) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._items[key] = features
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(f.nbytes for f in self._items.values())
