"""A request's pictures and clips, from their wire form (base64, data URL, http(s) URL, a client's
frames) to decoded images and sampled clips, with the server's limits and 4xx errors naming the field."""

from __future__ import annotations

import base64
import binascii
import re

from fastapi import Request
from PIL import Image

from edgevl.preprocess.image import ImageError, decode_image
from edgevl.preprocess.video import (
    DecodeBudget,
    VideoError,
    VideoLimits,
    decode_video,
    frame_bound,
    shrink_frame,
    video_from_frames,
)
from edgevl.server.errors import ApiError
from edgevl.server.remote import fetch_image
from edgevl.server.settings import Settings
from edgevl.server.state import server_state
from edgevl.types import VideoPart

_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]*)(;[\w=-]+)*;base64,", re.I)


def _nonempty(value: str, what: str, param: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(f"the {what} is empty", f"invalid_{what}", param)


def _base64_bytes(value: str, what: str, param: str) -> bytes:
    """The bytes of a base64 string or data URL."""
    m = _DATA_URL.match(value)
    payload = value[m.end():] if m else value
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(f"the {what} is not valid base64: {e}", "invalid_base64", param) from e


async def load_image(value: str, settings: Settings, param: str = "image") -> tuple[Image.Image, bytes]:
    """A base64 string, data URL or (with --allow-remote-images) http(s) URL → decoded RGB picture
    and its bytes, or a 4xx ApiError saying why."""
    data = await image_bytes(value, settings, param)
    return decode_image(data, settings.max_input_pixels), data  # ImageError → 4xx by type


async def image_bytes(value: str, settings: Settings, param: str = "image") -> bytes:
    """The bytes of an image field (base64, data URL, or a fetched http(s) URL), not yet decoded."""
    _nonempty(value, "image", param)
    scheme = re.match(r"^([a-z][a-z0-9+.-]*)://", value, re.I)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise ApiError(f"{scheme.group(1)}:// image URLs are not supported; send base64, a data URL or http(s)",
                       "remote_image_refused", param)
    if scheme:
        if not settings.allow_remote_images:
            raise ApiError("image URLs are not fetched by this server (start it with --allow-remote-images); "
                           "send the image as base64 or a data URL", "remote_image_refused", param)
        return await fetch_image(value, settings, param)
    return _base64_bytes(value, "image", param)


def _video_bytes(value: str, param: str) -> bytes:
    """The bytes of a base64 clip or data URL; clip URLs are not fetched."""
    _nonempty(value, "video", param)
    if value.startswith(("http://", "https://")):
        raise ApiError("video URLs are not fetched by this server; send the video as base64 or a data URL",
                       "remote_video_refused", param)
    return _base64_bytes(value, "video", param)


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_input_pixels,
                       settings.max_video_pixels)


async def video_from_base64(value: str, http: Request, param: str, fps: float | None = None,
                            max_frames: int | None = None) -> VideoPart:
    """A clip → sampled frames, decoded on the server's decode pool (bounded, cancellable, with a
    CPU budget: server/decoding.py). `max_frames` was checked against the server's limit by the
    caller, who knows its field's name."""
    data = _video_bytes(value, param)
    state = server_state(http)
    cfg, limits = state.video_config, video_limits(state.settings)
    try:
        return await state.decoders.run(http, lambda budget: decode_video(data, cfg, limits, fps, max_frames, budget))
    except VideoError as e:  # 4xx by type; the param says which part of the request
        e.param = e.param or param
        raise


def check_max_frames(max_frames: int | None, settings: Settings, param: str) -> None:
    if max_frames is not None and max_frames > settings.max_video_frames:
        raise ApiError(f"max_frames must be at most {settings.max_video_frames} (the server's max_video_frames)",
                       "invalid_parameter", param)


async def video_from_frames_base64(values: list[str], http: Request, param: str, fps: float | None) -> VideoPart:
    """A client's own frames (images) → a clip; decoded on the decode pool like a clip, each frame
    shrunk to `frame_bound` as soon as it is decoded, so one full-size picture is held at a time."""
    state = server_state(http)
    s = state.settings
    if len(values) > s.max_video_frames:
        raise ApiError(f"{len(values)} frames; the limit is {s.max_video_frames}", "too_many_frames", param)
    datas = [await image_bytes(v, s, f"{param}.{i}") for i, v in enumerate(values)]
    limits = video_limits(s)

    def decode(budget: DecodeBudget) -> VideoPart:
        bound = frame_bound(len(datas), limits)
        images: list[Image.Image] = []
        first: tuple[int, int] | None = None
        for i, data in enumerate(datas):
            budget.check()
            try:
                img = decode_image(data, s.max_input_pixels)
            except ImageError as e:
                e.param = f"{param}.{i}"
                raise
            if first is not None and img.size != first:
                raise VideoError("the video's frames differ in size", code="invalid_video")
            first = img.size
            images.append(shrink_frame(img, bound))
        return video_from_frames(images, fps or state.video_config.fps, limits)

    try:
        return await state.decoders.run(http, decode)
    except VideoError as e:
        e.param = e.param or param
        raise
