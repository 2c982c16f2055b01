"""The memorisation meter: exact figures on tiny corpora, the suffix array against brute force, one index per corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import memorization
from core.config import DataConfig
from core.data import prepare_corpus
from core.memorization import (
    INDEX_FILE,
    SPAN_TOKENS,
    CopyIndex,
    CopyReport,
    build_suffix_array,
    index_for,
    naive_longest_matches,
)

TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n"
    "MERCUTIO:\nA plague o' both your houses! They have made worms' meat of me.\n\n"
) * 3


@pytest.fixture
def corpus(tmp_path, tokenizer):
    source = tmp_path / "scene.txt"
    source.write_text(TEXT)
    return prepare_corpus(DataConfig(source=str(source), cache_dir=str(tmp_path / "data")), tokenizer)


@pytest.fixture
def train(corpus) -> np.ndarray:
    return np.asarray(corpus.tokens("train"), dtype=np.int64)


def absent_tokens(train: np.ndarray, count: int) -> list[int]:
    """Token ids that never occur in ``train``."""
    present = set(train.tolist())
    return [t for t in range(1000, 50_000) if t not in present][:count]


def brute_force_longest(tokens: list[int], query: list[int]) -> list[int]:
    """For each position of ``query``, the longest prefix of its rest occurring in ``tokens``, by trying them all."""
    best = []
    for i in range(len(query)):
        length = 0
        for j in range(len(tokens)):
            k = 0
            while i + k < len(query) and j + k < len(tokens) and tokens[j + k] == query[i + k]:
                k += 1
            length = max(length, k)
        best.append(length)
    return best


def test_a_sample_copied_from_the_training_split_is_all_copied(corpus, train, tokenizer):
    copied = train[10:60]
    report = index_for(corpus).report(copied, tokenizer)
    text = tokenizer.decode(copied.tolist())
    assert report.tokens == 50 and report.spans == 50 - SPAN_TOKENS + 1 == 43
    assert report.copied_spans == 43 and report.copied_share == 1.0
    assert report.longest_copy_chars == len(text) and report.longest_copy_text == text
    assert report.longest_copy_tokens == 50


def test_a_sample_of_tokens_never_in_the_corpus_copies_nothing(corpus, train, tokenizer):
    report = index_for(corpus).report(absent_tokens(train, 20), tokenizer)
    assert (report.spans, report.copied_spans, report.copied_share) == (13, 0, 0.0)
    assert (report.longest_copy_tokens, report.longest_copy_chars, report.longest_copy_text) == (0, 0, "")


def test_a_partly_copied_sample_gives_the_exact_counts(corpus, train, tokenizer):
    first, second = train[5:17], train[40:49]  # 12 and 9 copied tokens
    sample = np.concatenate([first, absent_tokens(train, 3), second])  # 24 tokens, 17 spans
    report = index_for(corpus).report(sample, tokenizer)
    # Spans inside the first run start at 0..4 (5 of them), inside the second at 15..16 (2); the rest hold an absent
    # token.
    assert (report.tokens, report.spans, report.copied_spans) == (24, 17, 7)
    assert report.copied_share == pytest.approx(7 / 17)
    longest = max((tokenizer.decode(run.tolist()) for run in (first, second)), key=len)
    assert report.longest_copy_text == longest and report.longest_copy_chars == len(longest)
    assert report.summary() == f"copied: {100 * 7 / 17:.1f}% of 17 8-token spans, longest {len(longest)} chars"


def test_a_sample_shorter_than_a_span_has_no_share(corpus, train, tokenizer):
    report = index_for(corpus).report(train[:5], tokenizer)
    assert (report.spans, report.copied_spans, report.copied_share) == (0, 0, None)
    assert report.longest_copy_chars == len(tokenizer.decode(train[:5].tolist()))
    assert set(report.metrics()) == {"sample_longest_copy_chars"}
    assert report.summary().startswith("copied: no 8-token spans in 5 token(s)")
    empty = index_for(corpus).report_text("", tokenizer)
    assert (empty.tokens, empty.spans, empty.copied_share, empty.longest_copy_chars) == (0, 0, None, 0)


def test_text_is_measured_in_the_tokenizer_s_tokens(corpus, tokenizer):
    index = index_for(corpus)
    text = " wherefore art thou Romeo?\nDeny thy father and refuse thy name."
    assert index.report_text(text, tokenizer) == index.report(tokenizer.encode(text), tokenizer)
    assert index.report_text(text, tokenizer).copied_share == 1.0
    report = index.report_text(" Wherefore dost thou quarrel, Tybalt, with a plague upon thy name?", tokenizer)
    assert report.copied_share == 0.0 and 0 < report.longest_copy_chars < 20


def test_the_report_is_json_ready_and_gives_the_trainer_s_metrics(corpus, train, tokenizer):
    report = index_for(corpus).report(train[:30], tokenizer)
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()
    assert set(report.to_dict()) == {f.name for f in CopyReport.__dataclass_fields__.values()}
    assert report.metrics() == {"sample_copied_share": 1.0, "sample_longest_copy_chars": report.longest_copy_chars}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=60),
    st.lists(st.integers(0, 4), min_size=0, max_size=30),
)
def test_the_suffix_array_search_agrees_with_brute_force(tokens, query):
    order = build_suffix_array(np.array(tokens))
    assert order.tolist() == sorted(range(len(tokens)), key=lambda i: tokens[i:])
    index = CopyIndex(tokens)
    expected = brute_force_longest(tokens, query)
    assert index.longest_matches(query).tolist() == expected
    assert naive_longest_matches(np.array(tokens), query).tolist() == expected


def test_long_repeats_and_long_matches_cross_the_comparison_chunks():
    tokens = [1, 2] * 40 + [3] + [1, 2] * 40  # repeats far longer than one 16-token comparison round
    query = [1, 2] * 30 + [3, 1, 2, 1]
    assert CopyIndex(tokens).longest_matches(query).tolist() == brute_force_longest(tokens, query)
    assert build_suffix_array(np.array(tokens)).tolist() == sorted(range(len(tokens)), key=lambda i: tokens[i:])


def test_the_index_is_built_once_per_corpus_and_kept_beside_the_token_cache(corpus, tokenizer, monkeypatch):
    first = index_for(corpus)
    hits = memorization._cached_index.cache_info().hits
    assert index_for(corpus) is first
    assert memorization._cached_index.cache_info().hits == hits + 1
    saved = corpus.directory / INDEX_FILE
    assert np.array_equal(np.load(saved, allow_pickle=False), first.suffix_array)

    # Another process (an empty memory cache) loads the saved array instead of building one.
    memorization._cached_index.cache_clear()

    def no_build(tokens):
        raise AssertionError("the saved suffix array should have been loaded")

    monkeypatch.setattr(memorization, "build_suffix_array", no_build)
    loaded = index_for(corpus)
    assert loaded is not first and np.array_equal(loaded.suffix_array, first.suffix_array)


@pytest.mark.parametrize("damage", ["garbage", "shuffled", "short", "float"])
def test_a_saved_index_that_does_not_fit_is_rebuilt(corpus, damage):
    expected = index_for(corpus).suffix_array.copy()
    saved = corpus.directory / INDEX_FILE
    if damage == "garbage":
        saved.write_bytes(b"not an npy file")
    else:
        bad = {
            "shuffled": np.random.default_rng(1).permutation(expected).astype(np.int32),
            "short": expected[:-1],
            "float": expected.astype(np.float64),
        }[damage]
        np.save(saved, bad)
    memorization._cached_index.cache_clear()
    assert np.array_equal(index_for(corpus).suffix_array, expected)
    assert np.array_equal(np.load(saved, allow_pickle=False), expected)  # and the file is repaired


def test_training_data_follows_the_run_then_the_default(monkeypatch):
    monkeypatch.setenv("SHAKESPEARE_SOURCE", "/corpora/default.txt")
    assert memorization.training_data({}).source == "/corpora/default.txt"
    run = {"data_source": "/corpora/run.txt", "val_fraction": "0.2"}
    assert (memorization.training_data(run).source, memorization.training_data(run).val_fraction) == (
        "/corpora/run.txt",
        0.2,
    )
    assert memorization.training_data(run, "/corpora/given.txt").source == "/corpora/given.txt"


def test_a_corpus_the_model_did_not_train_on_is_noted(corpus):
    assert memorization.corpus_mismatch(corpus, None) is None
    assert memorization.corpus_mismatch(corpus, corpus.meta["sha256"]) is None
    assert "trained on other data" in memorization.corpus_mismatch(corpus, "f" * 64)
