"""Shared plumbing for the command-line entry points: one-line errors and exit codes.

A user mistake (bad argument, bad file, missing cache) prints ``error: <what to do>`` on stderr and exits 2;
it never shows a traceback. A failure of the MLflow store (an ``MlflowException``: a broken database, a server
error) prints ``error: MLflow: <message>`` and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

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
