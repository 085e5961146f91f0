"""Media decoding: every limit, hostile and broken inputs, and video frame sampling."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.video_bench import decode_video_all_frames
from model_runtime.media import KEYFRAME_SNAP, MediaLimits, decode_image, decode_video
from model_runtime.samples import frame_marker, make_sample_image, make_sample_video
from model_runtime.types import RequestError

LIMITS = MediaLimits()


def _code(call) -> str:
    with pytest.raises(RequestError) as info:
        call()
    return info.value.code


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _png_bomb(side: int) -> bytes:
    """A valid side×side 1-bit PNG of zeros: a few KB that would decode to `side²` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + side // 8), []
    for _ in range(side // 100):
        parts.append(compressor.compress(row * 100))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_each_supported_format_decodes_to_rgb(fmt):
    image = decode_image(make_sample_image(96, 64, seed=1, format=fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (96, 64)


def test_byte_limit_is_checked_before_decoding():
    data = make_sample_image(64, 64)
    assert _code(lambda: decode_image(data, MediaLimits(max_image_bytes=len(data) - 1))) == "media_too_large"
    assert decode_image(data, MediaLimits(max_image_bytes=len(data))).size == (64, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_pixel_limit(fmt):
    data = make_sample_image(300, 200, format=fmt)
    assert _code(lambda: decode_image(data, MediaLimits(max_image_pixels=300 * 200 - 1))) == "media_too_large"
    assert decode_image(data, MediaLimits(max_image_pixels=300 * 200)).size == (300, 200)


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bomb_is_our_error_not_a_warning(side):
    bomb = _png_bomb(side)
    assert len(bomb) < 200_000  # tiny on disk, `side`² pixels decoded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _code(lambda: decode_image(bomb, LIMITS)) == "media_too_large"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_bomb_is_refused_even_when_our_pixel_limit_is_lifted():
    # Pillow's own hard limit is the backstop; it must still surface as our error.
    limits = MediaLimits(max_image_pixels=10**12)
    assert _code(lambda: decode_image(_png_bomb(20_000), limits)) == "media_too_large"


def test_truncated_jpeg_is_invalid_media():
    data = make_sample_image(256, 256, seed=3)
    assert _code(lambda: decode_image(data[: len(data) // 2], LIMITS)) == "invalid_media"


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not an image", b"%PDF-1.4\n" + b"0" * 100, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "text", "pdf", "png-garbage"],
)
def test_non_image_bytes_are_invalid_media(data):
    assert _code(lambda: decode_image(data, LIMITS)) == "invalid_media"


def test_formats_outside_the_allow_list_are_refused():
    data = _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "BMP")
    assert _code(lambda: decode_image(data, LIMITS)) == "invalid_media"


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored sideways with "rotate 90° clockwise to display".
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(_encode(stored, "JPEG", exif=exif, quality=95), LIMITS)
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[2, 10], np.asarray(image)[37, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_gif_first_frame_is_used():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    pixel = np.asarray(decode_image(data, LIMITS))[8, 8]
    assert pixel[0] > 200 and pixel[1] < 50 and pixel[2] < 50


def test_transparent_pixels_become_white_and_rgba_becomes_rgb():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (0, 0, 5, 10))
    image = decode_image(_encode(rgba, "PNG"), LIMITS)
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[5, 8]) == (255, 255, 255)
    assert tuple(np.asarray(image)[5, 1]) == (0, 128, 0)


def test_grayscale_and_palette_become_rgb():
    assert decode_image(_encode(Image.new("L", (9, 9), 77), "PNG"), LIMITS).getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("RGB", (9, 9), (10, 200, 30)).convert("P")
    assert decode_image(_encode(palette, "PNG"), LIMITS).mode == "RGB"


def test_importing_media_does_not_import_torch_or_transformers():
    code = "import model_runtime.media, model_runtime.samples, model_runtime.types, model_runtime, sys; " \
           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- videos


def _frame_index(frame: np.ndarray) -> int:
    band = frame[: max(2, frame.shape[0] // 4) - 1].reshape(-1, 3).mean(axis=0)
    return int(round(band[0] / 8)) + 32 * int(round(band[1] / 8))


@pytest.fixture(scope="module")
def clip() -> bytes:
    # 4 s at 25 fps = 100 frames, a keyframe every 10 frames.
    return make_sample_video(seconds=4, fps=25, width=96, height=64, gop=10)


def test_marker_round_trips_through_the_codec(clip):
    assert frame_marker(0) != frame_marker(1)
    every = decode_video(clip, MediaLimits(max_video_frames=100), num_frames=100)
    assert [_frame_index(f) for f in every.frames] == list(range(100))


@pytest.mark.parametrize("count", [1, 4, 8, 13])
def test_samples_uniform_timestamps_by_seeking(clip, count):
    video = decode_video(clip, LIMITS, num_frames=count)
    assert video.frames.shape == (count, 64, 96, 3) and video.frames.dtype == np.uint8
    assert video.fps == pytest.approx(25.0) and video.duration_s == pytest.approx(4.0)
    assert video.source_frames == 100
    # Segment midpoints, as InternVL samples: frame floor((i + 0.5) * 100 / count), or a
    # keyframe (every 10th frame here) within KEYFRAME_SNAP of a step from it, which decodes alone.
    step = 100 / count
    got = [_frame_index(f) for f in video.frames]
    snapped = 0
    for i, frame in enumerate(got):
        middle = (i + 0.5) * step
        if frame != int(middle):
            assert frame % 10 == 0 and abs(frame - middle) <= KEYFRAME_SNAP * step, (i, frame, middle)
            snapped += 1
        assert video.timestamps[i] == pytest.approx(frame / 25, abs=0.041 if frame == int(middle) else 1e-6)
    assert got == sorted(set(got))  # distinct and in order
    if count >= 8:
        assert snapped > 0  # the cheap path is really taken
    reference = decode_video_all_frames(clip, LIMITS, num_frames=count)
    assert np.array_equal(video.frames, reference.frames)


def test_default_frame_count_and_never_more_frames_than_the_source():
    assert decode_video(make_sample_video(seconds=2, fps=10), LIMITS).frames.shape[0] == LIMITS.default_video_frames
    assert decode_video(make_sample_video(seconds=2, fps=10), MediaLimits(max_video_frames=4)).frames.shape[0] == 4
    short = make_sample_video(seconds=0.3, fps=10)  # 3 frames
    video = decode_video(short, LIMITS, num_frames=8)
    assert [_frame_index(f) for f in video.frames] == [0, 1, 2]


def test_video_limits(clip):
    assert _code(lambda: decode_video(clip, MediaLimits(max_video_bytes=len(clip) - 1))) == "media_too_large"
    assert _code(lambda: decode_video(clip, MediaLimits(max_video_seconds=3.5))) == "media_too_large"
    assert _code(lambda: decode_video(clip, MediaLimits(max_video_pixels=96 * 64 - 1))) == "media_too_large"
    assert _code(lambda: decode_video(clip, MediaLimits(max_video_frames=4), num_frames=5)) == "media_too_large"
    assert decode_video(clip, MediaLimits(max_video_seconds=4.0, max_video_pixels=96 * 64), 4).frames.shape[0] == 4


def test_large_frames_are_scaled_down_while_decoding():
    video = decode_video(make_sample_video(seconds=1, fps=5, width=320, height=180), MediaLimits(max_frame_side=160), 3)
    assert video.frames.shape == (3, 90, 160, 3)
    assert [_frame_index(f) for f in video.frames] == [0, 2, 4]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a video at all" * 10,
        make_sample_image(32, 32),
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n",
    ],
    ids=["empty", "text", "jpeg", "hls-playlist"],
)
def test_non_video_bytes_are_invalid_media(data):
    assert _code(lambda: decode_video(data, LIMITS)) == "invalid_media"


def test_truncated_and_corrupted_mp4_are_invalid_media(clip):
    assert _code(lambda: decode_video(clip[: len(clip) // 3], LIMITS)) == "invalid_media"
    scrambled = bytearray(clip)
    scrambled[len(clip) // 4 :] = bytes(len(clip) - len(clip) // 4)
    assert _code(lambda: decode_video(bytes(scrambled), LIMITS)) == "invalid_media"


def test_mp4_without_frames_is_invalid_media():
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    assert _code(lambda: decode_video(out.getvalue(), LIMITS)) == "invalid_media"
