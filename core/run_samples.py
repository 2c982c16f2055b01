"""The periodic samples a training run logs (``samples.txt``: the same prompt every ``sample_interval`` steps), read
back from its MLflow artifacts: for a resumed run, and for Compare Runs' grid of how each run learned to write."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.store import quiet_artifacts
from core.tracking import parse_samples

SAMPLES_ARTIFACT = "samples.txt"
"""The artifact :class:`core.tracking.MlflowLogger` keeps a run's periodic samples in."""
SAMPLE_COLUMNS = ["run_id", "step", "text"]
"""The columns of :func:`samples_by_step`."""


def logged_samples(client, run_id: str) -> list[tuple[int, str]]:
    """The (step, text) samples of run ``run_id`` (none when it logged none); an unknown run raises MLflow's error."""
    if SAMPLES_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        return []
    with quiet_artifacts(), tempfile.TemporaryDirectory() as scratch:
        path = client.download_artifacts(run_id, SAMPLES_ARTIFACT, scratch)
        return parse_samples(Path(path).read_text(encoding="utf-8"))


def samples_by_step(client, run_ids: Sequence[str]) -> pd.DataFrame:
    """Every periodic sample of ``run_ids`` in long format (:data:`SAMPLE_COLUMNS`), by run in ``run_ids`` order,
    then by step. A run that logged no samples has no rows."""
    rows = [
        {"run_id": run_id, "step": step, "text": text}
        for run_id in dict.fromkeys(run_ids)
        for step, text in logged_samples(client, run_id)
    ]
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS).astype({"step": "int64"})
