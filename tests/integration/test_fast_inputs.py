"""FastInputs gives exactly what InternVLProcessor gives: ids and pixels, over prompts, sizes and tile limits.

It is an exact stand-in or it is not used: every case compares tensors with
torch.equal against the processor itself, on the tiny checkpoint (56 px
tiles, 4 tokens per tile) and on "tile448" (InternVL3's real 448 px tile and
256 tokens per tile, the size the control-plane bench measures).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_runtime.fast_inputs import FastInputs
from model_runtime.loading import load_processor
from model_runtime.media import MediaLimits, decode_image
from model_runtime.prompts import prepare, simple_chat
from model_runtime.samples import make_sample_image
from model_runtime.tiny import ensure_tiny
from model_runtime.types import Sampling

LIMITS = MediaLimits()
TEXTS = ["Tag this.", "  leading and trailing spaces  ", "line\nbreaks\n\n", "naïve 東京 café 🙂", "", "a<b>c</b>"]


@pytest.fixture(scope="module")
def tile448(tmp_path_factory):
    return load_processor(str(ensure_tiny(tmp_path_factory.mktemp("tile448"), "tile448")))


def _image(width: int, height: int, seed: int) -> Image.Image:
    return decode_image(make_sample_image(width, height, seed=seed), LIMITS)


def _both(processor, text: str, images: list, max_tiles: int):
    fast = FastInputs.for_processor(processor)
    assert fast is not None, "the probe found a difference: the fast path is off"
    want = processor(text=text, images=images or None, return_tensors="pt", max_patches=max_tiles)
    ids, pixels = fast(text, images, max_tiles)
    return (ids, pixels), (want["input_ids"][0], want.get("pixel_values"))


def _render(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.mark.parametrize("size", [(56, 56), (400, 120), (90, 300), (20, 20), (1000, 700), (57, 55)])
@pytest.mark.parametrize("max_tiles", [1, 2, 12])
def test_tiny_images_match_the_processor(tiny_runtime, size, max_tiles):
    processor = tiny_runtime.processor
    image = _image(*size, seed=size[0])
    for text in TEXTS[:3]:
        (ids, pixels), (want_ids, want_pixels) = _both(processor, _render(processor, text, 1), [image], max_tiles)
        assert torch.equal(ids, want_ids)
        assert torch.equal(pixels, want_pixels)


def test_several_images_and_text_only_match(tiny_runtime):
    processor = tiny_runtime.processor
    images = [_image(400, 120, 1), _image(56, 56, 2), _image(90, 300, 3)]
    for text in TEXTS:
        for n in (0, 1, 3):
            (ids, pixels), (want_ids, want_pixels) = _both(processor, _render(processor, text, n), images[:n], 6)
            assert torch.equal(ids, want_ids), (text, n)
            assert (pixels is None and want_pixels is None) or torch.equal(pixels, want_pixels)


def test_real_tile_size_matches(tile448):
    rng = np.random.default_rng(5)
    noise = Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))
    for image, tiles in ((noise, 1), (_image(448, 448, 7), 1), (_image(1200, 500, 8), 4)):
        (ids, pixels), (want_ids, want_pixels) = _both(tile448, _render(tile448, "Tag it.", 1), [image], tiles)
        assert torch.equal(ids, want_ids)
        assert torch.equal(pixels, want_pixels)
        assert int((ids == tile448.image_token_id).sum()) == 256 * pixels.shape[0]


def test_prepare_uses_it_and_video_requests_do_not(tiny_runtime):
    # Same Prepared either way; the fast path is on for this checkpoint.
    processor = tiny_runtime.processor
    assert FastInputs.for_processor(processor) is not None
    media = {"s3://m/a.jpg": _image(400, 120, 1)}
    prepared = prepare(processor, simple_chat("Describe.", images=["s3://m/a.jpg"]), media, Sampling(),
                       request_id="r", max_tiles=6)
    want = processor(text=_render(processor, "Describe.", 1), images=[media["s3://m/a.jpg"]],
                     return_tensors="pt", max_patches=6)
    assert torch.equal(prepared.input_ids, want["input_ids"][0])
    assert torch.equal(prepared.pixel_values, want["pixel_values"])


def test_other_processors_keep_the_processor(tiny_runtime):
    # A tokenizer alone is not InternVL's processor: no fast path, no error.
    assert FastInputs.for_processor(tiny_runtime.processor.tokenizer) is None
