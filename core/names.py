"""The one rule for the names of registered models and their aliases, wherever they are typed: a flag, the Train
form, a sweep, a model reference, the registry itself. Refusals are :class:`UsageError` (one line, a ValueError too,
so a config's ``__post_init__`` raises them as they are)."""

from __future__ import annotations

import re

from core.errors import UsageError

NEW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""A name the studio registers a new model under: safe in paths, URLs and MLflow's search filters."""
ALIAS = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]{0,254}")
"""An alias MLflow accepts: letters, digits, '_' and '-', not starting with a digit (MLflow reads those as
versions)."""
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)
"""Aliases MLflow keeps for itself."""
_NOT_IN_REFERENCES = "/:@'\""


def check_model_name(name: object, *, new: bool = True) -> str:
    """``name`` (stripped) if usable: a ``new`` name must match :data:`NEW_NAME`; an existing model's name (made by
    any MLflow client) only has to be free of the characters that would make a reference ambiguous."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("the model name is empty; give a registered model name, e.g. 'shakespeare-gpt'")
    name = name.strip()
    bad = sorted({c for c in name if c in _NOT_IN_REFERENCES})
    if bad:  # '/' and ':' MLflow refuses itself; '@' would make references ambiguous, quotes break search filters
        raise UsageError(f"invalid model name {name!r}: it cannot contain {' '.join(bad)}")
    if new and NEW_NAME.fullmatch(name) is None:
        raise UsageError(f"model name {name!r} is invalid: use letters, digits, '-', '_' or '.' (at most 128)")
    return name


def check_alias(alias: object) -> str:
    """``alias`` if MLflow accepts it and does not keep it for itself."""
    if not isinstance(alias, str) or ALIAS.fullmatch(alias) is None:
        raise UsageError(
            f"invalid alias {alias!r}: use 1-255 letters, digits, '_' or '-', not starting with a digit "
            "(e.g. 'champion')"
        )
    if RESERVED_ALIAS.fullmatch(alias):
        raise UsageError(
            f"alias {alias!r} is reserved by MLflow ('latest' and 'v<number>'); choose another, e.g. champion"
        )
    return alias
