"""Train a GPT on Shakespeare (or any UTF-8 text) with every step logged to MLflow, and register the model.

Usage: python -m pipelines.train [--preset tiny|small|gpt2] [--max-steps N] [--target-loss X] [--batch-size B]
       [--block-size T] [--lr X] [--weight-decay X] [--grad-clip X] [--eval-interval N] [--sample-interval N]
       [--patience N] [--data PATH|URL] [--experiment NAME] [--run-name NAME] [--register-as NAME] [--alias A]
       [--device D] [--seed S] [--checkpoint-root DIR] [--job-dir DIR] [--init-from HF_DIR [--context T]]
       [--pad-vocab N] [--compile] [--peak-tflops X] [--checkpoint-interval N] [--keep-checkpoints K] [--grad-accum N]
       python -m pipelines.train --resume RUN_ID [--checkpoint-root DIR] [--log-interval N] [--job-dir DIR]
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

With --job-dir (used by the studio app's background jobs, see core/jobs.py) the run id, live progress and the
outcome are also written to that folder, and the run is tagged with the job id and process id.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.cli import ArgumentParser, duration, positive_int, run

if TYPE_CHECKING:
    from core.config import DataConfig, ModelConfig, TrackingConfig, TrainConfig
    from core.distributed import DistContext
    from core.jobs import JobRecorder

DEFAULT_TOKENS_PER_BATCH = 2048  # the reference's B·T
DEFAULT_PRESET = "tiny"


def build_parser() -> ArgumentParser:
    from core.config import BUDGET_PRESET, PRESETS, TINY_SHAKESPEARE_URL, TrainConfig
    from core.device import DEVICE_CHOICES
    from core.store import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME

    d = TrainConfig()
    p = ArgumentParser(prog="python -m pipelines.train", description=__doc__.splitlines()[0])
    model = p.add_argument_group("model")
    model.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"model shape, with its recipe's training defaults if it has one (default: {DEFAULT_PRESET}, or "
        f"{BUDGET_PRESET} with --time-budget)",
    )
    model.add_argument("--n-layer", type=positive_int, help="override the preset's number of blocks")
    model.add_argument("--n-head", type=positive_int, help="override the preset's attention heads")
    model.add_argument("--n-embd", type=positive_int, help="override the preset's width")
    model.add_argument("--context", type=positive_int, help="override the preset's context length")
    model.add_argument("--dropout", type=float, help="dropout probability in [0, 1) (default 0)")
    model.add_argument(
        "--pad-vocab",
        type=positive_int,
        metavar="N",
        help="round the embedding/LM head rows up to a multiple of N, 64 suits GPUs; 1 = none (default 1)",
    )
    model.add_argument(
        "--init-from",
        metavar="HF_DIR",
        help="fine-tune a Hugging Face GPT-2 folder (config.json + model.safetensors); its config sets the shape",
    )

    data = p.add_argument_group("data")
    data.add_argument("--data", default=TINY_SHAKESPEARE_URL, help="corpus file or URL (default: Tiny Shakespeare)")
    data.add_argument("--batch-size", type=positive_int, help="sequences per batch (default: 2048 tokens / T)")
    data.add_argument("--block-size", type=positive_int, help="tokens per sequence T (default: the model context)")
    data.add_argument(
        "--order",
        choices=("sequential", "random"),
        help="batch order: the reference's sequential windows (default), or random windows",
    )

    opt = p.add_argument_group(
        "optimisation and stopping",
        "A default in brackets below is the reference's; the shakespeare-cpu preset has its own (core.config.RECIPES).",
    )
    opt.add_argument(
        "--time-budget",
        type=duration,
        metavar="DURATION",
        help="train for this wall-clock time (90s, 10m, 1h): the schedule is sized to end inside it, evaluations "
        "and checkpoints included; --max-steps becomes a cap",
    )
    opt.add_argument(
        "--tie-unused-tokens",
        action=argparse.BooleanOptionalAction,
        help="one shared embedding row for the tokens the corpus never uses: a ~4x cheaper LM head, same model",
    )
    opt.add_argument("--max-steps", type=int, help=f"step limit (default {d.max_steps:,})")
    opt.add_argument(
        "--target-loss",
        type=float,
        help=f"stop when the {d.avg_window}-step average loss is below this; 0 disables (default 0.1)",
    )
    opt.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    opt.add_argument(
        "--warmup-fraction",
        type=float,
        help=f"share of the schedule spent warming up (default {d.warmup_fraction})",
    )
    opt.add_argument(
        "--final-div-factor",
        type=float,
        help=f"final lr = lr / 25 / this (default {d.final_div_factor:g})",
    )
    opt.add_argument(
        "--weight-decay",
        type=float,
        help=f"AdamW weight decay on 2-D weights (default {d.weight_decay})",
    )
    opt.add_argument(
        "--grad-accum",
        type=positive_int,
        default=d.grad_accum,
        metavar="N",
        help="accumulate the gradients of N micro-batches per optimizer step (default 1)",
    )
    opt.add_argument("--beta1", type=float, help=f"AdamW beta1 (default {d.beta1})")
    opt.add_argument("--beta2", type=float, help=f"AdamW beta2 (default {d.beta2})")
    opt.add_argument("--eps", type=float, help=f"AdamW epsilon (default {d.eps:g})")
    opt.add_argument("--grad-clip", type=float, help="gradient norm clip; 0 disables (default 0.5)")
    opt.add_argument(
        "--eval-interval",
        type=int,
        help=f"validate every N steps and at the end; 0 disables (default {d.eval_interval})",
    )
    opt.add_argument("--eval-batches", type=positive_int, help="validation batches per eval (default: all)")
    opt.add_argument("--patience", type=positive_int, help="stop after N evals without a better val loss")
    opt.add_argument(
        "--sample-interval",
        type=int,
        help=f"log a text sample every N steps and at the end; 0 = end only (default {d.sample_interval})",
    )
    opt.add_argument(
        "--sample-prompt", default=d.sample_prompt, help=f"prompt of the samples (default {d.sample_prompt!r})"
    )
    opt.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    opt.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = CUDA, then MPS, then CPU")
    opt.add_argument(
        "--compile",
        action="store_true",
        help="run training steps through torch.compile (pays on CUDA; needs a C++ compiler on CPU)",
    )
    opt.add_argument(
        "--peak-tflops",
        type=float,
        metavar="X",
        help="the device's peak dense TFLOP/s for MFU (default: looked up for known CUDA GPUs, else no MFU)",
    )

    track = p.add_argument_group("tracking and registry")
    track.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})"
    )
    track.add_argument("--run-name", help="MLflow run name (default: generated)")
    track.add_argument(
        "--register-as", default=DEFAULT_MODEL_NAME, help=f"registered model name (default {DEFAULT_MODEL_NAME})"
    )
    track.add_argument("--alias", help="point this alias (e.g. champion) at the new version")
    track.add_argument("--register-best", action="store_true", help="register the best-validation checkpoint")
    track.add_argument("--log-interval", type=positive_int, default=10, help="terminal line every N steps (default 10)")
    track.add_argument(
        "--job-dir",
        help="record the run id, live progress and the outcome in this folder "
        "(used by the studio app to run training as a background job)",
    )

    ckpt = p.add_argument_group("checkpoints and resume")
    ckpt.add_argument(
        "--checkpoint-root", help="folder for local checkpoints, one per run (default: mlruns/checkpoints)"
    )
    ckpt.add_argument(
        "--checkpoint-interval",
        type=int,
        metavar="N",
        help=f"resumable checkpoint every N steps and at the end; 0 = none (default {d.checkpoint_interval})",
    )
    ckpt.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=d.keep_checkpoints,
        metavar="K",
        help=f"keep the newest K resumable checkpoints (default {d.keep_checkpoints})",
    )
    ckpt.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this KILLED or FAILED run from its latest resumable checkpoint, with its own settings",
    )
    return p


RESUME_OPTIONS = ("resume", "checkpoint_root", "log_interval", "job_dir")
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


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, DataConfig, TrainConfig, TrackingConfig]:
    """The validated configs of parsed arguments; a bad value raises ``ValueError`` with a one-line message."""
    from core.config import BUDGET_PRESET, DataConfig, ModelConfig, TrackingConfig, TrainConfig, recipe_defaults

    preset = args.preset or (BUDGET_PRESET if args.time_budget is not None and args.init_from is None else None)
    recipe = recipe_defaults(preset, args.time_budget) if preset is not None else {}

    def setting(name: str, flag_value, fallback):
        """A flag's value when given, else the preset's recipe, else the config class's default."""
        return flag_value if flag_value is not None else recipe.get(name, fallback)

    if args.init_from is not None:
        model_config = init_from_model_config(args)
        if args.pad_vocab is not None:  # padding is the studio's layout, not part of the checkpoint's shape
            model_config = dataclasses.replace(model_config, pad_vocab_multiple=args.pad_vocab)
    else:
        model_config = ModelConfig.from_preset(
            preset or DEFAULT_PRESET,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            block_size=args.context,
            dropout=setting("dropout", args.dropout, None),
            pad_vocab_multiple=args.pad_vocab,
        )
    block_size = setting("block_size", args.block_size, None) or model_config.block_size
    batch_size = setting("batch_size", args.batch_size, None) or max(1, DEFAULT_TOKENS_PER_BATCH // block_size)
    data_defaults, train_defaults = DataConfig(), TrainConfig()
    data_config = DataConfig(
        source=args.data,
        batch_size=batch_size,
        block_size=block_size,
        order=setting("order", args.order, data_defaults.order),
        seed=args.seed,
    )
    recipe_fields = [
        "max_steps",
        "target_loss",
        "lr",
        "warmup_fraction",
        "final_div_factor",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "grad_clip",
        "eval_interval",
        "sample_interval",
        "checkpoint_interval",
        "tie_unused_tokens",
    ]
    train_config = TrainConfig(
        **{name: setting(name, getattr(args, name), getattr(train_defaults, name)) for name in recipe_fields},
        time_budget=args.time_budget,
        grad_accum=args.grad_accum,
        eval_batches=args.eval_batches,
        patience=args.patience,
        sample_prompt=args.sample_prompt,
        seed=args.seed,
        device=args.device,
        init_from=None if args.init_from is None else str(Path(args.init_from).resolve()),
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        keep_checkpoints=args.keep_checkpoints,
    )
    tracking = TrackingConfig(
        experiment=args.experiment,
        run_name=args.run_name,
        register_as=args.register_as,
        alias=args.alias,
        register_best=args.register_best,
        preset=preset or ("custom" if args.init_from is not None else DEFAULT_PRESET),
        checkpoint_root=args.checkpoint_root,
    )
    return model_config, data_config, train_config, tracking


def init_from_model_config(args: argparse.Namespace) -> ModelConfig:
    """The model config of ``--init-from``'s checkpoint, with --context and --dropout applied.

    Raises ``UsageError`` when --preset, --n-layer, --n-head or --n-embd asks for another shape than the checkpoint's.
    """
    from core.config import PRESETS
    from core.errors import UsageError
    from core.hf import read_hf_config

    config, _ = read_hf_config(args.init_from, block_size=args.context, dropout=args.dropout)
    shape = ("n_layer", "n_head", "n_embd")
    asked: list[tuple[str, str, int | None]] = []  # (flag as typed, field, value it asks for)
    if args.preset is not None:
        asked += [(f"--preset {args.preset}", f, getattr(PRESETS[args.preset], f)) for f in shape]
    asked += [(f"--{f.replace('_', '-')} {getattr(args, f)}", f, getattr(args, f)) for f in shape]
    for flag, field, value in asked:
        if value is None:
            continue
        if value != getattr(config, field):
            raise UsageError(
                f"{flag} asks for {field} {value}, but --init-from {args.init_from} has {field} "
                f"{getattr(config, field)}; drop it: the shape comes from the checkpoint"
            )
    return config


def main(argv: Sequence[str] | None = None) -> int:
    from core.distributed import init_distributed, shutdown

    args = build_parser().parse_args(argv)
    # MLflow draws a progress bar for every artifact transfer (registering the model makes two); the studio's own
    # progress output is the one on this terminal. An explicit setting in the environment wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    given = explicit_options(argv) if args.resume is not None else []
    if args.resume is not None:
        check_resume_options(args, given)
        configs = None
    else:
        configs = build_configs(args)  # a bad value is refused before a process group is joined
    dist = init_distributed(args.device if configs is None else configs[2].device)
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
