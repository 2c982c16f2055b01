"""The Model Registry side: registering checkpoints as pickle-free pyfunc models, references, the safe loader."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from core import registry
from core.checkpoint import CheckpointError, save_checkpoint
from core.config import SampleConfig
from core.errors import StudioError
from core.model import GPT
from core.model_code import runtime_modules
from core.pyfunc_model import PARAM_NAMES, prompts_from_input, sample_config_from_params
from core.registry import RegistryError, log_and_register, parse_model_ref, resolve_model_version
from core.store import DEFAULT_MODEL_NAME, connect, ensure_experiment
from tests.conftest import REPO, TINY, cli_in_process

NAME = DEFAULT_MODEL_NAME


@pytest.fixture
def store(tmp_path, monkeypatch, new_store):
    """A fresh SQLite store, made the current one (MLFLOW_TRACKING_URI, which MLflow's own loaders follow too):
    (client, experiment id)."""
    uri = new_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = connect(uri)
    yield client, ensure_experiment(client, "test")
    registry.clear_model_cache()


def _checkpoint(tmp_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(GPT(TINY), tmp_path / f"checkpoint-{seed}")


def _model_folder(client, version) -> Path:
    uri = client.get_model_version_download_uri(version.name, version.version)
    path = registry._local_path(uri)
    assert path is not None and (path / "MLmodel").is_file()
    return path


def test_registered_version_is_linked_to_its_run_and_carries_no_pickle(store, tiny_checkpoint):
    client, experiment_id = store
    run_id = client.create_run(experiment_id).info.run_id

    version = log_and_register(client, run_id, tiny_checkpoint, alias="champion", description="first try")

    assert (version.name, int(version.version), version.status) == (NAME, 1, "READY")
    assert version.run_id == run_id
    assert version.aliases == ["champion"]
    assert version.description == "first try"
    assert client.get_run(run_id).info.status == "RUNNING"  # logging never ends the caller's run
    folder = _model_folder(client, version)
    assert sorted(p.name for p in (folder / "artifacts" / "checkpoint").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert not list(tiny_checkpoint.parent.glob(".*register*"))  # the staging folder is gone
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.metadata["studio_format"] == registry.STUDIO_FORMAT
    assert info.metadata["studio_format_version"] == registry.STUDIO_FORMAT_VERSION
    pyfunc = info.flavors["python_function"]
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("pyfunc_model.py")
    # Every generation param is declared with SampleConfig's default, so a server accepts and fills them.
    declared = {p.name: p.default for p in info.signature.params}
    defaults = SampleConfig()
    assert declared == {name: getattr(defaults, name) for name in PARAM_NAMES}
    assert [c.name for c in info.signature.inputs] == ["prompt"]
    # The logged model sits in the run's experiment (not MLflow's "current" one) and is an output of the run.
    logged = client.get_logged_model(info.model_id)
    assert (logged.experiment_id, logged.source_run_id) == (experiment_id, run_id)


def test_registering_from_inside_the_active_run_keeps_it_active(store, tiny_checkpoint):
    client, experiment_id = store
    with mlflow.start_run(experiment_id=experiment_id) as run:
        version = log_and_register(client, run.info.run_id, tiny_checkpoint)
        assert mlflow.active_run().info.run_id == run.info.run_id
    assert version.run_id == run.info.run_id
    assert version.aliases == []
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_references_resolve_to_versions(store, tmp_path):
    client, experiment_id = store
    first, second = _checkpoint(tmp_path, 1), _checkpoint(tmp_path, 2)
    run_1 = client.create_run(experiment_id).info.run_id
    run_2 = client.create_run(experiment_id).info.run_id
    log_and_register(client, run_1, first, alias="champion")
    log_and_register(client, run_2, second, alias="challenger")

    def resolved(ref):
        version = resolve_model_version(client, ref)
        return int(version.version), version.run_id

    assert resolved(NAME) == (2, run_2)  # a bare name is the latest version
    assert resolved(f"{NAME}/1") == (1, run_1)
    assert resolved(f"{NAME}@champion") == (1, run_1)
    assert resolved(f"models:/{NAME}@challenger") == (2, run_2)

    # Moving an alias re-points it; the other version loses it.
    log_and_register(client, run_2, second, alias="champion")
    assert resolved(f"{NAME}@champion") == (3, run_2)
    assert client.get_model_version(NAME, "1").aliases == []
    registry.set_alias(client, NAME, "champion", 1)
    assert resolved(f"{NAME}@champion") == (1, run_1)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("shakespeare-gpt", registry.ModelRef("shakespeare-gpt")),
        ("shakespeare-gpt/3", registry.ModelRef("shakespeare-gpt", version=3)),
        ("shakespeare-gpt@champion", registry.ModelRef("shakespeare-gpt", alias="champion")),
        (" models:/my.model@best-1 ", registry.ModelRef("my.model", alias="best-1")),
    ],
)
def test_parse_model_ref(ref, expected):
    assert parse_model_ref(ref) == expected
    assert parse_model_ref(str(expected)) == expected


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("", "empty"),
        ("name/", "positive number"),
        ("name/two", "positive number"),
        ("name/0", "positive number"),
        ("name@", "empty alias"),
        ("name@v2", "reserved"),
        ("name@latest", "reserved"),
        ("name@two words", "invalid alias"),
        ("/3", "name is empty"),
        ("a:b", "cannot contain :"),
    ],
)
def test_bad_references_are_refused_with_a_message(ref, message):
    with pytest.raises(RegistryError, match=message):
        parse_model_ref(ref)


def test_unknown_references_say_what_exists(store, tmp_path):
    client, experiment_id = store
    with pytest.raises(RegistryError, match=r"no model is registered yet .*python -m pipelines\.train"):
        resolve_model_version(client, NAME)
    with pytest.raises(RegistryError, match=r"--register-as other"):
        registry.load_registered_model(client, "other@champion")

    checkpoint = _checkpoint(tmp_path, 1)
    log_and_register(client, client.create_run(experiment_id).info.run_id, checkpoint, alias="champion")
    cases = {
        "nope": rf"no registered model named 'nope'; registered models: {NAME}$",
        f"{NAME}/7": r"has no version 7; its versions: 1$",
        f"{NAME}@staging": r"has no alias 'staging'; its aliases: @champion \(version 1\)$",
    }
    for ref, pattern in cases.items():
        with pytest.raises(RegistryError, match=pattern) as caught:
            registry.load_registered_model(client, ref)
        assert "\n" not in str(caught.value) and isinstance(caught.value, StudioError)


def test_registering_refuses_bad_input_before_logging_anything(store, tmp_path, tiny_checkpoint):
    client, experiment_id = store
    run_id = client.create_run(experiment_id).info.run_id
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        log_and_register(client, run_id, tmp_path / "empty")
    with pytest.raises(RegistryError, match="run 'no-such-run' was not found"):
        log_and_register(client, "no-such-run", tiny_checkpoint)
    with pytest.raises(RegistryError, match="reserved"):
        log_and_register(client, run_id, tiny_checkpoint, alias="latest")
    with pytest.raises(RegistryError, match="cannot contain /"):
        log_and_register(client, run_id, tiny_checkpoint, name="a/b")
    assert registry.list_registered_models(client).empty
    assert client.search_logged_models(experiment_ids=[experiment_id]) == []


def test_loaded_model_matches_the_original_and_is_cached(store, tiny_model, tiny_checkpoint, monkeypatch):
    client, experiment_id = store
    log_and_register(client, client.create_run(experiment_id).info.run_id, tiny_checkpoint, alias="champion")

    def no_download(**kwargs):
        raise AssertionError(f"a local artifact store is read in place, not downloaded: {kwargs}")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    model, version, document = registry.load_registered_model(client, f"{NAME}@champion")

    assert int(version.version) == 1 and document["format"] == "shakespeare-gpt-checkpoint"
    assert model.config == TINY and not model.training
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], tiny_model(idx)[0])
    again, _, _ = registry.load_registered_model(client, f"{NAME}/1")
    assert again is model  # same (tracking URI, name, version): served from the cache
    registry.clear_model_cache()
    assert registry.load_registered_model(client, NAME)[0] is not model


def test_a_remote_store_downloads_only_the_mlmodel_and_the_checkpoint(store, tiny_model, tiny_checkpoint, monkeypatch):
    client, experiment_id = store
    log_and_register(client, client.create_run(experiment_id).info.run_id, tiny_checkpoint)
    base = client.get_model_version_download_uri(NAME, "1")
    downloaded = []
    real_download = mlflow.artifacts.download_artifacts

    def recording_download(artifact_uri, dst_path, tracking_uri):
        downloaded.append(artifact_uri.removeprefix(f"{base}/"))
        return real_download(artifact_uri=artifact_uri, dst_path=dst_path, tracking_uri=tracking_uri)

    monkeypatch.setattr(registry, "_local_path", lambda uri: None)  # behave as if the artifacts were remote
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", recording_download)
    model, _, _ = registry.load_registered_model(client, NAME)
    assert downloaded == ["MLmodel", "artifacts/checkpoint/config.json", "artifacts/checkpoint/model.safetensors"]
    expected = tiny_model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in model.state_dict().items())
    idx = torch.arange(8).unsqueeze(0)
    with torch.no_grad():  # BLAS may round differently for weights at another memory alignment: close, not equal
        torch.testing.assert_close(model(idx)[0], tiny_model(idx)[0], rtol=1e-5, atol=1e-6)


def _spring_trap(marker: str) -> mlflow.pyfunc.PythonModel:
    """Called by the unpickler: leaves a marker file, proving the pickle was loaded."""
    Path(marker).write_text("unpickled")
    return mlflow.pyfunc.PythonModel()


class _PickleTrap(mlflow.pyfunc.PythonModel):
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _spring_trap, (self.marker,)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input


def test_a_pickled_pyfunc_is_refused_and_never_unpickled(store, tmp_path, monkeypatch):
    client, experiment_id = store
    marker = tmp_path / "unpickled.marker"
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=_PickleTrap(marker),
            pip_requirements=["mlflow"],  # no requirement inference, which would load the model
            # Even with the studio's marker, a pickled python model must be refused.
            metadata={"studio_format": registry.STUDIO_FORMAT, "studio_format_version": 1},
            registered_model_name=NAME,
        )
    marker.unlink(missing_ok=True)

    with pytest.raises(RegistryError, match="pickled python model"):
        registry.load_registered_model(client, NAME)
    assert not marker.exists()

    # The trap is real: MLflow's own loader, with pickles allowed, does unpickle it.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert marker.exists()


def _mlmodel(**pyfunc_overrides) -> dict:
    pyfunc = {
        "loader_module": "mlflow.pyfunc.loaders.code_model",
        "model_code_path": "/somewhere/pyfunc_model.py",
        "artifacts": {"checkpoint": {"path": "artifacts/checkpoint"}},
        "cloudpickle_version": "3.1.0",
    }
    pyfunc.update(pyfunc_overrides)
    return {
        "metadata": {"studio_format": registry.STUDIO_FORMAT, "studio_format_version": 1},
        "flavors": {"python_function": pyfunc},
    }


def test_check_studio_mlmodel():
    assert registry.check_studio_mlmodel(_mlmodel(), "m/1") == "artifacts/checkpoint"
    refused = {
        "not registered by this studio": {"flavors": _mlmodel()["flavors"]},
        "studio_format_version 2": {
            **_mlmodel(),
            "metadata": {"studio_format": registry.STUDIO_FORMAT, "studio_format_version": 2},
        },
        "no python_function flavor": {**_mlmodel(), "flavors": {"pytorch": {}}},
        "pickled python model": _mlmodel(python_model="python_model.pkl"),
        "no usable 'checkpoint'": _mlmodel(artifacts={"checkpoint": {"path": "../../../etc"}}),
        "no usable": _mlmodel(artifacts={"checkpoint": {"path": "/etc"}}),
        "no readable MLmodel": ["not", "a", "mapping"],
    }
    for message, document in refused.items():
        with pytest.raises(RegistryError, match=message):
            registry.check_studio_mlmodel(document, "m/1")
    with pytest.raises(RegistryError, match="not a pyfunc model from code"):
        registry.check_studio_mlmodel(_mlmodel(model_code_path=None, loader_module="mlflow.pyfunc.model"), "m/1")


def test_list_registered_models(store, tmp_path):
    client, experiment_id = store
    empty = registry.list_registered_models(client)
    assert empty.empty
    assert list(empty.columns) == ["name", "version", "aliases", "run_id", "created", "status", "description", "tags"]

    checkpoint = _checkpoint(tmp_path, 1)
    run_1 = client.create_run(experiment_id).info.run_id
    run_2 = client.create_run(experiment_id).info.run_id
    log_and_register(client, run_1, checkpoint, alias="champion")
    log_and_register(client, run_2, checkpoint, alias="challenger", description="longer training")
    log_and_register(client, run_2, checkpoint, name="other", alias="best")
    client.set_registered_model_alias(NAME, "stable", "1")

    table = registry.list_registered_models(client)
    assert list(zip(table["name"], table["version"], strict=True)) == [("other", 1), (NAME, 2), (NAME, 1)]
    assert list(table["aliases"]) == ["best", "challenger", "champion, stable"]
    assert list(table["run_id"]) == [run_2, run_2, run_1]
    assert list(table["description"]) == ["", "longer training", ""]
    assert set(table["status"]) == {"READY"}
    assert all(isinstance(tags, dict) for tags in table["tags"])  # each version's own tags
    assert pd.api.types.is_datetime64_any_dtype(table["created"]) and table["created"].is_monotonic_decreasing


def test_pyfunc_input_and_params_are_validated():
    assert prompts_from_input(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert prompts_from_input([{"prompt": "a"}, "b"]) == ["a", "b"]
    assert prompts_from_input({"prompt": "a"}) == ["a"]
    assert prompts_from_input("a") == ["a"]
    for bad in (pd.DataFrame({"text": ["a"]}), [], [" "], {"other": 1}, 3):
        with pytest.raises(MlflowException) as caught:
            prompts_from_input(bad)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"

    assert sample_config_from_params(None) == SampleConfig()
    # A server fills every declared param; null means the default, except top_k where it means "no limit".
    filled = {
        "max_new_tokens": 5,
        "num_samples": 2,
        "temperature": 0.5,
        "top_k": None,
        "top_p": 0.9,
        "seed": None,
        "stop_at_eot": False,
    }
    assert sample_config_from_params(filled) == SampleConfig(5, 2, 0.5, None, 0.9, None, False)
    with pytest.raises(MlflowException, match=r"temperature must be a number >= 0 \(0 = greedy\), got -1"):
        sample_config_from_params({"temperature": -1})
    with pytest.raises(MlflowException, match="unknown param"):
        sample_config_from_params({"temprature": 1.0})


def test_pyfunc_predict_answers_any_text_and_refuses_bad_requests_as_invalid(tiny_model, monkeypatch):
    """What a scoring server answers with HTTP 400 (INVALID_PARAMETER_VALUE), checked on predict itself."""
    from core.pyfunc_model import ShakespeareGPTModel

    pyfunc = ShakespeareGPTModel()
    pyfunc.model = tiny_model  # as load_context leaves it
    prompts = ["🎭 中文 \x00\x1b[0m", "Now is the winter of our discontent " * 20]
    out = pyfunc.predict(None, pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 3, "num_samples": 2})
    assert list(out["prompt"]) == [prompts[0]] * 2 + [prompts[1]] * 2
    assert all(text.startswith(prompt) for prompt, text in zip(out["prompt"], out["text"], strict=True))

    bad_requests = [
        ("ROMEO:", {"num_samples": 17}, "num_samples must be between 1 and 16"),
        ("ROMEO:", {"max_new_tokens": 0}, "max_new_tokens must be between 1 and 4096"),
        ("ROMEO:", {"top_p": 1.5}, "top_p must be in"),
        ("ROMEO:", {"top_k": 0}, "top_k must be a positive integer"),
        ("ROMEO:", {"seed": -1}, "seed must be a non-negative integer"),
        (pd.DataFrame({"prompt": ["ROMEO:", "  "]}), {}, "prompt 1 is empty"),
        # JSON may carry a lone "\udce9" (as records: a pandas string column cannot even hold it).
        ([{"prompt": "caf\udce9"}], {"max_new_tokens": 2}, "lone surrogate"),
    ]
    for model_input, params, message in bad_requests:
        with pytest.raises(MlflowException, match=message) as caught:
            pyfunc.predict(None, model_input, params=params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")

    monkeypatch.setattr(tiny_model, "forward", exhausted)
    with pytest.raises(MlflowException, match=r"allocation of 2.00 GiB failed\); ask for fewer samples") as caught:
        pyfunc.predict(None, pd.DataFrame({"prompt": ["ROMEO:"]}), params={"num_samples": 16})
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def _clean_env(store_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=store_uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    # The scoring server is started as `uvicorn`, found on PATH: make the venv's scripts visible.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


PYFUNC_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    # The studio's editable install would find the repository's core anywhere: hide it, so that only the code the
    # model ships can be imported.
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
    import mlflow, pandas as pd
    from mlflow.exceptions import MlflowException
    model = mlflow.pyfunc.load_model("models:/shakespeare-gpt@champion")
    import core
    shipped = sorted(os.listdir(os.path.dirname(core.__file__)))
    out = model.predict(pd.DataFrame({"prompt": ["ROMEO:", "JULIET:"]}),
                        params={"max_new_tokens": 5, "num_samples": 2, "seed": 7})
    try:
        model.predict(pd.DataFrame({"prompt": ["ROMEO:"]}), params={"temperature": -1.0})
        error = None
    except MlflowException as exc:
        error = exc.message
    print(json.dumps({"rows": out.to_dict("records"), "error": error, "core": core.__file__, "shipped": shipped}))
    """
)


def test_mlflow_loads_the_pyfunc_without_pickle(store, tiny_checkpoint, tmp_path):
    client, experiment_id = store
    log_and_register(client, client.create_run(experiment_id).info.run_id, tiny_checkpoint, alias="champion")
    # Run from an empty folder: the model must bring the `core` package along as code, not find it in the repo.
    result = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT],
        cwd=tmp_path,
        env=_clean_env(client.tracking_uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    rows = answer["rows"]
    assert [(r["prompt"], r["sample_index"]) for r in rows] == [
        ("ROMEO:", 0),
        ("ROMEO:", 1),
        ("JULIET:", 0),
        ("JULIET:", 1),
    ]
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in rows)
    assert {r["seed"] for r in rows} == {7}
    assert answer["error"] == "temperature must be a number >= 0 (0 = greedy), got -1.0"
    # The model brought its own runtime, and only that: no training loop, jobs or sweeps.
    assert str(REPO) not in answer["core"]
    shipped = {name.removesuffix(".py") for name in answer["shipped"] if name.endswith(".py")}
    assert shipped == {"__init__", *runtime_modules()}
    assert not {"trainer", "jobs", "sweep", "experiment"} & shipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="stops the server through its process group")
def test_mlflow_models_serve_answers_generation_requests(store, tiny_checkpoint, tmp_path):
    client, experiment_id = store
    log_and_register(client, client.create_run(experiment_id).info.run_id, tiny_checkpoint, alias="champion")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=_clean_env(client.tracking_uri),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the uvicorn worker goes down with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "the scoring server did not start within 120 s"
            time.sleep(0.5)

        status, answer = _post(
            f"{base}/invocations",
            {
                "dataframe_records": [{"prompt": "ROMEO:"}],
                "params": {"max_new_tokens": 20, "temperature": 0.8, "num_samples": 2},
            },
        )
        assert status == 200, answer
        rows = answer["predictions"]
        assert [r["sample_index"] for r in rows] == [0, 1]
        assert all(r["text"].startswith("ROMEO:") and len(r["text"]) > len("ROMEO:") for r in rows)

        status, answer = _post(
            f"{base}/invocations", {"dataframe_records": [{"prompt": "ROMEO:"}], "params": {"temperature": -1}}
        )
        assert status == 400
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "temperature must be a number >= 0 (0 = greedy), got -1" in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_registered_model_with_damaged_weights_is_refused_in_one_line(store, tmp_path, damage):
    """Weights damaged in the store after registration: the loader (and the generate CLI) says which file is wrong,
    loads nothing and changes nothing stored."""
    from safetensors.torch import load_file, save_file

    client, experiment_id = store
    log_and_register(client, client.create_run(experiment_id).info.run_id, _checkpoint(tmp_path, 1))
    [weights] = (_model_folder(client, client.get_model_version(NAME, "1")) / "artifacts").rglob("model.safetensors")
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        tensors = load_file(weights)
        tensors["transformer.wte.weight"][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    damaged = weights.read_bytes()

    with pytest.raises(CheckpointError, match="NaN" if damage == "nan" else "safetensors"):
        registry.load_registered_model(client, f"{NAME}/1")
    done = cli_in_process("pipelines.generate", "--model", f"{NAME}/1", "--prompt", "ROMEO:")  # the current store
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert weights.read_bytes() == damaged and client.get_model_version(NAME, "1").status == "READY"
