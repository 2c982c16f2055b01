"""Export a studio model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

The file is written with the ``gguf`` package (the format's own Python library, ``pip install gguf``) under
llama.cpp's ``gpt2`` architecture: GPT-2's tensor names (``token_embd``, ``blk.N.attn_qkv``, ...), its hyperparameters
and the GPT-2 BPE tokenizer (token list and merges, recovered from tiktoken's ranks), so ``llama-cli -m FILE`` needs
nothing else. The LM head is tied: llama.cpp reads ``token_embd`` as the output matrix when a file has no
``output.weight``, so the weight is stored once. Weights are F32, F16, Q8_0 or Q4_0 (blocks of 32 values with one
scale each, quantized by ``gguf.quants``); LayerNorms and biases stay F32, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.atomic import atomic_file
from core.errors import UsageError
from core.model import GPT
from core.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256
QUANT_BLOCK = 32
"""Values per Q8_0/Q4_0 block: a quantized matrix's rows must be a multiple of this long."""


@dataclass(frozen=True)
class GGUFDtype:
    """One weight precision of the export."""

    name: str
    """What ``--dtype`` calls it."""
    tensor_type: str
    """The ``gguf.GGMLQuantizationType`` member of the 2-D weights."""
    file_type: str
    """The ``gguf.LlamaFileType`` member recorded in the header."""
    quantized: bool
    """Stored in 32-value blocks (rows must be a multiple of :data:`QUANT_BLOCK` long)."""


GGUF_DTYPES = {
    "f32": GGUFDtype("f32", "F32", "ALL_F32", False),
    "f16": GGUFDtype("f16", "F16", "MOSTLY_F16", False),
    "q8_0": GGUFDtype("q8_0", "Q8_0", "MOSTLY_Q8_0", True),
    "q4_0": GGUFDtype("q4_0", "Q4_0", "MOSTLY_Q4_0", True),
}


def import_gguf():
    """The ``gguf`` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise UsageError("GGUF export needs the gguf package: pip install gguf") from exc
    return gguf


def gguf_dtype(name: str) -> GGUFDtype:
    """The :class:`GGUFDtype` called ``name``, or :class:`UsageError` listing the choices."""
    try:
        return GGUF_DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown GGUF dtype {name!r}; choose one of: {', '.join(GGUF_DTYPES)}") from None


def unsupported_reason(model: GPT, dtype: GGUFDtype) -> str | None:
    """Why llama.cpp's ``gpt2`` architecture cannot hold ``model`` at ``dtype``, or None when it can."""
    config = model.config
    if not config.bias:
        return (
            "the model has no biases (bias=False), and llama.cpp's gpt2 architecture requires them; "
            "export it to the Hugging Face format instead (--format hf)"
        )
    if config.vocab_size != GPT2_VOCAB_SIZE:
        return (
            f"the model's vocabulary has {config.vocab_size} tokens, not GPT-2's {GPT2_VOCAB_SIZE}, so the GPT-2 "
            "tokenizer written into the file would not match it"
        )
    if dtype.quantized and config.n_embd % QUANT_BLOCK:
        return (
            f"{dtype.name} stores rows in blocks of {QUANT_BLOCK} values, and n_embd {config.n_embd} is not a "
            f"multiple of {QUANT_BLOCK}; export with --dtype f16 or f32"
        )
    if model.lm_head.weight is not model.transformer.wte.weight:
        return "the LM head is not tied to the token embedding (a quantized copy?); export the trained model itself"
    return None


def check_gguf_target(path: str | Path, *, overwrite: bool = False) -> Path:
    """``path`` as a Path if a GGUF file may be written there, else :class:`UsageError` saying why.

    A new file is fine. An existing one is replaced only with ``overwrite``, and even then only when it is a GGUF
    file (starts with the GGUF magic), so a mistyped path never overwrites something else.
    """
    path = Path(path)
    if path.suffix != ".gguf":
        raise UsageError(f"{path} does not end in .gguf; name the output file NAME.gguf")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of the .gguf file to write")
    if path.exists():
        if not overwrite:
            raise UsageError(f"{path} already exists; choose another output file or pass --force to replace it")
        with open(path, "rb") as existing:
            if existing.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UsageError(f"{path} exists and is not a GGUF file: refusing to replace it, even with --force")
    if not path.parent.is_dir():
        raise UsageError(f"the folder {path.parent} does not exist; create it first")
    return path


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in which byte-level BPE tokens are written as text."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _split_by_ranks(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-pair-encode ``token`` using only merges whose result ranks below ``below`` (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def _gpt2_vocab(ranks_items: tuple[tuple[bytes, int], ...]) -> tuple[list[str], list[str]]:
    """Token texts (byte-level unicode, by id, ``<|endoftext|>`` last) and merges ("left right", by rank)."""
    ranks = dict(ranks_items)
    to_text = _byte_to_unicode()

    def text(piece: bytes) -> str:
        return "".join(to_text[b] for b in piece)

    tokens = [""] * (len(ranks) + 1)
    merges: list[tuple[int, str]] = []
    for token, rank in ranks.items():
        tokens[rank] = text(token)
        if len(token) > 1:
            # The merge that made this token is the last one BPE applies: below its own rank it is two parts.
            left, right = _split_by_ranks(token, ranks, rank)
            merges.append((rank, f"{text(left)} {text(right)}"))
    tokens[EOT_TOKEN] = "<|endoftext|>"
    return tokens, [merge for _, merge in sorted(merges)]


def gpt2_tokenizer_tables(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """The GPT-2 token list and merges as GGUF's ``tokenizer.ggml`` keys want them."""
    ranks = tokenizer._enc._mergeable_ranks  # tiktoken's byte string -> rank table: the BPE itself
    return _gpt2_vocab(tuple(ranks.items()))


def _tensors(model: GPT) -> list[tuple[str, torch.Tensor, bool]]:
    """(GGUF name, tensor as llama.cpp expects its shape, whether it is a 2-D weight) for every stored tensor."""
    config = model.config
    t = model.transformer
    out = [
        ("token_embd.weight", t.wte.weight[: config.vocab_size], True),  # (V, C): also the tied LM head
        ("position_embd.weight", t.wpe.weight, True),  # (block_size, C)
    ]
    for i, block in enumerate(t.h):
        # Studio Linear weights are (out, in), as ggml wants them: rows of `in` values, one per output.
        out += [
            (f"blk.{i}.attn_norm.weight", block.ln_1.weight, False),
            (f"blk.{i}.attn_norm.bias", block.ln_1.bias, False),
            (f"blk.{i}.attn_qkv.weight", block.attn.c_attn.weight, True),  # (3C, C)
            (f"blk.{i}.attn_qkv.bias", block.attn.c_attn.bias, False),
            (f"blk.{i}.attn_output.weight", block.attn.c_proj.weight, True),  # (C, C)
            (f"blk.{i}.attn_output.bias", block.attn.c_proj.bias, False),
            (f"blk.{i}.ffn_norm.weight", block.ln_2.weight, False),
            (f"blk.{i}.ffn_norm.bias", block.ln_2.bias, False),
            (f"blk.{i}.ffn_up.weight", block.mlp.c_fc.weight, True),  # (4C, C)
            (f"blk.{i}.ffn_up.bias", block.mlp.c_fc.bias, False),
            (f"blk.{i}.ffn_down.weight", block.mlp.c_proj.weight, True),  # (C, 4C)
            (f"blk.{i}.ffn_down.bias", block.mlp.c_proj.bias, False),
        ]
    out += [("output_norm.weight", t.ln_f.weight, False), ("output_norm.bias", t.ln_f.bias, False)]
    return out


def export_gguf(
    model: GPT,
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    source: str | None = None,
) -> Path:
    """Write ``model`` as the GGUF file ``path`` with weights in ``dtype`` and return the path.

    Raises :class:`UsageError` for an unknown dtype, a model the format cannot hold (:func:`unsupported_reason`) or
    a target :func:`check_gguf_target` refuses, before anything is written. The file is written under a temporary
    name and renamed when complete, so a failure leaves the old file (or none), never half of one. ``source``
    (e.g. ``shakespeare-gpt/3``) becomes the file's ``general.name``.
    """
    gguf = import_gguf()
    kind = gguf_dtype(dtype)
    reason = unsupported_reason(model, kind)
    if reason is not None:
        raise UsageError(f"GGUF cannot hold this model: {reason}")
    path = check_gguf_target(path, overwrite=overwrite)
    config = model.config
    tokens, merges = gpt2_tokenizer_tables(tokenizer)
    weight_type = gguf.GGMLQuantizationType[kind.tensor_type]
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        try:
            writer.add_name(source or "shakespeare-gpt")
            writer.add_context_length(config.block_size)
            writer.add_embedding_length(config.n_embd)
            writer.add_feed_forward_length(4 * config.n_embd)
            writer.add_block_count(config.n_layer)
            writer.add_head_count(config.n_head)
            writer.add_layer_norm_eps(1e-5)  # torch.nn.LayerNorm's default, which the studio uses
            writer.add_file_type(int(gguf.LlamaFileType[kind.file_type]))
            if kind.quantized:
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            token_types = [gguf.TokenType.NORMAL] * len(tokens)
            token_types[EOT_TOKEN] = gguf.TokenType.CONTROL
            writer.add_token_types(token_types)
            writer.add_token_merges(merges)
            writer.add_bos_token_id(EOT_TOKEN)
            writer.add_eos_token_id(EOT_TOKEN)
            writer.add_add_bos_token(False)
            for name, tensor, is_weight in _tensors(model):
                data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                if not is_weight or kind.name == "f32":
                    writer.add_tensor(name, data)
                elif kind.name == "f16":
                    writer.add_tensor(name, data.astype(np.float16))
                else:
                    writer.add_tensor(name, gguf.quants.quantize(data, weight_type), raw_dtype=weight_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
