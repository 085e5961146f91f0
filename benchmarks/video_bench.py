"""Sampling 8 frames from a long 720p clip: seeking to keyframes against decoding every frame.

The clip is generated once (a fast, low-quality H.264 encode with a keyframe
every 2 s, as phone and camera uploads have) and cached in the out dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_runtime.media import MediaLimits, VideoFrames


def sample_clip(out_dir: Path, *, seconds: int, fps: int = 30, width: int = 1280, height: int = 720) -> Path:
    from model_runtime.samples import make_sample_video

    path = out_dir / f"clip-{seconds}s-{height}p-{fps}fps.mp4"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        data = make_sample_video(seconds=seconds, fps=fps, width=width, height=height, gop=2 * fps)
        scratch = path.with_suffix(".part")
        scratch.write_bytes(data)
        scratch.rename(path)
    return path


def bench_video(out_dir: Path, *, seconds: int, repeats: int, frames: int = 8, height: int = 720) -> dict[str, Any]:
    from model_runtime.media import MediaLimits, decode_video

    started = time.perf_counter()
    width = height * 16 // 9
    path = sample_clip(out_dir, seconds=seconds, width=width, height=height)
    encode_s = time.perf_counter() - started
    data = path.read_bytes()
    limits = MediaLimits()
    seek_times, full_times = [], []
    for _ in range(repeats):  # interleaved, so a burst of load on the machine hits both
        t0 = time.perf_counter()
        sampled = decode_video(data, limits, frames)
        seek_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference = decode_video_all_frames(data, limits, frames)
        full_times.append(time.perf_counter() - t0)
    same = bool((sampled.frames == reference.frames).all())
    seek, full = min(seek_times), min(full_times)
    return {"clip_seconds": seconds, "clip_resolution": f"{width}x{height}", "clip_bytes": len(data),
            "source_frames": sampled.source_frames, "frames": frames, "seek_ms": round(seek * 1000, 2),
            "decode_all_ms": round(full * 1000, 2), "speedup": round(full / seek, 2),
            "same_frames": same, "clip_build_s": round(encode_s, 2)}


def decode_video_all_frames(data: bytes, limits: MediaLimits, num_frames: int | None = None) -> VideoFrames:
    """Reference path: decode every frame and keep the same ones as `decode_video`.

    It mirrors decode_video's own steps, so it uses model_runtime.media's helpers;
    the benchmark times it against the seeking path, the tests compare frames.
    """
    import av
    import numpy as np

    from model_runtime.media import (
        VideoFrames,
        _check_frames,
        _index,
        _invalid,
        _open_container,
        _rgb,
        _targets,
        _to_pts,
    )

    container, stream = _open_container(data, limits)
    try:
        index = _index(container, stream)
        count = _check_frames(index, limits, num_frames)
        targets = _targets(index, count)
        container.seek(_to_pts(index.keyframes[0], stream), stream=stream, backward=True)
        chosen: list = [None] * count
        for frame in container.decode(stream):
            for i, target in enumerate(targets):
                if frame.time is not None and frame.time <= target + 1e-6:
                    chosen[i] = frame
                elif chosen[i] is None:
                    chosen[i] = frame
        if any(c is None for c in chosen):
            raise _invalid("the video stream has no decodable frames")
        frames = [_rgb(c, limits.max_frame_side) for c in chosen]
        return VideoFrames(np.stack(frames), index.fps, index.duration_s, index.packets, targets)
    except av.FFmpegError as exc:
        raise _invalid(f"corrupt video: {exc}") from None
    finally:
        container.close()
