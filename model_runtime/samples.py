"""Sample media for tests, the demo, warm-up and benchmarks: made here, never downloaded.

`make_sample_image` draws a photo-like picture; `make_sample_video` encodes
an MP4 whose frames carry their own index (`frame_marker`), so a test can
tell which source frame a sampler picked.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw


def make_sample_image(width: int = 640, height: int = 480, seed: int = 0, format: str = "JPEG") -> bytes:
    """A photo-like test image: a smooth gradient with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(x / max(width, 1) * 3 + y / max(height, 1) * 2 + p) for p in phase]
    pixels = np.clip(np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, max(width - 8, 1)), rng.integers(0, max(height - 8, 1))
        size = int(rng.integers(8, max(9, min(width, height) // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0) + size, int(y0) + size)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, format=format, **({"quality": 90} if format.upper() == "JPEG" else {}))
    return out.getvalue()


def frame_marker(index: int) -> tuple[int, int, int]:
    """The colour of the top band of frame `index` in `make_sample_video`."""
    return (index % 32) * 8, (index // 32 % 32) * 8, 128


def make_sample_video(
    seconds: float = 2.0, fps: int = 10, width: int = 128, height: int = 96, *, gop: int | None = None
) -> bytes:
    """An MP4 with a moving shape; the top band's colour encodes the frame index.

    H.264 (libx264) if this PyAV build has it, else MPEG-4 part 2. `gop` is
    the keyframe interval in frames (default: one keyframe per second).
    """
    import av

    width, height = width + width % 2, height + height % 2  # yuv420p needs even sizes
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        codec: Literal["libx264", "mpeg4"] = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop or fps
        if codec == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "crf": "18"}
        y, x = np.mgrid[0:height, 0:width]
        background = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), np.full_like(x, 96)], axis=-1)
        band = max(2, height // 4)
        total = max(1, int(round(seconds * fps)))
        for i in range(total):
            pixels = background.astype(np.uint8).copy()
            cx = int((i / total) * (width - band)) + band // 2
            pixels[band + 2 :, max(0, cx - band // 2) : cx + band // 2] = (250, 250, 40)
            pixels[:band] = frame_marker(i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()
