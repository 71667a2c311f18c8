"""Image decoding and patches against transformers' processor, on awkward inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgevl.preprocess.image import (
    ImageError,
    ImageProcessorConfig,
    decode_image,
    patchify,
    smart_resize,
)
from tests.conftest import make_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint) -> ImageProcessorConfig:
    import json

    return ImageProcessorConfig.from_dict(json.loads((tiny_checkpoint / "preprocessor_config.json").read_text()))


@pytest.fixture(scope="module")
def ref_processor(tiny_checkpoint):
    pytest.importorskip("transformers")
    from edgevl.runtime.reference import ReferenceProcessor

    return ReferenceProcessor(tiny_checkpoint)


SIZES = [(1, 1), (7, 13), (31, 33), (64, 64), (100, 37), (448, 448), (1000, 10), (5, 900), (1920, 1080),
         (3000, 4000), (333, 777), (2, 300)]


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("max_pixels", [1024 * 1024, 200_000])
def test_pixel_values_match_transformers(cfg, ref_processor, w, h, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = make_image(w, h, seed=w * h)
    ours = patchify(img, cfg, max_pixels)
    size = {"shortest_edge": cfg.min_pixels, "longest_edge": max_pixels}
    theirs = Qwen2VLImageProcessorPil(size=size, patch_size=cfg.patch_size, merge_size=cfg.merge_size,
                                      temporal_patch_size=cfg.temporal_patch_size,
                                      image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))(
        images=[img], return_tensors="np")
    assert list(ours.grid_thw) == theirs["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(ours.pixel_values, theirs["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_modes_become_rgb_like_transformers(cfg, ref_processor, mode):
    img = make_image(90, 70, seed=5)
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr.astype("<u2"))
    elif mode in ("RGBA", "LA"):
        img = img.convert(mode)
        a = np.asarray(img).copy()
        a[..., -1] = np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :]
        img = Image.fromarray(a)
    else:
        img = img.convert(mode)
    data = encode(img, "TIFF" if mode == "CMYK" else "PNG") if mode != "CMYK" else None
    if mode == "CMYK":
        data = encode(img, "JPEG")
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (90, 70)
    if mode in ("L", "RGBA", "LA", "P", "1"):
        # transformers composites alpha on white and converts the rest with PIL: same pixels
        ref = ref_processor.image_processor(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        np.testing.assert_allclose(patchify(decoded, cfg).pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)


def test_exif_orientation_is_honoured():
    img = make_image(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (60, 120)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_supported_formats_decode(fmt):
    img = make_image(50, 40)
    out = decode_image(encode(img if fmt != "GIF" else img.convert("P"), fmt))
    assert out.size == (50, 40) and out.mode == "RGB"


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    px = decode_image(buf.getvalue()).getpixel((5, 5))
    assert px[0] > 200 and px[2] < 50


@pytest.mark.parametrize("data,code", [
    (b"", "invalid_image"),
    (b"not an image at all", "invalid_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "invalid_image"),
])
def test_garbage_is_a_clean_error(data, code):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.code == code


def test_unsupported_format_is_refused():
    with pytest.raises(ImageError) as e:
        decode_image(encode(make_image(10, 10), "TIFF"))
    assert e.value.code == "unsupported_image_format"


def test_pixel_bomb_is_refused_before_decoding():
    # a 10000 x 10000 PNG of one colour: 100 MP in a few hundred kilobytes
    data = encode(Image.new("L", (10000, 10000)), "PNG", optimize=True)
    assert len(data) < 2_000_000
    with pytest.raises(ImageError) as e:
        decode_image(data, max_input_pixels=50_000_000)
    assert e.value.code == "image_too_large"


def test_truncated_image_is_a_clean_error():
    data = encode(make_image(200, 200), "PNG")
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2])


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError):
        smart_resize(1, 400, 32, 65536, 1 << 20)


def test_default_budget_caps_a_phone_photo(cfg):
    p = patchify(make_image(4000, 3000), cfg, 1024 * 1024)
    h, w = p.resized_hw
    assert h * w <= 1024 * 1024 and p.n_tokens <= 1024
