"""The app factory: settings in, a FastAPI app out; the lifespan loads, warms and closes the engine,
and builds the one `ServerState` (server/state.py) that every route reaches through `server_state`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from edgevl import __version__
from edgevl.ops.energy import EnergyCounter
from edgevl.ops.thermal import ThermalGovernor, ThermalPolicy
from edgevl.preprocess.video import VideoConfig
from edgevl.server import anthropic_api, detect_api, edge_api, errors, ollama_api, openai_api, responses_api
from edgevl.server.decoding import DecodePool
from edgevl.server.guard import Guard
from edgevl.server.metrics import Metrics
from edgevl.server.response_store import ResponseStore
from edgevl.server.serving import Runner
from edgevl.server.settings import Settings
from edgevl.server.state import ServerState
from edgevl.types import Engine

log = logging.getLogger("edgevl.server")
WEB = Path(__file__).resolve().parent.parent / "web"


def load_default_engine(settings: Settings) -> Engine:
    from edgevl.runtime.loader import load_engine

    model = settings.model
    if model is None:
        from edgevl.demo import demo_model_dir

        model = str(demo_model_dir())
    return load_engine(model, settings.engine_options())


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    keys = settings.all_api_keys()
    metrics = Metrics()

    started = time.monotonic()
    replica = os.environ.get("EDGEVL_REPLICA_NAME", f"{socket.gethostname()}-{os.getpid()}")
    response_store = ResponseStore(settings.responses_store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine or await asyncio.to_thread(load_default_engine, settings)  # loads and warms
        info = eng.info()
        # the governor's one lever is the engine's admission: it pulls it on every change of level
        governor = ThermalGovernor(ThermalPolicy(
            soft_c=settings.thermal_soft_c, hard_c=settings.thermal_hard_c, hysteresis_c=settings.thermal_hysteresis_c,
            poll_s=settings.thermal_poll_s, sensor_file=settings.thermal_sensor), settings.max_batch,
            on_slots=eng.set_max_running)
        governor.start()
        eng.set_max_running(governor.allowed_slots())  # the level it started in
        energy = EnergyCounter(settings.energy_counter)  # the box's, for /metrics; the engine reads its own
        log.info("energy: %s", energy.status)
        st = ServerState(
            settings=settings, engine=eng, info=info, sampling_defaults=eng.sampling_defaults(),
            video_config=VideoConfig.from_folder(info.model_dir), metrics=metrics,
            runner=Runner(eng, metrics, settings.request_timeout_s), governor=governor,
            decoders=DecodePool(settings.max_batch, settings.queue_size, settings.max_decode_cpu_s,
                                settings.request_timeout_s),
            energy=energy, response_store=response_store, replica=replica, started=started)
        _register_gauges(metrics, st)
        app.state.server = st
        log.info("ready: %s (%s, %s%s) on %d thread(s)", info.model_name, info.backend, info.precision,
                 ", RANDOM WEIGHTS" if info.random_weights else "", info.intra_op_threads)
        try:
            yield
        finally:
            st.draining = True
            st.decoders.close()
            st.energy.close()
            st.governor.stop()
            eng.close()  # its queue refuses from here on (503 shutting_down), and its loop ends

    app = FastAPI(title="edgevl", version=__version__, lifespan=lifespan,
                  description="CPU-first vision-language inference (Qwen3-VL on ONNX Runtime).")
    errors.install(app)
    app.include_router(edge_api.router)
    app.include_router(detect_api.router)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    limits = {"max_tokens": settings.max_tokens, "max_turns": settings.max_turns,
              "reasoning_budget": settings.reasoning_budget,
              "max_prompt_chars": settings.max_context * 8}
    app.add_middleware(Guard, keys=keys, max_body=int(settings.max_body_mb * 1024 * 1024), limits=limits,
                       metrics=metrics, replica=replica)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"])

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # Ollama's clients probe HEAD /
    async def index() -> Response:
        page = WEB / "index.html"
        if page.is_file():
            return FileResponse(page, headers={"Cache-Control": "no-cache"})
        return JSONResponse({"name": "edgevl", "docs": "/docs"})

    if WEB.is_dir():
        app.mount("/web", StaticFiles(directory=WEB), name="web")
    return app


def _register_gauges(metrics: Metrics, st: ServerState) -> None:
    metrics.gauge("edgevl_queue_depth", "requests waiting (in the engine's queue)", lambda: st.requests()["waiting"])
    metrics.gauge("edgevl_in_flight", "generations admitted (encoding, prefilling or decoding)",
                  lambda: st.in_flight(st.requests()))
    for key in ("vision_cache_entries", "vision_cache_bytes", "kv_running", "kv_used_bytes", "kv_free_bytes",
                "kv_budget_bytes"):
        metrics.gauge(f"edgevl_{key}", key.replace("_", " "), lambda k=key: st.engine.cache_stats()[k])
    metrics.state_gauge("edgevl_requests_in_state", "requests by state (waiting: in the engine's queue, for a "
                        "batch place and KV memory)", ("waiting", "encoding", "prefilling", "decoding"),
                        st.requests)
    # the engine's admission counters, under the names they had when the server kept its own queue
    admission = {"submitted": ("requests",), "failed": ("errors",), "cancelled_waiting": ("cancelled_waiting",),
                 "rejected_queue_full": ("rejected_queue_full",), "rejected_thermal": ("rejected_paused",),
                 "completed": ("finished", "cancelled", "errors", "cancelled_waiting")}
    for key, counts in admission.items():
        metrics.gauge(f"edgevl_scheduler_{key}", f"admission: {key.replace('_', ' ')} (since start)",
                      lambda ks=counts: sum(st.engine.stats.get(k, 0) for k in ks))
    for key in ("cancelled", "finished", "errors", "forced_tokens"):
        metrics.gauge(f"edgevl_engine_{key}", f"engine: generations {key} (since start)",
                      lambda k=key: st.engine.stats.get(k, 0))
    metrics.counter("edgevl_mixed_steps", "decoder runs that carried decoding rows and a prompt slice together",
                    lambda: st.engine.stats.get("mixed_steps", 0))
    metrics.counter("edgevl_vision_slices", "vision-tower slices run by the batch loop",
                    lambda: st.engine.stats.get("vision_slices", 0))
    metrics.gauge("edgevl_decode_running", "videos being decoded now", lambda: st.decoders.running)
    metrics.gauge("edgevl_decode_waiting", "videos waiting for a decode thread",
                  lambda: st.decoders.admitted - st.decoders.running)
    metrics.gauge("edgevl_decode_cpu_seconds", "CPU seconds spent decoding videos (since start)",
                  lambda: st.decoders.cpu_seconds)
    for key in ("started", "cancelled", "over_budget", "refused", "rejected"):
        metrics.gauge(f"edgevl_decode_{key}", f"video decodes {key.replace('_', ' ')} (since start)",
                      lambda k=key: st.decoders.counts[k])
    metrics.gauge("edgevl_energy_joules_total", "CPU package energy since start (NaN: no readable counter; "
                  "see the log or /api/health for why)",
                  lambda: (st.energy.read(), st.energy.total_j)[1] if st.energy.available else float("nan"))
    metrics.gauge("edgevl_power_watts", "CPU package power, mean since the previous scrape (NaN: no readable counter)",
                  st.energy.power_w)
    metrics.gauge("edgevl_cpu_temperature_celsius", "CPU temperature (NaN: no sensor)",
                  lambda: st.governor.temperature_c if st.governor.temperature_c is not None else float("nan"))
    metrics.gauge("edgevl_thermal_level", "0 normal, 1 throttled, 2 halted, -1 no sensor",
                  lambda: {"normal": 0, "throttled": 1, "halted": 2}.get(st.governor.level, -1))
    metrics.gauge("edgevl_allowed_slots", "batch size allowed now (the thermal governor's lever)",
                  lambda: st.governor.allowed_slots())
    metrics.run_histograms(st.engine.run_histograms,
                           {"step_seconds": "wall time of a decoder run, by kind (decode, mixed: decode + a "
                                            "prompt slice, prefill, draft)",
                            "step_tokens": "tokens a decoder run carried (decode + prompt tokens)",
                            "vision_seconds": "vision-tower time of an image or a clip (its slices summed)"})
    metrics.histograms(st.engine.batch_histograms,
                       {"batch_size": "sequences per batched decoder step",
                        "prefill_chunk_tokens": "prompt tokens per prefill chunk (bucketed)"})
