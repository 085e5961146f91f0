"""Structured output in the engines, on the tiny random-weight checkpoint: valid by construction.

Its text is gibberish by design, so every output that matches its format was made to match
by the grammar's mask, not by the model. Each output is checked with `jsonschema` (or the
regex, or the choice list); only rows cut at max_new_tokens may fail to match, and those
must say so (finish_reason "length", grammar_complete False).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from pydantic import TypeAdapter

from api_client.formats import ResponseFormat, compile_format
from model_runtime.engine import Engine
from model_runtime.prompts import simple_chat
from model_runtime.types import DeadlineExceeded, Output, Prepared, RequestCancelled, Sampling
from tests.integration.test_engine_continuous import FaultyModel, decode_rows, engine, oom, prep
from tests.structured_cases import check_output, response_formats

FORMATS = response_formats()
def cap(name: str) -> int:
    """Room for the tiny model's byte-level strings; an open json_object runs to its cap anyway."""
    return 48 if name == "json_object" else 128


PROMPTS = ["Describe the product.", "What is in the photo?", "List it.", "a", "Answer in JSON please.",
           "Read the label", "Colour and size?", "Hello there, what is this?"]


def constrained(runtime, name: str, n: int, *, max_new_tokens: int = 96, sampled: bool = False) -> Prepared:
    sampling = Sampling(max_new_tokens=max_new_tokens, do_sample=sampled, temperature=0.9, seed=n if sampled else None)
    item = prep(runtime, simple_chat(PROMPTS[n % len(PROMPTS)] + f" #{n}"), {}, sampling, f"{name}-{n}")
    compiled = compile_format(TypeAdapter(ResponseFormat).validate_python(FORMATS[name]))
    assert compiled is not None
    item.constraint = runtime.loaded.grammars.constraint(compiled.grammar)
    return item


def free(runtime, n: int, max_new_tokens: int = 24) -> Prepared:
    return prep(runtime, simple_chat(PROMPTS[n % len(PROMPTS)]), {}, Sampling(max_new_tokens=max_new_tokens),
                f"free-{n}")


def test_every_output_matches_its_format_over_200_jobs_and_11_formats(tiny_runtime):
    names = list(FORMATS)
    items = [constrained(tiny_runtime, names[n % len(names)], n, max_new_tokens=cap(names[n % len(names)]),
                         sampled=n % 3 == 0) for n in range(220)]
    eng = engine(tiny_runtime, max_batch_size=32)
    outs = eng.run_until_done(items)
    valid: Counter[str] = Counter()
    cut: Counter[str] = Counter()
    for item, out in zip(items, outs, strict=True):
        assert isinstance(out, Output), out
        name = item.request_id.rsplit("-", 1)[0]
        if out.grammar_complete:
            check_output(FORMATS[name], out.text)  # raises if the grammar let anything invalid through
            assert out.finish_reason == "stop"
            valid[name] += 1
        else:  # cut at max_new_tokens: it says so, and is never claimed valid
            assert out.finish_reason == "length" and out.completion_tokens == cap(name), (name, out)
            cut[name] += 1
    print("\nvalidity per format (valid / jobs, cut at max_new_tokens):")
    for name in names:
        print(f"  {name:<45} {valid[name]:>3} / {valid[name] + cut[name]:<3} cut {cut[name]}")
    assert sum(valid.values()) + sum(cut.values()) == 220
    # An open object ({"type": "object"}) lets a random model add keys until the cap; closed schemas end.
    assert all(valid[name] >= 0.8 * (valid[name] + cut[name]) for name in names if name != "json_object"), (valid, cut)
    assert eng.structured.stats.rows > 0 and eng.stats.mean_decode_batch > 4
    assert tiny_runtime.loaded.grammars.compiles <= len(names) + 4  # one compile per format, then the cache


def test_unconstrained_rows_decode_the_same_tokens_beside_constrained_ones(tiny_runtime):
    alone = engine(tiny_runtime).run_until_done([free(tiny_runtime, n) for n in range(4)])
    names = list(FORMATS)
    mixed_items = []
    for n in range(4):
        mixed_items += [free(tiny_runtime, n), constrained(tiny_runtime, names[n], n)]
    mixed = engine(tiny_runtime).run_until_done(mixed_items)
    assert [o.token_ids for o in mixed[0::2]] == [o.token_ids for o in alone]
    assert all(o.grammar_complete is None for o in mixed[0::2])
    for n, out in enumerate(mixed[1::2]):
        assert out.grammar_complete, out
        check_output(FORMATS[names[n]], out.text)


def test_a_constrained_row_decodes_the_same_alone_and_in_a_batch(tiny_runtime):
    name = "product (enum, number, array)"
    solo = engine(tiny_runtime).run_until_done([constrained(tiny_runtime, name, 7)])[0]
    crowd = [constrained(tiny_runtime, name, 7)] + [free(tiny_runtime, n) for n in range(5)]
    together = engine(tiny_runtime).run_until_done(crowd)[0]
    assert together.token_ids == solo.token_ids and together.text == solo.text


def test_a_preempted_constrained_row_is_recomputed_with_its_matcher_restored(tiny_runtime):
    name = "strings with maxLength and pattern"
    items = [constrained(tiny_runtime, name, n) for n in range(3)]
    solo = [engine(tiny_runtime).run_until_done([dataclasses.replace(i)])[0] for i in items]
    state = {"failed": False}

    def once_at_three_rows(kind: str, kwargs: dict) -> bool:
        if kind == "forward" and decode_rows(kwargs) == 3 and not state["failed"]:
            state["failed"] = True
            return True
        return False

    faulty = FaultyModel(tiny_runtime.model, once_at_three_rows, oom)
    eng = engine(tiny_runtime, model=faulty)
    outs = eng.run_until_done(items)
    assert eng.stats.preempted == 1
    for out, ref in zip(outs, solo, strict=True):
        assert isinstance(out, Output) and out.grammar_complete
        assert out.token_ids == ref.token_ids  # the recompute replayed its grammar from the start
        check_output(FORMATS[name], out.text)


def test_a_row_cut_at_max_new_tokens_says_its_output_is_incomplete(tiny_runtime):
    out = engine(tiny_runtime).run_until_done([constrained(tiny_runtime, "nested objects", 1,
                                                           max_new_tokens=5)])[0]
    assert out.finish_reason == "length" and out.grammar_complete is False and out.completion_tokens == 5


def test_cancel_and_deadline_end_constrained_rows_and_spare_their_neighbours(tiny_runtime):
    name = "array of objects (minItems 2, maxItems 4)"
    cancelled, late = constrained(tiny_runtime, name, 1), constrained(tiny_runtime, name, 2)
    steps = {"n": 0}
    cancelled.cancelled = lambda: steps["n"] >= 3
    late.deadline = 0.0  # already past: it ends at the next step boundary
    neighbour = constrained(tiny_runtime, name, 3)
    eng = engine(tiny_runtime)
    for item in (cancelled, late, neighbour):
        eng.add(item)
    results: dict[str, object] = {}
    while len(results) < 3:
        steps["n"] += 1
        for prepared, result in eng.step():
            results[prepared.request_id] = result
    assert isinstance(results[cancelled.request_id], RequestCancelled)
    assert isinstance(results[late.request_id], DeadlineExceeded)
    out = results[neighbour.request_id]
    assert isinstance(out, Output) and out.grammar_complete
    check_output(FORMATS[name], out.text)
    after = eng.run_until_done([constrained(tiny_runtime, name, 4)])[0]  # the engine goes on
    assert isinstance(after, Output) and after.grammar_complete


@pytest.mark.parametrize("name", ["product (enum, number, array)", "$ref to $defs", "regex", "choice"])
def test_the_static_engine_enforces_formats_through_a_logits_processor(tiny_runtime, name):
    static = Engine(tiny_runtime.loaded, max_batch_size=8)
    items = [constrained(tiny_runtime, name, n, sampled=n == 2) for n in range(4)]
    frees = [free(tiny_runtime, n) for n in range(2)]
    outs = static.generate_batch(items + frees)
    for out in outs[:4]:
        assert isinstance(out, Output) and out.grammar_complete, out
        check_output(FORMATS[name], out.text)
    assert [o.token_ids for o in outs[4:]] == [o.token_ids for o in static.generate_batch(frees)]
