"""`python -m tests.fault_server serve ...`: `edgevl serve` itself, on an engine whose requests fail
after their first token when their text contains FAULT-MARKER, as a real engine fault would.
Everything else passes through to the real engine; the server code is not told."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from edgevl import cli
from edgevl.server import app
from edgevl.types import Engine, EngineError, Event, GenerationRequest, PreparedRequest, TextPart

MARKER = "FAULT-MARKER"


class FaultInjector:
    def __init__(self, engine: Engine, marker: str):
        self.engine, self.marker = engine, marker

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, request: GenerationRequest | PreparedRequest) -> Iterator[Event]:
        messages = (request.request if isinstance(request, PreparedRequest) else request).messages
        text = " ".join(p.text for m in messages for p in m.content if isinstance(p, TextPart))
        for i, ev in enumerate(self.engine.generate(request)):
            if self.marker in text and i == 1:
                raise EngineError("injected fault")
            yield ev


_load = app.load_default_engine
app.load_default_engine = lambda settings: FaultInjector(_load(settings), MARKER)  # serve looks it up when it runs

if __name__ == "__main__":
    sys.exit(cli.main())
