"""llama.cpp rows: batch-1 decoding of the studio against llama.cpp (llama-cpp-python) on the studio's own GGUF export
of the same weights, precision by precision, in one run."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.config import ModelConfig, SampleConfig
from core.errors import UsageError
from pipelines.benchmarks.rows import BENCH_SEED, SAMPLING, Row, higher_is_better

PAIRS = (("fp32", "f32"), ("int8", "q8_0"), ("f16", "f16"), ("bf16", "f16"), ("int4", "q4_0"))
"""(the studio's precision, the GGUF dtype llama.cpp decodes) of each row."""
PROMPT = "ROMEO:"
LLAMA_CONTEXT = 512


def import_llama_cpp():
    """``llama_cpp``, or a one-line error saying how to install it (it builds llama.cpp from source: minutes)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UsageError(
            "the llamacpp rows need llama-cpp-python: pip install -r requirements-llamacpp.txt (it builds llama.cpp "
            "from source, a few minutes)"
        ) from exc
    return llama_cpp


def open_gguf(path: str | Path, threads: int, context: int = LLAMA_CONTEXT):
    """A ``llama_cpp.Llama`` on ``path`` with ``threads`` threads for decoding and prompts, quiet."""
    llama_cpp = import_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        seed=BENCH_SEED,
        verbose=False,
    )


def llama_seconds(llm, prompt_ids: list[int], new_tokens: int) -> float:
    """Seconds llama.cpp takes to sample ``new_tokens`` tokens after ``prompt_ids`` (the benchmark's temperature
    and top-k, no other filter, no stop)."""
    started = time.perf_counter()
    tokens = llm.generate(
        prompt_ids,
        top_k=SAMPLING["top_k"],
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        temp=SAMPLING["temperature"],
        repeat_penalty=1.0,
        reset=True,
    )
    for count, _ in enumerate(tokens, 1):
        if count == new_tokens:
            break
    return time.perf_counter() - started


def _studio_seconds(model, tokenizer, new_tokens: int) -> float:
    from core.sampling import generate

    config = SampleConfig(max_new_tokens=new_tokens, num_samples=1, seed=BENCH_SEED, stop_at_eot=False, **SAMPLING)
    result = generate(model, tokenizer, PROMPT, config)
    if sum(result.new_tokens) != new_tokens:
        raise RuntimeError(f"the studio made {sum(result.new_tokens)} tokens, expected {new_tokens}")
    return result.seconds


def _spread(rates: list[float]) -> str:
    return f"{min(rates):.1f}–{max(rates):.1f}"


def llamacpp_rows(
    new_tokens: int = 128,
    repeats: int = 3,
    log: Callable[[str], None] = print,
    config: ModelConfig | None = None,
) -> list[Row]:
    """One row per pair of :data:`PAIRS`: the studio's batch-1 sampling tokens/s at a precision against llama.cpp's
    on the GGUF export of the same weights (a seeded random-init gpt2 124M unless ``config``), both on
    ``torch.get_num_threads()`` threads, the same prompt, temperature, top-k and number of new tokens. A warm-up
    each, then ``repeats`` alternating runs; medians, with each side's range in the note. A precision the studio
    cannot run here gets no row (its reason is logged)."""
    from core.cpu_kernels import load
    from core.gguf_export import export_gguf
    from core.huge_pages import move_to_huge_pages
    from core.model import GPT
    from core.quantize import quantize
    from core.tokenizer import get_tokenizer

    import_llama_cpp()
    kernels, kernels_note = load()
    threads = torch.get_num_threads()
    tokenizer = get_tokenizer()
    torch.manual_seed(BENCH_SEED)
    model = GPT(config or ModelConfig.from_preset("gpt2")).eval()
    move_to_huge_pages(model)  # where a stored model's weights are once loaded (core.checkpoint.load_checkpoint)
    shape = "gpt2 124M" if config is None else f"{model.config.n_layer} layers × {model.config.n_embd} dims"
    rows = []
    with tempfile.TemporaryDirectory(prefix="studio-llamacpp-") as folder:
        for precision, gguf_dtype in PAIRS:
            try:
                variant = quantize(model, precision)
            except UsageError as exc:
                log(f"  {precision}: no row, {exc}")
                continue
            path = Path(folder) / f"model-{gguf_dtype}.gguf"
            if not path.exists():
                export_gguf(model, path, tokenizer, dtype=gguf_dtype)
            llm = open_gguf(path, threads)
            prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False)
            _studio_seconds(variant, tokenizer, 8), llama_seconds(llm, prompt_ids, 8)  # warm-up
            ours, theirs = [], []
            for repeat in range(repeats):
                ours.append(new_tokens / _studio_seconds(variant, tokenizer, new_tokens))
                theirs.append(new_tokens / llama_seconds(llm, prompt_ids, new_tokens))
                log(
                    f"  {precision} vs {gguf_dtype.upper()} {repeat + 1}/{repeats}: ours {ours[-1]:.1f} tok/s, "
                    f"llama.cpp {theirs[-1]:.1f}"
                )
            del llm, variant
            name = f"llamacpp_{gguf_dtype}" if (precision, gguf_dtype) != ("bf16", "f16") else "llamacpp_f16_bf16"
            rows.append(
                higher_is_better(
                    name,
                    statistics.median(ours),
                    statistics.median(theirs),
                    "tokens/s",
                    f"{shape}: studio {precision} vs llama.cpp {gguf_dtype.upper()}, 1 × {new_tokens} new tokens, "
                    f"{threads} threads, temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}; ranges "
                    f"{_spread(ours)} vs {_spread(theirs)}"
                    + ("" if kernels else f"; without the studio's kernels ({kernels_note})"),
                )
            )
    return rows
