"""The benchmark's edge tasks, with images drawn by the benchmark itself (Pillow) and a generated clip."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from edgevl.grounding import BOXES_SCHEMA, detect_prompt


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    draw: callable  # (size) -> Image
    schema: dict | None = None  # a structured task: the answer is constrained to this JSON schema


def scene(size: int) -> Image.Image:
    """A synthetic street scene: sky, ground, houses, a tree, a car, the sun."""
    rnd = random.Random(1)
    img = Image.new("RGB", (size, size), (135, 190, 235))
    d = ImageDraw.Draw(img)
    s = size / 448
    d.rectangle([0, int(300 * s), size, size], fill=(90, 150, 70))
    d.ellipse([int(360 * s), int(30 * s), int(420 * s), int(90 * s)], fill=(250, 220, 60))
    for i in range(3):
        x = int((30 + i * 130) * s)
        d.rectangle([x, int(180 * s), x + int(100 * s), int(300 * s)], fill=(rnd.randint(120, 220), 90, 70))
        d.polygon([(x - int(10 * s), int(180 * s)), (x + int(50 * s), int(130 * s)), (x + int(110 * s), int(180 * s))],
                  fill=(120, 40, 40))
        d.rectangle([x + int(40 * s), int(250 * s), x + int(60 * s), int(300 * s)], fill=(60, 40, 30))
    d.rectangle([int(200 * s), int(330 * s), int(330 * s), int(380 * s)], fill=(200, 30, 40))
    for cx in (225, 305):
        d.ellipse([int((cx - 15) * s), int(370 * s), int((cx + 15) * s), int(400 * s)], fill=(20, 20, 20))
    d.ellipse([int(380 * s), int(200 * s), int(440 * s), int(290 * s)], fill=(40, 120, 40))
    return img


def document(size: int) -> Image.Image:
    """A page of printed text: a title, paragraphs, a small table."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = max(1, size // 448)
    y = 16 * s
    d.text((20 * s, y), "INVOICE No. 2026-1142", fill="black")
    y += 24 * s
    words = ("the meter reading for the period was recorded on site and the total amount is due within "
             "thirty days of the date of this invoice please quote the number above with any payment").split()
    line = ""
    for w in words * 3:
        if len(line) + len(w) > 48:
            d.text((20 * s, y), line, fill="black")
            y += 14 * s
            line = ""
        line += w + " "
        if y > size * 0.65:
            break
    y += 10 * s
    for row in [("Item", "Qty", "Price"), ("Energy kWh", "1234.5", "296.28"), ("Service", "1", "12.00"),
                ("Total", "", "308.28")]:
        for j, cell in enumerate(row):
            d.text(((20 + j * 130) * s, y), cell, fill="black")
        y += 16 * s
    return img


def chart(size: int) -> Image.Image:
    """A line chart with axes, ticks and a rising trend with a dip."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    m = size // 8
    d.line([(m, size - m), (m, m)], fill="black", width=2)
    d.line([(m, size - m), (size - m, size - m)], fill="black", width=2)
    months = 12
    vals = [20 + 5 * i + 12 * math.sin(i / 1.7) for i in range(months)]
    lo, hi = min(vals), max(vals)
    pts = [(m + i * (size - 2 * m) / (months - 1), size - m - (v - lo) / (hi - lo) * (size - 2.5 * m))
           for i, v in enumerate(vals)]
    d.line(pts, fill=(47, 111, 237), width=3)
    for i, (x, y) in enumerate(pts):
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(47, 111, 237))
        d.text((x - 6, size - m + 6), str(i + 1), fill="black")
    d.text((m, m // 3), "Monthly output (MWh), 2025", fill="black")
    return img


VIDEO_PROMPT = "What happens in this clip? Say what moves, where to, and what changes colour."
VIDEO_SECONDS = 4.0

RECEIPT_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["vendor", "date", "total", "items"],
    "properties": {
        "vendor": {"type": "string", "maxLength": 40}, "date": {"type": "string", "maxLength": 10},
        "total": {"type": "number"},
        "items": {"type": "array", "maxItems": 6, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "quantity", "price"],
            "properties": {"name": {"type": "string", "maxLength": 32}, "quantity": {"type": "number"},
                           "price": {"type": "number"}}}}}}

TASKS = {
    "caption": Task("caption", "Describe this image in detail: the objects, their colours and where they are.", scene),
    "ocr": Task("ocr", "Extract all the text in this image, keeping the reading order and line breaks.", document),
    "chart": Task("chart", "Explain the trend shown in this chart: what rises or falls, by how much, and where the "
                  "peak and the dip are.", chart),
    # structured answers, where the grammar dictates keys and punctuation (jump-forward's case)
    "receipt": Task("receipt", "Extract the vendor, the date, the total and every line item of this invoice as JSON.",
                    document, RECEIPT_SCHEMA),
    "detect": Task("detect", detect_prompt("house, car and tree"), scene, BOXES_SCHEMA),
}
