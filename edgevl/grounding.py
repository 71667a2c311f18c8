"""Boxes from Qwen3-VL's grounding answers, in pixels of the image the user sent.

Qwen3-VL answers "locate X" with boxes in coordinates relative to the picture it saw, scaled to
0..1000: `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]` (sometimes in a ```json fence, older
checkpoints as `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`). The picture it saw was upright (EXIF
orientation applied) and resized; here the relative coordinates become pixels of the upright
image and, undoing the EXIF transpose, of the image as stored in the file.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

from PIL import Image

SCALE = 1000.0
_BOX_TAG = re.compile(r"<\|box_start\|>\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,"
                      r"\s*(-?[\d.]+)\s*\)\s*<\|box_end\|>")
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>")

BOXES_SCHEMA = {
    "type": "array", "maxItems": 32,
    "items": {"type": "object", "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "minItems": 4, "maxItems": 4},
        "label": {"type": "string", "maxLength": 48}},
        "required": ["bbox_2d", "label"], "additionalProperties": False},
}


def detect_prompt(query: str) -> str:
    return (f"Locate every {query} in the image and output the bounding box coordinates in JSON format, "
            'as [{"bbox_2d": [x1, y1, x2, y2], "label": "..."}].')


@dataclass
class Box:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the file's own orientation
    box_upright: tuple[float, float, float, float]  # the same box on the EXIF-upright picture (as displayed)
    relative: tuple[float, float, float, float]  # what the model said, 0..1000


def parse_boxes(text: str) -> tuple[list[tuple[str, tuple[float, float, float, float]]], int]:
    """→ ([(label, (x1, y1, x2, y2) relative 0..1000)], number of malformed entries dropped). Never raises."""
    found: list[tuple[str, tuple[float, float, float, float]]] = []
    dropped = 0
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, flags=re.S)
    if fence:
        body = fence.group(1)
    start, end = body.find("["), body.rfind("]")
    items: list = []
    if start >= 0 and end > start:
        try:
            parsed = json.loads(body[start:end + 1])
            items = parsed if isinstance(parsed, list) else []
        except (json.JSONDecodeError, RecursionError):
            dropped += 1
    for item in items:
        box = _valid(item.get("bbox_2d") if isinstance(item, dict) else None)
        if box is None:
            dropped += 1
            continue
        label = item.get("label", "")
        found.append((label if isinstance(label, str) else str(label), box))
    refs = _REF.findall(text)
    for i, m in enumerate(_BOX_TAG.finditer(text)):
        box = _valid([float(g) for g in m.groups()])
        if box is None:
            dropped += 1
        else:
            found.append((refs[i] if i < len(refs) else "", box))
    return found, dropped


def _valid(b: object) -> tuple[float, float, float, float] | None:
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in b)
    except (TypeError, ValueError):
        return None
    x1, x2 = sorted((min(max(x1, 0.0), SCALE), min(max(x2, 0.0), SCALE)))
    y1, y2 = sorted((min(max(y1, 0.0), SCALE), min(max(y2, 0.0), SCALE)))
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of an image file; 1 when absent or unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:  # any decoder failure: the decode step reports it, here 1 is right
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_to_stored(x: float, y: float, orientation: int, stored_w: int, stored_h: int) -> tuple[float, float]:
    """A point on the EXIF-upright picture → the same point in the file's stored pixel grid.

    The inverse of PIL's exif_transpose for each of the 8 orientations (continuous coordinates).
    """
    w, h = stored_w, stored_h
    return {
        1: (x, y),
        2: (w - x, y),          # mirrored
        3: (w - x, h - y),      # rotated 180
        4: (x, h - y),          # flipped
        5: (y, x),              # transposed
        6: (y, h - x),          # stored rotated 90 counter-clockwise
        7: (w - y, h - x),      # transversed
        8: (w - y, x),          # stored rotated 90 clockwise
    }[orientation]


def to_pixels(found: list[tuple[str, tuple[float, float, float, float]]], upright_size: tuple[int, int],
              orientation: int) -> list[Box]:
    uw, uh = upright_size
    sw, sh = (uh, uw) if orientation in (5, 6, 7, 8) else (uw, uh)
    out = []
    for label, (x1, y1, x2, y2) in found:
        ux1, uy1, ux2, uy2 = x1 / SCALE * uw, y1 / SCALE * uh, x2 / SCALE * uw, y2 / SCALE * uh
        a = upright_to_stored(ux1, uy1, orientation, sw, sh)
        b = upright_to_stored(ux2, uy2, orientation, sw, sh)
        stored = (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))
        out.append(Box(label, tuple(round(v, 2) for v in stored), (round(ux1, 2), round(uy1, 2), round(ux2, 2),
                                                                   round(uy2, 2)), (x1, y1, x2, y2)))
    return out
