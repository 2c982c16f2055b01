"""The studio's MLflow pyfunc model, logged as code ("models from code"), so nothing about it is ever pickled.

MLflow executes this file when it loads the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``); the
last line hands it the model object with :func:`mlflow.models.set_model`. The weights and config travel as the
``checkpoint`` artifact (a checkpoint folder: ``model.safetensors`` + ``config.json``) and the ``core`` package as
code, so loading works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. :mod:`core.registry` logs it.

Input: a DataFrame with a ``prompt`` column (a list of prompts, a list of ``{"prompt": ...}`` records, a
``{"prompt": [...]}`` dict or a single string are accepted too). Params (all optional; defaults are
:class:`core.config.SampleConfig`'s): ``max_new_tokens``, ``num_samples``, ``temperature``, ``top_k`` (null: no
limit), ``top_p``, ``seed`` (null: a fresh one, reported per row) and ``stop_at_eot``. Output: one row per prompt and
sample with columns ``prompt``, ``sample_index``, ``text`` (the prompt followed by its continuation) and ``seed``.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

from core.checkpoint import load_checkpoint
from core.config import SampleConfig
from core.device import resolve_device
from core.errors import StudioError
from core.sampling import generate
from core.tokenizer import get_tokenizer

PROMPT_COLUMN = "prompt"
OUTPUT_COLUMNS = ("prompt", "sample_index", "text", "seed")
PARAM_NAMES = ("max_new_tokens", "num_samples", "temperature", "top_k", "top_p", "seed", "stop_at_eot")
"""The generation params the model accepts: exactly the fields of SampleConfig."""
DEVICE_ENV = "SHAKESPEARE_GPT_DEVICE"
"""Environment variable choosing where a loaded pyfunc runs (``auto``, ``cpu``, ``cuda``, ``mps``; default auto)."""


def model_signature():
    """The MLflow signature: a string ``prompt`` column in, the output columns out, and every generation param
    with SampleConfig's default (``seed`` and ``top_k`` may be null), so a scoring server accepts and fills them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = SampleConfig()
    kinds = {
        "max_new_tokens": "long",
        "num_samples": "long",
        "temperature": "double",
        "top_k": "long",
        "top_p": "double",
        "seed": "long",
        "stop_at_eot": "boolean",
    }
    return ModelSignature(
        inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("long", "sample_index"),
                ColSpec("string", "text"),
                ColSpec("long", "seed"),
            ]
        ),
        params=ParamSchema([ParamSpec(name, kinds[name], getattr(defaults, name)) for name in PARAM_NAMES]),
    )


def prompts_from_input(model_input: Any) -> list[str]:
    """The prompts in ``model_input`` (see the module docstring for accepted shapes), in order.

    Raises ``MlflowException`` (INVALID_PARAMETER_VALUE, which a scoring server answers with HTTP 400) when the input
    holds no ``prompt`` column or a prompt is not a non-empty string.
    """
    if isinstance(model_input, str):
        prompts: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input needs a {PROMPT_COLUMN!r} column; got columns {list(model_input.columns)}"
            )
        prompts = model_input[PROMPT_COLUMN].tolist()
    elif isinstance(model_input, dict):
        if PROMPT_COLUMN not in model_input:
            raise MlflowException.invalid_parameter_value(
                f"the input needs a {PROMPT_COLUMN!r} key; got keys {sorted(model_input)}"
            )
        value = model_input[PROMPT_COLUMN]
        prompts = [value] if isinstance(value, str) else list(value)
    elif isinstance(model_input, (list, tuple)):
        prompts = [item.get(PROMPT_COLUMN) if isinstance(item, dict) else item for item in model_input]
    else:
        raise MlflowException.invalid_parameter_value(
            f"the input must be a DataFrame with a {PROMPT_COLUMN!r} column, got {type(model_input).__name__}"
        )
    if not prompts:
        raise MlflowException.invalid_parameter_value("the input holds no prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise MlflowException.invalid_parameter_value(
                f"prompt {i} is empty or not text ({prompt!r}); give some text to continue, e.g. 'ROMEO:'"
            )
    return prompts


def sample_config_from_params(params: dict[str, Any] | None) -> SampleConfig:
    """A validated :class:`SampleConfig` from request params; missing or null values take SampleConfig's defaults,
    except ``top_k`` where an explicit null means no limit.

    Raises ``MlflowException`` (INVALID_PARAMETER_VALUE) with SampleConfig's message for a bad value, and for
    unknown param names.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise MlflowException.invalid_parameter_value(
            f"unknown param(s) {', '.join(unknown)}; known: {', '.join(PARAM_NAMES)}"
        )
    # A serving signature fills every declared param; null there means "use the default" (seed: a fresh one).
    values = {k: v for k, v in params.items() if v is not None or k == "top_k"}
    try:
        return SampleConfig(**values)
    except (TypeError, ValueError) as exc:
        raise MlflowException.invalid_parameter_value(str(exc)) from exc


class ShakespeareGPTModel(mlflow.pyfunc.PythonModel):
    """Generates Shakespeare-style continuations with a studio checkpoint; see the module docstring for I/O."""

    def __init__(self) -> None:
        self.model = None
        self.document: dict[str, Any] = {}

    def load_context(self, context) -> None:
        """Load the ``checkpoint`` artifact (safetensors + JSON, never pickle) onto ``$SHAKESPEARE_GPT_DEVICE``."""
        device = resolve_device(os.environ.get(DEVICE_ENV, "auto"))
        self.model, self.document = load_checkpoint(context.artifacts["checkpoint"], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per prompt × sample: ``prompt``, ``sample_index``, ``text`` (prompt + continuation), ``seed``.

        A given ``seed`` is used for every prompt, so a prompt's samples do not depend on the other prompts in the
        request. Invalid input or params raise ``MlflowException`` with INVALID_PARAMETER_VALUE (HTTP 400 when
        served) carrying the studio's one-line message.
        """
        if self.model is None:
            raise MlflowException("the model is not loaded: load_context was not called", error_code=INTERNAL_ERROR)
        prompts = prompts_from_input(model_input)
        config = sample_config_from_params(params)
        try:
            tokenizer = get_tokenizer()
        except StudioError as exc:  # the BPE files are missing on the serving machine: say what to set
            raise MlflowException(str(exc), error_code=INTERNAL_ERROR) from exc
        rows = []
        for prompt in prompts:
            try:
                result = generate(self.model, tokenizer, prompt, config)
            except (StudioError, ValueError) as exc:
                raise MlflowException.invalid_parameter_value(str(exc)) from exc
            for index, text in enumerate(result.samples):
                rows.append({"prompt": prompt, "sample_index": index, "text": text, "seed": result.seed})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(ShakespeareGPTModel())
