"""Hugging Face interop: the studio's GPT to and from the ``transformers`` GPT-2 layout (``GPT2LMHeadModel``).

The two layouts hold the same tensors under the same names, with two differences. Hugging Face's GPT-2 uses
``Conv1D`` for ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``, whose weights are stored
transposed relative to ``nn.Linear`` ((in, out) instead of (out, in)); and Hugging Face files may carry the causal
mask buffers ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` (older versions) and may drop the ``transformer.``
prefix. Buffers are ignored on the way in and never written on the way out.

Contracts:

- :func:`to_hf_state_dict` and :func:`from_hf_state_dict` are pure tensor conversions.
- :func:`export_hf` writes ``config.json`` (a ``GPT2Config``), ``model.safetensors`` and ``generation_config.json``
  atomically. No tokenizer files are written: every studio model uses GPT-2's tokenizer, which Hugging Face
  ships as ``AutoTokenizer.from_pretrained("gpt2")``. A model without biases (``bias=False``) is exported with
  zero biases, which computes the same function.
- :func:`load_hf_checkpoint` reads a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``, or a
  sharded ``model.safetensors.index.json``) into the studio's GPT. It never unpickles: a folder holding only
  ``pytorch_model.bin`` (or another pickle) is refused with a message saying to convert it to safetensors.
- Neither direction needs ``transformers``; only :func:`verify_hf_export` (``export_hf(..., verify=True)``)
  imports it, lazily, and raises :class:`~core.errors.UsageError` when it is missing.

The studio's MLP uses the tanh approximation of GELU, which Hugging Face calls ``gelu_new`` (GPT-2's own, also
spelt ``gelu_pytorch_tanh`` or ``gelu_fast``); checkpoints with any other activation are refused. Errors are
:class:`HFFormatError` (a :class:`~core.errors.UsageError`) with a one-line message.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.atomic import atomic_folder
from core.checkpoint import all_finite
from core.config import GPT2_VOCAB_SIZE, ModelConfig
from core.errors import UsageError
from core.model import GPT
from core.tokenizer import EOT_TOKEN

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
HF_ACTIVATION = "gelu_new"
"""What the studio's ``nn.GELU(approximate="tanh")`` is called in a ``GPT2Config``."""
TANH_GELU_NAMES = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})
"""Hugging Face activations that compute the tanh-approximated GELU, so the studio's MLP reproduces them."""
LAYER_NORM_EPS = 1e-5
"""The studio's LayerNorm epsilon (``nn.LayerNorm``'s default) and GPT-2's ``layer_norm_epsilon``."""
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""Per-block weights stored transposed by Hugging Face's ``Conv1D``."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
"""Causal-mask buffers some Hugging Face versions save; they are not weights."""

# GPT2Config's defaults, applied to fields a config.json leaves out, exactly as transformers does.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


class HFFormatError(UsageError):
    """A Hugging Face folder that is missing, not GPT-2, pickled, or whose tensors do not match its config."""


def import_transformers(purpose: str):
    """The ``transformers`` module, or :class:`UsageError` saying that ``purpose`` needs it and how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise UsageError(f"{purpose} needs the transformers package: pip install transformers") from exc
    return transformers


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A ``GPT2Config``-compatible ``config.json`` document for a studio model of shape ``config``.

    The studio has one dropout probability; it becomes all three of GPT-2's (residual, embedding, attention).
    Raises :class:`HFFormatError` for a vocabulary other than GPT-2's, which no Hugging Face GPT-2 tokenizer fits.
    """
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise HFFormatError(
            f"only models with GPT-2's {GPT2_VOCAB_SIZE}-token vocabulary can be exported, not {config.vocab_size}"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # GPT-2's 4 * n_embd, as the studio's MLP
        "activation_function": HF_ACTIVATION,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def _check_exportable(model: GPT) -> None:
    """Refuse a model whose computation the GPT-2 layout cannot express (guards against drift in core/model.py)."""
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise HFFormatError("only models with the LM head tied to the token embedding can be exported")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and not math.isclose(module.eps, LAYER_NORM_EPS):
            raise HFFormatError(f"{name} has LayerNorm epsilon {module.eps}; GPT-2 uses {LAYER_NORM_EPS}")
        if isinstance(module, torch.nn.GELU) and module.approximate != "tanh":
            raise HFFormatError(f"{name} is GELU({module.approximate!r}); GPT-2's {HF_ACTIVATION} is the tanh one")


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights of ``model`` in ``GPT2LMHeadModel`` layout: ``transformer.*`` keys, Conv1D weights transposed.

    The tied ``lm_head.weight`` is left out (Hugging Face re-ties it from ``tie_word_embeddings``), as are
    buffers. Missing biases of a ``bias=False`` model are filled with zeros. Tensors are detached and contiguous,
    on the model's device, in its dtype.
    """
    _check_exportable(model)
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif key == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]  # vocabulary padding rows are never predicted: leave them out
        out[key] = tensor.contiguous()
    if not config.bias:
        like = state["transformer.wte.weight"]
        widths = {"ln_1": config.n_embd, "ln_2": config.n_embd, "attn.c_attn": 3 * config.n_embd}
        widths.update({"attn.c_proj": config.n_embd, "mlp.c_fc": 4 * config.n_embd, "mlp.c_proj": config.n_embd})
        for i in range(config.n_layer):
            for part, width in widths.items():
                out.setdefault(f"transformer.h.{i}.{part}.bias", like.new_zeros(width))
        out.setdefault("transformer.ln_f.bias", like.new_zeros(config.n_embd))
    return out


def _expected_hf_shapes(config: ModelConfig, n_positions: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a ``GPT2LMHeadModel`` checkpoint of this shape, without the ``transformer.`` prefix."""
    C = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (config.vocab_size, C), "wpe.weight": (n_positions, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,)})
        shapes.update({p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,)})
        shapes.update({p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,)})
        shapes.update({p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,)})
        shapes.update({p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, *, n_positions: int | None = None, where: str = "weights"
) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights as a state dict for ``GPT(config)`` (``lm_head.weight`` included, tied to wte).

    ``hf_state`` may use the ``transformer.`` prefix or not, and may hold mask buffers and a tied ``lm_head.weight``
    (both ignored; an untied head is refused). ``n_positions`` is the checkpoint's context (default
    ``config.block_size``); a smaller ``config.block_size`` keeps the first rows of ``wpe``. Raises
    :class:`HFFormatError` naming missing, unexpected or misshapen tensors (``where`` names the source in messages).
    """
    n_positions = config.block_size if n_positions is None else n_positions
    if config.block_size > n_positions:
        raise HFFormatError(f"{where}: context {config.block_size} is longer than the checkpoint's {n_positions}")
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, tensor in hf_state.items():
        short = key.removeprefix("transformer.")
        if short == "lm_head.weight":
            lm_head = tensor
        elif not _BUFFER.fullmatch(short):
            state[short] = tensor
    expected = _expected_hf_shapes(config, n_positions)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HFFormatError(
            f"{where} are not a GPT-2 language model of the configured shape: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise HFFormatError(f"{where}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
        if not all_finite(state[key]):
            raise HFFormatError(f"{where}: {key} contains NaN or infinite values; the checkpoint is unusable")
    if lm_head is not None and not torch.equal(lm_head, state["wte.weight"]):
        raise HFFormatError(f"{where}: lm_head.weight differs from wte.weight; the studio needs a tied LM head")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        elif key == "wpe.weight":
            tensor = tensor[: config.block_size]
        elif key == "wte.weight" and config.padded_vocab_size > config.vocab_size:
            padding = tensor.new_zeros(config.padded_vocab_size - config.vocab_size, tensor.size(1))
            tensor = torch.cat([tensor, padding])  # rows the studio's vocabulary padding adds, never predicted
        out[f"transformer.{key}"] = tensor.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _atomic_write_folder(out_dir: Path, files: dict[str, Any], check=None) -> None:
    """Write ``files`` (name -> callable taking a path) into a staging sibling of ``out_dir``, run ``check`` on that
    folder if given, then swap it in for ``out_dir`` (:func:`core.atomic.atomic_folder`)."""
    with atomic_folder(out_dir) as staging:
        for name, write in files.items():
            write(staging / name)
        if check is not None:
            check(staging)


def check_export_target(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """``out_dir`` as a Path if an export may be written there, else :class:`UsageError` saying why.

    A missing or empty folder is fine. A non-empty one is replaced only with ``overwrite``, and even then only if
    it holds a ``config.json`` (a model folder), so a mistyped path never deletes unrelated files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"{out_dir} is not empty; choose another output folder or pass --force to replace it")
        if not (out_dir / CONFIG_FILE).is_file():
            raise UsageError(
                f"{out_dir} is not empty and holds no {CONFIG_FILE}: refusing to replace it, even with --force"
            )
    return out_dir


def export_hf(
    model: GPT, out_dir: str | Path, *, overwrite: bool = False, source: str | None = None, verify: bool = False
) -> dict[str, Path]:
    """Write ``model`` as a Hugging Face GPT-2 folder and return ``{file name: path}`` of what was written.

    ``out_dir`` gets ``config.json``, ``model.safetensors`` (float32 unless the model is in another dtype) and
    ``generation_config.json``, written into a temporary sibling folder and renamed into place, so a failure leaves
    nothing half-written. See :func:`check_export_target` for when an existing folder is replaced. ``source``
    (e.g. ``shakespeare-gpt/3``) is recorded in the safetensors metadata. ``verify`` loads the files with
    ``transformers`` before they are moved into place and refuses them unless the logits match
    (:func:`verify_hf_export`); it needs the ``transformers`` package, the export itself does not.
    """
    out_dir = check_export_target(out_dir, overwrite=overwrite)
    if verify:
        import_transformers("checking a Hugging Face export")  # fail before writing anything
    document = hf_config_dict(model.config)
    state = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    document["torch_dtype"] = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if source:
        metadata["studio_source"] = source
    generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "pad_token_id": EOT_TOKEN}
    files = {
        CONFIG_FILE: lambda p: p.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8"),
        WEIGHTS_FILE: lambda p: save_file(state, str(p), metadata=metadata),
        GENERATION_CONFIG_FILE: lambda p: p.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8"),
    }
    _atomic_write_folder(out_dir, files, (lambda folder: verify_hf_export(model, folder)) if verify else None)
    return {name: out_dir / name for name in files}


def read_hf_config(
    directory: str | Path, *, block_size: int | None = None, dropout: float | None = None
) -> tuple[ModelConfig, int]:
    """The studio model config of a Hugging Face GPT-2 folder, and the checkpoint's own context (``n_positions``).

    Reads only ``config.json``. ``block_size`` (default ``n_positions``) may crop the context; ``dropout`` (default
    the checkpoint's ``resid_pdrop``) replaces GPT-2's three dropout probabilities. Raises :class:`HFFormatError`
    for a missing folder or file, a model type other than ``gpt2``, a vocabulary other than GPT-2's, or any setting
    the studio's GPT cannot reproduce (activation, LayerNorm epsilon, inner width, attention scaling, untied head).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise HFFormatError(f"Hugging Face model folder not found: {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise HFFormatError(f"{directory} is not a Hugging Face model folder: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise HFFormatError(f"{path} must hold a JSON object")
    if raw.get("model_type") != "gpt2":
        raise HFFormatError(f"{path}: model_type is {raw.get('model_type')!r}; only GPT-2 ('gpt2') models load")
    hf = {**_HF_DEFAULTS, **raw}
    if hf["vocab_size"] != GPT2_VOCAB_SIZE:
        raise HFFormatError(
            f"{path}: vocab_size is {hf['vocab_size']}, but the studio's GPT-2 tokenizer has {GPT2_VOCAB_SIZE} tokens"
        )
    if hf["activation_function"] not in TANH_GELU_NAMES:
        raise HFFormatError(
            f"{path}: activation_function {hf['activation_function']!r} is not supported; "
            f"the studio's GPT uses {HF_ACTIVATION} (tanh-approximated GELU)"
        )
    eps = hf["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS):
        raise HFFormatError(f"{path}: layer_norm_epsilon is {eps!r}; the studio's GPT uses {LAYER_NORM_EPS}")
    n_embd = hf["n_embd"]
    if hf["n_inner"] is not None and hf["n_inner"] != 4 * n_embd:
        raise HFFormatError(f"{path}: n_inner is {hf['n_inner']}; the studio's GPT uses 4 * n_embd")
    for flag, wanted in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if hf[flag] is not wanted:
            raise HFFormatError(f"{path}: {flag} is {hf[flag]!r}; the studio's GPT needs {wanted}")
    n_positions = hf["n_positions"]
    if not isinstance(n_positions, int) or isinstance(n_positions, bool) or n_positions <= 0:
        raise HFFormatError(f"{path}: n_positions must be a positive integer, got {n_positions!r}")
    if block_size is not None and block_size > n_positions:
        raise HFFormatError(f"context {block_size} is longer than the checkpoint's n_positions {n_positions}")
    try:
        config = ModelConfig(
            vocab_size=hf["vocab_size"],
            block_size=n_positions if block_size is None else block_size,
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=n_embd,
            dropout=hf["resid_pdrop"] if dropout is None else dropout,
            bias=True,  # GPT-2 always has biases
        )
    except ValueError as exc:
        raise HFFormatError(f"{path}: {exc}") from exc
    return config, n_positions


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a folder (one, or the shards its index names); refuses pickled weights."""
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise HFFormatError(f"{index} is not a valid safetensors index: {exc}") from exc
        shards = [directory / name for name in names]
        for shard in shards:
            if shard.parent != directory or not shard.is_file():
                raise HFFormatError(f"{index} names {shard.name}, which is not a file in {directory}")
        return shards
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise HFFormatError(
            f"{directory} holds {', '.join(pickles[:3])} but no {WEIGHTS_FILE}: pickled weights are never loaded; "
            "convert it to safetensors first (in a trusted environment: "
            "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
        )
    raise HFFormatError(f"{directory} has no {WEIGHTS_FILE}")


def load_hf_state_dict(directory: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face GPT-2 folder as a float32 state dict for ``GPT(config)``, on the CPU.

    ``config`` must have the folder's shape (n_layer, n_head, n_embd, vocabulary) and a context no longer than its
    ``n_positions`` (a shorter one keeps the first position embeddings); dropout may differ. Raises
    :class:`HFFormatError` when it does not, and for pickled, missing, corrupt or misshapen weights.
    """
    directory = Path(directory)
    hf_config, n_positions = read_hf_config(directory)
    for field in ("vocab_size", "n_layer", "n_head", "n_embd"):
        if getattr(config, field) != getattr(hf_config, field):
            raise HFFormatError(
                f"{directory} has {field} {getattr(hf_config, field)}, but the model is configured with "
                f"{getattr(config, field)}; take the shape from the checkpoint"
            )
    if config.block_size > n_positions:
        raise HFFormatError(f"context {config.block_size} is longer than {directory}'s n_positions {n_positions}")
    hf_state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        try:
            hf_state.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise HFFormatError(f"{path} is truncated or corrupt ({exc}); re-save or re-download it") from exc
    state = from_hf_state_dict(hf_state, config, n_positions=n_positions, where=str(directory))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_hf_checkpoint(
    directory: str | Path,
    *,
    block_size: int | None = None,
    dropout: float | None = None,
    device: str | torch.device = "cpu",
) -> GPT:
    """The studio GPT holding the weights of a Hugging Face GPT-2 folder, in eval mode on ``device`` (float32).

    ``block_size`` crops the context (default: the checkpoint's ``n_positions``); ``dropout`` defaults to the
    checkpoint's ``resid_pdrop``. Raises :class:`HFFormatError` as :func:`read_hf_config` and
    :func:`load_hf_state_dict` do.
    """
    config, _ = read_hf_config(directory, block_size=block_size, dropout=dropout)
    state = load_hf_state_dict(directory, config)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model.to(device).eval()


@torch.no_grad()
def verify_hf_export(model: GPT, directory: str | Path, *, tokens: int = 16, seed: int = 0) -> float:
    """Load an export with ``transformers`` and return the largest logit difference from ``model`` on random ids.

    Needs the ``transformers`` package (imported here only); raises :class:`UsageError` when it is missing, and
    :class:`HFFormatError` when the logits disagree by more than 1e-4 relative to their scale.
    """
    transformers = import_transformers("checking a Hugging Face export")
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check should not draw a loading bar; restored below
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    was_training = model.training
    model.eval()
    try:
        device = model.transformer.wte.weight.device
        generator = torch.Generator().manual_seed(seed)
        length = min(tokens, model.config.block_size)
        idx = torch.randint(0, model.config.vocab_size, (2, length), generator=generator)
        ours, _ = model(idx.to(device))
        theirs = hf_model(idx).logits
    finally:
        model.train(was_training)
    difference = float((ours.float().cpu() - theirs.float()).abs().max())
    scale = max(1.0, float(theirs.abs().max()))
    if difference > 1e-4 * scale:
        raise HFFormatError(f"the export in {directory} loads in transformers but its logits differ by {difference:g}")
    return difference
