"""Property: any generation request is either refused by SampleConfig, naming the field, or answered in full.

Values are drawn around and beyond every limit (and of wrong types), prompts from all of Unicode; the model is the
tiny one, so each example costs milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from core.config import MAX_NEW_TOKENS_CAP, NUM_SAMPLES_CAP, SampleConfig
from core.errors import UsageError
from core.model import GPT
from core.sampling import generate
from core.tokenizer import get_tokenizer
from tests.conftest import TINY

FIELDS = ("max_new_tokens", "num_samples", "temperature", "top_k", "top_p", "seed")

# Per field: values it must accept (small ones, to keep each example fast) and values around and past its limits,
# of wrong types included, that it may or must refuse. Most examples break no field or one, so that both outcomes,
# a refusal and a full answer, are drawn often.
WRONG_TYPES = st.sampled_from([None, True, "3", 2.5, float("nan"), float("inf")])
ACCEPTED = {
    "max_new_tokens": st.integers(1, 24),
    "num_samples": st.integers(1, 4),
    "temperature": st.one_of(st.floats(0, 5), st.sampled_from([0, 1, -0.0, 5e-324, 1e-40, 1e300])),
    "top_k": st.one_of(st.none(), st.integers(1, 60_000)),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1e-9, 1])),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
}
# Integers past a cap are never valid: a valid 3,000-token request would only make the example slow.
PROBED = {
    "max_new_tokens": st.one_of(
        st.integers(-3, 0),
        st.just(MAX_NEW_TOKENS_CAP + 1),
        st.integers(-(2**70), 0),
        st.integers(min_value=MAX_NEW_TOKENS_CAP + 1),
    ),
    "num_samples": st.one_of(
        st.integers(-2, 0),
        st.just(NUM_SAMPLES_CAP + 1),
        st.integers(-(2**70), 0),
        st.integers(min_value=NUM_SAMPLES_CAP + 1),
    ),
    "temperature": st.one_of(st.floats(), st.floats(max_value=-1e-300), st.just(-1)),
    "top_k": st.one_of(st.integers(-(2**70), 0), st.just(0)),
    "top_p": st.one_of(st.floats(), st.floats(min_value=1, exclude_min=True), st.just(0)),
    "seed": st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70)),
}
prompts = st.one_of(
    # Every code point but surrogates: emoji, CJK, NUL and other controls, now and then only whitespace.
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=100, max_size=300),  # past the 32-token context
)


@st.composite
def requests(draw) -> dict:
    broken = draw(st.sets(st.sampled_from(FIELDS), max_size=2))
    values = {}
    for name in FIELDS:
        strategy = st.one_of(PROBED[name], WRONG_TYPES) if name in broken else ACCEPTED[name]
        values[name] = draw(strategy)
    return values


def invalid_fields(values: dict) -> set[str]:
    """The fields whose value SampleConfig must refuse, judged independently of its code."""

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    ok = {
        "max_new_tokens": is_int(values["max_new_tokens"]) and 1 <= values["max_new_tokens"] <= MAX_NEW_TOKENS_CAP,
        "num_samples": is_int(values["num_samples"]) and 1 <= values["num_samples"] <= NUM_SAMPLES_CAP,
        "temperature": is_number(values["temperature"])
        and math.isfinite(values["temperature"])
        and values["temperature"] >= 0,
        "top_k": values["top_k"] is None or (is_int(values["top_k"]) and values["top_k"] > 0),
        "top_p": is_number(values["top_p"]) and 0 < values["top_p"] <= 1,
        "seed": values["seed"] is None or (is_int(values["seed"]) and 0 <= values["seed"] < 2**63),
    }
    return {name for name, good in ok.items() if not good}


@pytest.fixture(scope="module")
def model() -> Iterator[GPT]:
    # One thread: the tiny model's matmuls are too small to share, and on a busy machine waiting for a second thread
    # made single examples take seconds instead of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield GPT(TINY).eval()
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=requests(), prompt=prompts)
@example(
    values=dict(max_new_tokens=5, num_samples=3, temperature=0.8, top_k=200, top_p=0.9, seed=1),
    prompt="🎭 中文 \x00\x1b[0m\r\n",
)
@example(
    values=dict(max_new_tokens=4, num_samples=NUM_SAMPLES_CAP, temperature=5e-324, top_k=None, top_p=1.0, seed=None),
    prompt="Ay, " * 60,
)
@example(values=dict(max_new_tokens=3, num_samples=2, temperature=1.0, top_k=None, top_p=5e-324, seed=None), prompt="0")
@example(values=dict(max_new_tokens=3, num_samples=1, temperature=0, top_k=None, top_p=1, seed=None), prompt="")
@example(values=dict(max_new_tokens=0, num_samples=0, temperature=-1, top_k=0, top_p=0, seed=-1), prompt="a")
def test_a_request_is_refused_by_field_or_answered_in_full(model, values, prompt):
    invalid = invalid_fields(values)
    try:
        config = SampleConfig(**values)
    except ValueError as exc:
        named = str(exc).split(" ", 1)[0]
        assert named in FIELDS and named in invalid, (str(exc), invalid)
        event("refused by SampleConfig")
        return
    assert not invalid, f"accepted invalid {invalid}: {config}"

    tokenizer = get_tokenizer()
    if not prompt.strip():
        with pytest.raises(UsageError, match="prompt is empty"):
            generate(model, tokenizer, prompt, config)
        event("empty prompt refused")
        return
    event("answered")
    result = generate(model, tokenizer, prompt, config)
    assert len(result.samples) == len(result.new_tokens) == config.num_samples
    for sample, continuation, new in zip(result.samples, result.continuations, result.new_tokens, strict=True):
        assert sample == prompt + continuation
        assert 0 <= new <= config.max_new_tokens
    assert result.prompt_cropped == (len(tokenizer.encode(prompt)) > model.config.block_size)
    # The seed used (given, or drawn and reported) reproduces the samples exactly.
    again = generate(model, tokenizer, prompt, dataclasses.replace(config, seed=result.seed))
    assert again.samples == result.samples
