"""No thread per request: streamed answers, running and waiting, reach the event loop from the
engine's own thread. The server runs in this process (uvicorn on loopback, the tiny model), so
its Python threads can be listed by name while requests are in flight."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import uvicorn

from edgevl.runtime.engine import OrtEngine
from edgevl.server.app import create_app
from edgevl.server.settings import Settings
from edgevl.types import EngineOptions
from tests.server.conftest import free_port

POOL = "asyncio_"  # asyncio's bounded default executor (prepare runs there), not a thread per request


def _threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith(POOL))


def test_streams_running_and_waiting_start_no_thread_each(tiny_onnx):
    engine = OrtEngine(tiny_onnx, EngineOptions(max_batch=4, queue_size=8))
    settings = Settings(max_batch=4, queue_size=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    seen: dict[str, object] = {}

    async def stream(c: httpx.AsyncClient, i: int, first: asyncio.Event) -> None:
        body = {"prompt": f"story {i}", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/api/predict", json=body) as r:  # cancelled: the connection closes
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    json.loads(line)
                    first.set()

    async def until(cond) -> None:
        for _ in range(1200):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out: {engine.request_states()}")

    async def main() -> None:
        serving = asyncio.create_task(server.serve())
        await until(lambda: server.started)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert (await c.post("/api/predict", json={"prompt": "warm", "max_tokens": 2})).status_code == 200
            seen["idle"] = _threads()
            firsts = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(stream(c, i, firsts[i])) for i in range(4)]
            await until(lambda: all(f.is_set() for f in firsts[:4]))
            seen["four"] = _threads()
            seen["four_states"] = engine.request_states()
            tasks += [asyncio.create_task(stream(c, i, firsts[i])) for i in range(4, 8)]
            await until(lambda: engine.request_states()["waiting"] == 4)
            seen["eight"] = _threads()
            seen["eight_states"] = engine.request_states()
            for t in tasks:
                t.cancel()  # every client leaves: running answers stop, waiting ones leave the queue
            await asyncio.gather(*tasks, return_exceptions=True)
            await until(lambda: not any(engine.request_states().values()))
        server.should_exit = True
        await serving

    asyncio.run(main())
    assert seen["four_states"]["decoding"] == 4
    assert seen["eight_states"] == {"waiting": 4, "encoding": 0, "prefilling": 0, "decoding": 4}
    assert not [n for n in seen["eight"] if n.startswith("generate")]
    assert seen["four"] == seen["idle"] and seen["eight"] == seen["idle"], seen
    assert "batch-loop" in seen["idle"]
