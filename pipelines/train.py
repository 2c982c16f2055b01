"""Train a GPT on Shakespeare (or any UTF-8 text) with every step logged to MLflow, and register the model.

Usage: python -m pipelines.train [--preset tiny|small|gpt2] [--max-steps N] [--target-loss X] [--batch-size B]
       [--block-size T] [--lr X] [--weight-decay X] [--grad-clip X] [--eval-interval N] [--sample-interval N]
       [--patience N] [--data PATH|URL] [--experiment NAME] [--run-name NAME] [--register-as NAME] [--alias A]
       [--device D] [--seed S] [--checkpoint-root DIR] [--job-dir DIR] [--init-from HF_DIR [--context T]]
       [--pad-vocab N] [--compile] [--peak-tflops X] [--checkpoint-interval N] [--keep-checkpoints K] [--grad-accum N]
       python -m pipelines.train --resume RUN_ID [--checkpoint-root DIR] [--log-interval N] [--job-dir DIR]
       python -m pipelines.train --spec JOB_DIR/spec.json [--job-dir JOB_DIR] [--log-interval N]
       torchrun --standalone --nproc_per_node=N -m pipelines.train [the same options]

It stops when the running-average loss drops below --target-loss (default 0.1), at --max-steps (default 20,000),
or after --patience evaluations without a better validation loss. The final checkpoint (or the best-validation
one with --register-best) becomes a new version of the registered model. Ctrl-C or SIGTERM stops after the
current step, saves a checkpoint and ends the run KILLED.

Every --checkpoint-interval steps (default 500; 0 = never) and when training stops, a resumable checkpoint (weights,
optimizer, schedule, batch position, random states, running averages; safetensors + JSON) is written atomically
to <checkpoint root>/<run id>/resume/; the newest --keep-checkpoints (default 3) are kept. --resume RUN_ID continues
a KILLED or FAILED run from its latest one: the same MLflow run, with the settings it was started with (flags that
would change them are refused), its metrics going on at the next step. The checkpoint is looked for where the run
wrote it, or under --checkpoint-root when that is given.

With --init-from HF_DIR the run fine-tunes a Hugging Face GPT-2 checkpoint (config.json + model.safetensors, e.g.
pretrained GPT-2 saved locally) instead of starting from random weights. The model's shape then comes from that
config.json: --preset, --n-layer, --n-head and --n-embd may be given only if they agree with it. --context may be
shorter than the checkpoint's n_positions (only the first position embeddings are kept), never longer; --dropout
defaults to the checkpoint's resid_pdrop.

On a CUDA GPU training runs in bf16 autocast with TF32 matmuls and fused AdamW. --pad-vocab 64 rounds the
embedding and LM head rows up to a multiple of 64 (faster GPU matmuls; the tokenizer and the predictions are
unchanged); --compile runs the training steps through torch.compile (slow to start, then faster on CUDA; on the CPU
it needs a C++ compiler). Every step logs mfu, the model FLOPs utilisation, when the GPU's peak is known (H100, H200,
A100, L4, A10, RTX 4090) or given with --peak-tflops.

Under torchrun the job trains with DistributedDataParallel (gloo on the CPU, NCCL on CUDA with one GPU per process;
multi-node through torchrun's rendezvous flags). --batch-size is per process and each process reads its own shard
of every batch: the global batch is batch size × --grad-accum × processes. Only rank 0 logs to MLflow, prints,
writes checkpoints and registers the model, so a job is one run (param world_size). A run started with N processes
resumes with N.

With --job-dir (used by the studio app's background jobs, see core/jobs/) the run id, live progress and the
outcome are also written to that folder, and the run is tagged with the job id and process id. A job's process
takes its settings from the job's spec.json (--spec: the run's configs as JSON, or a run to resume), never from
flags. Every other flag derives from a config field (core/config.py): its help is the field's docstring.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.cli import ArgumentParser, add_config_flags, duration, positive_int, read_json_file, run

if TYPE_CHECKING:
    from core.config import DataConfig, ModelConfig, TrackingConfig, TrainConfig
    from core.distributed import DistContext
    from core.jobs import JobRecorder


def build_parser() -> ArgumentParser:
    """The options: the config dataclasses' fields (their docstrings are the help, their defaults shown), plus the
    preset, the model overrides and where things go."""
    from core.config import PRESETS, TRAIN_PRECISIONS, DataConfig, ModelConfig, TrackingConfig, TrainConfig
    from core.device import DEVICE_CHOICES
    from core.recipes import BUDGET_PRESET, DEFAULT_PRESET

    p = ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    model = p.add_argument_group("model")
    model.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"model shape, with its recipe's training defaults if it has one (default: {DEFAULT_PRESET}, or "
        f"{BUDGET_PRESET} with --time-budget)",
    )
    add_config_flags(
        model,
        ModelConfig,
        ["n_layer", "n_head", "n_embd", "block_size", "dropout", "pad_vocab_multiple"],
        flags={"block_size": "--context", "pad_vocab_multiple": "--pad-vocab"},
        types={"n_layer": positive_int, "n_head": positive_int, "n_embd": positive_int, "block_size": positive_int}
        | {"pad_vocab_multiple": positive_int},
        metavars={"pad_vocab_multiple": "N"},
        prefix="override the preset: ",
        show_defaults=False,
    )
    add_config_flags(model, TrainConfig, ["init_from"], metavars={"init_from": "HF_DIR"})

    data = p.add_argument_group("data")
    add_config_flags(
        data,
        DataConfig,
        ["source", "batch_size", "block_size", "order"],
        flags={"source": "--data"},
        types={"batch_size": positive_int, "block_size": positive_int},
        choices={"order": ("sequential", "random")},
        defaults={"batch_size": "2,048 tokens / T", "block_size": "the model's context"},
    )

    opt = p.add_argument_group(
        "optimisation and stopping",
        "A default in brackets below is the reference's; the shakespeare-cpu preset has its own "
        "(core.recipes.RECIPES).",
    )
    add_config_flags(
        opt,
        TrainConfig,
        ["time_budget", "tie_unused_tokens", "max_steps", "target_loss", "lr", "warmup_fraction"]
        + ["final_div_factor", "weight_decay", "grad_accum", "beta1", "beta2", "eps", "grad_clip", "eval_interval"]
        + ["eval_batches", "patience", "sample_interval", "sample_prompt", "seed", "device", "compile", "precision"]
        + ["peak_tflops"],
        types={"time_budget": duration, "grad_accum": positive_int, "eval_batches": positive_int}
        | {"patience": positive_int},
        choices={"device": DEVICE_CHOICES, "precision": TRAIN_PRECISIONS},
        metavars={"time_budget": "DURATION", "grad_accum": "N", "peak_tflops": "X"},
    )

    track = p.add_argument_group("tracking and registry")
    add_config_flags(track, TrackingConfig, ["experiment", "run_name", "register_as", "alias", "register_best"])
    track.add_argument("--log-interval", type=positive_int, default=10, help="terminal line every N steps (default 10)")
    track.add_argument(
        "--job-dir",
        help="record the run id, live progress and the outcome in this folder "
        "(used by the studio app to run training as a background job)",
    )
    track.add_argument(
        "--spec",
        metavar="JSON",
        help="run the training job this file describes (a job folder's spec.json: the run's configs, or a run to "
        "resume) instead of the flags above",
    )

    ckpt = p.add_argument_group("checkpoints and resume")
    add_config_flags(
        ckpt,
        TrackingConfig,
        ["checkpoint_root"],
    )
    add_config_flags(
        ckpt,
        TrainConfig,
        ["checkpoint_interval", "keep_checkpoints"],
        types={"keep_checkpoints": positive_int},
        metavars={"checkpoint_interval": "N", "keep_checkpoints": "K"},
    )
    ckpt.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this KILLED or FAILED run from its latest resumable checkpoint, with its own settings",
    )
    return p


RESUME_OPTIONS = ("resume", "checkpoint_root", "log_interval", "job_dir")

SPEC_OPTIONS = ("spec", "log_interval", "job_dir")
"""The options --spec may be combined with: the file holds every setting of the run."""
"""The options --resume may be combined with: where things are and how progress shows, never the training."""


def explicit_options(argv: Sequence[str] | None) -> list[str]:
    """The destinations of the options given in ``argv`` (default: the command line), whatever their values."""
    parser = build_parser()
    # With every default suppressed, the namespace holds only what was typed, even a value equal to its default.
    # (set_defaults cannot do this: argparse would put its SUPPRESS marker in the namespace as a value.)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return list(vars(parser.parse_args(argv)))


def check_resume_options(args: argparse.Namespace, given: Sequence[str]) -> None:
    """Raise ``UsageError`` when ``--resume`` comes with an option that would change the resumed training."""
    from core.errors import UsageError

    conflicting = [f"--{dest.replace('_', '-')}" for dest in given if dest not in RESUME_OPTIONS]
    if conflicting:
        raise UsageError(
            f"--resume continues run {args.resume} with the settings it was started with; drop "
            + ", ".join(conflicting)
        )


def check_only(given: Sequence[str], allowed: Sequence[str], why: str) -> None:
    """Raise ``UsageError`` when an option outside ``allowed`` was given (``why`` says what makes it pointless)."""
    from core.errors import UsageError

    extra = [f"--{dest.replace('_', '-')}" for dest in given if dest not in allowed]
    if extra:
        raise UsageError(f"{why}; drop {', '.join(extra)}")


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, DataConfig, TrainConfig, TrackingConfig]:
    """The validated configs of parsed arguments (:func:`core.recipes.resolve_run_configs`); a bad value raises
    ``ValueError`` with a one-line message."""
    from core.recipes import CHOICE_KEYS, resolve_run_configs

    return resolve_run_configs({k: v for k, v in vars(args).items() if k in CHOICE_KEYS}).astuple()


def main(argv: Sequence[str] | None = None) -> int:
    from core.distributed import init_distributed, shutdown

    args = build_parser().parse_args(argv)
    # MLflow draws a progress bar for every artifact transfer (registering the model makes two); the studio's own
    # progress output is the one on this terminal. An explicit setting in the environment wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    given = explicit_options(argv) if args.resume is not None or args.spec is not None else []
    configs = None
    if args.spec is not None:  # a job's spec.json: the configs of a new run, or the run to resume
        from core.jobs import TrainingJob

        check_only(given, SPEC_OPTIONS, "--spec holds every setting of the run")
        spec = TrainingJob.from_dict(read_json_file(args.spec, "--spec"))
        args.resume = spec.resume
        configs = None if spec.configs is None else spec.configs.astuple()
    elif args.resume is not None:
        check_resume_options(args, given)
    else:
        configs = build_configs(args)  # a bad value is refused before a process group is joined
    dist = init_distributed((args.device or "auto") if configs is None else configs[2].device)
    try:
        if args.job_dir is None or not dist.is_main:
            code = train(args, configs=configs, dist=dist)
        else:
            from core.jobs import JobRecorder

            with JobRecorder(args.job_dir) as job:  # records a failure (and re-raises) if training raises
                code = train(args, job, configs=configs, dist=dist)
    except BaseException:
        shutdown(dist, synchronize=False)
        raise
    shutdown(dist)
    return code


def train(
    args: argparse.Namespace,
    job: JobRecorder | None = None,
    *,
    configs: tuple[ModelConfig, DataConfig, TrainConfig, TrackingConfig] | None = None,
    dist: DistContext | None = None,
) -> int:
    """Train as ``args`` ask with ``configs`` (or resume ``args.resume``), reporting to the terminal (and to
    ``job``); returns the exit code. In a torchrun job only rank 0 (``dist``) reports anything."""
    from core.distributed import SINGLE
    from core.experiment import find_resume_point, resume_training, run_training, share_resume_point
    from core.store import tracking_uri
    from pipelines.progress import TerminalProgress

    dist = dist or SINGLE
    point = None
    if args.resume is not None:
        if dist.is_main:
            point = find_resume_point(args.resume, checkpoint_root=args.checkpoint_root, world_size=dist.world_size)
        if dist.enabled:
            point = share_resume_point(point, dist)
        model_config, data_config, train_config, tracking = (
            point.model_config,
            point.data_config,
            point.train_config,
            point.tracking,
        )
    else:
        model_config, data_config, train_config, tracking = configs or build_configs(args)
    if not dist.is_main:
        if point is not None:
            outcome = resume_training(point, dist=dist)
        else:
            outcome = run_training(model_config, data_config, train_config, tracking, dist=dist)
        return 130 if outcome.status == "KILLED" else 0
    print(f"tracking store: {tracking_uri()}")
    if dist.enabled:
        print(
            f"torchrun job: {dist.world_size} processes, global batch {data_config.batch_size} × "
            f"{train_config.grad_accum} × {dist.world_size} sequences",
            flush=True,
        )
    callbacks = [TerminalProgress(train_config.max_steps, log_interval=args.log_interval)]
    if job is not None:
        callbacks.append(job.progress_recorder(train_config.max_steps))

    def on_run_created(run_id: str) -> None:
        print(f"mlflow run: {run_id}", flush=True)
        if job is not None:
            job.run_created(run_id)

    if args.resume is not None:
        print(f"resuming run {point.run_id} after step {point.step:,} of {train_config.max_steps:,}", flush=True)
        outcome = resume_training(point, callbacks, on_run_created=on_run_created, dist=dist)
    else:
        outcome = run_training(
            model_config, data_config, train_config, tracking, callbacks, on_run_created=on_run_created, dist=dist
        )
    code = 0 if outcome.model_version is not None else (130 if outcome.status == "KILLED" else 1)
    if job is not None:
        job.record_outcome(outcome, code)
    print(f"run {outcome.run_id} ended {outcome.status}")
    if outcome.model_version is not None:
        print(
            f"registered model: {outcome.model_name} version {outcome.model_version}"
            + (f" (alias @{tracking.alias})" if tracking.alias else "")
        )
        print(
            f"generate: python -m pipelines.generate --model {outcome.model_name}/{outcome.model_version} "
            '--prompt "ROMEO:"'
        )
    return code


if __name__ == "__main__":
    run(main)
