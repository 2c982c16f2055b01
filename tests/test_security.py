"""Safe defaults: the app's server settings, no unpickling anywhere in the code, and a pickle-free registry loader."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SCANNED = ("core", "pipelines", "app")
"""Every module the studio runs (tests may build pickles on purpose, to prove they are refused)."""

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {
    "torch.load",
    "torch.serialization.load",
    "mlflow.pytorch.load_model",
    "mlflow.pyfunc.load_model",  # unpickles a python_model.pkl; core.registry reads the safetensors itself
    "pandas.read_pickle",
    "numpy.lib.format.read_array",
}


def test_the_app_listens_on_loopback_with_xsrf_on_and_a_small_upload_cap():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "127.0.0.1"  # reachable from this machine only (an SSH tunnel for others)
    assert server["enableXsrfProtection"] is True
    assert server["enableCORS"] is True  # Streamlit's CORS protection: on
    assert 0 < server["maxUploadSize"] <= 50  # MB; Streamlit's default is 200
    assert config["browser"]["serverAddress"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False


def unpickling_uses(source: str) -> list[str]:
    """``line: what`` for every import of an unpickling module and every call that unpickles in ``source``, in order."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> the dotted name it stands for
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
                if top in UNPICKLING_MODULES:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if node.module.split(".")[0] in UNPICKLING_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in UNPICKLING_CALLS or (name or "").endswith("read_pickle"):
            found.append((node.lineno, f"{name}()"))
        elif name == "numpy.load" and _is_true(keywords.get("allow_pickle")):
            found.append((node.lineno, "numpy.load(allow_pickle=True)"))
        elif "weights_only" in keywords and not _is_true(keywords["weights_only"]):
            found.append((node.lineno, f"{name}(weights_only=False)"))
    return [f"{line}: {what}" for line, what in sorted(found)]


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a call's function, its first part replaced by what the module imported under that name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_scan_finds_every_way_of_unpickling():
    planted = """\
import pickle
import cloudpickle as cp
from joblib import load as jl
import torch
import torch as t
from torch import load
import numpy as np
import pandas as pd
import mlflow
from mlflow import pyfunc
t.load("x.pt")
load("y.pt")
torch.load("z.pt", weights_only=True)
np.load("a.npy", allow_pickle=True)
np.load("b.npy")
pd.read_pickle("c.pkl")
mlflow.pyfunc.load_model("models:/m/1")
pyfunc.load_model("models:/m/2")
mlflow.pytorch.load_model("models:/m/3")
something.open(weights_only=False)
"""
    assert unpickling_uses(planted) == [
        "1: import pickle",
        "2: import cloudpickle",
        "3: from joblib import ...",
        "11: torch.load()",
        "12: torch.load()",
        "13: torch.load()",
        "14: numpy.load(allow_pickle=True)",
        "16: pandas.read_pickle()",
        "17: mlflow.pyfunc.load_model()",
        "18: mlflow.pyfunc.load_model()",
        "19: mlflow.pytorch.load_model()",
        "20: something.open(weights_only=False)",
    ]
    safe = "import numpy as np\nnp.load('b.npy')\nfrom safetensors.torch import load_file\nload_file('m.safetensors')\n"
    assert unpickling_uses(safe) == []


def test_no_module_of_the_studio_unpickles():
    files = sorted(path for folder in SCANNED for path in (REPO / folder).rglob("*.py"))
    assert len(files) > 20
    found = {}
    for path in files:
        if uses := unpickling_uses(path.read_text(encoding="utf-8")):
            found[str(path.relative_to(REPO))] = uses
    assert found == {}


def test_the_registry_loads_a_model_with_pickle_deserialisation_disabled(studio_store, monkeypatch):
    from core.config import SampleConfig
    from core.registry import clear_model_cache, load_registered_model
    from core.sampling import generate
    from core.store import connect
    from core.tokenizer import get_tokenizer

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    clear_model_cache()
    try:
        model, version, document = load_registered_model(connect(studio_store), "shakespeare-gpt@champion")
    finally:
        clear_model_cache()
    assert (version.name, int(version.version)) == ("shakespeare-gpt", 1)
    assert document["format"] == "shakespeare-gpt-checkpoint"
    result = generate(model, get_tokenizer(), "ROMEO:", SampleConfig(max_new_tokens=5, seed=0))
    assert result.samples[0].startswith("ROMEO:") and result.new_tokens == [5]
