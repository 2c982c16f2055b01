"""The memorisation meter: how much of a generated text is copied verbatim from the training split.

For a sample, :class:`CopyReport` gives the share of its 8-token spans (:data:`SPAN_TOKENS`) that occur verbatim in
the training tokens, and its longest copied span: the longest run of its tokens found verbatim anywhere in the
training split, measured in characters, with the text itself. A model that writes rather than copies keeps the share
under :data:`COPY_SHARE_GOAL` (5%); held-out Shakespeare itself shares a few of its spans with the training split
(stock phrases, speaker names), so 0% is not the target either.

**What is measured.** Only the generated continuation, never the prompt: the prompt is the user's text, and a span
straddling it would count a quoted prompt (``ROMEO:``) as the model's copying. The continuation is measured as
text: it is encoded with the corpus's tokenizer (the canonical tokenization, as the training split was encoded),
so a model that spells a copied phrase with other tokens still counts as copying it. A continuation of ``n``
tokens has ``max(0, n - 7)`` spans; one shorter than 8 tokens has none, and its share is ``None`` (not 0: nothing
could be measured), while its longest copied span is still reported. Characters are those of the decoded tokens
(a byte sequence that is not UTF-8 on its own counts as one U+FFFD).

**How.** :class:`CopyIndex` holds a suffix array of the training token ids (built by prefix doubling in numpy:
about a quarter of a second for Tiny Shakespeare's 302k tokens on a laptop core). For every position of a
sample, a binary search finds where the sample's remaining tokens would sort among the training suffixes; the
longest prefix they share with a training suffix is the longer of the common prefixes with the two neighbours
there. All positions of a sample are searched together in lockstep (numpy, no Python loop per position), so a
200-token sample costs a few milliseconds, against a scan of the training tokens per position.
:func:`index_for` builds the index of a :class:`core.data.PreparedCorpus` once: it is kept in memory per corpus
(keyed by the corpus folder and its content's sha256) and saved beside the token cache as ``train.sa.npy``
(numpy's format, never pickle; checked on load, rebuilt when it does not fit).

No Streamlit and no MLflow here: the Generate page, ``pipelines.generate``, the trainer and the benchmark call in.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.atomic import write_bytes
from core.config import TINY_SHAKESPEARE_URL, DataConfig
from core.data import PreparedCorpus
from core.tokenizer import Tokenizer

SPAN_TOKENS = 8
"""Length of the spans whose verbatim occurrence in the training split counts as copying."""
COPY_SHARE_GOAL = 0.05
"""The goal: a model that writes keeps under this share of its spans copied."""
INDEX_FILE = "train.sa.npy"
"""The suffix array's file in a corpus cache folder (int32, numpy's ``.npy`` format)."""
INDEX_CACHE_SIZE = 4
"""Indexes kept in memory (Tiny Shakespeare's takes 2.4 MB: its tokens and its suffix array)."""
METRIC_SHARE = "sample_copied_share"
"""Metric the trainer logs for each periodic sample: its :attr:`CopyReport.copied_share`."""
METRIC_LONGEST = "sample_longest_copy_chars"
"""Metric the trainer logs for each periodic sample: its :attr:`CopyReport.longest_copy_chars`."""

_CHUNK = 16  # tokens compared per vectorised round; most comparisons end within the first few
_VALIDATE_PAIRS = 2048  # adjacent suffix pairs re-checked when a saved suffix array is loaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyReport:
    """How much of one sample's continuation occurs verbatim in the training split (see the module docstring)."""

    tokens: int
    """Tokens of the measured continuation."""
    spans: int
    """Its 8-token spans: ``max(0, tokens - 7)``."""
    copied_spans: int
    """Spans found verbatim in the training split."""
    copied_share: float | None
    """``copied_spans / spans``; None when the continuation has no span (fewer than 8 tokens)."""
    longest_copy_tokens: int
    """Tokens of the longest run found verbatim in the training split, longest in characters (0: no token of the
    continuation occurs there)."""
    longest_copy_chars: int
    """Characters of that run."""
    longest_copy_text: str
    """The copied text itself."""

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The figures the trainer logs: :data:`METRIC_SHARE` (only when there are spans) and :data:`METRIC_LONGEST`."""
        metrics = {METRIC_LONGEST: float(self.longest_copy_chars)}
        if self.copied_share is not None:
            metrics[METRIC_SHARE] = self.copied_share
        return metrics

    def summary(self) -> str:
        """One line, e.g. ``copied: 3.1% of 193 8-token spans, longest 41 chars``."""
        if self.copied_share is None:
            share = f"no {SPAN_TOKENS}-token spans in {self.tokens} token(s)"
        else:
            share = f"{100 * self.copied_share:.1f}% of {self.spans} {SPAN_TOKENS}-token spans"
        return f"copied: {share}, longest {self.longest_copy_chars} chars"


def build_suffix_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """The suffix array of ``tokens``: the start positions of its suffixes in lexicographic order (int32), a suffix
    that is a prefix of another sorting first.

    Prefix doubling: the suffixes are ranked by their first 1, 2, 4, ... tokens, each round one sort of (rank of the
    first half, rank of the second half) pairs, until every rank is distinct: O(n log n · log L) for a longest
    repeat of L tokens, all in numpy.
    """
    t = np.asarray(tokens)
    n = len(t)
    if n == 0:
        return np.empty(0, dtype=np.int32)
    if n >= 2**31:
        raise ValueError(f"{n} tokens are too many for an int32 suffix array")
    rank = t.astype(np.int64) + 1  # 0 stands for "past the end", which sorts before every token
    k = 1
    while True:
        following = np.zeros(n, dtype=np.int64)
        if k < n:
            following[: n - k] = rank[k:]
        # Ranks never exceed max(n, vocabulary + 1), so the pair fits an int64 for any corpus the cache can hold.
        key = rank * (int(rank.max()) + 1) + following
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate(([1], 1 + np.cumsum(ordered[1:] != ordered[:-1])))
        rank = new_rank
        if rank.max() == n or k >= n:  # all distinct: the order is final
            return order.astype(np.int32)
        k *= 2


def _compare(x: np.ndarray, x_starts: np.ndarray, y: np.ndarray, y_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row r, the suffixes ``x[x_starts[r]:]`` and ``y[y_starts[r]:]``: the length of their common prefix
    and the sign of their comparison (-1: the x suffix sorts first, 0: equal, 1: the y suffix sorts first).

    Vectorised over rows, :data:`_CHUNK` tokens a round; only rows still equal go on to the next round.
    """
    rows = len(x_starts)
    lcp = np.zeros(rows, dtype=np.int64)
    sign = np.zeros(rows, dtype=np.int64)
    pending = np.arange(rows)
    columns = np.arange(_CHUNK)
    nx, ny = len(x), len(y)
    offset = 0
    while pending.size:
        xi = x_starts[pending, None] + offset + columns
        yi = y_starts[pending, None] + offset + columns
        xv = np.where(xi < nx, x[np.minimum(xi, nx - 1)], -1)  # -1: past the end, below every token
        yv = np.where(yi < ny, y[np.minimum(yi, ny - 1)], -1)
        stop = (xv != yv) | (xv < 0)  # a difference, or the x suffix ended (both ended: equal)
        ended = stop.any(axis=1)
        first = stop.argmax(axis=1)[ended]
        done = pending[ended]
        lcp[done] = offset + first
        sign[done] = np.sign(xv[ended, first] - yv[ended, first])
        pending = pending[~ended]
        offset += _CHUNK
    return lcp, sign


class CopyIndex:
    """A suffix array over the training split's token ids, answering "how long a run of these tokens occurs
    verbatim in the training split, from each position" (:meth:`longest_matches`) and :meth:`report`."""

    def __init__(self, tokens: Sequence[int] | np.ndarray, suffix_array: np.ndarray | None = None):
        """Index ``tokens``; ``suffix_array`` is theirs when already built (it is trusted: see :func:`index_for`)."""
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.suffix_array = build_suffix_array(self.tokens) if suffix_array is None else suffix_array
        if self.suffix_array.shape != self.tokens.shape:
            raise ValueError(f"suffix array of {self.suffix_array.shape} for {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    def longest_matches(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """For each position i of ``ids``, the largest L such that ``ids[i:i+L]`` occurs verbatim in the training
        tokens (int64 array of ``len(ids)``; 0 where even ``ids[i]`` does not occur)."""
        query = np.asarray(ids, dtype=np.int64)
        m, n = len(query), len(self.tokens)
        if m == 0 or n == 0:
            return np.zeros(m, dtype=np.int64)
        starts = np.arange(m)
        sa = self.suffix_array
        # Lockstep binary search for every position: the first suffix that does not sort before the query.
        lo = np.zeros(m, dtype=np.int64)
        hi = np.full(m, n, dtype=np.int64)
        while True:
            active = np.flatnonzero(lo < hi)
            if not active.size:
                break
            mid = (lo[active] + hi[active]) // 2
            _, sign = _compare(query, starts[active], self.tokens, sa[mid].astype(np.int64))
            after = sign > 0  # the query sorts after this suffix: look right of it
            lo[active[after]] = mid[after] + 1
            hi[active[~after]] = mid[~after]
        # The suffix sharing the longest prefix with the query sorts right before or right at its place.
        best = np.zeros(m, dtype=np.int64)
        for neighbour in (lo - 1, lo):
            valid = np.flatnonzero((neighbour >= 0) & (neighbour < n))
            lcp, _ = _compare(query, starts[valid], self.tokens, sa[neighbour[valid]].astype(np.int64))
            best[valid] = np.maximum(best[valid], lcp)
        return best

    def report(self, ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer) -> CopyReport:
        """The :class:`CopyReport` of the token ids ``ids`` (characters counted with ``tokenizer``'s decoding)."""
        ids = np.asarray(ids, dtype=np.int64)
        return report_from_matches(ids, self.longest_matches(ids), tokenizer)

    def report_text(self, text: str, tokenizer: Tokenizer) -> CopyReport:
        """The :class:`CopyReport` of ``text``, a generated continuation (without its prompt), encoded with
        ``tokenizer`` (which must be the one that encoded the training split)."""
        return self.report(tokenizer.encode(text), tokenizer)


def report_from_matches(ids: np.ndarray, matches: np.ndarray, tokenizer: Tokenizer) -> CopyReport:
    """The :class:`CopyReport` of ``ids`` given ``matches``, the longest verbatim match from each position (as
    :meth:`CopyIndex.longest_matches` or :func:`naive_longest_matches` gives it)."""
    ids = np.asarray(ids, dtype=np.int64)
    matches = np.asarray(matches, dtype=np.int64)
    spans = max(0, len(ids) - SPAN_TOKENS + 1)
    copied = int(np.count_nonzero(matches[:spans] >= SPAN_TOKENS))
    longest_text, longest_tokens = "", 0
    # Characters are not additive over tokens (a character split across tokens), so every run is decoded; a sample
    # has at most a few hundred.
    for start in np.flatnonzero(matches):
        length = int(matches[start])
        text = tokenizer.decode(ids[start : start + length].tolist())
        if len(text) > len(longest_text) or (len(text) == len(longest_text) and length > longest_tokens):
            longest_text, longest_tokens = text, length
    return CopyReport(
        tokens=len(ids),
        spans=spans,
        copied_spans=copied,
        copied_share=copied / spans if spans else None,
        longest_copy_tokens=longest_tokens,
        longest_copy_chars=len(longest_text),
        longest_copy_text=longest_text,
    )


def naive_longest_matches(tokens: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """What :meth:`CopyIndex.longest_matches` computes, by scanning the training tokens once per position of ``ids``
    (no index): the reference the benchmark times the index against."""
    tokens = np.asarray(tokens)
    query = np.asarray(ids, dtype=np.int64)
    best = np.zeros(len(query), dtype=np.int64)
    for i in range(len(query)):
        candidates = np.flatnonzero(tokens == query[i])
        length = 0
        while candidates.size:
            length += 1
            if i + length == len(query):
                break
            candidates = candidates[candidates + length < len(tokens)]
            candidates = candidates[tokens[candidates + length] == query[i + length]]
        best[i] = length
    return best


# -- one index per corpus -------------------------------------------------------------------------------------------


def index_for(corpus: PreparedCorpus, *, save: bool = True) -> CopyIndex:
    """The :class:`CopyIndex` of ``corpus``'s training split, built once per corpus and process.

    Kept in memory (the last :data:`INDEX_CACHE_SIZE` corpora, keyed by the cache folder and the content's sha256)
    and, with ``save``, in ``<corpus folder>/train.sa.npy``, which later processes load instead of building. A
    saved file that does not fit the tokens (another length or dtype, not a permutation, out of order) is rebuilt.
    A folder that cannot be written only costs the saving (a warning is logged): the index is still returned.
    """
    return _cached_index(str(Path(corpus.directory).resolve()), corpus.meta["sha256"], save)


@functools.lru_cache(maxsize=INDEX_CACHE_SIZE)
def _cached_index(directory: str, sha256: str, save: bool) -> CopyIndex:
    tokens = np.fromfile(Path(directory) / "train.bin", dtype=np.uint16).astype(np.int32)
    path = Path(directory) / INDEX_FILE
    loaded = _load_suffix_array(path, tokens)
    if loaded is not None:
        return CopyIndex(tokens, loaded)
    index = CopyIndex(tokens)
    if save:
        buffer = io.BytesIO()
        np.save(buffer, index.suffix_array, allow_pickle=False)
        try:
            write_bytes(path, buffer.getvalue())
        except OSError as exc:
            log.warning("could not save the copy index to %s (it is rebuilt next time): %s", path, exc)
    return index


def _load_suffix_array(path: Path, tokens: np.ndarray) -> np.ndarray | None:
    """The suffix array saved at ``path`` if it is one of ``tokens``; None when there is none or it does not fit."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:  # truncated or not an .npy file: rebuild it
        log.warning("ignoring the unreadable copy index %s: %s", path, exc)
        return None
    if not _is_suffix_array(array, tokens):
        log.warning("ignoring the copy index %s: it is not the suffix array of the training split", path)
        return None
    return array


def _is_suffix_array(array: np.ndarray, tokens: np.ndarray) -> bool:
    """Whether ``array`` is (very probably) the suffix array of ``tokens``: int32, a permutation, sorted by first
    token, and a sample of adjacent suffixes in strict order (checking every pair would cost a build)."""
    n = len(tokens)
    if array.dtype != np.int32 or array.shape != (n,):
        return False
    if n == 0:
        return True
    if array.min() < 0 or array.max() >= n or np.bincount(array, minlength=n).max() != 1:
        return False
    if np.any(np.diff(tokens[array].astype(np.int64)) < 0):
        return False
    if n < 2:
        return True
    pairs = np.random.default_rng(0).integers(0, n - 1, size=min(_VALIDATE_PAIRS, n - 1))
    _, sign = _compare(tokens, array[pairs].astype(np.int64), tokens, array[pairs + 1].astype(np.int64))
    return bool(np.all(sign < 0))


def default_source() -> str:
    """The corpus the studio trains on unless told otherwise: ``$SHAKESPEARE_SOURCE``, else Tiny Shakespeare's URL."""
    return os.environ.get("SHAKESPEARE_SOURCE") or TINY_SHAKESPEARE_URL


def training_data(params: dict[str, str], source: str | None = None) -> DataConfig:
    """The data config of the training split a run trained on, from its logged ``params`` (``data_source`` and
    ``val_fraction``, as :func:`core.experiment.run_params` logs them): ``source`` when given, else the run's
    ``data_source``, else :func:`default_source`; the run's ``val_fraction``, else the default split."""
    chosen = source or params.get("data_source") or default_source()
    if "val_fraction" in params:
        return DataConfig(source=chosen, val_fraction=float(params["val_fraction"]))
    return DataConfig(source=chosen)


def corpus_mismatch(corpus: PreparedCorpus, trained_sha256: str | None) -> str | None:
    """A one-line note when ``corpus`` is not the content a model trained on (its run's ``dataset_sha256`` tag),
    so its figures do not say how much the model copies; None when they match or the run does not say."""
    sha = corpus.meta["sha256"]
    if not trained_sha256 or trained_sha256 == sha:
        return None
    return (
        f"the model was trained on other data (sha256 {trained_sha256[:12]}…) than {corpus.meta['source']} "
        f"(sha256 {sha[:12]}…): the copy figures are against the latter"
    )
