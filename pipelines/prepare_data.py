"""Download (or read) a corpus, split it 90/10 by characters, and cache its GPT-2 token ids as uint16 arrays.

Usage: python -m pipelines.prepare_data [--source PATH|URL] [--out DIR] [--val-fraction F] [--json]

With no --source it downloads Tiny Shakespeare (1,115,394 characters → 301,966 train / 36,059 val tokens).
Any UTF-8 text file works the same way. The cache folder is keyed by the content hash, so re-running is instant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pipelines.cli import ArgumentParser, add_config_flags, given_fields, run

CORPUS_FIELDS = ("source", "cache_dir", "val_fraction")
CORPUS_FLAGS = {"cache_dir": "--out"}


def build_parser() -> ArgumentParser:
    from core.config import DataConfig

    parser = ArgumentParser(prog="python -m pipelines.prepare_data", description=__doc__.splitlines()[0])
    add_config_flags(
        parser,
        DataConfig,
        CORPUS_FIELDS,
        flags=CORPUS_FLAGS,
        metavars={"source": "PATH|URL", "cache_dir": "DIR"},
        defaults={"source": "the Tiny Shakespeare URL"},
    )
    parser.add_argument("--json", action="store_true", help="print the cache's metadata as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.config import DataConfig
    from core.data import prepare_corpus
    from core.tokenizer import get_tokenizer

    config = DataConfig(**given_fields(args, CORPUS_FIELDS, flags=CORPUS_FLAGS))
    corpus = prepare_corpus(config, get_tokenizer())
    meta = corpus.meta
    if args.json:
        print(json.dumps({**meta, "directory": str(corpus.directory)}))
        return 0
    print(f"corpus:  {meta['source']} ({meta['characters']:,} characters, sha256 {meta['sha256'][:16]}…)")
    print(f"train:   {meta['train_tokens']:,} tokens ({meta['train_characters']:,} characters)")
    print(f"val:     {meta['val_tokens']:,} tokens ({meta['val_characters']:,} characters)")
    print(f"cached:  {corpus.directory}")
    return 0


if __name__ == "__main__":
    run(main)
