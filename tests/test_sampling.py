import pytest
import torch

from core.config import SampleConfig
from core.errors import UsageError
from core.model import GPT
from core.sampling import TextStream, _candidates, encode_prompt, generate, stream_tokens


def greedy_without_cache(model: GPT, ids: list[int], steps: int) -> list[int]:
    """Reference decoder: a full forward over the (cropped) context for every new token."""
    seq = torch.tensor([ids])
    out = []
    for _ in range(steps):
        logits, _ = model(seq[:, -model.config.block_size :])
        token = int(logits[0, -1].argmax())
        out.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_with_kv_cache_equals_greedy_without(tiny_model, tokenizer):
    prompt = tokenizer.encode("ROMEO: what light")
    steps = tiny_model.config.block_size - len(prompt)  # fill the whole context
    config = SampleConfig(max_new_tokens=steps, temperature=0, stop_at_eot=False)
    cached = [int(t[0]) for t, _ in stream_tokens(tiny_model, prompt, config)]
    assert cached == greedy_without_cache(tiny_model, prompt, steps)


def test_temperature_zero_is_greedy_and_ignores_the_seed(tiny_model, tokenizer):
    a = generate(tiny_model, tokenizer, "JULIET:", SampleConfig(max_new_tokens=12, temperature=0, seed=1))
    b = generate(tiny_model, tokenizer, "JULIET:", SampleConfig(max_new_tokens=12, temperature=0, seed=2))
    assert a.samples == b.samples
    expected = greedy_without_cache(tiny_model, tokenizer.encode("JULIET:"), 12)
    assert a.continuations[0] == tokenizer.decode(expected)


def test_seed_reproduces_samples(tiny_model, tokenizer):
    config = SampleConfig(max_new_tokens=20, num_samples=3, temperature=1.0, seed=1234)
    first = generate(tiny_model, tokenizer, "KING:", config)
    second = generate(tiny_model, tokenizer, "KING:", config)
    assert first.samples == second.samples
    assert first.seed == 1234
    other = generate(tiny_model, tokenizer, "KING:", SampleConfig(max_new_tokens=20, num_samples=3, seed=99))
    assert other.samples != first.samples


def test_unseeded_generation_reports_a_seed_that_reproduces_it(tiny_model, tokenizer):
    first = generate(tiny_model, tokenizer, "KING:", SampleConfig(max_new_tokens=15, temperature=1.0))
    again = generate(tiny_model, tokenizer, "KING:", SampleConfig(max_new_tokens=15, temperature=1.0, seed=first.seed))
    assert again.samples == first.samples


def test_k_samples_are_independent_and_start_with_the_prompt(tiny_model, tokenizer):
    result = generate(tiny_model, tokenizer, "To be", SampleConfig(max_new_tokens=16, num_samples=4, seed=0))
    assert len(result.samples) == 4
    assert all(s.startswith("To be") for s in result.samples)
    assert len(set(result.continuations)) == 4
    assert result.new_tokens == [16] * 4
    assert result.tokens_per_sec > 0


def test_long_prompt_is_cropped_to_its_last_tokens(tiny_model, tokenizer):
    prompt = "Now is the winter of our discontent " * 40
    ids, cropped = encode_prompt(tokenizer, prompt, tiny_model.config.block_size)
    assert cropped and len(ids) == tiny_model.config.block_size
    assert ids == tokenizer.encode(prompt)[-tiny_model.config.block_size :]
    result = generate(tiny_model, tokenizer, prompt, SampleConfig(max_new_tokens=5, seed=0, stop_at_eot=False))
    assert result.prompt_cropped
    assert result.samples[0].startswith(prompt)
    assert result.new_tokens == [5]


def test_generation_can_run_past_the_context(tiny_model, tokenizer):
    steps = 3 * tiny_model.config.block_size
    result = generate(tiny_model, tokenizer, "A", SampleConfig(max_new_tokens=steps, seed=0, stop_at_eot=False))
    assert result.new_tokens == [steps]


def test_empty_prompt_is_refused(tiny_model, tokenizer):
    for prompt in ("", "   \n\t"):
        with pytest.raises(UsageError, match="prompt is empty"):
            generate(tiny_model, tokenizer, prompt, SampleConfig())


def eot_loving_model(model: GPT, eot: int) -> GPT:
    """Make every position's final hidden state point at the <|endoftext|> embedding, so greedy picks it."""
    with torch.no_grad():
        direction = torch.randn(model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[eot] = direction * 10
    return model


def test_generation_stops_at_end_of_text(tiny_model, tokenizer):
    model = eot_loving_model(tiny_model, tokenizer.eot)
    stopped = generate(model, tokenizer, "Exit,", SampleConfig(max_new_tokens=10, num_samples=2, temperature=0))
    assert stopped.new_tokens == [0, 0]
    assert stopped.stopped_at_eot == [True, True]
    assert stopped.samples == ["Exit,", "Exit,"]
    running = generate(model, tokenizer, "Exit,", SampleConfig(max_new_tokens=10, temperature=0, stop_at_eot=False))
    assert running.new_tokens == [10]


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model, tokenizer):
    greedy = generate(tiny_model, tokenizer, "HAMLET:", SampleConfig(max_new_tokens=10, temperature=0))
    top_k = generate(
        tiny_model, tokenizer, "HAMLET:", SampleConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    )
    top_p = generate(
        tiny_model,
        tokenizer,
        "HAMLET:",
        SampleConfig(max_new_tokens=10, temperature=1.0, top_k=None, top_p=1e-6, seed=5),
    )
    assert top_k.samples == greedy.samples == top_p.samples


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))

    def kept(config: SampleConfig) -> list[int]:
        scores, ids = _candidates(logits, config)
        ids = torch.arange(logits.size(1)).expand_as(scores) if ids is None else ids
        return sorted(ids[torch.isfinite(scores)].tolist())

    assert kept(SampleConfig(temperature=1.0, top_k=2)) == [1, 3]
    assert kept(SampleConfig(temperature=1.0, top_k=None, top_p=0.7)) == [1, 3]
    assert kept(SampleConfig(temperature=1.0, top_k=3, top_p=0.6)) == [1, 3]
    assert kept(SampleConfig(temperature=1.0, top_k=None, top_p=1.0)) == [0, 1, 2, 3]


def test_top_k_draws_follow_the_renormalised_distribution():
    """Sampling among the top-k candidates draws each with its probability renormalised over the k."""
    from core.sampling import _next_tokens

    logits = torch.log(torch.tensor([[0.1, 0.4, 0.05, 0.2, 0.25]])).expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    tokens = _next_tokens(logits, SampleConfig(temperature=1.0, top_k=3), generator)
    counts = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert counts[0] == counts[2] == 0
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.4, 0.2, 0.25]) / 0.85, atol=0.03, rtol=0)


def test_stream_yields_the_same_text_as_generate(tiny_model, tokenizer):
    config = SampleConfig(max_new_tokens=30, num_samples=2, temperature=1.0, seed=42)
    stream = TextStream(tiny_model, tokenizer, "Emoji 🎭 and 中文:", config)
    steps = list(stream)
    assert all(len(step) == 2 for step in steps)
    joined = ["".join(step[i] for step in steps) for i in range(2)]
    assert joined == generate(tiny_model, tokenizer, "Emoji 🎭 and 中文:", config).continuations
    assert stream.result().continuations == joined


@pytest.mark.parametrize(
    "prompt",
    [
        "Emoji 🎭👑🗡️ and a flag 🏴󠁧󠁢󠁥󠁮󠁧󠁿",
        "中文：生存还是毁灭，这是一个问题",
        "Controls\x00\x07\x1b[31m red\x1b[0m\r\n\ttab\x7f\u200b",
        "<|endoftext|>",  # plain text to the tokenizer, never the special token
    ],
)
def test_any_text_prompt_gives_text(tiny_model, tokenizer, prompt):
    result = generate(tiny_model, tokenizer, prompt, SampleConfig(max_new_tokens=8, num_samples=2, seed=3))
    assert len(result.samples) == 2
    assert all(sample.startswith(prompt) and isinstance(sample, str) for sample in result.samples)
    assert all(0 <= n <= 8 for n in result.new_tokens)
    assert result.prompt_tokens == min(len(tokenizer.encode(prompt)), tiny_model.config.block_size)


@pytest.mark.parametrize("prompt", ["caf\udce9", "\ud83c alone", "ROMEO:\udfff"])
def test_a_prompt_with_a_lone_surrogate_is_refused(tiny_model, tokenizer, prompt):
    # How Python carries a command-line argument that was not UTF-8, or a JSON "\ud83c" without its pair.
    with pytest.raises(UsageError, match="lone surrogate"):
        generate(tiny_model, tokenizer, prompt, SampleConfig(max_new_tokens=2))


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(5e-324, 1.0), (1e-40, 1.0), (1e-12, 0.5), (1.0, 5e-324), (1.0, 1e-45)]
)
def test_extreme_temperatures_and_top_p_are_greedy_not_nan(tiny_model, tokenizer, temperature, top_p):
    # Values below float32's range used to become NaN probabilities, which torch.multinomial refuses.
    greedy = generate(tiny_model, tokenizer, "KING:", SampleConfig(max_new_tokens=6, temperature=0))
    for top_k in (None, 50):
        config = SampleConfig(max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
        assert generate(tiny_model, tokenizer, "KING:", config).samples == greedy.samples


def test_side_by_side_streams_write_what_each_model_writes_alone(tiny_model, tokenizer):
    from core.sampling import side_by_side

    torch.manual_seed(1)
    other = GPT(tiny_model.config).eval()
    config = SampleConfig(max_new_tokens=12, num_samples=2, seed=4, stop_at_eot=False)
    alone = [generate(model, tokenizer, "ROMEO:", config).samples for model in (tiny_model, other)]
    streams = [TextStream(model, tokenizer, "ROMEO:", config) for model in (tiny_model, other)]
    texts = [["ROMEO:"] * 2, ["ROMEO:"] * 2]
    for step in side_by_side(streams):
        for m, pieces in enumerate(step):
            if pieces is not None:
                texts[m] = [text + piece for text, piece in zip(texts[m], pieces, strict=True)]
    assert texts == alone == [stream.result().samples for stream in streams]
    assert all(stream.result().new_tokens == [12, 12] for stream in streams)


def test_a_streams_time_is_the_models_own_not_the_consumers(tiny_model, tokenizer):
    import time

    stream = TextStream(tiny_model, tokenizer, "ROMEO:", SampleConfig(max_new_tokens=5, seed=1, stop_at_eot=False))
    for _ in stream:
        time.sleep(0.2)  # a slow consumer: drawing the text, another model's turn (a second in all)
    assert stream.result().seconds < 0.5
