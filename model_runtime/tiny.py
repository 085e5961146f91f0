"""Build a tiny random-weight InternVL checkpoint offline, for tests and the demo.

Nothing here downloads anything: the tokenizer is trained on a small built-in
corpus with the `tokenizers` library, the weights are random (fixed seed), and
the result is written with `save_pretrained` so that the ordinary
`AutoProcessor.from_pretrained` + `AutoModelForImageTextToText.from_pretrained`
path loads it exactly like a hub checkpoint.

The model's output is gibberish by design: it has never been trained. It
exercises the real transformers code path (vision tower, pixel shuffle,
projector, Qwen2 decoder, chat template, tiling, video frames), not quality.

Three sizes: "tiny" (builds in well under a second, for tests), "small"
(224 px tiles, a wider decoder) where compute matters enough on a CPU for
batching benchmarks to mean something, and "tile448" (the tiny towers behind
the real 448 px tile, for the host-path benchmark).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
# One build at a time per process: weight init draws from torch's global RNG, and
# transformers' lazy imports are not thread-safe on first use.
_BUILD_LOCK = threading.Lock()
EOS_GAIN = 1.5

# Qwen-like chat format; media items become the placeholders InternVLProcessor
# expands (`<IMG_CONTEXT>` per image, `<video>` per video), as in InternVL3-hf.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
MEDIA_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN, *MEDIA_TOKENS.values()]

_CORPUS = """
Describe this image in detail. What is shown in the picture? How many objects are there?
The photo shows a red square, a blue circle and a green triangle on a grey background.
Summarise the video. What happens first, and what happens at the end of the clip?
A person walks across the street while cars wait at the light. The sky is clear.
Answer with one word. Is there a cat? Yes. No. Maybe. Read the text in the image.
Compare the two images and list the differences. The left one is brighter than the right.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ( ) - _
user assistant system You are a helpful assistant. Frame1: Frame2: Frame3: Frame4:
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one variant; tile_size / patch_size must be even (pixel shuffle 0.5)."""

    tile_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    context_length: int

    @property
    def tokens_per_tile(self) -> int:
        side = self.tile_size // self.patch_size
        return (side // 2) ** 2


SPECS = {
    "tiny": TinySpec(56, 14, 32, 1, 2, 64, 2, 4, 2, 384, 4096),
    "small": TinySpec(224, 14, 192, 4, 4, 256, 4, 8, 2, 512, 8192),
    # InternVL3's real tile (448 px, 256 tokens per tile) on the tiny towers: the host path's
    # processor and prompt sizes are the real ones (benchmarks/control_plane.py).
    "tile448": TinySpec(448, 14, 32, 1, 2, 64, 2, 4, 2, 384, 8192),
}


def _build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: any text encodes, so user prompts never hit an unknown token.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS.strip().splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=dict(MEDIA_TOKENS),
        padding_side="left",
        model_max_length=spec.context_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny(out_dir: str | os.PathLike, size: str = "tiny", max_patches: int = 12) -> Path:
    """Write a random-weight InternVL checkpoint + processor to `out_dir` and return it.

    Deterministic: the same arguments give the same weights and tokenizer.
    """
    with _BUILD_LOCK:
        return _build(Path(out_dir), SPECS[size], max_patches)


def _build(out: Path, spec: TinySpec, max_patches: int) -> Path:
    import torch
    from transformers import (
        GenerationConfig,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(spec)
    vocab = len(tokenizer)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    text_config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.context_length,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        # Wider than a trained model's init: outputs then depend on the input instead of
        # repeating one token, so "batched == alone" comparisons mean something.
        initializer_range=0.2,
    )
    vision_config = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.tile_size,
        patch_size=spec.patch_size,
    )
    config = InternVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(MEDIA_TOKENS["context_image_token"]),
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=0.5,
    )
    config.architectures = ["InternVLForConditionalGeneration"]

    # A private RNG stream: building the model must not disturb the caller's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = InternVLForConditionalGeneration(config).eval()
        with torch.no_grad():
            # A louder end-of-turn token: some prompts stop early, others run to the limit,
            # so both finish reasons occur.
            model.get_input_embeddings().weight[eos_id] *= EOS_GAIN
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)

    tile = {"height": spec.tile_size, "width": spec.tile_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=tile, crop_to_patches=True, min_patches=1, max_patches=max_patches,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(
            size=tile, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        ),
        image_seq_length=spec.tokens_per_tile,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def ensure_tiny(cache_dir: str | os.PathLike, size: str = "tiny") -> Path:
    """Return the cached checkpoint for `size`, building it once.

    Safe when several processes race: each builds into its own temporary
    directory and renames it into place; the loser discards its copy.
    """
    cache = Path(cache_dir)
    target = cache / f"internvl-{size}-random"
    if (target / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{size}-{uuid.uuid4().hex[:8]}-", dir=cache))
    try:
        build_tiny(scratch, size=size)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target
