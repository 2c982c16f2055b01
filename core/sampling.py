"""Text generation: K independent continuations as one batch, with a KV cache, temperature, top-k, top-p and seed.

:func:`stream_tokens` is the engine (token ids per step); :class:`TextStream` turns it into text pieces that
never split a multi-byte character; :func:`generate` collects whole samples. A prompt longer than the context keeps its
last ``block_size`` tokens. When a sample grows past the context, the cache is rebuilt from the last three
quarters of the window, so a long generation costs one full forward per ``block_size / 4`` tokens, not per token.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from core.config import SampleConfig
from core.errors import UsageError
from core.memory import GENERATION_OOM_HINT, friendly_oom
from core.model import GPT, KVCache, decoding_kernel
from core.tokenizer import Tokenizer

_SURROGATE = re.compile("[\ud800-\udfff]")
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


@dataclass
class Generation:
    """The result of :func:`generate`."""

    samples: list[str]
    """Each sample as the full prompt followed by its continuation."""
    continuations: list[str]
    """Each sample's new text only."""
    new_tokens: list[int]
    """New tokens per sample (an ``<|endoftext|>`` stop is not counted)."""
    seconds: float
    """Wall time from the first forward pass to the last token."""
    seed: int
    """The seed used; pass it back to reproduce these samples."""
    prompt_tokens: int
    """Tokens of the prompt the model saw (after cropping)."""
    prompt_cropped: bool
    """Whether the prompt was longer than the context and lost its beginning."""
    stopped_at_eot: list[bool] = field(default_factory=list)
    """Per sample, whether it ended on ``<|endoftext|>``."""

    @property
    def tokens_per_sec(self) -> float:
        """New tokens of all samples together per second."""
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> tuple[list[int], bool]:
    """Token ids of ``prompt`` cropped to its last ``block_size`` tokens, and whether cropping happened.

    Raises :class:`UsageError` for an empty or whitespace-only prompt, and for one holding a lone surrogate.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty; give some text to continue, e.g. 'ROMEO:'")
    # A lone surrogate is not text: it is how Python carries bytes that were not UTF-8 (a command-line argument
    # from a terminal in another encoding) or a broken JSON escape. The tokenizer would silently turn it into U+FFFD
    # and printing the sample would then fail; say what is wrong instead.
    bad = _SURROGATE.search(prompt)
    if bad is not None:
        raise UsageError(
            f"the prompt is not valid text: character {bad.start()} is a lone surrogate ({bad.group()!r}), e.g. a "
            "byte that is not UTF-8; give the prompt as UTF-8 text"
        )
    ids = tokenizer.encode(prompt)
    if len(ids) > block_size:
        return ids[-block_size:], True
    return ids, False


def _candidates(logits: torch.Tensor, config: SampleConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature, top-k and top-p applied to logits (K, V): the candidates' scaled logits (K, n), filtered-out
    ones set to -inf, and their token ids (K, n), or None when the candidates are the whole vocabulary in order.

    With top-k, only the k best tokens are ever touched again (the scaling, the softmax and the draw run over k,
    not V).
    """
    ids = None
    if config.top_k is not None and config.top_k < logits.size(-1):
        # (K, k) each, best first; scaling keeps the order. The studio's kernel where loaded: one pass with a k-entry
        # heap, where torch.topk took about 250 µs of a decoded token's time over the 50,257 logits.
        top_k = decoding_kernel("top_k") if logits.device.type == "cpu" and logits.dtype == torch.float32 else None
        logits, ids = top_k(logits, config.top_k) if top_k is not None else torch.topk(logits, config.top_k, dim=-1)
        best = logits[:, :1]
    else:
        best = logits.amax(dim=-1, keepdim=True)
    # The best logit is subtracted before dividing (the softmax does not change): with a tiny temperature the others
    # then go to -inf, instead of the best one overflowing to inf and the softmax turning into NaN. A temperature
    # below float32's smallest normal number would round to 0 in the division (0 / 0 is NaN); at that scale the
    # distribution is already all on the best token, so the smallest normal number stands in for it.
    logits = (logits - best) / max(config.temperature, _FLOAT32_TINY)
    if config.top_p < 1.0:
        if ids is None:
            logits, ids = torch.sort(logits, dim=-1, descending=True)  # (K, V) each
        probs = torch.softmax(logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p. The most likely one always stays, also
        # when top_p is below float32's range and compares as 0 (dropping every token would leave NaNs to draw from).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= config.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    return logits, ids


def _next_tokens(logits: torch.Tensor, config: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of logits (K, V): argmax when greedy, else a draw from the filtered distribution."""
    if config.greedy:
        return torch.argmax(logits, dim=-1)
    scores, ids = _candidates(logits, config)
    choice = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)  # (K, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


def _model_device_dtype(model: GPT) -> tuple[torch.device, torch.dtype]:
    weight = model.transformer.wte.weight
    return weight.device, weight.dtype


@torch.inference_mode()
def stream_tokens(
    model: GPT, prompt_ids: list[int], config: SampleConfig, *, eot_token: int | None = None, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens, active)`` per step: the next token of each of the K samples (K,) and which are still going.

    ``prompt_ids`` must already fit the context. A sample becomes inactive after it yields ``eot_token`` (when
    ``config.stop_at_eot``); generation ends when all are inactive or after ``config.max_new_tokens`` steps.
    """
    block_size = model.config.block_size
    if not 0 < len(prompt_ids) <= block_size:
        raise ValueError(f"prompt must have 1..{block_size} tokens, got {len(prompt_ids)}")
    was_training = model.training
    device, dtype = _model_device_dtype(model)
    if device.type == "cpu":
        from core.cpu_kernels import load

        load()  # the decoding kernels: built once per machine, loaded once per process; without them, PyTorch's ops
    K = config.num_samples
    # The cache and the activations grow with the number of samples: a failed allocation says to ask for fewer.
    with friendly_oom(GENERATION_OOM_HINT):
        model.eval()
        try:
            generator = torch.Generator(device=device).manual_seed(seed)
            cache = KVCache(model.config, K, device=device, dtype=dtype)
            # Only the last block_size tokens can ever be attended to again.
            window = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).expand(K, -1).contiguous()
            active = torch.ones(K, dtype=torch.bool, device=device)
            logits, _ = model(window, cache=cache, start_pos=0, last_only=True)  # (K, 1, V)
            length = window.size(1)  # positions filled in the cache
            # A token at a time without the module machinery where the kernels allow it (an fp32 cache on the CPU)
            plan = model.decoding_plan()
            for step in range(config.max_new_tokens):
                tokens = _next_tokens(logits[:, -1, :].float(), config, generator)  # (K,)
                yield tokens, active.clone()
                if config.stop_at_eot and eot_token is not None:
                    active &= tokens != eot_token
                if not bool(active.any()) or step == config.max_new_tokens - 1:
                    return
                window = torch.cat([window, tokens.unsqueeze(1)], dim=1)[:, -block_size:]
                if length == block_size:
                    keep = max(1, (3 * block_size) // 4)
                    window = window[:, -keep:]
                    logits, _ = model(window, cache=cache, start_pos=0, last_only=True)
                    length = keep
                elif plan is not None:
                    logits = model.decode_one(plan, tokens, cache, length).unsqueeze(1)  # (K, 1, V)
                    length += 1
                else:
                    logits, _ = model(tokens.unsqueeze(1), cache=cache, start_pos=length, last_only=True)
                    length += 1
        finally:
            model.train(was_training)


def fresh_seed() -> int:
    """A new random seed (what an unseeded generation uses, and reports so that it can be repeated)."""
    return int.from_bytes(os.urandom(4), "little")


def _resolve_seed(config: SampleConfig) -> int:
    return config.seed if config.seed is not None else fresh_seed()


class TextStream:
    """Iterate to receive, per step, the new text of each sample (``""`` when a sample has nothing new or stopped).

    Pieces never split a multi-byte character: bytes of an unfinished character wait for the next token. While or
    after iterating, :meth:`result` gives the samples so far with counts, timing and the seed used. The time counted
    is the model's own (from asking for a step to getting it): not what the consumer does between steps, such as
    drawing the text or running another model's stream (:func:`side_by_side`).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, prompt: str, config: SampleConfig):
        self.prompt_ids, self.prompt_cropped = encode_prompt(tokenizer, prompt, model.config.block_size)
        self.seed = _resolve_seed(config)
        self._model, self._tokenizer, self._prompt, self._config = model, tokenizer, prompt, config
        K = config.num_samples
        self._pieces: list[list[str]] = [[] for _ in range(K)]
        self._new_tokens = [0] * K
        self._stopped = [False] * K
        self._seconds = 0.0

    def __iter__(self) -> Iterator[list[str]]:
        eot, stop_at_eot = self._tokenizer.eot, self._config.stop_at_eot
        decoders = [self._tokenizer.stream_decoder() for _ in range(self._config.num_samples)]
        steps = stream_tokens(self._model, self.prompt_ids, self._config, eot_token=eot, seed=self.seed)
        while True:
            start = time.perf_counter()
            try:
                tokens, active = next(steps)
            except StopIteration:
                break
            step = []
            for i, (token, is_active) in enumerate(zip(tokens.tolist(), active.tolist(), strict=True)):
                piece = ""
                if is_active and stop_at_eot and token == eot:
                    self._stopped[i] = True
                elif is_active:
                    self._new_tokens[i] += 1
                    piece = decoders[i].push(token)
                self._pieces[i].append(piece)
                step.append(piece)
            self._seconds += time.perf_counter() - start
            yield step
        tail = [d.flush() for d in decoders]
        for i, piece in enumerate(tail):
            self._pieces[i].append(piece)
        if any(tail):
            yield tail

    def result(self) -> Generation:
        continuations = ["".join(p) for p in self._pieces]
        return Generation(
            samples=[self._prompt + c for c in continuations],
            continuations=continuations,
            new_tokens=list(self._new_tokens),
            seconds=self._seconds,
            seed=self.seed,
            prompt_tokens=len(self.prompt_ids),
            prompt_cropped=self.prompt_cropped,
            stopped_at_eot=list(self._stopped),
        )


SIDE_BY_SIDE_MAX = 4
"""The most models that write side by side (the Generate page's columns, ``pipelines.generate --model`` repeated)."""


def side_by_side(streams: Sequence[TextStream]) -> Iterator[list[list[str] | None]]:
    """One step of every stream in turn, until all have ended: per step, each stream's pieces, or None for a stream
    that has ended. Several models write at once, one token each per step, each timed on its own; each stream draws
    from its own seeded generator, so the texts are those each model writes alone with the same settings."""
    iterators = [iter(stream) for stream in streams]
    live = [True] * len(iterators)
    while any(live):
        step: list[list[str] | None] = []
        for i, iterator in enumerate(iterators):
            pieces = next(iterator, None) if live[i] else None
            live[i] = live[i] and pieces is not None
            step.append(pieces)
        if any(pieces is not None for pieces in step):
            yield step


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, config: SampleConfig) -> Generation:
    """K whole samples for ``prompt``, with timing and the seed used."""
    stream = TextStream(model, tokenizer, prompt, config)
    for _ in stream:
        pass
    return stream.result()
