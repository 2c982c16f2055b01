"""The terminal consumer of the trainer's reports: the reference's log lines and a progress bar."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from core.callbacks import Callback, TrainResult
from core.memorization import METRIC_LONGEST, METRIC_SHARE


class TerminalProgress(Callback):
    """Prints the run header, a line per ``log_interval`` steps, evaluations, samples and the end.

    On a terminal a one-line progress bar (with ETA) is redrawn in place between log lines; in a file or pipe only
    whole lines are written, so logs of background jobs stay readable.
    """

    def __init__(self, max_steps: int, log_interval: int = 10, stream: TextIO | None = None, show_samples=True):
        self.max_steps = max_steps
        self.log_interval = max(1, log_interval)
        self.stream = stream or sys.stdout
        self.show_samples = show_samples
        self.is_tty = self.stream.isatty()
        self._started = time.perf_counter()
        self._start_step = 0  # a resumed training starts after this step: the ETA counts only this session's steps
        self._bar_visible = False
        self._copy_metrics: dict[str, float] | None = None  # the next sample's memorisation figures

    def _line(self, text: str) -> None:
        if self._bar_visible:
            self.stream.write("\r\033[K")
            self._bar_visible = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_train_start(self, summary: dict) -> None:
        self._started = time.perf_counter()
        self._start_step = summary.get("start_step", 0)
        self._line(f"total parameters: {summary['total_params']:,} (trainable {summary['trainable_params']:,})")
        self._line(f"model size: {summary['size_mb']:.2f} MB (fp32)")
        for name, size in summary["size_by_component"].items():
            self._line(f"  {name}: {size:.2f} MB")
        self._line(f"loaded {summary['tokens_loaded']:,} tokens ({summary['dataset_name']})")
        self._line(f"1 epoch = {summary['batches_per_epoch']:,} batches of {summary['tokens_per_batch']:,} tokens")
        peak = summary.get("peak_tflops")
        self._line(
            f"device: {summary['device']}, {summary['threads']} threads"
            + (f" per process × {summary['world_size']} processes" if summary.get("world_size", 1) > 1 else "")
            + (f", peak {peak:g} TFLOP/s (for MFU)" if peak is not None else "")
        )
        if self._start_step:
            self._line(f"resumed after step {self._start_step:,}")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_interval == 0 or step == self._start_step + 1:
            self._line(
                f"step {step:6d} | loss {metrics['loss']:.4f} | avg_loss {metrics['avg_loss']:.4f} | "
                f"best_loss {metrics['best_loss']:.4f} | lr {metrics['lr']:.2e} | "
                f"time/batch {metrics['time_per_batch'] * 1000:.1f} ms | {metrics['tokens_per_sec']:,.0f} tok/s"
                # MFU is reported only where the device's peak is known (see core.device.peak_flops)
                + (f" | mfu {metrics['mfu'] * 100:.1f}%" if "mfu" in metrics else "")
            )
        if self.is_tty:
            # A time-budget run reports the steps it plans to take; the bar and ETA follow that plan.
            planned = int(metrics.get("planned_steps", self.max_steps))
            elapsed = time.perf_counter() - self._started
            eta = elapsed / (step - self._start_step) * max(0, planned - step)
            done = min(30, int(30 * step / planned))
            bar = "█" * done + "·" * (30 - done)
            note = "planned for the time budget" if "planned_steps" in metrics else "at most; a target loss may stop it"
            self.stream.write(
                f"\r\033[K{bar} {step}/{planned} avg_loss {metrics['avg_loss']:.4f} ETA {eta:,.0f}s ({note})"
            )
            self.stream.flush()
            self._bar_visible = True

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._line(f"step {step:6d} | val_loss {metrics['val_loss']:.4f} | val_bpc {metrics['val_bpc']:.4f}")

    def on_sample_report(self, step: int, metrics: dict[str, float]) -> None:
        self._copy_metrics = metrics

    def on_sample(self, step: int, text: str) -> None:
        if self.show_samples:
            self._line(f"--- sample at step {step} ---\n{text}\n---")
            copied = self._copy_metrics
            if copied is not None:
                share = copied.get(METRIC_SHARE)
                spans = "no 8-token spans" if share is None else f"{100 * share:.1f}% of 8-token spans"
                self._line(f"copied from the training split: {spans}, longest {copied[METRIC_LONGEST]:.0f} chars")
        self._copy_metrics = None

    def on_train_end(self, result: TrainResult) -> None:
        self._line(
            f"stopped after {result.steps} steps ({result.stop_reason}) in {result.seconds:.1f}s; "
            f"final loss {result.final_loss:.4f}, avg_loss {result.avg_loss:.4f}"
        )
