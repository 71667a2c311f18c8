"""Box parsing and the conversion to pixels: exact on hand-made answers, every EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgevl.grounding import exif_orientation, parse_boxes, to_pixels
from edgevl.preprocess.image import decode_image


def test_parse_qwen3_json_fenced_and_tagged():
    text = ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "hydrant"}, {"bbox_2d": [5, 5, 5, 9]},'
            ' {"bbox_2d": "nope", "label": "x"}, {"label": "no box"}]\n```')
    found, dropped = parse_boxes(text)
    assert found == [("hydrant", (100.0, 200.0, 300.0, 400.0))] and dropped == 3
    tagged = "<|object_ref_start|>car<|object_ref_end|><|box_start|>(10,20),(500,600)<|box_end|>"
    assert parse_boxes(tagged) == ([("car", (10.0, 20.0, 500.0, 600.0))], 0)


@pytest.mark.parametrize("text", ["", "no boxes here", "[", '[{"bbox_2d": [1,2,3]}]', "[[[[", "{}", "[1, 2]",
                                  '[{"bbox_2d": [1e999, 0, 5, 5]}]', "]" * 10 + "[" * 10])
def test_malformed_answers_never_raise(text):
    found, dropped = parse_boxes(text)
    assert isinstance(found, list) and dropped >= 0


def test_coordinates_are_clamped_and_ordered():
    found, _ = parse_boxes('[{"bbox_2d": [900, 1200, -50, 300], "label": "a"}]')
    assert found == [("a", (0.0, 300.0, 900.0, 1000.0))]


def test_resized_non_square_image_exact():
    boxes = to_pixels([("a", (250.0, 500.0, 750.0, 1000.0))], upright_size=(1920, 1080), orientation=1)
    assert boxes[0].box == (480.0, 540.0, 1440.0, 1080.0) == boxes[0].box_upright


def _marked(w: int, h: int, u: int, v: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[v:v + 4, u:u + 4] = (255, 0, 0)  # a 4x4 red marker at stored (u, v)
    return Image.fromarray(arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_maps_back_to_the_stored_pixels(orientation):
    stored_w, stored_h, u, v = 200, 120, 150, 30
    img = _marked(stored_w, stored_h, u, v)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    data = buf.getvalue()
    assert exif_orientation(data) == orientation
    upright = decode_image(data)
    red = np.argwhere((np.asarray(upright)[..., 0] > 200) & (np.asarray(upright)[..., 1] < 50))
    y0, x0 = red.min(0)
    y1, x1 = red.max(0) + 1
    uw, uh = upright.size
    # the model's answer: the marker's box on the upright picture, in 0..1000
    rel = (x0 / uw * 1000, y0 / uh * 1000, x1 / uw * 1000, y1 / uh * 1000)
    box = to_pixels([("marker", rel)], (uw, uh), orientation)[0]
    assert box.box == pytest.approx((u, v, u + 4, v + 4), abs=1e-6)
    assert box.box_upright == pytest.approx((x0, y0, x1, y1), abs=1e-6)
