"""Property tests: whatever bytes or sizes arrive, preprocessing gives a clean result or ImageError."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevl.preprocess.image import ImageError, ImageProcessorConfig, decode_image, patchify, smart_resize
from tests.conftest import assert_public

CFG = ImageProcessorConfig(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=65536,
                           max_pixels=16777216, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_raise_image_error(data):
    try:
        img = decode_image(data)
    except ImageError as e:
        assert e.code in ("invalid_image", "unsupported_image_format", "image_too_large")
        assert_public(str(e))
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1


@FAST
@given(st.integers(0, 2000), st.binary(min_size=1, max_size=64))
def test_corrupted_png_decodes_or_raises_image_error(pos, junk):
    data = bytearray(_png(40, 30))
    pos = pos % len(data)
    data[pos:pos + len(junk)] = junk
    try:
        decode_image(bytes(data))
    except ImageError as e:
        assert_public(str(e))


@FAST
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(32 * 32, 2048 * 2048))
@example(1, 10, 45159)  # a tiny image scaled up: rounding each side up may pass the budget (as transformers')
def test_smart_resize_invariants(h, w, budget):
    lo = min(65536, budget)
    try:
        rh, rw = smart_resize(h, w, 32, lo, budget)
    except ImageError:
        assert max(h, w) / min(h, w) > 200
        return
    assert rh % 32 == 0 and rw % 32 == 0 and rh >= 32 and rw >= 32
    upscaled = round(h / 32) * round(w / 32) * 32 * 32 < lo
    if upscaled:  # each side was rounded up by less than one factor from an area of `lo`
        assert (rh - 32) * (rw - 32) < lo * 1.0001
    else:
        assert rh * rw <= max(budget, 65536) * 1.0001 or rh == 32 or rw == 32


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([64 * 64, 224 * 224, 448 * 448, 1024 * 1024]))
def test_patchify_shapes_are_consistent(w, h, budget):
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    try:
        p = patchify(img, CFG, budget)
    except ImageError:
        assert max(h, w) / min(h, w) > 200
        return
    t, gh, gw = p.grid_thw
    assert p.pixel_values.shape == (gh * gw, 3 * 2 * 16 * 16)
    assert p.n_tokens * 4 == gh * gw and gh % 2 == 0 and gw % 2 == 0
    assert np.isfinite(p.pixel_values).all() and np.abs(p.pixel_values).max() <= 1.0 + 1e-6
