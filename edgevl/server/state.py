"""The server's shared state: one typed object, built once by the app's lifespan (server/app.py)
when the engine is loaded, and reached by every route through `server_state(http)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from edgevl.server.errors import Unavailable

if TYPE_CHECKING:  # the modules below import this one
    from edgevl.ops.energy import EnergyCounter
    from edgevl.ops.thermal import ThermalGovernor
    from edgevl.preprocess.video import VideoConfig
    from edgevl.server.decoding import DecodePool
    from edgevl.server.metrics import Metrics
    from edgevl.server.response_store import ResponseStore
    from edgevl.server.serving import Runner
    from edgevl.server.settings import Settings
    from edgevl.types import Engine, EngineInfo


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    info: EngineInfo  # engine.info(), read once
    sampling_defaults: dict  # engine.sampling_defaults(), read once
    video_config: VideoConfig
    metrics: Metrics
    runner: Runner  # the request path: engine.submit, events to the event loop, metrics
    governor: ThermalGovernor  # pulls the engine's set_max_running lever
    decoders: DecodePool  # clip decodes, before the engine's queue
    energy: EnergyCounter  # the box's, for /metrics (the engine reads its own)
    response_store: ResponseStore
    replica: str
    started: float  # time.monotonic() when the app was made
    draining: bool = False  # shutting down: health answers 503 so a balancer stops sending

    def requests(self) -> dict[str, int]:
        """Requests by state, each counted once: the engine holds the only queue."""
        return self.engine.request_states()

    @staticmethod
    def in_flight(requests: dict[str, int]) -> int:
        """Of `requests()`: those admitted (encoding, prefilling or decoding)."""
        return sum(n for state, n in requests.items() if state != "waiting")


def server_state(http: Request) -> ServerState:
    """The app's state; 503 while the engine is still loading (no route is served then anyway)."""
    state = getattr(http.app.state, "server", None)
    if state is None:
        raise Unavailable("the model is still loading", "loading", headers={"Retry-After": "5"})
    return state
