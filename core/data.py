"""Corpus loading, the 90/10 character split, the uint16 token cache, and batch iterators.

A prepared corpus lives in ``<cache_dir>/<sha256[:16]>/`` (the source's content hash) as ``train.bin`` and
``val.bin`` (uint16 token ids) plus ``meta.json`` (counts, source, hash). Preparing the same content again reuses
the cache; a different file gets its own folder, so nothing already prepared is overwritten. A corpus uploaded in
the studio is checked like any other and kept as ``<cache_dir>/uploads/<safe name>-<sha256[:16]>.<ext>``
(:func:`store_upload`), a local file like any other from then on.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.atomic import write_bytes
from core.config import DataConfig
from core.errors import StudioError, UsageError
from core.tokenizer import Tokenizer

CACHE_FORMAT_VERSION = 1
DOWNLOAD_LIMIT_BYTES = 512 * 2**20
UPLOADS_FOLDER = "uploads"
"""Sub-folder of the cache folder that holds uploaded corpora (see :func:`store_upload`)."""
UPLOAD_STEM_CHARS = 64
UPLOAD_SUFFIX_CHARS = 10


class CorpusError(UsageError):
    """The corpus cannot be used: missing, unreadable, empty, binary or not UTF-8."""


@dataclass(frozen=True)
class PreparedCorpus:
    """A tokenised, split corpus on disk."""

    directory: Path
    """Folder holding train.bin, val.bin and meta.json."""
    meta: dict
    """Counts and provenance: source, sha256, characters, train/val tokens and characters."""

    @property
    def train_tokens(self) -> int:
        return self.meta["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["val_tokens"]

    def tokens(self, split: str) -> np.ndarray:
        """Memory-mapped uint16 token ids of ``split`` ('train' or 'val')."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return np.memmap(self.directory / f"{split}.bin", dtype=np.uint16, mode="r")


def is_url(source: str) -> bool:
    """Whether ``source`` is an http(s) address rather than a local path."""
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _download(url: str, cache_dir: Path) -> Path:
    """Fetch ``url`` once into ``cache_dir/downloads`` and return the local file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "corpus.txt"
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = cache_dir / "downloads" / f"{key}-{name}"
    if target.exists():
        return target
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read(DOWNLOAD_LIMIT_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CorpusError(
            f"cannot download {url}: {reason}. Check the network, or give the path of a local copy of the file instead"
        ) from exc
    if len(data) > DOWNLOAD_LIMIT_BYTES:
        raise CorpusError(f"{url} is larger than {DOWNLOAD_LIMIT_BYTES // 2**20} MiB; download it and pass its path")
    write_bytes(target, data)
    return target


def read_corpus(source: str, cache_dir: str | Path = "data") -> tuple[str, str, Path]:
    """Text, sha256 and local path of the corpus at ``source`` (a path or an http(s) URL, fetched once).

    Raises :class:`CorpusError` for a missing, empty, whitespace-only, binary or non-UTF-8 file.
    """
    path = _download(source, Path(cache_dir)) if is_url(source) else Path(source).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus file not found: {source}")
    if not path.is_file():
        raise CorpusError(f"corpus source is not a file: {source}")
    raw = path.read_bytes()
    return decode_corpus(raw, source), hashlib.sha256(raw).hexdigest(), path


def decode_corpus(raw: bytes, source: str) -> str:
    """The text of a corpus file's bytes; ``source`` names it in messages.

    Raises :class:`CorpusError` for empty, whitespace-only, binary (NUL bytes) or non-UTF-8 content.
    """
    # Windows editors save "Unicode" text as UTF-16 with a byte-order mark: its NUL bytes are not a binary file.
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise CorpusError(f"{source} is UTF-16 (or UTF-32) text; save it as UTF-8")
    if b"\x00" in raw:
        raise CorpusError(f"{source} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{source} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8") from exc
    if not text.strip():
        raise CorpusError(f"{source} is empty or only whitespace; give a text file with content")
    return text


def upload_file_name(name: str, sha256: str) -> str:
    """A safe file name for an uploaded corpus called ``name`` (as the browser sent it) with content hash ``sha256``.

    Only the last path component is kept (``/`` and ``\\`` both separate), control characters are dropped, each run
    of other characters outside ``[A-Za-z0-9._-]`` becomes one ``_``, runs of dots collapse (no ``..``) and leading
    dots and dashes go (no hidden files, nothing that reads as an option). The stem is never empty (``corpus``) and
    ends in ``-<sha256[:16]>``, so different contents never share a name, whatever they were called.
    """
    base = re.split(r"[/\\]", name)[-1]
    base = "".join(c for c in base if c.isprintable())  # NUL, newlines, escapes and other control characters
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
    base = re.sub(r"\.{2,}", ".", base).lstrip(".-")
    stem, dot, suffix = base.rpartition(".")
    if not dot:  # no extension at all
        stem, suffix = base, "txt"
    stem = stem.strip("._-")[:UPLOAD_STEM_CHARS] or "corpus"
    suffix = suffix.strip("_-")[:UPLOAD_SUFFIX_CHARS] or "txt"
    return f"{stem}-{sha256[:16]}.{suffix}"


def store_upload(name: str, data: bytes, cache_dir: str | Path = "data") -> Path:
    """Store an uploaded corpus under ``<cache_dir>/uploads/`` and return its path, to use as a corpus source.

    The content is checked as :func:`read_corpus` checks a file (not empty, not binary, UTF-8) before anything is
    written, and the file name comes from :func:`upload_file_name`, so a name can neither leave the folder nor
    replace another upload. The same content uploaded again under the same name returns the stored file unchanged.
    Raises :class:`CorpusError` for unusable content (nothing is written then).
    """
    shown = repr(name) if name else "the uploaded file"
    if len(data) > DOWNLOAD_LIMIT_BYTES:
        raise CorpusError(f"{shown} is larger than {DOWNLOAD_LIMIT_BYTES // 2**20} MiB; give a smaller text file")
    decode_corpus(data, shown)
    directory = (Path(cache_dir) / UPLOADS_FOLDER).resolve()
    target = directory / upload_file_name(name, hashlib.sha256(data).hexdigest())
    if target.parent != directory:  # cannot happen with a sanitised name; never write outside the folder anyway
        raise CorpusError(f"refusing to store {shown} outside {directory}")
    if not target.is_file():
        write_bytes(target, data)
    return target


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters for training, the rest for validation (nanoGPT's split)."""
    n_train = int(len(text) * (1 - val_fraction))
    return text[:n_train], text[n_train:]


def prepare_corpus(config: DataConfig, tokenizer: Tokenizer) -> PreparedCorpus:
    """Read, split and tokenise ``config.source`` into the token cache, or reuse the cache if it already exists.

    Both splits must hold at least two tokens; the vocabulary must fit in uint16.
    """
    if tokenizer.n_vocab > 2**16:
        raise StudioError(f"vocabulary of {tokenizer.n_vocab} tokens does not fit the uint16 token cache")
    text, sha, path = read_corpus(config.source, config.cache_dir)
    directory = Path(config.cache_dir) / f"{sha[:16]}-v{round(config.val_fraction * 1000):03d}"
    meta_path = directory / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == CACHE_FORMAT_VERSION and meta.get("sha256") == sha:
            return PreparedCorpus(directory, meta)

    train_text, val_text = split_text(text, config.val_fraction)
    train_ids, val_ids = tokenizer.encode_batch([train_text, val_text])
    for split, ids in (("train", train_ids), ("val", val_ids)):
        if len(ids) < 2:
            raise CorpusError(
                f"{config.source} is too short: its {split} split has {len(ids)} token(s); give a longer text"
            )
    write_bytes(directory / "train.bin", np.asarray(train_ids, dtype=np.uint16).tobytes())
    write_bytes(directory / "val.bin", np.asarray(val_ids, dtype=np.uint16).tobytes())
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "source": config.source,
        "local_path": str(path),
        "name": path.stem,
        "sha256": sha,
        "tokenizer": tokenizer.name,
        "val_fraction": config.val_fraction,
        "characters": len(text),
        "train_characters": len(train_text),
        "val_characters": len(val_text),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
    }
    # meta.json is written last: its presence marks a complete cache.
    write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return PreparedCorpus(directory, meta)


class TokenBatches:
    """Batches ``(x, y)`` of shape (B, T) cut from a 1-D token array, where y is x shifted by one token.

    ``sequential`` walks the tokens in consecutive B·T windows as the reference does and wraps to the start once
    fewer than B·T + 1 tokens remain: an epoch is ``(n_tokens - 1) // (B·T)`` batches. ``random`` draws B windows
    at independent random offsets, reproducibly from the seed. ``state_dict`` / ``load_state_dict`` capture the
    position so a resumed run continues with the same batches.

    In a job of ``world_size`` processes, every process walks the same global batches of ``batch_size ×
    world_size`` rows and reads only its own shard of them, rows ``[rank · B, (rank + 1) · B)``: together the
    processes see exactly the batches one process with ``batch_size × world_size`` would see.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        order: str = "sequential",
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        if order not in ("sequential", "random"):
            raise ValueError(f"order must be 'sequential' or 'random', got {order!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        global_batch = batch_size * world_size
        needed = global_batch * block_size + 1 if order == "sequential" else block_size + 1
        if len(tokens) < needed:
            per_rank = f" × {world_size} processes" if world_size > 1 else ""
            raise UsageError(
                f"the corpus split has {len(tokens)} tokens, too few for batch_size={batch_size}{per_rank} × "
                f"block_size={block_size} ({needed} needed); use a smaller batch or block size or a longer corpus"
            )
        self.tokens = tokens
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.block_size = block_size
        self.order = order
        self.position = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def batches_per_epoch(self) -> int:
        """Number of distinct sequential batches in one pass over the tokens."""
        return (len(self.tokens) - 1) // (self.batch_size * self.world_size * self.block_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) of this process's shard, both int64 of shape (B, T)."""
        B, T = self.batch_size, self.block_size
        global_rows = B * self.world_size
        if self.order == "sequential":
            start = self.position + self.rank * B * T
            window = torch.from_numpy(self.tokens[start : start + B * T + 1].astype(np.int64))
            self.position += global_rows * T
            if self.position + global_rows * T + 1 > len(self.tokens):
                self.position = 0
            return window[:-1].view(B, T), window[1:].view(B, T)
        # Every process draws the whole global batch's offsets, so the generators stay in step, and keeps its rows.
        all_starts = torch.randint(len(self.tokens) - T, (global_rows,), generator=self.generator)
        starts = all_starts[self.rank * B : (self.rank + 1) * B].tolist()
        rows = [torch.from_numpy(self.tokens[s : s + T + 1].astype(np.int64)) for s in starts]
        stacked = torch.stack(rows)  # (B, T+1)
        return stacked[:, :-1], stacked[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position and RNG state, enough to continue with the same batches."""
        return {"position": self.position, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.generator.set_state(state["rng"])


def epoch_batches(tokens: np.ndarray, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sequential (x, y) batch of one pass over ``tokens``, in order (used for evaluation)."""
    B, T = batch_size, block_size
    for start in range(0, len(tokens) - B * T, B * T):
        window = torch.from_numpy(tokens[start : start + B * T + 1].astype(np.int64))
        yield window[:-1].view(B, T), window[1:].view(B, T)
