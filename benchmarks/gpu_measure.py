"""The measurements of `python -m benchmarks.gpu_check` (benchmarks/gpu_check.py runs them and reports).

What they run on: a random-weight InternVL of the real or the tiny dimensions, one-tile
jobs as `prepare` makes them, and one `model.generate` alone per job. The sections:
equality of the continuous engine with `generate` alone, the decode step against the
bandwidth floor, vision tiles/s, the engine's jobs/s, and vision reuse (cache on against off). torch, transformers and
model_runtime are imported inside the functions, after gpu_check has made sure of structlog.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
import types
from pathlib import Path
from typing import Any

# The worker's defaults (worker/settings.py; importing it needs pydantic, absent on a bare GPU machine).
DEFAULT_CAP, PREFILL_CHUNK_TOKENS, VISION_CHUNK_TILES = 16, 128, 4
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 16, 256  # benchmarks/mixes.py's per-job lengths
BATCHES = (1, 8, 32, 64)
BANDWIDTH_TB_S = 4.3  # H200, measured there (../shared/GPU.md); --bandwidth-tb-s changes it


def job_lengths(seed: int, name: str, jobs: int) -> list[int]:
    """benchmarks.mixes.job_lengths (that module needs pydantic): log-uniform 16..256 per job."""
    rng = random.Random(f"{seed}-{name}-lengths")
    low, high = MIN_NEW_TOKENS, MAX_NEW_TOKENS
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))) for _ in range(jobs)]


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    dims: str  # "real" (InternVL3-1B) or "tiny"
    equality_jobs: int
    engine_jobs: int
    sequential_jobs: int
    caps: tuple[int, ...]
    vision_tiles: int
    repeats: int
    context: int  # cached tokens per row when timing decode steps
    length_divisor: int = 1  # --tiny: per-job lengths / this, so the check stays short
    bandwidth_tb_s: float = BANDWIDTH_TB_S  # the decode floor's memory bandwidth (--bandwidth-tb-s)


def plan_for(tiny: bool) -> Plan:
    if tiny:
        return Plan("cpu", "float32", "tiny", equality_jobs=4, engine_jobs=8, sequential_jobs=2, caps=(4, 8),
                    vision_tiles=4, repeats=2, context=32, length_divisor=8)
    return Plan("cuda", "bfloat16", "real", equality_jobs=8, engine_jobs=128, sequential_jobs=12,
                caps=(DEFAULT_CAP, 64), vision_tiles=64, repeats=5, context=512)


# ---------------------------------------------------------------- models
def random_internvl(dims: str, device: str, dtype: str, attn: str = "sdpa") -> Any:
    """A random-weight InternVL: InternVL3-1B-hf's dimensions ("real") or the test model's ("tiny")."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    if dims == "real":  # OpenGVLab/InternVL3-1B-hf config.json
        text = Qwen2Config(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           tie_word_embeddings=False, eos_token_id=151645)
        vision = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14])
        config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=151667, image_seq_length=256,
                                downsample_ratio=0.5)
    else:
        from model_runtime.tiny import SPECS

        spec = SPECS["tiny"]
        text = Qwen2Config(vocab_size=spec.vocab_size, hidden_size=spec.text_hidden,
                           intermediate_size=spec.text_hidden * 2, num_hidden_layers=spec.text_layers,
                           num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_kv_heads,
                           max_position_embeddings=spec.context_length, eos_token_id=spec.vocab_size - 1)
        vision = InternVLVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 4,
                                      num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                      image_size=spec.tile_size, patch_size=spec.patch_size)
        config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=spec.vocab_size - 2,
                                image_seq_length=spec.tokens_per_tile, downsample_ratio=0.5)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for a billion weights
        model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                              dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.eos_token_id
    return model.eval()


class IdsTokenizer:
    """What the engine asks of a tokenizer, for a model that has none: the ids as text."""

    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def loaded_of(model: Any, device: str, dtype: str) -> Any:
    from model_runtime.loading import Loaded

    tokenizer = IdsTokenizer(int(model.generation_config.eos_token_id))
    return Loaded(model=model, processor=types.SimpleNamespace(tokenizer=tokenizer), model_id="random",
                  device=device, dtype=dtype, attn_implementation=model.config._attn_implementation, load_seconds=0.0)


def one_tile_job(model: Any, index: int, max_new_tokens: int) -> Any:
    """A one-tile image job as `prepare` makes it: a short prompt around the tile's placeholders."""
    import torch

    from model_runtime.types import Prepared, Sampling

    config = model.config
    size = config.vision_config.image_size
    side = size[0] if isinstance(size, (list, tuple)) else size
    g = torch.Generator().manual_seed(index)
    vocab = config.text_config.vocab_size - 8  # clear of the special ids at the top
    text = torch.randint(0, vocab, (12 + index % 9,), generator=g)
    ids = torch.cat([text[:4], torch.full((config.image_seq_length,), config.image_token_id), text[4:]])
    pixels = torch.randn((1, 3, side, side), generator=g).to(model.dtype)
    sampling = Sampling(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)  # random weights: no early EOS
    return Prepared(request_id=f"job-{index}", input_ids=ids.to(model.device), pixel_values=pixels, sampling=sampling,
                    prompt_tokens=int(ids.shape[0]), image_tiles=1, video_frames=0,
                    cost=float(ids.shape[0] + max_new_tokens), preprocess_ms=0.0)


def generate_alone(model: Any, job: Any) -> list[int]:
    import torch

    n = job.sampling.max_new_tokens
    inputs: dict[str, Any] = {"input_ids": job.input_ids[None], "attention_mask": torch.ones_like(job.input_ids)[None]}
    if job.pixel_values is not None:
        inputs["pixel_values"] = job.pixel_values.to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=job.sampling.min_new_tokens, do_sample=False)
    tokens = out[0, job.input_ids.shape[0]:].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- sections
def check_equality(plan: Plan) -> dict[str, Any]:
    """The continuous engine against `generate` alone, on the tiny checkpoint (real prompts and tiles)."""
    import importlib.util

    from model_runtime.engine_continuous import ContinuousEngine
    from model_runtime.loading import load_runtime
    from model_runtime.media import MediaLimits, decode_image
    from model_runtime.prompts import prepare, simple_chat
    from model_runtime.samples import make_sample_image
    from model_runtime.types import Sampling

    attentions = ["sdpa", "eager"]
    result: dict[str, Any] = {}
    if importlib.util.find_spec("flash_attn") is not None and plan.device.startswith("cuda"):
        attentions.append("flash_attention_2")
    else:
        result["flash_attention_2"] = "not importable here"
    dtypes = ["float32", "bfloat16"] if plan.device.startswith("cuda") else ["float32"]
    cache = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for attn in attentions:
        for dtype in dtypes:
            if attn == "flash_attention_2" and dtype == "float32":
                continue  # flash-attn runs in half precision only
            loaded = load_runtime("tiny", cache_dir=cache, device=plan.device, dtype=dtype, attn_implementation=attn)
            tile = int(loaded.processor.image_processor.size["height"])
            images = {f"file://{i}.jpg": decode_image(make_sample_image(tile * (1 + i % 3), tile * (1 + i % 2),
                                                                        seed=i), MediaLimits()) for i in range(4)}
            jobs = []
            for i in range(plan.equality_jobs):
                url = f"file://{i % 4}.jpg"
                chat = simple_chat(f"Describe picture {i}." + " Again." * (i % 3), images=[url] if i % 4 else [])
                jobs.append(prepare(loaded.processor, chat, images, Sampling(max_new_tokens=8 + 3 * i),
                                    request_id=f"eq-{i}", context_length=loaded.context_length))
            alone = [generate_alone(loaded.model, job) for job in jobs]
            engine = ContinuousEngine(loaded, max_batch_size=8, max_batch_tokens=100_000,
                                      prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, vision_chunk_tiles=VISION_CHUNK_TILES)
            outs = engine.run_until_done(jobs)
            same = sum(getattr(o, "token_ids", None) == a for o, a in zip(outs, alone, strict=True))
            result.setdefault(attn, {})[dtype] = {"same": same, "jobs": len(jobs), "share": round(same / len(jobs), 3),
                                                  "mean_decode_batch": round(engine.stats.mean_decode_batch, 2)}
    return result


def decode_steps(plan: Plan, model: Any) -> dict[str, Any]:
    """One decode forward at each batch size over `plan.context` cached tokens a row, against the floor."""
    import torch
    from transformers import DynamicCache

    from model_runtime.capacity import kv_bytes_per_token

    # What one decode step must read: every decoder weight and the output head (tied or not); the input
    # embedding is only looked up, a row per sequence.
    lm = model.model.language_model
    embedding = lm.get_input_embeddings().weight
    head = model.lm_head.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embedding)
    weight_bytes += head.numel() * head.element_size()
    per_token = kv_bytes_per_token(model)
    text = model.config.text_config
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    out: dict[str, Any] = {"weight_bytes": weight_bytes, "context_tokens": plan.context}
    with torch.inference_mode():
        for batch in BATCHES:
            shape = (batch, heads, plan.context, head_dim)
            layers = [(torch.randn(shape, device=model.device, dtype=model.dtype),
                       torch.randn(shape, device=model.device, dtype=model.dtype))
                      for _ in range(text.num_hidden_layers)]
            ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
            mask = torch.ones((batch, plan.context + 1), dtype=torch.long, device=model.device)
            positions = torch.full((batch, 1), plan.context, device=model.device)

            def step(layers: list = layers, ids: Any = ids, mask: Any = mask, positions: Any = positions) -> None:
                model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      past_key_values=DynamicCache(ddp_cache_data=list(layers)))

            seconds = _timed(step, plan.device, plan.repeats)
            floor = (weight_bytes + batch * plan.context * per_token) / (plan.bandwidth_tb_s * 1e12)
            out[str(batch)] = {"ms": _sig(seconds * 1e3), "floor_ms": _sig(floor * 1e3),
                               "over_floor": _sig(seconds / floor), "tokens_per_s": _sig(batch / seconds)}
            del layers
    return out


def _sig(value: float) -> float:
    """Four significant digits (a tiny model's floor is microseconds)."""
    return float(f"{value:.4g}")


def _timed(fn: Any, device: str, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def vision_rate(plan: Plan, model: Any) -> dict[str, Any]:
    import torch

    from model_runtime.prefill import image_features

    size = model.config.vision_config.image_size
    side = size[0] if isinstance(size, (list, tuple)) else size
    pixels = torch.randn((plan.vision_tiles, 3, side, side), device=model.device, dtype=model.dtype)
    with torch.inference_mode():
        seconds = _timed(lambda: image_features(model, pixels), plan.device, plan.repeats)
    return {"tiles": plan.vision_tiles, "tile_px": side, "tiles_per_s": round(plan.vision_tiles / seconds, 1)}


def engine_rates(plan: Plan, model: Any) -> dict[str, Any]:
    """One-tile jobs: continuous at each cap against one `generate` per job, fixed 16 and per-job lengths."""
    from model_runtime.capacity import kv_budget_tokens
    from model_runtime.engine_continuous import ContinuousEngine

    loaded = loaded_of(model, plan.device, plan.dtype)
    budget = kv_budget_tokens(model, device=plan.device, setting=None, memory_fraction=0.5)
    out: dict[str, Any] = {"kv_budget_tokens": budget}
    per_job = [max(2, n // plan.length_divisor) for n in job_lengths(0, "one_tile", plan.engine_jobs)]
    regimes = {"fixed_16": [16] * plan.engine_jobs, "per_job": per_job}
    for regime, lengths in regimes.items():
        jobs = [one_tile_job(model, i, n) for i, n in enumerate(lengths)]
        row: dict[str, Any] = {"jobs": len(jobs), "max_new_tokens_mean": round(sum(lengths) / len(lengths), 1)}
        short = [dataclasses.replace(j, sampling=dataclasses.replace(j.sampling, max_new_tokens=2, min_new_tokens=2))
                 for j in jobs]
        generate_alone(model, short[0])  # first-call allocations off the clock
        started = time.perf_counter()
        for job in jobs[: plan.sequential_jobs]:
            generate_alone(model, job)
        _sync(plan.device)
        seq_seconds = (time.perf_counter() - started) * len(jobs) / plan.sequential_jobs
        row["sequential_jobs_per_s"] = round(len(jobs) / seq_seconds, 2)
        row["sequential_sampled_jobs"] = plan.sequential_jobs
        for cap in plan.caps:
            engine = ContinuousEngine(loaded, max_batch_size=cap, max_batch_tokens=budget,
                                      prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, vision_chunk_tiles=VISION_CHUNK_TILES)
            engine.run_until_done(short[:cap])  # first-call allocations off the clock
            engine = ContinuousEngine(loaded, max_batch_size=cap, max_batch_tokens=budget,
                                      prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, vision_chunk_tiles=VISION_CHUNK_TILES)
            timed = with_keys([dataclasses.replace(j) for j in jobs])
            started = time.perf_counter()
            results = engine.run_until_done(timed)
            _sync(plan.device)
            seconds = time.perf_counter() - started
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise RuntimeError(f"engine job failed at cap {cap}: {failed[0]!r}") from failed[0]
            row[f"continuous_cap_{cap}"] = {
                "jobs_per_s": round(len(jobs) / seconds, 2),
                "mean_decode_batch": round(engine.stats.mean_decode_batch, 2),
                "steps": engine.stats.steps, "prefill_forwards": engine.stats.prefill_chunks,
                "max_decode_stall_ms": round(engine.stats.max_decode_stall_ms, 2),
                "over_sequential": round(len(jobs) / seconds / row["sequential_jobs_per_s"], 2)}
        out[regime] = row
    return out


def with_keys(jobs: list[Any]) -> list[Any]:
    """Tile digests set before the clock, as the worker's task threads set them at submit (off the model thread)."""
    from model_runtime.vision_cache import ensure_keys

    for job in jobs:
        ensure_keys(job)
    return jobs


def vision_reuse(plan: Plan, model: Any, *, questions: int = 4) -> dict[str, Any]:
    """One-tile jobs at 16 tokens, each image asked `questions` times (shared) or once (distinct): jobs/s with the
    vision cache on against off, side by side (alternating, best of two), and the vision share of step time."""
    from model_runtime.capacity import kv_budget_tokens
    from model_runtime.engine_continuous import ContinuousEngine

    loaded = loaded_of(model, plan.device, plan.dtype)
    budget = kv_budget_tokens(model, device=plan.device, setting=None, memory_fraction=0.5)
    distinct = [one_tile_job(model, i, 16) for i in range(plan.engine_jobs)]
    mixes = {f"shared_x{questions}": [dataclasses.replace(j, pixel_values=distinct[i // questions].pixel_values)
                                      for i, j in enumerate(distinct)], "distinct": distinct}
    out: dict[str, Any] = {"jobs": plan.engine_jobs, "cap": DEFAULT_CAP}
    for name, jobs in mixes.items():
        best: dict[str, dict[str, float]] = {}
        for turn in range(2):
            for mb in ((0, 256) if turn == 0 else (256, 0)):
                engine = ContinuousEngine(loaded, max_batch_size=DEFAULT_CAP, max_batch_tokens=budget,
                                          prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
                                          vision_chunk_tiles=VISION_CHUNK_TILES, vision_cache_mb=mb)
                items = [dataclasses.replace(j) for j in jobs]
                if mb:
                    with_keys(items)
                started = time.perf_counter()
                failed = [r for r in engine.run_until_done(items) if isinstance(r, BaseException)]
                _sync(plan.device)
                seconds = time.perf_counter() - started
                if failed:
                    raise RuntimeError(f"vision reuse job failed: {failed[0]!r}") from failed[0]
                key = "on" if mb else "off"
                run = {"jobs_per_s": round(len(items) / seconds, 2), "vision_share": round(
                    engine.stats.vision_seconds / engine.stats.generate_seconds, 3), "tiles": engine.stats.vision_tiles}
                if key not in best or run["jobs_per_s"] > best[key]["jobs_per_s"]:
                    best[key] = run
        out[name] = {"on": best["on"], "off": best["off"],
                     "on_over_off": round(best["on"]["jobs_per_s"] / best["off"]["jobs_per_s"], 3)}
    return out
