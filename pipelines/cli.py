"""Shared plumbing for the command-line entry points: one-line errors and exit codes, and flags derived from the
config dataclasses (:func:`add_config_flags`: a field, its default and its help are written once, in core).

A user mistake (bad argument, bad file, missing cache) prints ``error: <what to do>`` on stderr and exits 2;
it never shows a traceback. A failure of the MLflow store (an ``MlflowException``: a broken database, a server
error) prints ``error: MLflow: <message>`` and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from core.errors import StudioError

USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message instead of the usage block."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # "--time-budget -5m" is a value to refuse with its own message, not an unknown option "-5m": argparse lets a
        # negative number through as a value, and this widens what counts as one to numbers with a unit.
        self._negative_number_matcher = re.compile(r"^-\d*\.?\d+[a-z]*$")

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def duration(text: str) -> float:
    """argparse type: a duration such as ``90s``, ``10m`` or ``1h`` (see :func:`core.config.parse_duration`), in
    seconds."""
    from core.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_json_file(path: str, what: str) -> Any:
    """The JSON document in ``path``; a missing or unreadable file or bad JSON raises :class:`UsageError` naming
    ``what`` (the option that gave the path)."""
    import json

    from core.errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{what} {path}: not a readable JSON file ({exc})") from None


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run ``main`` and exit with its code, turning user errors into one line and exit code 2."""
    try:
        code = main(argv)
    except (StudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except Exception as exc:
        if not _is_mlflow_error(exc):
            raise
        print(f"error: MLflow: {getattr(exc, 'message', exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def _is_mlflow_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``MlflowException`` (checked without importing MLflow into tools that never use it)."""
    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(exc, module.MlflowException)


_SCALAR_TYPES = {"int": int, "float": float, "str": str}
_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`")  # :class:`core.lm_head.SharedRows` -> SharedRows


@functools.cache
def field_docs(config_type: type) -> dict[str, str]:
    """The docstring of each field of a config dataclass (the string literal under it), on one line, with the
    reStructuredText markup taken out."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(config_type)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = _ROLE.sub(r"\1", " ".join(following.value.value.split())).replace("``", "")
            docs[node.target.id] = text
    return docs


def add_config_flags(
    group: argparse._ActionsContainer,
    config_type: type,
    names: Sequence[str],
    *,
    flags: dict[str, str] | None = None,
    types: dict[str, Callable[[str], Any]] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
    metavars: dict[str, str] | None = None,
    prefix: str = "",
    show_defaults: bool = True,
    defaults: dict[str, str] | None = None,
) -> None:
    """Add a ``--field-name`` option to ``group`` for each field ``names`` of the dataclass ``config_type``.

    Its help is the field's docstring and ``(default X)`` from the dataclass; its type comes from the annotation
    (``bool`` fields get ``--x/--no-x``) unless ``types`` names another parser (e.g. :func:`positive_int`). The
    option's value defaults to None, "not given", so that whoever builds the config can tell a choice from a default
    (a preset's recipe fills what is not given). ``flags`` renames an option (``{"source": "--data"}``; its
    destination is then the flag's name). ``prefix`` goes before each help text; ``show_defaults=False`` leaves the
    class default out (fields a preset sets); ``defaults`` says in words what a field defaults to where the entry
    point derives it (``{"block_size": "the model's context"}``).
    """
    flags, types, choices, metavars = flags or {}, types or {}, choices or {}, metavars or {}
    defaults = defaults or {}
    fields = {field.name: field for field in dataclasses.fields(config_type)}
    docs = field_docs(config_type)
    for name in names:
        field = fields[name]  # a KeyError here is a typo in the entry point, found by its --help test
        flag = flags.get(name, "--" + name.replace("_", "-"))
        annotation = str(field.type).replace(" | None", "")
        doc = docs.get(name, "").replace("%", "%%")
        help_text = prefix + (doc[:1].lower() + doc[1:] if prefix else doc)
        if name in defaults:
            help_text += f" (default: {defaults[name]})"
        elif show_defaults and field.default not in (dataclasses.MISSING, None, False):
            shown = (
                f"{field.default:,}" if isinstance(field.default, int) and field.default >= 10_000 else field.default
            )
            help_text += f" (default {shown})"
        options: dict[str, Any] = {"default": None, "help": help_text, "dest": _destination(flag)}
        if annotation == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = types.get(name, _SCALAR_TYPES.get(annotation, str))
            if name in choices:
                options["choices"] = choices[name]
            if name in metavars:
                options["metavar"] = metavars[name]
        group.add_argument(flag, **options)


def given_fields(args: argparse.Namespace, names: Sequence[str], *, flags: dict[str, str] | None = None) -> dict:
    """The fields ``names`` whose flags (added by :func:`add_config_flags` with the same ``flags``) were given, by
    field name: what a config is built from, so every field not given keeps its dataclass default."""
    flags = flags or {}
    values = {name: getattr(args, _destination(flags.get(name, "--" + name.replace("_", "-")))) for name in names}
    return {name: value for name, value in values.items() if value is not None}


def _destination(flag: str) -> str:
    """The argparse destination of option ``flag`` (``--eot-stop`` → ``eot_stop``)."""
    return flag.lstrip("-").replace("-", "_")
