import math

import pytest
import torch

from core.config import DataConfig, ModelConfig, TrainConfig
from core.errors import UsageError
from core.trainer import Callback, Trainer, build_optimizer, build_scheduler

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


class Recorder(Callback):
    def __init__(self):
        self.summary, self.steps, self.evals, self.samples, self.result = None, [], [], [], None

    def on_train_start(self, summary):
        self.summary = summary

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_sample(self, step, text):
        self.samples.append((step, text))

    def on_train_end(self, result):
        self.result = result


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-head.txt"
    path.write_text(shakespeare_path.read_text()[:40_000])
    return path


def make_trainer(small_corpus, tmp_path, **train_fields):
    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=4, block_size=32)
    fields = {"max_steps": 30, "eval_interval": 10, "sample_interval": 15, "sample_tokens": 8, "device": "cpu"}
    recorder = Recorder()
    trainer = Trainer(MODEL, data, TrainConfig(**{**fields, **train_fields}), [recorder])
    return trainer, recorder


def test_every_step_reports_the_metrics_and_loss_goes_down(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, lr=3e-3, target_loss=0)
    result = trainer.fit(tmp_path / "out")
    assert [s for s, _ in rec.steps] == list(range(1, 31))
    for _, metrics in rec.steps:
        assert set(metrics) == {"loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec"}
        assert all(math.isfinite(v) for v in metrics.values())
    first, last = rec.steps[0][1], rec.steps[-1][1]
    recent = sum(m["loss"] for _, m in rec.steps[-5:]) / 5
    assert recent < first["loss"] - 1.0
    assert last["best_loss"] == min(m["loss"] for _, m in rec.steps)
    assert last["tokens_per_sec"] == pytest.approx(4 * 32 / last["time_per_batch"])
    assert [s for s, _ in rec.evals] == [10, 20, 30]
    assert all(set(m) == {"val_loss", "val_bpc"} for _, m in rec.evals)
    assert [s for s, _ in rec.samples] == [15, 30]
    assert all(text.startswith("ROMEO:") for _, text in rec.samples)
    assert result.stop_reason == "max_steps" and result.steps == 30
    assert result.final_checkpoint.joinpath("model.safetensors").exists()
    assert result.best_checkpoint is not None and result.best_val_step in (10, 20, 30)
    assert rec.result is result
    assert rec.summary["tokens_loaded"] == trainer.corpus.train_tokens
    assert rec.summary["batches_per_epoch"] == (trainer.corpus.train_tokens - 1) // 128


def test_running_average_uses_the_window(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, avg_window=5, max_steps=12, target_loss=0)
    trainer.fit(tmp_path / "out")
    losses = [m["loss"] for _, m in rec.steps]
    assert rec.steps[-1][1]["avg_loss"] == pytest.approx(sum(losses[-5:]) / 5)
    assert rec.steps[2][1]["avg_loss"] == pytest.approx(sum(losses[:3]) / 3)


def test_bits_per_character_follow_from_the_loss(small_corpus, tmp_path):
    trainer, _ = make_trainer(small_corpus, tmp_path)
    metrics = trainer.evaluate()
    meta = trainer.corpus.meta
    expected = metrics["val_loss"] * meta["val_tokens"] / meta["val_characters"] / math.log(2)
    assert metrics["val_bpc"] == pytest.approx(expected)


def test_high_target_loss_stops_early(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, target_loss=50.0)
    result = trainer.fit(tmp_path / "out")
    assert result.stop_reason == "target_loss"
    assert result.steps == 1
    assert len(rec.evals) == 1  # the final evaluation still runs
    assert len(rec.samples) == 1  # and the final sample


def test_patience_stops_when_validation_stalls(small_corpus, tmp_path):
    # A learning rate of ~0 can never improve validation loss after the first evaluation.
    trainer, rec = make_trainer(small_corpus, tmp_path, lr=1e-12, patience=2, eval_interval=2, target_loss=0)
    result = trainer.fit(tmp_path / "out")
    assert result.stop_reason == "patience"
    assert result.steps < 30


def test_stop_request_ends_after_the_current_step(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, target_loss=0)

    class StopAtFive(Callback):
        def on_step(self, step, metrics):
            if step == 5:
                trainer.request_stop("SIGTERM")

    trainer.callbacks.append(StopAtFive())
    result = trainer.fit(tmp_path / "out")
    assert result.steps == 5
    assert result.stop_reason == "stopped: SIGTERM"
    assert result.final_checkpoint.exists()


def test_block_size_above_context_is_refused(small_corpus, tmp_path):
    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path), batch_size=2, block_size=64)
    with pytest.raises(UsageError, match="above the model's context of 32"):
        Trainer(MODEL, data, TrainConfig(device="cpu"))


def test_weight_decay_only_on_matrices():
    model = torch.nn.Module()
    from core.model import GPT

    model = GPT(MODEL)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.3), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_one_cycle_schedule_warms_up_then_anneals():
    from core.model import GPT

    config = TrainConfig(max_steps=100, lr=1e-3, warmup_fraction=0.2, final_div_factor=100)
    optimizer = build_optimizer(GPT(MODEL), config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3 / 25)
    peak = max(range(100), key=lambda i: lrs[i])
    assert lrs[peak] == pytest.approx(1e-3, rel=1e-3) and 18 <= peak <= 22
    assert lrs[-1] < 1e-3 / 25
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


def test_gradients_are_clipped(small_corpus, tmp_path, monkeypatch):
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        norm = original(parameters, max_norm, *args, **kwargs)
        seen.append((max_norm, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer, _ = make_trainer(small_corpus, tmp_path, max_steps=3, target_loss=0, eval_interval=0)
    trainer.fit(tmp_path / "out")
    assert [m for m, _ in seen] == [0.5, 0.5, 0.5]
    assert seen[0][1] > 0.5  # the initial gradients are larger than the clip, so clipping mattered
