"""/api/detect: boxes for a query, in pixels of the image the user sent."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from edgevl.grounding import BOXES_SCHEMA, detect_prompt, exif_orientation, parse_boxes, to_pixels
from edgevl.server.errors import as_api_error, error_body
from edgevl.server.protocol import DetectRequest
from edgevl.server.serving import constraint_for, image_and_bytes, timings_dict, usage_dict
from edgevl.types import FinishEvent, GenerationRequest, ImagePart, Message, TextPart

router = APIRouter(prefix="/api", tags=["edge"])


def _result(text: str, size: tuple[int, int], orientation: int) -> dict:
    found, dropped = parse_boxes(text)
    boxes = to_pixels(found, size, orientation)
    return {"boxes": [{"label": b.label, "box": list(b.box), "box_upright": list(b.box_upright),
                       "relative": list(b.relative)} for b in boxes],
            "dropped": dropped, "image": {"width": size[0], "height": size[1], "exif_orientation": orientation},
            "text": text}


@router.post("/detect", responses={400: {}, 413: {}, 429: {}, 503: {}})
async def detect(body: DetectRequest, http: Request):
    """Find every instance of `query`: boxes as [x1, y1, x2, y2] in pixels of the stored image
    (`box`) and of the upright, EXIF-rotated picture as a browser shows it (`box_upright`)."""
    state = http.app.state
    img, raw = image_and_bytes(body.image, state.settings)
    orientation = exif_orientation(raw)
    params = body.sampling_params(state.sampling_defaults, state.settings.default_max_tokens)
    if body.temperature is None:
        params.temperature = 0.0
    req = GenerationRequest([Message("user", [ImagePart(img), TextPart(detect_prompt(body.query))])], params,
                            max_pixels=body.max_pixels)
    req.constraint = await constraint_for(state, BOXES_SCHEMA, params.max_new_tokens)  # always parses
    if not body.stream:
        out = await state.runner.collect("detect", req, http)
        return {**_result(out.text, img.size, orientation), "finish_reason": out.finish.finish_reason,
                "model": state.info.model_name, "usage": usage_dict(out.finish),
                "timings": timings_dict(out.finish, out.queue_ms)}
    job, t0 = state.runner.start(req)

    async def lines() -> AsyncIterator[bytes]:
        parts: list[str] = []
        try:
            async for ev in state.runner.events("detect", job, http):
                if isinstance(ev, FinishEvent):
                    queue_ms = max(0.0, (time.perf_counter() - t0) * 1000 - ev.timings.total_ms)
                    yield _line({"token": "", "done": True, **_result("".join(parts), img.size, orientation),
                                 "finish_reason": ev.finish_reason, "usage": usage_dict(ev),
                                 "timings": timings_dict(ev, queue_ms)})
                elif ev.text:
                    parts.append(ev.text)
                    yield _line({"token": ev.text, "done": False})
        except Exception as e:
            err = as_api_error(e)
            yield _line({**error_body(err.message, err.type, err.code, err.param), "done": True})

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()
