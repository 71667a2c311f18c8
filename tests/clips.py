"""Test clips made with PyAV in memory: moving and changing shapes, so sampling and order matter."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from edgevl.bench.clip import clip_frame


def frame(i: int, w: int, h: int) -> np.ndarray:
    return clip_frame(i, w, h)


def encode(codec: str, fmt: str, n: int = 20, fps: int = 10, w: int = 96, h: int = 64,
           pix_fmt: str = "yuv420p", audio: bool = False, video: bool = True, solid: bool = False) -> bytes:
    """`solid`: black frames, which compress to almost nothing (a decompression bomb's trick)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        if video:
            st = out.add_stream(codec, rate=fps)
            st.width, st.height, st.pix_fmt = w, h, pix_fmt
        if audio:
            a = out.add_stream("aac" if fmt in ("mp4", "mov") else "libopus", rate=48000)
        if video:
            for i in range(n):
                pixels = np.zeros((h, w, 3), np.uint8) if solid else frame(i, w, h)
                for p in st.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    out.mux(p)
            for p in st.encode():
                out.mux(p)
        if audio:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 960 * 10), np.float32), format="flt",
                                                 layout="mono")
            samples.sample_rate = 48000
            for p in a.encode(samples):
                out.mux(p)
            for p in a.encode():
                out.mux(p)
    return buf.getvalue()


def mp4(n: int = 20, fps: int = 10, w: int = 96, h: int = 64) -> bytes:
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return encode(codec, "mp4", n, fps, w, h)


def webm(n: int = 20, fps: int = 10, w: int = 96, h: int = 64, codec: str = "libvpx-vp9") -> bytes:
    return encode(codec, "webm", n, fps, w, h)


def gif(n: int = 12, w: int = 80, h: int = 48, duration_ms: int = 100) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(frame(i, w, h)) for i in range(n)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def webp(n: int = 12, w: int = 80, h: int = 48, duration_ms: int = 100) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(frame(i, w, h)) for i in range(n)]
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0,
                   lossless=True)
    return buf.getvalue()


def gif_flicker(n: int, w: int, h: int, duration_ms: int = 10) -> bytes:
    """Two solid colours in turn over the whole canvas: little on the wire, every frame a full decode.
    Pillow encodes each colour once; the file repeats the two frames (Pillow's own writer takes
    tens of seconds for thousands of frames)."""
    frames = []
    for colour in (1, 2):
        img = Image.new("P", (w, h), colour)
        img.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200] + [0] * (253 * 3))
        buf = io.BytesIO()
        img.save(buf, format="GIF")
        b = buf.getvalue()
        pos = 13 + (3 << ((b[10] & 7) + 1) if b[10] & 0x80 else 0)  # header, screen, global palette
        head = b"GIF89a" + b[6:pos]
        while b[pos] == 0x21:  # extensions: introducer, label, then sub-blocks up to an empty one
            pos += 2
            while b[pos]:
                pos += b[pos] + 1
            pos += 1
        frames.append(b[pos:-1])  # the image descriptor and its data, without the trailer
    delay = b"\x21\xf9\x04\x00" + (duration_ms // 10).to_bytes(2, "little") + b"\x00\x00"
    return head + b"".join(delay + frames[i % 2] for i in range(n)) + b";"


def mp4_bomb(n: int = 64, fps: int = 2, size: int = 2000) -> bytes:
    """Black frames compress to almost nothing: `n` frames of size² in a few kilobytes."""
    import av

    return encode("libx264" if "libx264" in av.codecs_available else "mpeg4", "mp4", n, fps, size, size, solid=True)
