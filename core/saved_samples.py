"""Samples a user liked, kept with the model version that wrote them.

Where: a JSON artifact of the version's source run, ``saved_samples/<model>-v<version>/<UTC time>-<id>.json``. An
artifact, not a registry tag: a sample may be thousands of characters (MLflow caps a tag value at a few thousand),
it stays beside the run's other samples, the MLflow UI shows it under the run's artifacts, and deleting a version
does not delete what was saved. Each file holds the model and version, the prompt, the sample, the sampling
settings and the seed (together: what generates it again), and when it was saved.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from core.config import SampleConfig
from core.errors import UsageError
from core.registry import RegistryError
from core.store import quiet_artifacts

SAVED_DIR = "saved_samples"
"""Folder of the run's artifacts that holds saved samples."""
MAX_SAMPLE_CHARS = 200_000
"""The longest sample kept: far above a 4,096-token sample with its prompt, far below what would clog a run."""


def _folder(name: str, version: int) -> str:
    return f"{SAVED_DIR}/{name}-v{int(version)}"


def save_sample(client, name: str, version: int, *, prompt: str, sample: str, settings: SampleConfig) -> str:
    """Save ``sample`` (the prompt and its continuation) to version ``name``/``version``; returns the artifact path.

    ``settings`` must carry the seed that produced the sample. Raises :class:`UsageError` for an empty or oversized
    sample or a missing seed, and :class:`RegistryError` for a version that no longer exists or has no run.
    """
    from mlflow.exceptions import MlflowException

    if not sample.strip():
        raise UsageError("there is no text to save yet")
    if len(sample) > MAX_SAMPLE_CHARS:
        raise UsageError(f"a saved sample holds at most {MAX_SAMPLE_CHARS:,} characters, this one has {len(sample):,}")
    if settings.seed is None:
        raise UsageError("a sample is saved with the seed that wrote it; this one has none")
    try:
        run_id = client.get_model_version(name, str(version)).run_id
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(f"{name} version {version} no longer exists (deleted in the MLflow UI?)") from None
    if not run_id:
        raise RegistryError(f"{name} version {version} has no source run to keep samples with")
    saved_at = datetime.now(UTC)
    document = {
        "model": name,
        "version": int(version),
        "prompt": prompt,
        "sample": sample,
        "settings": settings.to_dict(),
        "seed": settings.seed,
        "saved_at": saved_at.isoformat(timespec="seconds"),
    }
    path = f"{_folder(name, version)}/{saved_at.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}.json"
    with quiet_artifacts():
        client.log_text(run_id, json.dumps(document, indent=1, ensure_ascii=False), path)
    return path


def list_saved_samples(client, name: str, version: int) -> list[dict]:
    """The samples saved to ``name``/``version``, newest first (each the saved document, plus its ``path``). A
    version without a run or without saved samples has none; a file there that is not a saved sample comes as
    ``{"path": ..., "error": why}``, for the page to say so."""
    run_id = client.get_model_version(name, str(version)).run_id
    if not run_id:
        return []
    folder = _folder(name, version)
    entries = [a for a in client.list_artifacts(run_id, folder) if a.path.endswith(".json")]
    documents = []
    with quiet_artifacts(), tempfile.TemporaryDirectory() as scratch:
        for entry in sorted(entries, key=lambda a: a.path, reverse=True):
            local = Path(client.download_artifacts(run_id, entry.path, scratch))
            try:
                document = json.loads(local.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                documents.append({"path": entry.path, "error": f"not a saved sample: {exc}"})
                continue
            if isinstance(document, dict) and {"prompt", "sample", "seed"} <= document.keys():
                documents.append({**document, "path": entry.path})
            else:
                documents.append({"path": entry.path, "error": "not a saved sample: no prompt, sample and seed"})
    return documents
