"""The MLflow Model Registry side of the studio: register trained checkpoints, resolve references, load safely.

A checkpoint folder is logged to its training run as an MLflow pyfunc model *from code* (:mod:`core.pyfunc_model`):
the weights stay in safetensors, the config in JSON, and the model class travels as source, so nothing is pickled
and ``mlflow models serve -m models:/NAME@ALIAS`` works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. Each
registration is a new version of the registered model, linked to the run, optionally under an alias such as
``champion``. The MLmodel carries :data:`STUDIO_FORMAT` in its metadata to mark the model as the studio's own.

References name a version: ``NAME`` (the latest version), ``NAME/3`` or ``NAME@champion`` (an optional
``models:/`` prefix is accepted). A reference to something that does not exist raises :class:`RegistryError`
saying what does.

:func:`load_registered_model` is the studio's own loader. It never calls ``mlflow.pyfunc.load_model`` and never
unpickles: it reads the version's MLmodel with ``yaml.safe_load``, refuses models without the studio marker or
with a pickled python model, and loads only ``model.safetensors`` and ``config.json`` via
:func:`core.checkpoint.load_checkpoint` (in place when the artifacts are on a local disk).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import pandas as pd
import torch
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, read_checkpoint_config
from core.errors import StudioError, UsageError
from core.model import GPT
from core.model_code import stage_runtime_code
from core.names import check_alias, check_model_name
from core.store import DEFAULT_MODEL_NAME, all_pages, fluent_tracking_uri, quiet_artifacts

STUDIO_FORMAT = "shakespeare-gpt-pyfunc"
"""Value of ``studio_format`` in the MLmodel metadata of every model this studio logs."""
STUDIO_FORMAT_VERSION = 1
"""Value of ``studio_format_version`` in that metadata; the loader accepts only this version."""
MODEL_NAME_IN_RUN = "model"
"""The ``name`` the pyfunc model is logged under."""
CHECKPOINT_ARTIFACT = "checkpoint"
"""Key of the checkpoint folder in the pyfunc model's artifacts (``artifacts/checkpoint`` in the model folder)."""
TRAIN_HINT = "python -m pipelines.train"
"""How a user gets a registered model; quoted (with --register-as for other names) when there is none."""
READY = "READY"
CACHE_SIZE = 2
"""Loaded models kept in memory (a ``gpt2``-sized model is about 500 MB)."""

_PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
_MLMODEL = "MLmodel"


class RegistryError(StudioError):
    """A registry request that cannot be met as asked (unknown model, version or alias; not a studio model)."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a name with at most one of ``version`` and ``alias`` (neither: the latest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def _check_name(name: str, *, new: bool = False) -> str:
    """:func:`core.names.check_model_name` as a :class:`RegistryError` (existing names by default)."""
    try:
        return check_model_name(name, new=new)
    except UsageError as exc:
        raise RegistryError(str(exc)) from None


def _check_alias(alias: str) -> str:
    """:func:`core.names.check_alias` as a :class:`RegistryError`."""
    try:
        return check_alias(alias)
    except UsageError as exc:
        raise RegistryError(str(exc)) from None


def parse_model_ref(ref: str) -> ModelRef:
    """Parse ``NAME``, ``NAME/VERSION`` or ``NAME@ALIAS`` (optionally prefixed with ``models:/``).

    Raises :class:`RegistryError` for an empty reference, a non-numeric or non-positive version, or an invalid
    alias.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise RegistryError("the model reference is empty; use NAME, NAME/VERSION or NAME@ALIAS")
    text = ref.strip().removeprefix("models:/")
    if "@" in text:
        name, _, alias = text.partition("@")
        if not alias:
            raise RegistryError(
                f"model reference {ref!r} has an empty alias; use NAME@ALIAS, e.g. shakespeare-gpt@champion"
            )
        return ModelRef(_check_name(name), alias=_check_alias(alias))
    if "/" in text:
        name, _, version = text.partition("/")
        if not version.isdigit() or int(version) < 1:
            raise RegistryError(f"model reference {ref!r}: the version must be a positive number, e.g. {name}/1")
        return ModelRef(_check_name(name), version=int(version))
    return ModelRef(_check_name(text))


@contextmanager
def _staged_checkpoint(checkpoint_dir: Path) -> Iterator[Path]:
    """The checkpoint's two files in a folder named ``checkpoint``, so the model holds ``artifacts/checkpoint``.

    MLflow names an artifact folder after its source and refuses symlinks out of it, so the files are hard-linked
    into a sibling staging folder (no copy of a large checkpoint), or copied where linking is impossible.
    """
    try:
        scratch = Path(tempfile.mkdtemp(dir=checkpoint_dir.parent, prefix=f".{checkpoint_dir.name}.register-"))
    except OSError:  # a read-only parent folder: stage in the system temp folder instead
        scratch = Path(tempfile.mkdtemp(prefix="studio-register-"))
    try:
        staged = scratch / CHECKPOINT_ARTIFACT
        staged.mkdir()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            try:
                os.link(checkpoint_dir / name, staged / name)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(checkpoint_dir / name, staged / name)
        yield staged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pip_requirements() -> list[str]:
    """Pinned runtime requirements for ``mlflow models serve`` with a non-local env manager.

    Given explicitly: MLflow's inference would load the model in a subprocess at log time, which is slow.
    """
    import numpy
    import safetensors
    import tiktoken

    torch_version = torch.__version__.split("+")[0]  # a local build tag like +cpu is not on PyPI
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch_version}",
        f"tiktoken=={tiktoken.__version__}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pd.__version__}",
    ]


def log_and_register(
    client,
    run_id: str,
    checkpoint_dir: str | Path,
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = None,
    *,
    description: str | None = None,
    await_seconds: float = 300,
) -> ModelVersion:
    """Log ``checkpoint_dir`` to run ``run_id`` as a pickle-free pyfunc model and register it as a new version.

    The run may be the caller's active run or any other run in ``client``'s store; it is neither started nor
    ended here. The new version is linked to the run (``version.run_id == run_id``), waited for until READY, and
    given ``alias`` (moved from whichever version held it) when one is asked for. Returns the version as stored
    after all of that.

    Raises :class:`core.checkpoint.CheckpointError` for a folder that is not a valid studio checkpoint (checked
    before anything is logged), and :class:`RegistryError` for an invalid name or alias, an unknown run, or a
    version that does not become READY within ``await_seconds``.
    """
    from mlflow.models import Model

    from core import pyfunc_model

    name = _check_name(name, new=True)
    if alias is not None:
        alias = _check_alias(alias)
    checkpoint_dir = Path(checkpoint_dir).resolve()
    config, _ = read_checkpoint_config(checkpoint_dir)
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a checkpoint: {WEIGHTS_FILE} is missing")
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # the store itself failed: not a user mistake
        raise RegistryError(f"run {run_id!r} was not found in {client.tracking_uri}") from exc

    # MLflow resolves the logged model through its global URI twice: Model.log creates it there, and a SQLite
    # registry's create_model_version looks it up there. Both must see this client's store.
    with fluent_tracking_uri(client.tracking_uri):
        with (
            quiet_artifacts(),
            _staged_checkpoint(checkpoint_dir) as staged,
            warnings.catch_warnings(),
        ):
            # The logged model is created here, in the run's experiment and linked to the run: Model.log would
            # otherwise put it in the fluent "current" experiment when the run is not the active one.
            logged = client.create_logged_model(
                experiment_id=run.info.experiment_id,
                name=MODEL_NAME_IN_RUN,
                source_run_id=run_id,
                params={k: str(v) for k, v in run.data.params.items()},
            )
            # The signature is given on purpose; an input example would run a generation at log time.
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            # Model.log is what mlflow.pyfunc.log_model calls, but it also takes run_id: the model is attached to
            # this run whether or not it is the active one, and no run is started or ended as a side effect.
            info = Model.log(
                artifact_path=None,  # deprecated in favour of name, but still a required positional parameter
                name=MODEL_NAME_IN_RUN,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(_PYFUNC_MODEL_FILE),
                artifacts={CHECKPOINT_ARTIFACT: str(staged)},
                code_paths=[str(stage_runtime_code(staged.parent / "code"))],
                signature=pyfunc_model.model_signature(),
                pip_requirements=_pip_requirements(),
                metadata={
                    "studio_format": STUDIO_FORMAT,
                    "studio_format_version": STUDIO_FORMAT_VERSION,
                    "model_config": config.to_dict(),
                },
            )
        try:
            client.create_registered_model(name, description="Shakespeare-style GPT-2 text generator (studio model)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name=name,
            source=info.model_uri,
            run_id=run_id,
            description=description,
            model_id=info.model_id,
            await_creation_for=await_seconds,
        )
        version = _wait_until_ready(client, name, version.version, await_seconds)
        if alias is not None:
            client.set_registered_model_alias(name, alias, version.version)
            version = client.get_model_version(name, version.version)
    return version


def _wait_until_ready(client, name: str, version: str, await_seconds: float) -> ModelVersion:
    """The version once its status is READY; :class:`RegistryError` if it fails or the wait runs out."""
    deadline = time.monotonic() + await_seconds
    while True:
        current = client.get_model_version(name, version)
        if current.status == READY:
            return current
        if current.status == "FAILED_REGISTRATION":
            raise RegistryError(f"registering {name}/{version} failed: {current.status_message or 'no reason given'}")
        if time.monotonic() >= deadline:
            raise RegistryError(f"{name}/{version} is still {current.status} after {await_seconds:g} s; try later")
        time.sleep(0.5)


def set_alias(client, name: str, alias: str, version: int | str) -> ModelVersion:
    """Point ``alias`` of model ``name`` at ``version`` (moving it from any other version); returns that version.

    Raises :class:`RegistryError` for an invalid alias or an unknown model or version.
    """
    target = resolve_model_version(client, ModelRef(_check_name(name), version=int(version)))
    client.set_registered_model_alias(target.name, _check_alias(alias), target.version)
    return client.get_model_version(target.name, target.version)


def _registered_names(client) -> list[str]:
    return sorted(m.name for m in all_pages(client.search_registered_models))


def _train_hint(name: str) -> str:
    return TRAIN_HINT if name == DEFAULT_MODEL_NAME else f"{TRAIN_HINT} --register-as {name}"


def _unknown_model_message(client, name: str) -> str:
    names = _registered_names(client)
    if not names:
        return f"no model is registered yet (looked for {name!r}): train one with {_train_hint(name)}"
    return f"no registered model named {name!r}; registered models: {', '.join(names)}"


def resolve_model_version(client, ref: str | ModelRef) -> ModelVersion:
    """The registry version ``ref`` names (see :func:`parse_model_ref`); a bare name means its latest version.

    Raises :class:`RegistryError` with a one-line message that lists what exists when the model, version or
    alias is unknown or the registry is empty.
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    models = client.search_registered_models(filter_string=f"name = '{ref.name}'")
    model = next((m for m in models if m.name == ref.name), None)
    if model is None:
        raise RegistryError(_unknown_model_message(client, ref.name))
    numbers = sorted(
        int(v.version) for v in all_pages(client.search_model_versions, filter_string=f"name = '{ref.name}'")
    )
    if not numbers:
        raise RegistryError(f"model {ref.name!r} has no versions yet: train one with {_train_hint(ref.name)}")
    aliases = dict(model.aliases or {})
    if ref.alias is not None:
        if ref.alias not in aliases:
            known = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: {known}")
        number = int(aliases[ref.alias])
    elif ref.version is not None:
        if ref.version not in numbers:
            raise RegistryError(
                f"model {ref.name!r} has no version {ref.version}; its versions: {', '.join(map(str, numbers))}"
            )
        number = ref.version
    else:
        number = numbers[-1]
    return client.get_model_version(ref.name, str(number))


def list_registered_models(client) -> pd.DataFrame:
    """Every registered model version, newest first, as a DataFrame.

    Columns: ``name``, ``version`` (int), ``aliases`` (comma-separated, sorted), ``run_id``, ``created``
    (timezone-aware UTC datetime), ``status``, ``description`` ("" when unset) and ``tags`` (the version's tags, a
    dict). Empty (with these columns) when nothing is registered.
    """
    columns = ["name", "version", "aliases", "run_id", "created", "status", "description", "tags"]
    aliases: dict[tuple[str, int], list[str]] = {}
    for model in all_pages(client.search_registered_models):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, int(version)), []).append(alias)
    rows = [
        {
            "name": v.name,
            "version": int(v.version),
            "aliases": ", ".join(sorted(aliases.get((v.name, int(v.version)), []))),
            "run_id": v.run_id or "",
            "created": pd.Timestamp(v.creation_timestamp, unit="ms", tz="UTC"),
            "status": v.status,
            "description": v.description or "",
            "tags": dict(v.tags or {}),
        }
        for v in all_pages(client.search_model_versions)
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame.astype({"version": "int64", "created": "datetime64[ns, UTC]"})
    return frame.sort_values(["created", "name", "version"], ascending=False, ignore_index=True)


def _local_path(uri: str) -> Path | None:
    """The local folder of a ``file:`` URI or a plain path; None for a remote artifact store."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or Path(uri).is_absolute():  # a bare path (is_absolute also covers C:\\ on Windows)
        return Path(uri)
    return None


def _fetch(client, base_uri: str, relative: str, into: Path) -> Path:
    """One artifact file ``relative`` under ``base_uri``: in place when local, else downloaded into ``into``."""
    local = _local_path(base_uri)
    if local is not None:
        return local / relative
    target = into / PurePosixPath(relative).parent
    target.mkdir(parents=True, exist_ok=True)
    with quiet_artifacts():
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base_uri.rstrip('/')}/{relative}",
                dst_path=str(target),
                tracking_uri=client.tracking_uri,
            )
        )


def check_studio_mlmodel(document: Any, where: str) -> str:
    """The checkpoint artifact's path inside the model folder, if ``document`` (a parsed MLmodel) is a studio model.

    Raises :class:`RegistryError` unless it carries the studio marker and version, is a models-from-code pyfunc
    with no pickled python model, and has a checkpoint artifact at a plain relative path inside the model folder.
    """
    if not isinstance(document, dict):
        raise RegistryError(f"{where} has no readable MLmodel file; it is not a model this studio registered")
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, dict) or metadata.get("studio_format") != STUDIO_FORMAT:
        raise RegistryError(
            f"{where} was not registered by this studio (its MLmodel lacks studio_format: {STUDIO_FORMAT}); "
            "refusing to load it"
        )
    if metadata.get("studio_format_version") != STUDIO_FORMAT_VERSION:
        raise RegistryError(
            f"{where} has studio_format_version {metadata.get('studio_format_version')!r}; this studio reads "
            f"version {STUDIO_FORMAT_VERSION}"
        )
    pyfunc = (document.get("flavors") or {}).get("python_function")
    if not isinstance(pyfunc, dict):
        raise RegistryError(f"{where} has no python_function flavor; refusing to load it")
    # A pickled PythonModel is recorded as python_model: python_model.pkl; a model from code has model_code_path
    # and the code_model loader (cloudpickle_version is written for both, so it says nothing).
    if "python_model" in pyfunc:
        raise RegistryError(f"{where} holds a pickled python model; the studio never unpickles, refusing to load it")
    if not pyfunc.get("model_code_path") or pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model":
        raise RegistryError(
            f"{where} is not a pyfunc model from code (loader {pyfunc.get('loader_module')!r}); refusing to load it"
        )
    checkpoint = (pyfunc.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
    path = checkpoint.get("path") if isinstance(checkpoint, dict) else None
    parts = PurePosixPath(path).parts if isinstance(path, str) else ()
    # The path comes from a file anyone could edit: keep it inside the model folder.
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts or "\\" in path:
        raise RegistryError(f"{where} has no usable {CHECKPOINT_ARTIFACT!r} artifact in its MLmodel")
    return str(PurePosixPath(*parts))


class _ModelCache:
    """A small thread-safe LRU of loaded models (Streamlit serves sessions from several threads).

    :meth:`get_or_load` loads each key once however many threads ask for it at the same time: the first caller
    loads while the others wait on that key's lock, then they all get the same object. Loads of different keys
    run in parallel.
    """

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, tuple[GPT, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()  # guards _items and _loading; never held during a load
        self._loading: dict[tuple, tuple[threading.Lock, int]] = {}  # key -> (its load lock, threads using it)

    def get(self, key: tuple) -> tuple[GPT, dict[str, Any]] | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: tuple, value: tuple[GPT, dict[str, Any]]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get_or_load(self, key: tuple, load: Callable[[], tuple[GPT, dict[str, Any]]]) -> tuple[GPT, dict[str, Any]]:
        """The cached value of ``key``, else ``load()``'s, kept; concurrent callers of one key share one load.

        A load that raises caches nothing and raises in its caller only; a waiting caller then tries itself.
        """
        cached = self.get(key)
        if cached is not None:
            return cached
        with self._lock:
            key_lock, users = self._loading.get(key, (threading.Lock(), 0))
            self._loading[key] = (key_lock, users + 1)
        try:
            with key_lock:
                cached = self.get(key)  # loaded by the thread this one waited for
                if cached is not None:
                    return cached
                value = load()
                self.put(key, value)
                return value
        finally:
            with self._lock:
                key_lock, users = self._loading[key]
                # The last user removes the lock, so a key never loaded again leaves nothing behind.
                if users == 1:
                    del self._loading[key]
                else:
                    self._loading[key] = (key_lock, users - 1)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _ModelCache(CACHE_SIZE)


def clear_model_cache() -> None:
    """Forget every model :func:`load_registered_model` has kept in memory."""
    _cache.clear()


def load_registered_model(
    client, ref: str | ModelRef, device: str | torch.device = "cpu"
) -> tuple[GPT, ModelVersion, dict[str, Any]]:
    """The model a registry reference names, on ``device`` and in eval mode, with its version and checkpoint document.

    Never unpickles and never calls ``mlflow.pyfunc.load_model``: the version's MLmodel is read with
    ``yaml.safe_load`` and checked (:func:`check_studio_mlmodel`), then only the checkpoint's safetensors and
    JSON files are read (in place for a local artifact store, else downloaded to a temporary folder). Models are
    cached per (tracking URI, name, version, source, device) for the last :data:`CACHE_SIZE` loads, so callers
    share one model object and must not modify it; :func:`clear_model_cache` empties the cache.

    Raises :class:`RegistryError` for an unknown reference, a version that is not READY or not a studio model,
    and :class:`core.checkpoint.CheckpointError` for unreadable or corrupt weights.
    """
    version = resolve_model_version(client, ref)
    where = f"{version.name}/{version.version}"
    if version.status != READY:
        raise RegistryError(f"{where} is {version.status}, not READY; wait for it or register the model again")
    key = (client.tracking_uri, version.name, int(version.version), version.source, str(torch.device(device)))
    model, checkpoint_document = _cache.get_or_load(key, lambda: _load_version(client, version, where, device))
    return model, version, checkpoint_document


def _load_version(client, version: ModelVersion, where: str, device) -> tuple[GPT, dict[str, Any]]:
    """The model and checkpoint document of a READY ``version``, its files read and checked (uncached)."""
    try:
        base_uri = client.get_model_version_download_uri(version.name, version.version)
    except MlflowException as exc:
        raise RegistryError(f"cannot locate the files of {where}: {exc.message}") from exc
    with tempfile.TemporaryDirectory(prefix="studio-model-") as scratch:
        scratch = Path(scratch)
        try:
            mlmodel_path = _fetch(client, base_uri, _MLMODEL, scratch)
            document = yaml.safe_load(mlmodel_path.read_text(encoding="utf-8"))
        except (OSError, MlflowException, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read the MLmodel file of {where} at {base_uri}: {exc}") from exc
        checkpoint_path = check_studio_mlmodel(document, where)
        try:
            files = [_fetch(client, base_uri, f"{checkpoint_path}/{f}", scratch) for f in (CONFIG_FILE, WEIGHTS_FILE)]
        except (OSError, MlflowException) as exc:
            raise RegistryError(f"cannot fetch the checkpoint of {where} from {base_uri}: {exc}") from exc
        model, checkpoint_document = load_checkpoint(files[0].parent, device=device)
    return model, checkpoint_document
