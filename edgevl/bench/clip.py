"""A synthetic camera clip: shapes that move and change colour, encoded in memory with PyAV.

Used by the benchmark's video task, the README example (docs/example.mp4) and the tests, so that
a clip is at hand without shipping footage.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def clip_frame(i: int, w: int, h: int) -> np.ndarray:
    """Frame `i`: a square crossing the picture and a disc changing colour, on a gradient."""
    y, x = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                                    np.full_like(x, (i * 17) % 256)], -1).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = max(4, min(w, h) // 4)
    left = (i * 7) % max(1, w - s)
    d.rectangle([left, h // 3, left + s, h // 3 + s], fill=(255, 40, 40))
    d.ellipse([w // 2, h // 2, w // 2 + s, h // 2 + s], fill=((i * 40) % 256, 200, 255 - (i * 40) % 256))
    return np.asarray(img)


def make_clip(seconds: float = 4.0, width: int = 448, height: int = 448, fps: int = 10,
              fmt: str = "mp4") -> bytes:
    """An MP4 (H.264, or MPEG-4 Part 2 if this FFmpeg lacks libx264) or a WebM (VP9)."""
    import av

    codec = "libvpx-vp9" if fmt == "webm" else "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        for i in range(max(2, round(seconds * fps))):
            out.mux(st.encode(av.VideoFrame.from_ndarray(clip_frame(i, width, height), format="rgb24")))
        out.mux(st.encode())
    return buf.getvalue()
