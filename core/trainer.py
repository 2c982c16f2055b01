"""The training loop: AdamW, OneCycle schedule, gradient clipping, stop rules, evaluation and samples.

The trainer knows nothing of MLflow, the terminal or Streamlit. It reports through :class:`Callback` objects:
``on_train_start(summary)``, ``on_step(step, metrics)``, ``on_eval(step, metrics)``, ``on_sample(step, text)`` (after
``on_sample_report(step, metrics)``: the sample's memorisation figures, :mod:`core.memorization`) and
``on_train_end(result)``. Every step reports ``loss``, ``avg_loss`` (mean of the last ``avg_window`` steps),
``best_loss`` (lowest single-step loss so far), ``lr`` (the rate used for that step), ``time_per_batch`` (seconds)
and ``tokens_per_sec``, plus ``mfu`` (model FLOPs utilisation, a fraction of the device's peak) when that peak is
known; every evaluation reports ``val_loss`` and ``val_bpc`` (bits per character) and the best of each so far,
``best_val_loss`` and ``best_val_bpc``.

On CUDA, training runs under bf16 autocast with TF32 matmuls and fused AdamW; ``TrainConfig.compile`` runs the
training steps through ``torch.compile`` while evaluation, samples and checkpoints use the plain module.

Every ``checkpoint_interval`` steps, and when the loop ends for any reason, the trainer writes a resumable
checkpoint (:meth:`Trainer.save_training_state`): weights, AdamW state, schedule, batch position, RNG states and
its running state, in safetensors + JSON. A new trainer with the same configs that loads it
(:meth:`Trainer.load_training_state`) and then fits takes exactly the steps the first one would have taken.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from core.budget import PROBE_STEPS, BudgetPlanner, BudgetSchedule, Overheads, periodic_due
from core.callbacks import Callback, TrainResult
from core.checkpoint import (
    save_checkpoint,
)
from core.config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from core.data import PreparedCorpus, TokenBatches, epoch_batches, prepare_corpus
from core.device import cpp_compiler, peak_flops, resolve_device
from core.distributed import SINGLE, DistContext, all_reduce_sum
from core.errors import UsageError
from core.estimate import training_flops_per_token
from core.evaluation import bits_per_char, mean_loss
from core.hf import load_hf_state_dict
from core.lm_head import SharedRows
from core.memorization import index_for
from core.memory import TRAINING_OOM_HINT, friendly_oom
from core.model import GPT, parameter_breakdown
from core.optim import (
    SharedRowsTraining,
    autocast_for,
    build_optimizer,
    build_scheduler,
    enable_tf32,
    training_module,
    training_precision,
)
from core.sampling import generate
from core.tokenizer import Tokenizer, get_tokenizer
from core.train_state import LoopState, load_training_state, save_training_state


class Trainer:
    """Trains a GPT on a prepared corpus.

    Everything that can be refused (device, corpus, block size, compiling without a compiler) is checked in the
    constructor, before any work.
    ``fit(out_dir)`` runs until a stop rule fires: the running-average loss below ``target_loss``, ``max_steps``, the
    validation patience, or :meth:`request_stop` (e.g. from a signal handler). It always ends with a final
    evaluation (if enabled), a final sample and a final checkpoint. With ``train_config.init_from`` the model
    starts from that Hugging Face GPT-2 folder's weights (:func:`core.hf.load_hf_state_dict`) instead of random ones.
    :meth:`load_training_state` before ``fit`` continues a stopped training from its resumable checkpoint.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        data_config: DataConfig,
        train_config: TrainConfig,
        callbacks: Iterable[Callback] = (),
        *,
        tokenizer: Tokenizer | None = None,
        corpus: PreparedCorpus | None = None,
        dist: DistContext = SINGLE,
    ):
        if data_config.block_size > model_config.block_size:
            raise UsageError(
                f"block size {data_config.block_size} is above the model's context of {model_config.block_size}; "
                f"use --block-size {model_config.block_size} or less"
            )
        self.model_config = model_config
        self.data_config = data_config
        self.config = train_config
        self.callbacks = list(callbacks)
        self.dist = dist
        # In a torchrun job the process's device was fixed when it joined the group (its own GPU on CUDA).
        self.device = dist.device if dist.device is not None else resolve_device(train_config.device)
        if train_config.compile and self.device.type == "cpu" and cpp_compiler() is None:
            # Inductor would only fail at the first step, after the corpus and the model are ready: refuse now.
            raise UsageError("compiling for the CPU needs a C++ compiler (g++, or $CXX); install one or drop --compile")
        self.tokenizer = tokenizer or get_tokenizer()
        self.corpus = corpus or prepare_corpus(data_config, self.tokenizer)
        enable_tf32(self.device)
        # Measured on this machine where it depends on the CPU's units (a short matmul probe), never assumed.
        self.precision = training_precision(train_config.precision, self.device)
        # MFU's numerator per token (at the trained sequence length) and its denominator, fixed for the whole run;
        # without a known peak (CPU, MPS, an unlisted GPU, and no peak_tflops) no step reports ``mfu``.
        self.flops_per_token = training_flops_per_token(model_config, data_config.block_size)
        peak_tflops = train_config.peak_tflops
        self.peak_flops = peak_tflops * 1e12 if peak_tflops is not None else peak_flops(self.device)
        if self.peak_flops is not None:
            self.peak_flops *= dist.world_size  # MFU of the whole job: its tokens/s against all its devices' peak
        torch.manual_seed(train_config.seed)
        self.model = GPT(model_config).to(self.device)
        if train_config.init_from is not None:  # fine-tune: pretrained weights replace the random initialisation
            self.model.load_state_dict(load_hf_state_dict(train_config.init_from, model_config))
        self.shared_rows: SharedRows | None = None
        self.token_rows: torch.nn.Parameter | None = None
        step_module: torch.nn.Module = self.model
        if train_config.tie_unused_tokens:
            used = torch.from_numpy(self.corpus.tokens("train").astype(np.int64))
            self.shared_rows = SharedRows(used, model_config.vocab_size, device=self.device)
            # The optimizer trains a compact copy of the K + 1 rows that matter: no (V, C) gradient to fill, clip and
            # step every time. The full weight is written from it whenever the model is used whole (full_model).
            wte = self.model.transformer.wte.weight
            self.shared_rows.tie_unused_rows(wte)
            self.token_rows = torch.nn.Parameter(wte.detach()[self.shared_rows.rows].clone())
            wte.requires_grad_(False)
            step_module = SharedRowsTraining(self.model, self.token_rows, self.shared_rows)
        self._ddp = None
        if dist.enabled:
            # Every rank built the same weights from the same seed (DDP also broadcasts rank 0's on wrapping); from
            # here on each rank draws its own dropout masks.
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = step_module = DistributedDataParallel(step_module, device_ids=device_ids)
            torch.manual_seed(train_config.seed + 1 + dist.rank)
        self._train_step_model = training_module(step_module, train_config.compile)
        # On the CPU the model's default loss is its hand-written chunked LM head + cross-entropy (an autograd
        # Function computing into preallocated buffers), which Inductor (torch 2.13) fails to compile ("KeyError:
        # 'buf1'"). Compiled steps there take the plain logits + F.cross_entropy route instead, which compiles and
        # which Inductor fuses itself; on other devices that route is the model's default anyway.
        self._plain_loss = train_config.compile and self.device.type == "cpu"
        self.optimizer = build_optimizer(step_module, train_config, self.device)
        self.scheduler = build_scheduler(self.optimizer, train_config)
        self.batches = TokenBatches(
            self.corpus.tokens("train"),
            data_config.batch_size,
            data_config.block_size,
            order=data_config.order,
            seed=data_config.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self._val_tokens = self.corpus.tokens("val")
        self._stop_reason: str | None = None
        self._loop = LoopState(window=deque(maxlen=train_config.avg_window))
        self._saved_step: int | None = None  # step of the latest resumable checkpoint
        self.clock: Callable[[], float] = time.perf_counter
        """Seconds on a monotonic clock: what steps are timed and a time budget is spent by."""

    def request_stop(self, why: str) -> None:
        """Ask the loop to stop after the current step (safe to call from a signal handler)."""
        self._stop_reason = f"stopped: {why}"

    def summary(self) -> dict:
        """The reference's header: parameter counts and sizes, tokens loaded, batches per epoch, device, and
        ``start_step`` (0, or the step a resumed training continues after)."""
        breakdown = parameter_breakdown(self.model)
        return {
            "total_params": breakdown["total_params"],
            # With compact token rows the embedding weight is frozen, yet trained through them: every parameter is.
            "trainable_params": breakdown["total_params" if self.token_rows is not None else "trainable_params"],
            "size_mb": breakdown["size_mb"],
            "size_by_component": {c["name"]: c["size_mb"] for c in breakdown["components"]},
            "params_by_component": {c["name"]: c["params"] for c in breakdown["components"]},
            "tokens_loaded": self.corpus.train_tokens,
            "val_tokens": self.corpus.val_tokens,
            "tokens_per_batch": self.tokens_per_step,
            "batches_per_epoch": self.batches.batches_per_epoch,
            "world_size": self.dist.world_size,
            "grad_accum": self.config.grad_accum,
            "global_batch_size": self.tokens_per_step // self.data_config.block_size,
            "device": str(self.device),
            "train_precision": self.precision,
            "threads": torch.get_num_threads(),
            "flops_per_token": self.flops_per_token,
            "peak_tflops": None if self.peak_flops is None else self.peak_flops / 1e12,
            "dataset_name": self.corpus.meta["name"],
            "dataset_sha256": self.corpus.meta["sha256"],
            "start_step": self._loop.step,
        }

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step of the whole job: B × T × gradient-accumulation steps × processes."""
        data = self.data_config
        return data.batch_size * data.block_size * self.config.grad_accum * self.dist.world_size

    def _emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per token and bits per character (loss × val tokens / val characters / ln 2)."""
        B, T = self.data_config.batch_size, self.data_config.block_size
        if len(self._val_tokens) <= T:
            raise UsageError(f"the validation split has {len(self._val_tokens)} tokens, fewer than one block of {T}")
        if len(self._val_tokens) <= B * T:
            B = max(1, (len(self._val_tokens) - 1) // T)  # a short validation split still gets evaluated
        # With tied unused rows the shared-row loss is the full model's, for a fraction of the head's work.
        with friendly_oom(TRAINING_OOM_HINT):
            val_loss = mean_loss(
                self.model,
                self._val_tokens,
                B,
                T,
                max_batches=self.config.eval_batches,
                device=self.device,
                dist=self.dist,
                shared_rows=self.shared_rows,
                token_rows=self.token_rows,
            )
        return {"val_loss": val_loss, "val_bpc": val_loss * self._bits_per_char_per_nat()}

    def _bits_per_char_per_nat(self) -> float:
        """Bits per character of the validation split per nat of mean validation loss per token."""
        meta = self.corpus.meta
        return bits_per_char(1.0, meta["val_tokens"], meta["val_characters"])

    def sample(self, step: int) -> str:
        """One sample from the current weights, seeded by the step so it is reproducible.

        Its continuation's memorisation figures go to ``on_sample_report`` before it is returned. The training
        split's copy index is built by the first sample, once per corpus and process, or loaded from the corpus
        cache (:func:`core.memorization.index_for`).
        """
        config = SampleConfig(max_new_tokens=self.config.sample_tokens, temperature=0.8, top_k=200, seed=step)
        generation = generate(self.full_model(), self.tokenizer, self.config.sample_prompt, config)
        report = index_for(self.corpus).report_text(generation.continuations[0], self.tokenizer)
        self._emit("on_sample_report", step, report.metrics())
        return generation.samples[0]

    def fit(self, out_dir: str | Path) -> TrainResult:
        """Train, then write ``out_dir/final`` (and ``out_dir/best`` when evaluating) and report the result.

        Training continues from the trainer's state: step 0 for a new trainer, the checkpoint's step after
        :meth:`load_training_state`. With ``checkpoint_interval`` set, a resumable checkpoint goes to
        ``out_dir/resume`` every that many steps and once more when the loop ends (a stop request included),
        before the final evaluation, so resuming it continues exactly as if training had never stopped.
        """
        out_dir = Path(out_dir)
        cfg = self.config
        run = self._loop
        self._emit("on_train_start", self.summary())
        self.model.train()
        tokens_per_step = self.tokens_per_step
        main = self.dist.is_main
        stop_reason = "max_steps"
        loop_start = self.clock()
        budget = self._budget_planner() if cfg.time_budget is not None else None
        schedule = self._budget_schedule()
        budget_used_before = run.budget_used  # what earlier processes of a resumed budget run spent
        steps_this_process = 0
        events = 0  # rounds of periodic work in the budget plan (rank 0's, like the plan)
        budget_event = False  # whether this step is a round of the budget plan's periodic work

        def budget_elapsed() -> float:
            return budget_used_before + self.clock() - loop_start

        def due(interval: int, step: int) -> bool:
            """Whether periodic work with this interval (0: off) runs after ``step``: every ``interval`` steps, or
            in a budget run at the plan's evenly spaced points (none before the first plan)."""
            if not interval:
                return False
            return step % interval == 0 if schedule is None else budget_event

        def timed(overhead: str, work: Callable[..., object], *args) -> object:
            """``work(*args)``; in a budget run its duration feeds the planner's ``overhead`` estimate."""
            started = self.clock()
            result = work(*args)
            if budget is not None:
                setattr(budget.overheads, overhead, self.clock() - started)
            return result

        def checkpoint(at_step: int) -> None:
            run.budget_used = budget_elapsed()
            self._checkpoint(out_dir, at_step)

        def run_eval(at_step: int) -> None:
            run.last_eval = timed("eval_seconds", self.evaluate)
            run.last_eval_step = at_step
            if run.last_eval["val_loss"] < run.best_val:
                run.best_val, run.best_val_step, run.evals_without_improvement = run.last_eval["val_loss"], at_step, 0
                if main:  # only rank 0 writes the best weights; the other ranks need not keep a copy
                    run.best_state = {k: v.detach().clone() for k, v in self.full_model().state_dict().items()}
            else:
                run.evals_without_improvement += 1
            # The best so far travels with every evaluation: a run's latest value of it is its best.
            best = {"best_val_loss": run.best_val, "best_val_bpc": run.best_val * self._bits_per_char_per_nat()}
            self._emit("on_eval", at_step, {**run.last_eval, **best})

        while run.step < cfg.max_steps:
            started = self.clock()
            # A batch too large for the device is one line naming --batch-size, not an allocator traceback.
            with friendly_oom(TRAINING_OOM_HINT):
                lr = self.optimizer.param_groups[0]["lr"]
                loss_value = self._train_step()
            elapsed = self.clock() - started
            steps_this_process += 1
            proposal = 0.0  # the budget's plan for the total steps: rank 0's counts, 0 = none yet
            if budget is not None:
                if steps_this_process > 1:  # a process's first step allocates and warms caches: not its speed
                    budget.record_step(elapsed)
                if budget.step_seconds is not None and (schedule.total or steps_this_process > PROBE_STEPS):
                    now = budget_elapsed()
                    # -1: one more step would overrun the budget, whatever the plan said (the machine slowed down)
                    if budget.out_of_time(now):
                        proposal = -1.0
                    else:  # the plan and its rounds of periodic work in one number (fewer than 16 rounds)
                        proposal = float(budget.plan(run.step + 1, now) * 16 + budget.events)
            # One small collective a step: the job's mean loss (what every rank logs and stops on), whether any
            # rank was asked to stop, so all ranks leave the loop after the same step, and rank 0's budget plan, so
            # all ranks keep the same schedule (learning rate, evaluations, end).
            loss_sum, stops, proposal = all_reduce_sum(
                [loss_value, float(self._stop_reason is not None), proposal if main else 0.0], self.dist
            )
            loss_value = loss_sum / self.dist.world_size
            run.step += 1
            step = run.step
            if proposal > 0:
                total, events = divmod(round(proposal), 16)
                schedule.plan(total, cfg.warmup_fraction)
                self._apply_schedule()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}); lower --lr")
            run.loss_value = loss_value
            run.window.append(loss_value)
            run.best_loss = min(run.best_loss, loss_value)
            avg_loss = sum(run.window) / len(run.window)
            metrics = {
                "loss": loss_value,
                "avg_loss": avg_loss,
                "best_loss": run.best_loss,
                "lr": lr,
                "time_per_batch": elapsed,
                "tokens_per_sec": tokens_per_step / elapsed,
            }
            if self.peak_flops is not None:
                metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / self.peak_flops
            if schedule is not None and schedule.total:
                metrics["planned_steps"] = schedule.total
            self._emit("on_step", step, metrics)
            budget_event = schedule is not None and periodic_due(
                step, run.budget_rounds, run.last_event_step, schedule.total, events
            )
            if budget_event:
                run.last_event_step, run.budget_rounds = step, run.budget_rounds + 1
            if due(cfg.eval_interval, step):
                run_eval(step)
                if cfg.patience is not None and run.evals_without_improvement >= cfg.patience:
                    stop_reason = "patience"
                    break
            if main and due(cfg.sample_interval, step):
                self._emit("on_sample", step, timed("sample_seconds", self.sample, step))
                run.last_sample_step = step
            # After the step's evaluation and sample, so a run resumed from here repeats neither.
            if due(cfg.checkpoint_interval, step):
                timed("checkpoint_seconds", checkpoint, step)
            if cfg.target_loss > 0 and avg_loss < cfg.target_loss:
                stop_reason = "target_loss"
                break
            if schedule is not None and ((schedule.total and step >= schedule.total) or proposal < 0):
                # The planned schedule is complete (or time is up), inside the budget, unless the cap was the limit.
                stop_reason = "max_steps" if step >= cfg.max_steps else "time_budget"
                break
            # Alone, a request made at any time during the step (a signal, a callback) ends the training here. In a
            # job of several processes only the reduced flag decides: a signal landing on one rank after the
            # collective would let that rank leave a step before the others, which then wait in the next step's
            # gradient all-reduce for ever. Such a late request is carried by the next step's collective.
            if (stops > 0) if self.dist.enabled else (self._stop_reason is not None):
                stop_reason = self._stop_reason or "stopped: another process of the job was stopped"
                break

        step = run.step
        seconds = self.clock() - loop_start
        # Before the final evaluation: the evaluation at a step that is not a multiple of eval_interval would count
        # towards patience and the best weights, which an uninterrupted run never sees.
        if cfg.checkpoint_interval and step != self._saved_step:
            checkpoint(step)
        if cfg.eval_interval and step > run.last_eval_step:
            run_eval(step)
        if schedule is not None:  # the plan moved during the run: the last step it sampled at is remembered
            last_sample_step = run.last_sample_step
        else:
            last_sample_step = step - step % cfg.sample_interval if cfg.sample_interval else 0
        if main and step > last_sample_step:
            self._emit("on_sample", step, self.sample(step))

        # Rank 0 writes the checkpoints; the other ranks of a job report the same paths.
        metadata = {"step": step, "stop_reason": stop_reason, **run.last_eval}
        final_checkpoint = out_dir / "final"
        if main:
            final_checkpoint = save_checkpoint(self.full_model(), final_checkpoint, metadata)
        best_checkpoint = None if run.best_val_step is None else out_dir / "best"
        if main and run.best_state is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(run.best_state)
            best_checkpoint = save_checkpoint(
                self.model, best_checkpoint, {"step": run.best_val_step, "val_loss": run.best_val}
            )
            self.model.load_state_dict(current)
        result = TrainResult(
            steps=step,
            stop_reason=stop_reason,
            final_loss=run.loss_value,
            avg_loss=sum(run.window) / len(run.window) if run.window else math.nan,
            best_val_loss=None if run.best_val_step is None else run.best_val,
            best_val_step=run.best_val_step,
            final_checkpoint=final_checkpoint,
            best_checkpoint=best_checkpoint,
            seconds=seconds,
            last_eval=run.last_eval,
            planned_steps=None if schedule is None else schedule.total,
        )
        self._emit("on_train_end", result)
        return result

    def _budget_schedule(self) -> BudgetSchedule | None:
        """The schedule a budget run plans (shared by every parameter group), None without a budget."""
        if self.config.time_budget is None:
            return None
        return self.scheduler.lr_lambdas[0]

    def _apply_schedule(self) -> None:
        """Set every group's learning rate for the next step from the (re-planned) schedule."""
        index = self.scheduler.last_epoch
        for group, schedule in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * schedule(index)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _budget_planner(self) -> BudgetPlanner:
        """A planner for this run's budget, its evaluation cost estimated from one timed validation batch (until the
        first real evaluation is timed)."""
        cfg = self.config
        B, T = self.data_config.batch_size, self.data_config.block_size
        batches = max(1, (len(self._val_tokens) - 1) // (B * T))
        if cfg.eval_batches is not None:
            batches = min(batches, cfg.eval_batches)
        x, y = next(epoch_batches(self._val_tokens, max(1, min(B, (len(self._val_tokens) - 1) // T)), T))
        x, y = x.to(self.device), y.to(self.device)
        with torch.no_grad(), autocast_for(self.device, self.precision):
            for _ in range(2):  # the second call is the one timed: the first allocates
                started = self.clock()
                self.model(x, y, shared_rows=self.shared_rows, token_rows=self.token_rows)
        eval_seconds = (self.clock() - started) * -(-batches // self.dist.world_size)
        periodic = {"eval": bool(cfg.eval_interval), "sample": bool(cfg.sample_interval) and self.dist.is_main}
        periodic["checkpoint"] = bool(cfg.checkpoint_interval)
        return BudgetPlanner(cfg.time_budget, cfg.max_steps, periodic, Overheads(eval_seconds=eval_seconds))

    def _train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns this process's mean loss."""
        cfg = self.config
        losses = []
        for micro in range(cfg.grad_accum):
            x, y = self.batches.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # DDP averages gradients across processes during the last micro-batch's backward only.
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or self._ddp is None else self._ddp.no_sync()
            with sync:
                with autocast_for(self.device, self.precision):
                    # [1]: only the loss; the logits the plain route returns are not kept alive through the step
                    if self.shared_rows is not None:
                        loss = self._train_step_model(x, y)[1]
                    else:
                        loss = self._train_step_model(x, y, return_logits=self._plain_loss)[1]
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
            losses.append(loss.detach())
        if cfg.grad_clip > 0:
            trained = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # .item() waits for the device, so the step's timing is honest
        return (losses[0] if len(losses) == 1 else torch.stack(losses).mean()).item()

    def _checkpoint(self, out_dir: Path, step: int) -> None:
        """A resumable checkpoint of ``step``, written by rank 0 (every rank holds the same state)."""
        if self.dist.is_main:
            self._emit("before_checkpoint", step)
            self.save_training_state(out_dir)
        self._saved_step = step

    # -- resumable checkpoints ------------------------------------------------------------------------------------

    def full_model(self) -> GPT:
        """The model with every weight current: with compact token rows, the full embedding is written from them
        first (evaluation, samples and checkpoints use the whole GPT-2)."""
        if self.token_rows is not None:
            self.shared_rows.expand_into(self.token_rows.detach(), self.model.transformer.wte.weight)
        return self.model

    def save_training_state(self, out_dir: str | Path) -> Path:
        """Write a resumable checkpoint of the current step to ``out_dir/resume``, keeping the newest
        ``keep_checkpoints``; returns it (:func:`core.train_state.save_training_state`)."""
        directory = save_training_state(self, out_dir)
        self._saved_step = self._loop.step
        return directory

    def load_training_state(self, directory: str | Path) -> int:
        """Continue from the resumable checkpoint ``directory``; returns its step. A checkpoint of another training,
        or a missing, corrupt or inconsistent one, raises :class:`CheckpointError` and changes nothing
        (:func:`core.train_state.load_training_state`)."""
        loop = load_training_state(self, directory)
        self._loop = loop
        self._saved_step = loop.step
        return loop.step
