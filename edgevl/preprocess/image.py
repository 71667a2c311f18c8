"""Image bytes → RGB picture → Qwen3-VL patches, with numpy and Pillow only.

The output layout is exactly that of transformers' Qwen2VLImageProcessorPil (which the
Qwen3-VL processor uses): tests compare the two on many sizes.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgevl.types import InputError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_INPUT_PIXELS = 40_000_000  # what we agree to decode at all (the resize comes after)


class ImageError(InputError):
    """The bytes are not an image we can use; always the caller's fault (4xx)."""


def decode_image(data: bytes, max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS) -> Image.Image:
    """Decode, honour EXIF orientation, flatten to RGB. Refuses bombs before decoding pixels."""
    if not data:
        raise ImageError("the image is empty", code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in SUPPORTED_FORMATS:
                raise ImageError(
                    f"unsupported image format {fmt}; use one of {', '.join(SUPPORTED_FORMATS)}",
                    code="unsupported_image_format",
                )
            w, h = img.size
            if w * h > max_input_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {max_input_pixels}",
                    code="image_too_large",
                )
            if w < 1 or h < 1:
                raise ImageError("image has no pixels", code="invalid_image")
            img.seek(0)  # GIF/WebP animations: the first frame
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused as a decompression bomb: {e}", code="image_too_large") from e
    except UnidentifiedImageError as e:  # its message names the buffer object, an address: not for a client
        raise ImageError(f"cannot decode image: not an image in a known format ({', '.join(SUPPORTED_FORMATS)})",
                         code="invalid_image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image: {e}", code="invalid_image") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited on white, as transformers does."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") and arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen's rule: both sides divisible by `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(
            f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over the limit of 200:1",
            code="invalid_image",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int  # the checkpoint's own upper limit
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        size = d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", 16)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)),
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge", 56 * 56)),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280)),
            image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
        )


@dataclass
class ImagePatches:
    pixel_values: np.ndarray  # (grid_h * grid_w, C * T * P * P) float32, merge-block order
    grid_thw: tuple[int, int, int]
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]
    merge_size: int

    @property
    def n_tokens(self) -> int:
        """Tokens the language model sees for this image (after the spatial merge)."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)

    def groups(self) -> list[ImagePatches]:
        """What the vision tower runs on, one call each (a clip has one per frame group)."""
        return [self]


def target_size(
    height: int, width: int, cfg: ImageProcessorConfig, max_pixels: int | None = None
) -> tuple[int, int]:
    budget = cfg.max_pixels if max_pixels is None else min(max_pixels, cfg.max_pixels)
    budget = max(budget, cfg.min_pixels)
    return smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, budget)


def patchify(img: Image.Image, cfg: ImageProcessorConfig, max_pixels: int | None = None) -> ImagePatches:
    """Resize (bicubic, on uint8 like transformers), normalise, cut into merge-ordered patches."""
    width, height = img.size
    rh, rw = target_size(height, width, cfg, max_pixels)
    resized = img.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(resized, dtype=np.uint8)
    # transformers rescales in float64 and then casts; normalisation is in float32
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # (C, H, W)
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    c = x.shape[0]
    gh, gw = rh // p, rw // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    pixel_values = np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)
    return ImagePatches(pixel_values, (1, gh, gw), (rh, rw), (height, width), m)
