"""GPT-2 BPE through tiktoken's ``gpt2`` encoding, with offline-cache handling and a streaming decoder.

tiktoken downloads the BPE files once and caches them; with ``TIKTOKEN_CACHE_DIR`` pointing at a folder that
holds them, it works offline. When neither the network nor the cache is available, :func:`get_tokenizer` raises
:class:`TokenizerUnavailable` saying exactly what to set.
"""

from __future__ import annotations

import codecs
import functools
import os

import tiktoken

from core.errors import StudioError

EOT_TOKEN = 50256
"""Id of ``<|endoftext|>`` in the GPT-2 vocabulary."""


class TokenizerUnavailable(StudioError):
    """The GPT-2 BPE files could be neither read from the cache nor downloaded."""


class Tokenizer:
    """Text <-> GPT-2 token ids. Special-token text in the input is treated as ordinary text, never as a control."""

    def __init__(self, encoding: tiktoken.Encoding):
        self._enc = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab
        self.eot = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel threads."""
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte character)."""
        return self._enc.decode_single_token_bytes(token)

    def stream_decoder(self) -> StreamDecoder:
        """A decoder that turns tokens into text one at a time without splitting a multi-byte character."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental token -> text decoding; bytes of an unfinished UTF-8 character are held until it completes."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by ``token`` (possibly empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token))

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer (loaded once per process).

    Raises :class:`TokenizerUnavailable` when the BPE files are neither cached nor downloadable.
    """
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as exc:  # requests' network errors subclass OSError; a bad hash is a ValueError
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold them" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise TokenizerUnavailable(
            "cannot load the GPT-2 BPE files: they could not be downloaded and "
            f"{where}. Connect to the internet once, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's "
            f"cached gpt2 files (vocab.bpe and encoder.json under their cache names). ({type(exc).__name__})"
        ) from exc
    return Tokenizer(encoding)
