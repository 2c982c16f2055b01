"""What a job runs, as data: a :class:`JobSpec` is written into the job folder (``spec.json``) by
:func:`core.jobs.start_job` and rebuilt by the job's process (``python -m <module> --spec <file>``). A spec checks
itself before anything is created (:meth:`JobSpec.check`); its configs validated themselves when they were made.

:class:`TrainingJob` is one training run (or the resumption of a stopped one); a sweep's spec is
:class:`core.sweep_jobs.SweepJob`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from core.errors import UsageError
from core.recipes import RunConfigs
from core.store import REPO_ROOT

MAX_PROCESSES = 64
"""Most training processes one job may start on this machine."""


class JobSpec(Protocol):
    """What :func:`core.jobs.start_job` needs of a job's spec."""

    kind: ClassVar[str]
    """``train`` or ``sweep`` (recorded in ``job.json``; the app shows each kind its own way)."""
    module: ClassVar[str]
    """The entry point the job's process runs: ``python -m <module> --spec <file> --job-dir <folder>``."""

    def check(self, processes: int, tracking_uri: str) -> None:
        """Raise :class:`UsageError` (one line) if the job cannot run as asked; create nothing."""

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data, read back by the module's ``--spec``."""


@dataclass(frozen=True)
class TrainingJob:
    """A training job: a new run of ``configs``, or the stopped run ``resume`` continued with its own settings."""

    configs: RunConfigs | None = None
    """The new run's configs; None when resuming."""
    resume: str | None = None
    """The MLflow run id of a KILLED or FAILED run to continue; None for a new run."""

    kind: ClassVar[str] = "train"
    module: ClassVar[str] = "pipelines.train"

    def __post_init__(self) -> None:
        if (self.configs is None) == (self.resume is None):
            raise UsageError("a training job is a new run (its configs) or a resumed one (a run id), not both")

    def check(self, processes: int, tracking_uri: str) -> None:
        """The corpus of a new run exists (a URL is fetched by the run), the device is there, and ``processes`` can
        run on it (the CPU, or one GPU each; never MPS)."""
        from core.data import is_url
        from core.device import resolve_device

        check_processes(processes)
        if self.configs is None:
            return  # the resumed run's settings are checked by the resume itself, against its checkpoint
        data, train = self.configs.data, self.configs.train
        if not is_url(data.source):
            source = Path(data.source)
            if not (source if source.is_absolute() else REPO_ROOT / source).is_file():
                raise UsageError(f"corpus file not found: {data.source}")
        device = resolve_device(train.device)
        if processes > 1 and device.type == "mps":
            raise UsageError("multi-process training does not run on MPS; use 1 process or the CPU device")
        if processes > 1 and device.type == "cuda" and processes > torch.cuda.device_count():
            raise UsageError(
                f"{processes} processes need {processes} GPUs; this machine has {torch.cuda.device_count()}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "configs": self.configs and self.configs.to_dict(), "resume": self.resume}

    @classmethod
    def from_dict(cls, values: Any) -> TrainingJob:
        """The spec :meth:`to_dict` wrote; anything else raises ``ValueError`` saying what is wrong."""
        if not isinstance(values, dict) or values.get("kind") != cls.kind:
            raise ValueError("not a training job's spec (its kind is not 'train')")
        configs = values.get("configs")
        return cls(configs=None if configs is None else RunConfigs.from_dict(configs), resume=values.get("resume"))


def check_processes(processes: int) -> None:
    """``processes`` is an integer from 1 to :data:`MAX_PROCESSES`."""
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= MAX_PROCESSES:
        raise UsageError(f"processes must be an integer from 1 to {MAX_PROCESSES}, got {processes!r}")
