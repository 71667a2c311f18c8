"""/api/detect: boxes for a query, in pixels of the image the user sent."""

from __future__ import annotations

from fastapi import APIRouter, Request

from edgevl.grounding import BOXES_SCHEMA, detect_prompt, exif_orientation, parse_boxes, to_pixels
from edgevl.server.constraints import constraint_for
from edgevl.server.edge_api import answer, lines
from edgevl.server.inputs import load_image
from edgevl.server.protocol import DetectRequest, DetectResponse
from edgevl.server.routing import SafeRoute
from edgevl.server.serving import Done
from edgevl.server.state import server_state
from edgevl.server.wire import ndjson
from edgevl.types import GenerationRequest, ImagePart, Message, TextPart

router = APIRouter(prefix="/api", tags=["edge"], route_class=SafeRoute)


def _result(text: str, size: tuple[int, int], orientation: int) -> dict:
    found, dropped = parse_boxes(text)
    boxes = to_pixels(found, size, orientation)
    return {"boxes": [{"label": b.label, "box": list(b.box), "box_upright": list(b.box_upright),
                       "relative": list(b.relative)} for b in boxes],
            "dropped": dropped, "image": {"width": size[0], "height": size[1], "exif_orientation": orientation},
            "text": text}


@router.post("/detect", response_model=DetectResponse, responses={400: {}, 413: {}, 429: {}, 503: {}})
async def detect(body: DetectRequest, http: Request):
    """Find every instance of `query`: boxes as [x1, y1, x2, y2] in pixels of the stored image
    (`box`) and of the upright, EXIF-rotated picture as a browser shows it (`box_upright`)."""
    state = server_state(http)
    img, raw = await load_image(body.image, state.settings)
    orientation = exif_orientation(raw)
    params = body.sampling_params(state.sampling_defaults, state.settings.default_max_tokens)
    if body.temperature is None:
        params.temperature = 0.0
    req = GenerationRequest([Message("user", [ImagePart(img), TextPart(detect_prompt(body.query))])], params,
                            max_pixels=body.max_pixels)
    req.constraint = await constraint_for(state, BOXES_SCHEMA, params)  # always parses

    def boxes(text: str, done: Done) -> dict:
        return _result(text, img.size, orientation)

    frames = lines(state, state.runner.events("detect", await state.runner.start(req), http), boxes)
    return ndjson(frames) if body.stream else await answer(frames, None)
