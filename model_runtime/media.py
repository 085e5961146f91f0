"""Bytes → pixels: images with Pillow, videos with PyAV, every limit checked first.

Untrusted bytes come from object storage, so each size limit is checked from
the header before anything is decoded (a 20000×20000 PNG can be a few KB),
only the formats we expect are opened, and every decoder failure becomes a
`RequestError(invalid_media)` that fails that one job. No transformers here.

Videos are sampled at N uniform timestamps (segment midpoints, as InternVL's
own sampler does) by seeking to the keyframe before each timestamp and
decoding forward, instead of decoding every frame.
"""

from __future__ import annotations

import bisect
import io
import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image, ImageOps

from model_runtime.types import RequestError

# Never let Pillow guess formats like EPS (which runs Ghostscript) or PSD.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_video_bytes: int = 200 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160
    max_video_frames: int = 32
    default_video_frames: int = 8
    # Sampled frames are scaled down to this longest side while decoding: the
    # processor resizes each frame to one tile anyway, and 32 4K RGB frames
    # would hold 800 MB per job in memory.
    max_frame_side: int = 1024


@dataclass
class VideoFrames:
    """Sampled frames (T×H×W×3 uint8, RGB) and what the container said."""

    frames: np.ndarray
    fps: float
    duration_s: float
    source_frames: int
    timestamps: list[float]


def _too_large(message: str) -> RequestError:
    return RequestError("media_too_large", message)


def _invalid(message: str) -> RequestError:
    return RequestError("invalid_media", message)


# ---------------------------------------------------------------- images


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, GIF or JPEG header without Pillow.

    Pillow's own check warns (a process-wide warning, not an error) on
    89-179 MP images before we could look; reading the header first means an
    oversized image is refused with our error and never reaches Pillow.
    WebP needs no help: Pillow's WebP reader only ever raises.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
            elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            else:
                i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """Decode JPEG/PNG/WebP/GIF (first frame) to an upright RGB image."""
    if len(data) > limits.max_image_bytes:
        raise _too_large(f"image is {len(data)} bytes, limit {limits.max_image_bytes}")
    size = header_size(data)
    if size is not None and size[0] * size[1] > limits.max_image_pixels:
        raise _too_large(f"image is {size[0]}x{size[1]} pixels, limit {limits.max_image_pixels} pixels")
    try:
        # open() reads only the header; the pixels are decoded by load() below.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_large(f"image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _invalid(f"not a readable JPEG/PNG/WebP/GIF image: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _invalid(f"image has an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise _too_large(f"image is {width}x{height} pixels, limit {limits.max_image_pixels} pixels")
    try:
        image.load()  # GIF: the first frame, which open() positioned us on
        return _to_rgb(ImageOps.exif_transpose(image))  # a new upright image; None only with in_place=True
    except Image.DecompressionBombError as exc:
        raise _too_large(f"image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _invalid(f"corrupt or truncated image: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels have arbitrary colours underneath; show them as white.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ---------------------------------------------------------------- videos


def container_format(data: bytes) -> str:
    """The FFmpeg demuxer for MP4/MOV, Matroska/WebM or AVI, from the magic bytes.

    Naming the demuxer keeps FFmpeg from probing its way into formats that
    open other URLs (HLS playlists, concat lists) or that are not video.
    """
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if data.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if data.startswith(b"RIFF") and data[8:12] == b"AVI ":
        return "avi"
    raise _invalid("not an MP4/MOV, Matroska/WebM or AVI file")


def _open_container(data: bytes, limits: MediaLimits):
    import av

    if len(data) > limits.max_video_bytes:
        raise _too_large(f"video is {len(data)} bytes, limit {limits.max_video_bytes}")
    demuxer = container_format(data)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _invalid(f"not a readable video container: {exc}") from None
    if not container.streams.video:
        container.close()
        raise _invalid("the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_video_pixels:
        container.close()
        raise _too_large(f"video is {width}x{height}, limit {limits.max_video_pixels} pixels per frame")
    declared = container.duration / 1_000_000 if container.duration else 0.0  # AV_TIME_BASE units
    if declared > limits.max_video_seconds:  # fail before reading the packets; _check_frames re-checks
        container.close()
        raise _too_large(f"video is {declared:.1f} s long, limit {limits.max_video_seconds:.0f} s")
    return container, stream


@dataclass
class _Index:
    """What one demux pass (no decoding) tells about a stream."""

    keyframes: list[float]  # presentation times, sorted
    packets: int
    start_s: float
    duration_s: float
    fps: float


def _index(container, stream) -> _Index:
    base = stream.time_base or Fraction(1, 90000)
    keyframes: list[float] = []
    first, last_end, packets = math.inf, -math.inf, 0
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue  # the flush packet
        packets += 1
        t = float(packet.pts * base)
        first = min(first, t)
        last_end = max(last_end, t + float((packet.duration or 0) * base))
        if packet.is_keyframe:
            keyframes.append(t)
    if packets == 0:
        raise _invalid("the video stream has no frames")
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else packets / max(last_end - first, 1e-6)
    duration = max(last_end - first, packets / fps if fps else 0.0)
    return _Index(sorted(keyframes) or [first], packets, first, duration, fps)


# A sample may move to a keyframe this close (as a share of the sampling step):
# a keyframe decodes alone, any other frame needs the frames since its keyframe.
KEYFRAME_SNAP = 0.25


def _targets(index: _Index, num_frames: int) -> list[float]:
    """Uniform sample times, each moved to the nearest keyframe when one is close enough."""
    step = index.duration_s / num_frames
    targets = [index.start_s + (i + 0.5) * step for i in range(num_frames)]
    snapped: list[float] = []
    for target in targets:
        i = bisect.bisect_left(index.keyframes, target)
        near = min(index.keyframes[max(0, i - 1) : i + 1], key=lambda k: abs(k - target))
        use = near if abs(near - target) <= KEYFRAME_SNAP * step else target
        snapped.append(use if not snapped or use > snapped[-1] else target)
    return snapped


def _check_frames(index: _Index, limits: MediaLimits, num_frames: int | None) -> int:
    if index.duration_s > limits.max_video_seconds:
        raise _too_large(f"video is {index.duration_s:.1f} s long, limit {limits.max_video_seconds:.0f} s")
    wanted = num_frames or min(limits.default_video_frames, limits.max_video_frames)
    if wanted > limits.max_video_frames:
        raise _too_large(f"{wanted} frames asked for, limit {limits.max_video_frames}")
    return min(wanted, index.packets)  # never repeat a source frame


def _rgb(frame, max_side: int) -> np.ndarray:
    scale = max_side / max(frame.width, frame.height)
    if scale >= 1:
        return frame.to_ndarray(format="rgb24")
    width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
    return frame.to_ndarray(width=width, height=height, format="rgb24")


def decode_video(data: bytes, limits: MediaLimits, num_frames: int | None = None) -> VideoFrames:
    """Sample `num_frames` frames at uniform timestamps, decoding only what is needed.

    For each timestamp: if its keyframe lies ahead of where the decoder is,
    seek there; otherwise keep decoding forward. The frame shown at the
    timestamp (the last one starting at or before it) is kept.
    """
    import av

    container, stream = _open_container(data, limits)
    try:
        index = _index(container, stream)
        count = _check_frames(index, limits, num_frames)
        targets = _targets(index, count)
        frames: list[np.ndarray] = []
        decoder, position, previous = None, -math.inf, None
        for target in targets:
            keyframe = index.keyframes[max(0, bisect.bisect_right(index.keyframes, target + 1e-6) - 1)]
            if decoder is None or target < position or keyframe > position:
                container.seek(_to_pts(keyframe, stream), stream=stream, backward=True)
                decoder, previous = container.decode(stream), None
            chosen = None
            for frame in decoder:
                t = frame.time if frame.time is not None else position
                position = t
                if t > target + 1e-6:
                    chosen = previous if previous is not None else frame
                    previous = frame
                    break
                previous = frame
            if chosen is None:  # ran off the end: the last frame is the one shown
                if previous is None:
                    raise _invalid("no frame could be decoded at the sampled time")
                chosen = previous
            frames.append(_rgb(chosen, limits.max_frame_side))
        return VideoFrames(np.stack(frames), index.fps, index.duration_s, index.packets, targets)
    except av.FFmpegError as exc:
        raise _invalid(f"corrupt video: {exc}") from None
    finally:
        container.close()


def _to_pts(seconds: float, stream) -> int:
    return int(math.floor(seconds / float(stream.time_base))) if stream.time_base else 0
