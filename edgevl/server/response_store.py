"""Finished responses kept for `previous_response_id` and GET/DELETE /v1/responses/{id}: an LRU
bounded by count (--responses-store), in this process's memory only.

Each entry holds its whole conversation (the items before its answer, and the answer), so a chain
of turns never needs its ancestors: the next turn is that conversation plus its own input. Turns of
one chain share their item objects, so an image sent once is held once however long the chain."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from edgevl.server.responses_protocol import InputItem, Response


@dataclass(frozen=True)
class StoredResponse:
    response: Response
    history: list[InputItem]  # the conversation the answer continued, instructions excluded


class ResponseStore:
    """Thread-safe (a lock around each operation, none of which awaits), so the event loop and any
    worker thread may share it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: StoredResponse) -> bool:
        """Keeps the entry (dropping the least recently used beyond capacity); False when nothing is kept."""
        if self.capacity <= 0:
            return False
        with self._lock:
            self._entries[entry.response.id] = entry
            self._entries.move_to_end(entry.response.id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
