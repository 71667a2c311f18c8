"""`python -m tests.fault_server serve ...`: `edgevl serve` itself, on an engine whose requests fail
after their first token when their text contains FAULT-MARKER, as a real engine fault would.
Everything else passes through to the real engine; the server code is not told."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from edgevl import cli
from edgevl.server import app
from edgevl.types import Engine, EngineError, Event, GenerationRequest, Handle, PreparedRequest, Sink, TextPart

MARKER = "FAULT-MARKER"


class FaultInjector:
    def __init__(self, engine: Engine, marker: str):
        self.engine, self.marker = engine, marker

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def _marked(self, request: GenerationRequest) -> bool:
        return any(self.marker in p.text for m in request.messages for p in m.content if isinstance(p, TextPart))

    def generate(self, request: GenerationRequest | PreparedRequest) -> Iterator[Event]:
        marked = self._marked(request.request if isinstance(request, PreparedRequest) else request)
        for i, ev in enumerate(self.engine.generate(request)):
            if marked and i == 1:
                raise EngineError("injected fault")
            yield ev

    def submit(self, prepared: PreparedRequest, sink: Sink) -> Handle:
        """The fault as the engine's thread would deliver it: an error in place of the second event,
        then nothing more (the request is cancelled underneath, as a failed one leaves the batch)."""
        if not self._marked(prepared.request):
            return self.engine.submit(prepared, sink)
        seen = [0]

        def faulty(item: Event | BaseException) -> None:
            seen[0] += 1
            if seen[0] == 2:
                prepared.request.cancel.set()
                sink(EngineError("injected fault"))
            elif seen[0] < 2:
                sink(item)

        return self.engine.submit(prepared, faulty)


_load = app.load_default_engine
app.load_default_engine = lambda settings: FaultInjector(_load(settings), MARKER)  # serve looks it up when it runs

if __name__ == "__main__":
    sys.exit(cli.main())
