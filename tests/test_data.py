import hashlib
import http.server
import re
import threading
from functools import partial

import numpy as np
import pytest
import torch

from core.config import DataConfig
from core.data import (
    CorpusError,
    TokenBatches,
    epoch_batches,
    prepare_corpus,
    read_corpus,
    split_text,
    store_upload,
)
from core.errors import UsageError


def test_real_corpus_split_matches_the_reference(shakespeare_path, tokenizer, tmp_path):
    corpus = prepare_corpus(DataConfig(source=str(shakespeare_path), cache_dir=str(tmp_path)), tokenizer)
    assert corpus.meta["characters"] == 1_115_394
    assert (corpus.train_tokens, corpus.val_tokens) == (301_966, 36_059)
    assert corpus.tokens("train").dtype == np.uint16
    assert len(corpus.tokens("train")) == 301_966
    assert len(corpus.tokens("val")) == 36_059
    assert corpus.meta["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_reference_sequential_order_has_165_batches_per_epoch(shakespeare_path, tokenizer):
    tokens = np.asarray(tokenizer.encode(shakespeare_path.read_text()), dtype=np.uint16)
    assert len(tokens) == 338_025
    batches = TokenBatches(tokens, batch_size=2, block_size=1024)
    assert batches.batches_per_epoch == 165


def test_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer):
    source = tmp_path / "play.txt"
    source.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    config = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"))
    first = prepare_corpus(config, tokenizer)
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = prepare_corpus(config, tokenizer)
    assert again.directory == first.directory
    assert (again.directory / "train.bin").stat().st_mtime_ns == stamp
    other = tmp_path / "other.txt"
    other.write_text("All the world's a stage, and all the men and women merely players.\n" * 50)
    second = prepare_corpus(DataConfig(source=str(other), cache_dir=str(tmp_path / "cache")), tokenizer)
    assert second.directory != first.directory
    assert (first.directory / "meta.json").exists()  # the first corpus is untouched


def test_split_is_by_characters():
    train, val = split_text("abcdefghij", 0.1)
    assert (train, val) == ("abcdefghi", "j")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"   \n\t \n", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("Ç'est la vie".encode("latin-1"), "not UTF-8"),
    ],
)
def test_unusable_corpora_are_refused(tmp_path, tokenizer, content, message):
    source = tmp_path / "bad.txt"
    source.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(DataConfig(source=str(source), cache_dir=str(tmp_path / "cache")), tokenizer)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_missing_corpus_is_refused(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(str(tmp_path / "nope.txt"), tmp_path)


def test_url_source_is_downloaded_once(tmp_path, tokenizer):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sonnets.txt").write_text("Shall I compare thee to a summer's day?\n" * 40)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/sonnets.txt"
        corpus = prepare_corpus(DataConfig(source=url, cache_dir=str(tmp_path / "cache")), tokenizer)
        assert corpus.meta["characters"] == 40 * len("Shall I compare thee to a summer's day?\n")
        (site / "sonnets.txt").unlink()  # a second prepare must not need the server's file
        again = prepare_corpus(DataConfig(source=url, cache_dir=str(tmp_path / "cache")), tokenizer)
        assert again.meta["sha256"] == corpus.meta["sha256"]
        with pytest.raises(CorpusError, match="cannot download"):
            read_corpus(url.replace("sonnets", "missing"), tmp_path / "cache")
    finally:
        server.shutdown()


def test_sequential_batches_walk_the_tokens_and_wrap():
    tokens = np.arange(50, dtype=np.uint16)
    batches = TokenBatches(tokens, batch_size=2, block_size=5)
    assert batches.batches_per_epoch == 4
    x, y = batches.next_batch()
    assert x.shape == y.shape == (2, 5)
    assert x.dtype == torch.int64
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    torch.testing.assert_close(y, x + 1)
    starts = [batches.next_batch()[0][0, 0].item() for _ in range(5)]
    assert starts == [10, 20, 30, 0, 10]  # 40 + 10 + 1 > 50 tokens: wrap to the start


def test_random_batches_are_reproducible_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = TokenBatches(tokens, batch_size=4, block_size=8, order="random", seed=7)
    b = TokenBatches(tokens, batch_size=4, block_size=8, order="random", seed=7)
    xa, ya = a.next_batch()
    torch.testing.assert_close(xa, b.next_batch()[0])
    torch.testing.assert_close(ya, xa + 1)
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    c = TokenBatches(tokens, batch_size=4, block_size=8, order="random", seed=99)
    c.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(c.next_batch()[0], want)


def test_too_short_split_asks_for_smaller_batches():
    with pytest.raises(UsageError, match="smaller batch"):
        TokenBatches(np.arange(10, dtype=np.uint16), batch_size=4, block_size=8)


def test_epoch_batches_cover_the_split_once():
    tokens = np.arange(41, dtype=np.uint16)
    batches = list(epoch_batches(tokens, batch_size=2, block_size=5))
    assert len(batches) == 4
    assert batches[-1][1][-1, -1].item() == 40


# ---- uploaded corpora ----

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\x.txt", "x"),
        ("/etc/passwd", "passwd"),
        ("C:\\Windows\\system32\\notes.txt", "notes"),
        ("evil\x00name\n.txt", "evilname"),
        ("", "corpus"),
        ("..", "corpus"),
        (".bashrc", "bashrc"),
        ("-rf.txt", "rf"),
        ("play...txt", "play"),
        ("Roméo & Juliette (1597).txt", "Rom_o_Juliette_1597"),
        ("中文.txt", "corpus"),
    ],
)
def test_uploads_get_a_safe_name_inside_the_uploads_folder(tmp_path, name, stem):
    path = store_upload(name, TEXT, tmp_path)
    uploads = (tmp_path / "uploads").resolve()
    assert path.parent == uploads
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", path.name), path.name
    assert ".." not in path.name
    assert path.name.startswith(f"{stem}-{hashlib.sha256(TEXT).hexdigest()[:16]}.")
    assert path.read_bytes() == TEXT
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [path.name]  # nothing else anywhere


def test_an_upload_is_stored_intact_and_usable_as_a_corpus(tmp_path, tokenizer):
    content = "ROMEO:\nBut soft, what light through yonder window breaks? 🌅 中文\n".encode() * 40
    path = store_upload("sonnets.txt", content, tmp_path / "data")
    assert path.parent == (tmp_path / "data" / "uploads").resolve()
    assert path.suffix == ".txt" and path.read_bytes() == content
    corpus = prepare_corpus(DataConfig(source=str(path), cache_dir=str(tmp_path / "data")), tokenizer)
    assert corpus.meta["sha256"] == hashlib.sha256(content).hexdigest()


def test_uploads_never_overwrite_each_other(tmp_path):
    first = store_upload("play.txt", TEXT, tmp_path)
    stamp = first.stat().st_mtime_ns
    other = store_upload("play.txt", TEXT + b"Speak, speak.\n", tmp_path)
    assert other != first and first.read_bytes() == TEXT
    again = store_upload("play.txt", TEXT, tmp_path)  # the same content again: the same file, not rewritten
    assert again == first and first.stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "uploads").iterdir())) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b" \n\t\n", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        (bytes(range(256)), "binary"),
        ("Ç'est la vie".encode("latin-1"), "not UTF-8"),
        ("Hamlet".encode("utf-16"), "UTF-16"),
    ],
)
def test_unusable_uploads_are_refused_and_nothing_is_written(tmp_path, content, message):
    with pytest.raises(CorpusError, match=message) as caught:
        store_upload("../../evil\n.txt", content, tmp_path)
    assert "\n" not in str(caught.value)  # the name is shown escaped, on one line
    assert not any(tmp_path.iterdir())
