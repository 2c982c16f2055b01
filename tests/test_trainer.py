import dataclasses
import io
import math

import pytest
import torch

from core.callbacks import Callback
from core.config import DataConfig, ModelConfig, TrainConfig
from core.errors import UsageError
from core.estimate import training_flops_per_token
from core.optim import build_optimizer, build_scheduler
from core.trainer import Trainer
from pipelines.progress import TerminalProgress

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
    assert all(set(m) == {"val_loss", "val_bpc", "best_val_loss", "best_val_bpc"} for _, m in rec.evals)
    for i, (_, m) in enumerate(rec.evals):  # the best so far is the lowest of the evaluations up to this one
        assert m["best_val_loss"] == min(e["val_loss"] for _, e in rec.evals[: i + 1])
        assert m["best_val_bpc"] == pytest.approx(min(e["val_bpc"] for _, e in rec.evals[: i + 1]))
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


# ---- the GPU training path: MFU, vocabulary padding, torch.compile, TF32 ----

# Importing torch.compile's machinery (torch._dynamo) makes torch itself warn about its own TorchScript use.
quiet_compile_import = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_mfu_is_reported_on_every_step_when_a_peak_is_given(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, max_steps=4, peak_tflops=1.0, eval_interval=0, target_loss=0)
    terminal = io.StringIO()
    trainer.callbacks.append(TerminalProgress(4, log_interval=1, stream=terminal, show_samples=False))
    trainer.fit(tmp_path / "out")
    flops_per_token = training_flops_per_token(MODEL, 32)
    assert trainer.flops_per_token == flops_per_token
    assert rec.summary["flops_per_token"] == flops_per_token and rec.summary["peak_tflops"] == 1.0
    assert len(rec.steps) == 4
    for _, metrics in rec.steps:
        assert metrics["mfu"] == pytest.approx(metrics["tokens_per_sec"] * flops_per_token / 1e12)
        assert 0 < metrics["mfu"] < 1  # a tiny model on a CPU is nowhere near even 1 TFLOP/s
    lines = terminal.getvalue().splitlines()
    assert any(line.startswith("device: cpu") and line.endswith("peak 1 TFLOP/s (for MFU)") for line in lines)
    assert sum(" | mfu " in line for line in lines) == 4


def test_no_mfu_on_the_cpu_without_a_peak(small_corpus, tmp_path):
    trainer, rec = make_trainer(small_corpus, tmp_path, max_steps=2, eval_interval=0, target_loss=0)
    trainer.fit(tmp_path / "out")
    assert trainer.peak_flops is None and rec.summary["peak_tflops"] is None
    assert rec.summary["flops_per_token"] > 0  # the FLOPs are known even where the peak is not
    assert all("mfu" not in metrics for _, metrics in rec.steps)


def test_the_device_peak_is_looked_up_and_a_given_peak_overrides_it(small_corpus, tmp_path, monkeypatch):
    # No GPU needed: the lookup is faked to know this CPU's peak, as the real one knows a listed GPU's.
    import core.trainer

    monkeypatch.setattr(core.trainer, "peak_flops", lambda device: 989e12 if device.type == "cpu" else None)
    trainer, _ = make_trainer(small_corpus, tmp_path)
    assert trainer.peak_flops == 989e12 and trainer.summary()["peak_tflops"] == 989
    trainer, _ = make_trainer(small_corpus, tmp_path, peak_tflops=312)
    assert trainer.peak_flops == 312e12 and trainer.summary()["peak_tflops"] == 312


def test_a_padded_vocabulary_trains_and_its_checkpoint_reloads_with_the_same_logits(small_corpus, tmp_path):
    from core.checkpoint import load_checkpoint

    padded = dataclasses.replace(MODEL, pad_vocab_multiple=64)
    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=4, block_size=32)
    config = TrainConfig(max_steps=5, eval_interval=5, sample_interval=0, sample_tokens=8, device="cpu", lr=3e-3)
    rec = Recorder()
    trainer = Trainer(padded, data, config, [rec])
    assert trainer.model.transformer.wte.weight.shape[0] == 50_304  # 50,257 rounded up to a multiple of 64
    result = trainer.fit(tmp_path / "out")
    assert result.steps == 5 and all(math.isfinite(m["loss"]) for _, m in rec.steps)
    assert rec.steps[-1][1]["loss"] < rec.steps[0][1]["loss"]
    reloaded, document = load_checkpoint(result.final_checkpoint)
    assert reloaded.config == padded and document["model"]["pad_vocab_multiple"] == 64
    idx = torch.from_numpy(trainer.corpus.tokens("val")[:32].astype("int64")).unsqueeze(0)
    with torch.no_grad():
        expected, _ = trainer.model.eval()(idx)
        got, _ = reloaded(idx)
    assert got.shape == (1, 32, 50_257)  # padding rows are never predicted
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@quiet_compile_import
def test_training_module_compiles_a_wrapper_that_shares_the_parameters():
    from core.model import GPT
    from core.optim import training_module

    model = GPT(MODEL)
    assert training_module(model, compile=False) is model
    compiled = training_module(model, compile=True)  # lazy: nothing is compiled until it is called
    assert compiled is not model and compiled._orig_mod is model
    assert all(a is b for a, b in zip(compiled.parameters(), model.parameters(), strict=True))


def test_compiling_without_a_cpp_compiler_is_refused_before_any_work(small_corpus, tmp_path, monkeypatch):
    import core.trainer

    monkeypatch.setattr(core.trainer, "cpp_compiler", lambda: None)
    monkeypatch.setattr(core.trainer, "prepare_corpus", lambda *a: pytest.fail("the corpus was prepared first"))
    with pytest.raises(UsageError, match="needs a C\\+\\+ compiler"):
        make_trainer(small_corpus, tmp_path, compile=True)


@pytest.mark.slow
@quiet_compile_import
def test_compiled_training_steps_give_the_same_losses_and_plain_checkpoints(small_corpus, tmp_path):
    from core.checkpoint import load_checkpoint
    from core.device import cpp_compiler

    if cpp_compiler() is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++, or $CXX), and none is installed")
    one_layer = dataclasses.replace(MODEL, n_layer=1)
    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=2, block_size=16)
    fields = {"max_steps": 2, "eval_interval": 0, "sample_interval": 0, "sample_tokens": 4, "target_loss": 0}
    runs = {}
    for compile in (False, True):
        rec = Recorder()
        config = TrainConfig(**fields, device="cpu", compile=compile, lr=1e-2)
        trainer = Trainer(one_layer, data, config, [rec])
        if compile:  # the steps go through a compiled wrapper of the very module that is checkpointed
            assert trainer._train_step_model._orig_mod is trainer.model
        result = trainer.fit(tmp_path / f"out-{compile}")
        runs[compile] = ([m["loss"] for _, m in rec.steps], result.final_checkpoint)
    (plain_losses, plain_checkpoint), (compiled_losses, compiled_checkpoint) = runs[False], runs[True]
    assert len(compiled_losses) == 2
    # The second loss comes after an optimizer step on the compiled gradients, so it checks the backward pass too.
    assert compiled_losses == pytest.approx(plain_losses, abs=1e-4)
    assert compiled_losses[1] != pytest.approx(compiled_losses[0], abs=1e-3)
    # The checkpoint is the plain module's (no "_orig_mod." keys) and loads like any other.
    model, _ = load_checkpoint(compiled_checkpoint)
    reference, _ = load_checkpoint(plain_checkpoint)
    for (name, a), (other, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert name == other
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_tf32_is_enabled_for_cuda_only():
    from core.optim import enable_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        enable_tf32(torch.device("cuda"))  # only flips process-wide switches: no GPU needed
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_terminal_line_shows_mfu_only_when_reported():
    stream = io.StringIO()
    progress = TerminalProgress(10, log_interval=1, stream=stream)
    metrics = {"loss": 5.0, "avg_loss": 5.0, "best_loss": 5.0, "lr": 1e-3, "time_per_batch": 0.1}
    progress.on_step(1, {**metrics, "tokens_per_sec": 1000.0})
    progress.on_step(2, {**metrics, "tokens_per_sec": 1000.0, "mfu": 0.4123})
    first, second = stream.getvalue().splitlines()
    assert "mfu" not in first
    assert second.endswith("1,000 tok/s | mfu 41.2%")


@pytest.mark.parametrize("max_steps, warmup", [(1, 0.1), (9, 0.1), (19, 0.05), (1, 0.5), (3, 0.25), (200, 0.1)])
def test_schedule_works_for_every_run_length(max_steps, warmup):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    config = TrainConfig(max_steps=max_steps, warmup_fraction=warmup, lr=1e-3)
    scheduler = build_scheduler(optimizer, config)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(max_steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    if warmup * (max_steps + 1) >= 1:  # a warm-up of at least one step starts from lr / div_factor
        assert rates[0] == pytest.approx(1e-3 / config.div_factor)
    assert max(rates) <= 1e-3 * (1 + 1e-9) and min(rates) > 0


# ---- resumable checkpoints: stop, resume, same training ----


def resume_trainer(small_corpus, tmp_path, callbacks=(), **train_fields):
    """A trainer whose every step draws on the RNGs a resume must restore: dropout, random batch windows."""
    data = DataConfig(
        source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=4, block_size=32, order="random"
    )
    fields = {
        "max_steps": 8,
        "eval_interval": 3,
        "eval_batches": 2,
        "sample_interval": 4,
        "sample_tokens": 4,
        "checkpoint_interval": 2,
        "patience": 5,
        "device": "cpu",
        "lr": 3e-3,
        "target_loss": 0,
    }
    model = dataclasses.replace(MODEL, dropout=0.1)
    return Trainer(model, data, TrainConfig(**{**fields, **train_fields}), list(callbacks))


class StopAt(Callback):
    def __init__(self, step):
        self.step, self.trainer = step, None

    def on_step(self, step, metrics):
        if step == self.step:
            self.trainer.request_stop("SIGTERM")


def test_stopping_and_resuming_gives_the_same_training_as_running_straight(small_corpus, tmp_path):
    straight = Recorder()
    # Writing checkpoints must not change the training either: the straight run writes none.
    reference = resume_trainer(small_corpus, tmp_path, [straight], checkpoint_interval=0)
    reference.fit(tmp_path / "straight")

    first = Recorder()
    stop = StopAt(5)  # not a multiple of the checkpoint, eval or sample interval: the stop writes its own checkpoint
    stopped = resume_trainer(small_corpus, tmp_path, [first, stop])
    stop.trainer = stopped
    assert stopped.fit(tmp_path / "resumed").stop_reason == "stopped: SIGTERM"

    second = Recorder()
    resumed = resume_trainer(small_corpus, tmp_path, [second])
    checkpoint = tmp_path / "resumed" / "resume" / "step-00000005"
    assert resumed.load_training_state(checkpoint) == 5
    result = resumed.fit(tmp_path / "resumed")

    assert [s for s, _ in second.steps] == [6, 7, 8]
    assert second.summary["start_step"] == 5
    losses = [(s, m["loss"], m["avg_loss"], m["best_loss"], m["lr"]) for s, m in first.steps + second.steps]
    assert losses == [(s, m["loss"], m["avg_loss"], m["best_loss"], m["lr"]) for s, m in straight.steps]
    # The stopped training's final evaluation at step 5 is extra; every other one is the straight run's.
    assert first.evals[:-1] + second.evals == straight.evals and first.evals[-1][0] == 5
    assert [s for s, _ in straight.evals] == [3, 6, 8]
    assert [s for s, _ in second.samples] == [8] and second.samples == straight.samples[-1:]
    for (name, a), (other, b) in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert name == other
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert result.best_val_step == reference._loop.best_val_step
    assert result.best_val_loss == pytest.approx(reference._loop.best_val, abs=1e-6)


def test_checkpoints_are_written_every_interval_and_at_the_end_keeping_the_newest(small_corpus, tmp_path):
    from core.checkpoint import latest_resumable_checkpoint, list_resumable_checkpoints, load_resumable_checkpoint

    trainer = resume_trainer(small_corpus, tmp_path, max_steps=7, keep_checkpoints=2, eval_interval=0)
    trainer.fit(tmp_path / "out")
    assert [p.name for p in list_resumable_checkpoints(tmp_path / "out")] == ["step-00000006", "step-00000007"]
    latest = load_resumable_checkpoint(latest_resumable_checkpoint(tmp_path / "out"))
    assert latest.step == 7
    names = {name for name, _ in trainer.model.named_parameters()}
    assert set(latest.tensors["optimizer"]) == {f"{k}/{n}" for k in ("exp_avg", "exp_avg_sq", "step") for n in names}
    assert "best" not in latest.tensors  # no evaluation, no best weights
    assert latest.state["trainer"]["window"] == pytest.approx(list(trainer._loop.window))

    off = resume_trainer(small_corpus, tmp_path, max_steps=2, checkpoint_interval=0)
    off.fit(tmp_path / "off")
    assert not (tmp_path / "off" / "resume").exists()


def test_a_checkpoint_of_another_training_is_refused_and_changes_nothing(small_corpus, tmp_path):
    from core.checkpoint import CheckpointError

    resume_trainer(small_corpus, tmp_path, max_steps=3).fit(tmp_path / "out")
    other = resume_trainer(small_corpus, tmp_path, max_steps=3, lr=1e-3)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    batch_rng, global_rng = other.batches.generator.get_state(), torch.get_rng_state()
    with pytest.raises(CheckpointError, match="lr is 0.003 there, 0.001 here"):
        other.load_training_state(tmp_path / "out" / "resume" / "step-00000003")
    assert other._loop.step == 0 and not other.optimizer.state
    assert torch.equal(other.batches.generator.get_state(), batch_rng)
    assert torch.equal(torch.get_rng_state(), global_rng)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


def test_the_trainer_announces_every_checkpoint_before_writing_it(small_corpus, tmp_path):
    """Callbacks hear of a resumable checkpoint before it exists, so a logger can store its points first."""
    seen: list[tuple[int, bool]] = []

    class CheckpointWatcher(Callback):
        def before_checkpoint(self, step: int) -> None:
            seen.append((step, (tmp_path / "out" / "resume" / f"step-{step:08d}").exists()))

    trainer, _ = make_trainer(
        small_corpus, tmp_path, max_steps=7, checkpoint_interval=3, eval_interval=0, sample_interval=0, target_loss=0
    )
    trainer.callbacks.append(CheckpointWatcher())
    trainer.fit(tmp_path / "out")
    assert seen == [(3, False), (6, False), (7, False)]
    assert (tmp_path / "out" / "resume" / "step-00000007").is_dir()


def test_a_batch_that_does_not_fit_in_memory_is_one_message_naming_the_batch_size(tmp_path, shakespeare_path):
    from core.memory import NotEnoughMemory

    data = DataConfig(source=str(shakespeare_path), batch_size=2, block_size=16)
    config = TrainConfig(max_steps=3, eval_interval=0, sample_interval=0, checkpoint_interval=0, device="cpu")
    trainer = Trainer(MODEL, data, config)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    trainer._train_step_model = out_of_memory
    with pytest.raises(NotEnoughMemory, match="--batch-size"):
        trainer.fit(tmp_path / "out")
    assert not (tmp_path / "out" / "final").exists()


def test_each_sample_reports_how_much_it_copies_from_the_training_split(small_corpus, tmp_path, tokenizer):
    from core.memorization import index_for

    class CopyRecorder(Recorder):
        def __init__(self):
            super().__init__()
            self.reports = []

        def on_sample_report(self, step, metrics):
            self.reports.append((step, metrics))

    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=4, block_size=32)
    config = TrainConfig(max_steps=12, eval_interval=0, sample_interval=5, sample_tokens=24, device="cpu")
    recorder = CopyRecorder()
    trainer = Trainer(MODEL, data, config, [recorder])
    trainer.fit(tmp_path / "out")
    assert [s for s, _ in recorder.reports] == [s for s, _ in recorder.samples] == [5, 10, 12]
    index = index_for(trainer.corpus)
    for (_, metrics), (_, text) in zip(recorder.reports, recorder.samples, strict=True):
        expected = index.report_text(text.removeprefix(config.sample_prompt), tokenizer)
        assert metrics == expected.metrics()
        assert set(metrics) == {"sample_copied_share", "sample_longest_copy_chars"}
    lines = io.StringIO()
    progress = TerminalProgress(12, stream=lines)
    progress.on_sample_report(5, {"sample_copied_share": 0.125, "sample_longest_copy_chars": 17.0})
    progress.on_sample(5, "ROMEO: hello")
    assert lines.getvalue().splitlines()[-1] == (
        "copied from the training split: 12.5% of 8-token spans, longest 17 chars"
    )


def test_tied_unused_tokens_train_the_same_gpt2_with_every_unused_row_equal(small_corpus, tmp_path):
    from core.checkpoint import load_checkpoint

    trainer, rec = make_trainer(small_corpus, tmp_path, tie_unused_tokens=True, lr=3e-3, target_loss=0)
    result = trainer.fit(tmp_path / "out")
    shared = trainer.shared_rows
    used = set(trainer.corpus.tokens("train").tolist())
    assert set(shared.rows[:-1].tolist()) == used and shared.shared not in used
    weight = trainer.model.transformer.wte.weight
    assert torch.equal(weight[shared.unused], weight[shared.shared].expand(len(shared.unused), -1))
    assert rec.steps[-1][1]["loss"] < rec.steps[0][1]["loss"]
    # Its evaluation (through the shared row) is the full model's: the saved GPT-2 scores the same.
    model, _ = load_checkpoint(result.final_checkpoint)
    trainer.model.load_state_dict(model.state_dict())
    trainer.shared_rows = trainer.token_rows = None  # the plain full-vocabulary route
    assert trainer.evaluate()["val_loss"] == pytest.approx(rec.evals[-1][1]["val_loss"], rel=1e-5)


def test_bf16_training_on_a_cpu_where_bf16_measures_fast_tracks_the_fp32_loss_curve(
    small_corpus, tmp_path, monkeypatch
):
    from core import device as device_module

    # Whatever this CPU measures, a bf16 run gets bf16 where bf16 measures fast; its loss curve follows fp32's.
    monkeypatch.setattr(
        device_module, "matmul_gflops", lambda dtype, size=512: 400.0 if dtype == torch.bfloat16 else 100.0
    )
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer, rec = make_trainer(
            small_corpus,
            tmp_path / precision,
            lr=3e-3,
            target_loss=0,
            max_steps=12,
            precision=precision,
            eval_interval=0,
            sample_interval=0,
        )
        assert trainer.summary()["train_precision"] == precision
        trainer.fit(tmp_path / precision / "out")
        losses[precision] = [m["loss"] for _, m in rec.steps]
    fp32_losses, bf16_losses = losses["fp32"], losses["bf16"]
    assert len(bf16_losses) == 12 and bf16_losses[-1] < bf16_losses[0] - 0.3  # it learns
    assert all(abs(a - b) < 0.05 * a for a, b in zip(fp32_losses, bf16_losses, strict=True))
