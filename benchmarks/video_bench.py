"""Sampling 8 frames from a long 720p clip: seeking to keyframes against decoding every frame.

The clip is generated once (a fast, low-quality H.264 encode with a keyframe
every 2 s, as phone and camera uploads have) and cached in the out dir.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


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
    from model_runtime.media import MediaLimits, decode_video, decode_video_all_frames

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
