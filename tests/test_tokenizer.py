import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SAMPLES = [
    "To be, or not to be, that is the question:",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
    "Emoji 🎭🗡️👑 and a family 👨‍👩‍👧",
    "中文：生存还是毁灭，这是一个问题。日本語と한국어",
    "tabs\tand\r\ncontrol \x07 characters",
]


def test_gpt2_vocabulary(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert tokenizer.eot == 50256


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tokenizer.decode(ids) == text


def test_known_encoding(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_special_token_text_is_ordinary_text(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b")
    assert tokenizer.eot not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b"


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Multi-byte characters span several tokens here, so some pieces must have been held back.
    if any(ord(ch) > 0x7FF for ch in text):
        assert any(len(tokenizer.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)


def test_missing_cache_and_network_gives_an_actionable_message(tmp_path):
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        # A proxy on a closed loopback port makes every download fail at once, online or not.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    script = (
        "from core.tokenizer import get_tokenizer, TokenizerUnavailable\n"
        "try:\n    get_tokenizer()\nexcept TokenizerUnavailable as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TIKTOKEN_CACHE_DIR" in out.stdout
    assert str(tmp_path / "empty-cache") in out.stdout
