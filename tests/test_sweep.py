"""Hyperparameter sweeps: the search space and its checks, the CLI's refusals, and real sweeps on a tiny model
(nested MLflow runs, pruning, resuming a killed sweep, the registered best model, a cancelled sweep job)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from core.config import DataConfig, ModelConfig, TrainConfig
from core.errors import UsageError
from core.sweep import SweepSettings, check_space, parse_param, parse_space, study_trials
from pipelines.cli import run
from tests.conftest import REPO

MODEL = ModelConfig.from_preset("tiny")
DATA = DataConfig(source="corpus.txt", block_size=128)
TRAIN = TrainConfig()


# ---- the search space ------------------------------------------------------------------------------------------


def test_each_kind_parses_to_the_fields_type():
    lr, layers, width, bias, patience, order = parse_space(
        [
            "lr=loguniform:1e-4:3e-3",
            "n_layer=int:2:6",
            "n_embd = int:64:256:64",
            "bias=choice:true,false",
            "patience=choice:none,3",
            "order=choice:random",
        ]
    )
    assert (lr.kind, lr.low, lr.high, lr.targets) == ("loguniform", 1e-4, 3e-3, ("train.lr",))
    assert (layers.low, layers.high, layers.step) == (2, 6, None) and isinstance(layers.low, int)
    assert width.text == "n_embd=int:64:256:64" and width.values() == (64, 128, 192, 256)
    assert bias.choices == (True, False)
    assert patience.choices == (None, 3)
    assert order.choices == ("random",)  # one value is a fixed setting, not an error


def test_block_size_and_seed_set_both_configs_unless_qualified():
    assert parse_param("block_size=choice:64,128").targets == ("model.block_size", "data.block_size")
    assert parse_param("seed=int:1:9").targets == ("data.seed", "train.seed")
    assert parse_param("data.block_size=choice:64").targets == ("data.block_size",)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([], "the search space is empty: give at least one --param NAME=SPEC, e.g. lr=loguniform:1e-4:3e-3"),
        (["lr"], "--param lr: expected NAME=KIND:ARGS, e.g. lr=loguniform:1e-4:3e-3"),
        (["lr=gauss:1:2"], "--param lr=gauss:1:2: unknown kind 'gauss'; use uniform:LOW:HIGH, loguniform:LOW:HIGH, "
         "int:LOW:HIGH[:STEP] or choice:A,B,..."),
        (["lr=uniform:3e-3:1e-4"], "--param lr=uniform:3e-3:1e-4: LOW must be below HIGH, got 0.003 and 0.0001 "
         "(for one value use choice:0.003)"),
        (["n_layer=int:4:4"], "--param n_layer=int:4:4: LOW must be below HIGH, got 4 and 4 (for one value use "
         "choice:4)"),
        (["lr=loguniform:0:1"], "--param lr=loguniform:0:1: a loguniform range needs LOW > 0, got 0"),
        (["lr=uniform:1e-4"], "--param lr=uniform:1e-4: expected uniform:LOW:HIGH"),
        (["lr=uniform:a:1"], "--param lr=uniform:a:1: 'a' is not a number"),
        (["lr=uniform:0:inf"], "--param lr=uniform:0:inf: 'inf' is not a finite number"),
        (["n_embd=choice:"], "--param n_embd=choice:: a choice needs at least one value, e.g. n_embd=choice:A,B"),
        (["n_embd=choice:64,64"], "--param n_embd=choice:64,64: the choice 64 is given twice"),
        (["n_embd=choice:64,1.5"], "--param n_embd=choice:64,1.5: '1.5' is not an integer"),
        (["bias=choice:yes"], "--param bias=choice:yes: 'yes' is not true or false"),
        (["lr=int:1:3"], "--param lr=int:1:3: lr is not a whole number; use uniform:, loguniform: or choice:"),
        (["n_layer=uniform:1:3"], "--param n_layer=uniform:1:3: n_layer is a whole number; use int:LOW:HIGH or "
         "choice:A,B,..."),
        (["n_layer=int:2:6:3"], "--param n_layer=int:2:6:3: the range 2..6 is not a whole number of steps of 3"),
        (["n_layer=int:2:6:0"], "--param n_layer=int:2:6:0: the step must be a positive integer, got 0"),
        (["device=choice:cpu"], "--param device=choice:cpu: device cannot be searched: it says where training runs"),
        (["eval_interval=choice:10"], "--param eval_interval=choice:10: eval_interval cannot be searched: every "
         "trial must be evaluated (and pruned) at the same points"),
        (["lr=uniform:1e-4:3e-3", "lr=choice:1e-3"], "--param lr is given twice; give each field once"),
        (["block_size=choice:64", "data.block_size=choice:32"], "--param block_size and --param data.block_size "
         "both set data.block_size; give it once"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_exact_line(specs, message):
    with pytest.raises(UsageError) as caught:
        parse_space(specs)
    assert str(caught.value) == message


def test_an_unknown_field_lists_the_searchable_ones():
    with pytest.raises(UsageError) as caught:
        parse_space(["learning_rate=uniform:0:1"])
    message = str(caught.value)
    assert message.startswith("--param learning_rate=uniform:0:1: no training or model field is called")
    assert "lr, max_steps, n_embd" in message and "device" not in message and "\n" not in message


@pytest.mark.parametrize(
    "specs, message",
    [
        (["dropout=uniform:0:1"], "--param dropout=uniform:0:1: dropout=1.0 is refused: model config: dropout must "
         "be in [0, 1), got 1.0"),
        (["n_head=choice:3,4"], "--param n_head=choice:3,4: n_head=3 is refused: model config: n_embd (128) must be "
         "divisible by n_head (3)"),
        (["n_embd=int:64:256"], "--param n_embd=int:64:256: n_embd=65 is refused: model config: n_embd (65) must be "
         "divisible by n_head (4)"),
        (["model.block_size=choice:64,128"], "--param model.block_size=choice:64,128: model.block_size=64 is "
         "refused: block size 128 is above the model's context of 64"),
        (["n_embd=choice:96,192", "n_head=choice:4,64"], "the search space contradicts itself: n_embd=96, "
         "n_head=64 is refused: model config: n_embd (96) must be divisible by n_head (64)"),
    ],
)  # fmt: skip
def test_values_the_configs_refuse_are_caught_before_anything_runs(specs, message):
    with pytest.raises(UsageError) as caught:
        check_space(parse_space(specs), MODEL, DATA, TRAIN)
    assert str(caught.value) == message


def test_a_consistent_space_passes():
    specs = ["n_embd=int:64:256:64", "n_head=choice:2,4", "lr=loguniform:1e-4:1e-2", "dropout=uniform:0:0.2"]
    space = parse_space(specs)
    check_space(space, MODEL, DATA, TRAIN)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "say how long the sweep runs: --trials N, --time-budget T, or both"),
        ({"n_trials": 3, "metric": "loss"}, "--metric loss is never logged by training; a sweep can minimise "
         "val_bpc or val_loss"),
        ({"time_budget": 60.0, "trial_budget": 120.0}, "--trial-budget (120 s) is longer than the whole "
         "--time-budget (60 s): not one trial would fit"),
        ({"n_trials": 3, "sampler": "grid"}, "--sampler grid needs choices only; --param lr=uniform:1e-4:1e-3 is a "
         "range"),
        ({"n_trials": 3, "sampler": "cmaes"}, "--sampler cmaes: choose one of tpe, random, grid"),
        ({"n_trials": 3, "pruner": "hyperband"}, "--pruner hyperband: use median, median:N (N completed trials "
         "before pruning), threshold:X or none"),
        ({"n_trials": 3, "name": "a b"}, "sweep name 'a b' is invalid: use letters, digits, '-', '_' or '.'"),
    ],
)  # fmt: skip
def test_contradictory_settings_are_one_exact_line(fields, message):
    fields = {"name": "s", "space": parse_space(["lr=uniform:1e-4:1e-3"]), **fields}
    with pytest.raises(UsageError) as caught:
        SweepSettings(**fields)
    assert str(caught.value) == message


def test_settings_round_trip_through_the_study():
    settings = SweepSettings("s", parse_space(["lr=loguniform:1e-4:1e-2", "n_layer=choice:1,2"]), n_trials=4)
    assert SweepSettings.from_dict(settings.to_dict()) == settings


def test_trials_are_compared_at_their_kth_evaluation_not_at_equal_steps():
    """Time-budget trials evaluate at different steps (their speeds differ): the pruner compares evaluation k."""
    import optuna

    from core.sweep import PRUNED, _Pruning

    class Trainer:
        stopped = None

        def request_stop(self, why):
            self.stopped = why

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    for k, value in enumerate((4.0, 3.5), start=1):
        first.report(value, k)
    study.tell(first, 3.5)
    fast, slow = Trainer(), Trainer()
    _Pruning(study.ask(), "val_bpc", lambda: fast).on_eval(80, {"val_bpc": 3.9, "val_loss": 9.0})
    assert fast.stopped is None  # better than the first trial's first evaluation (taken at another step)
    pruning = _Pruning(study.ask(), "val_bpc", lambda: slow)
    pruning.on_eval(31, {"val_bpc": 4.5, "val_loss": 9.0})
    assert slow.stopped == PRUNED and pruning.pruned_at == 31 and pruning.values == [4.5]


# ---- the CLI refuses bad input with one line, exit 2, and creates nothing --------------------------------------


def sweep_cli(argv, capsys):
    """Run ``python -m pipelines.sweep argv`` in this process: (exit code, stdout, stderr)."""
    from pipelines.sweep import main

    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tracking store that does not exist yet: a refused sweep must leave it so."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    return tmp_path / "store"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "error: the search space is empty"),
        (["--param", "lr=uniform:1e-4:1e-3"], "error: say how long the sweep runs"),
        (["--trials", "0"], "argument --trials: expected a positive integer, got 0"),
        (["--trials", "2", "--time-budget", "ten", "--param", "lr=choice:1e-3"], "argument --time-budget: a duration "
         "looks like 90s, 10m or 1h, got 'ten'"),
        (["--trials", "2", "--param", "lr=choice:1e-3", "--metric", "train_loss"], "error: --metric train_loss is "
         "never logged by training"),
        (["--trials", "2", "--param", "lr=choice:1e-3", "--eval-interval", "0"], "error: --metric val_bpc is never "
         "logged: --eval-interval 0 turns validation off"),
        (["--trials", "2", "--param", "n_head=choice:3,4"], "error: --param n_head=choice:3,4: n_head=3 is refused"),
        (["--trials", "2", "--param", "lr=choice:1e-3", "--alias", "latest"], "error: alias 'latest' is reserved"),
        (["--trials", "2", "--param", "lr=choice:1e-3", "--register-best"], "error: --register-best: a sweep "
         "always registers its best trial's best-validation checkpoint"),
        (["--trials", "2", "--param", "lr=choice:1e-3", "--data", "missing.txt"], "error: corpus file not found: "
         "missing.txt"),
        (["--resume", "nothing-here"], "error: no sweep named 'nothing-here'"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_line_exit_2_and_creates_nothing(argv, message, store, capsys, shakespeare_path):
    if "--data" not in argv and "--resume" not in argv:
        argv = [*argv, "--data", str(shakespeare_path)]
    code, out, err = sweep_cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not store.exists()  # no MLflow store, no study file


def test_a_corpus_every_trial_would_fail_on_stops_the_sweep_before_it_starts(store, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, out, err = sweep_cli(["--trials", "2", "--param", "lr=choice:1e-3", "--data", str(empty)], capsys)
    assert code == 2 and out == "" and "is empty or only whitespace" in err and len(err.strip().splitlines()) == 1
    assert not store.exists()


def test_a_taken_name_and_resume_conflicts_are_refused(store, capsys, shakespeare_path):
    import optuna

    from core.sweep import default_storage

    store.mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not its "new study" line on stderr
    optuna.create_study(study_name="taken", storage=default_storage())
    code, _, err = sweep_cli(
        ["--name", "taken", "--trials", "2", "--param", "lr=choice:1e-3", "--data", str(shakespeare_path)], capsys
    )
    assert code == 2 and err.startswith("error: a sweep named 'taken' already exists in sqlite:///")
    assert err.strip().endswith("continue it with --resume taken, or choose another --name")
    code, _, err = sweep_cli(["--resume", "taken", "--lr", "1", "--param", "lr=choice:1e-3"], capsys)
    assert code == 2
    assert err == "error: --resume taken goes on with the settings the sweep was started with; drop --lr, --param\n"
    code, _, err = sweep_cli(["--resume", "taken"], capsys)  # a study made by something else
    assert code == 2 and "was not made by pipelines.sweep" in err
    assert not (store / "mlflow.db").exists()


def test_check_validates_and_creates_nothing(store, capsys, shakespeare_path):
    argv = ["--trials", "3", "--param", "lr=loguniform:1e-4:1e-2", "--name", "dry", "--data", str(shakespeare_path)]
    code, out, _ = sweep_cli([*argv, "--check"], capsys)
    assert code == 0
    assert out.startswith("sweep dry: search lr=loguniform:1e-4:1e-2 (3 trials, up to 20,000 steps), minimising")
    assert out.strip().endswith("(checked; nothing created)")
    assert not store.exists()


# ---- real sweeps on a tiny model -------------------------------------------------------------------------------

TINY_ARGS = [
    "--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "32", "--block-size", "32",
    "--batch-size", "4", "--max-steps", "12", "--eval-interval", "4", "--sample-interval", "0", "--target-loss", "0",
    "--device", "cpu", "--log-interval", "1000",
]  # fmt: skip


@pytest.fixture
def tiny_corpus(tmp_path, shakespeare_path):
    """The first 20,000 characters of Tiny Shakespeare: a two-second trial."""
    corpus = tmp_path / "head.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    return corpus


def sweep_runs(client, experiment="shakespeare-gpt"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    return parents, trials


@pytest.mark.slow
def test_a_three_trial_sweep_nests_prunes_and_registers_the_best(store, tmp_path, tiny_corpus, capsys):
    from core.registry import resolve_model_version
    from core.store import connect
    from pipelines.sweep import main

    # The grid tries each learning rate once. At step 4 a learning rate of 1e-6 leaves the model as it was
    # initialised (5.40 bits per character); 3e-3 and 1e-2 are below 5.30 by then: the threshold prunes only 1e-6.
    argv = [*TINY_ARGS, "--data", str(tiny_corpus), "--checkpoint-root", str(tmp_path / "checkpoints")]
    argv += ["--param", "lr=choice:1e-2,1e-6,3e-3", "--sampler", "grid", "--pruner", "threshold:5.37"]
    argv += ["--trials", "3", "--name", "tiny-sweep"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "=== trial 1 of 3 (number 0): lr=" in out and "=== trial 3 of 3 (number 2): lr=" in out
    assert "PRUNED: val_bpc 5.40" in out
    assert "registered model: shakespeare-gpt version 1 (alias @sweep-best)" in out

    client = connect()
    [parent], trials = sweep_runs(client)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny-sweep"
    assert parent.data.params["space.lr"] == "choice:1e-2,1e-6,3e-3" and parent.data.params["sweep.metric"] == "val_bpc"
    assert [t.data.tags["mlflow.parentRunId"] for t in trials] == [parent.info.run_id] * 3
    assert [t.data.tags["sweep.trial_number"] for t in trials] == ["0", "1", "2"]
    by_lr = {t.data.params["lr"]: t for t in trials}
    assert sorted(by_lr) == ["0.003", "0.01", "1e-06"]
    assert {lr: t.data.tags["sweep.state"] for lr, t in by_lr.items()} == {
        "0.01": "COMPLETE",
        "1e-06": "PRUNED",
        "0.003": "COMPLETE",
    }
    # A pruned trial is a run stopped by a rule, as by patience: FINISHED, stop_reason pruned, after its 4th step.
    assert [t.info.status for t in trials] == ["FINISHED"] * 3
    pruned = by_lr["1e-06"]
    assert pruned.data.tags["stop_reason"] == "pruned"
    assert max(m.step for m in client.get_metric_history(pruned.info.run_id, "loss")) == 4
    history = client.get_metric_history(parent.info.run_id, "best_val_bpc")
    best = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)][-1] == 2
    assert best == sorted(best, reverse=True)  # the best so far, after each trial with a completed one
    winner = by_lr["0.01"]
    assert best[-1] == pytest.approx(float(winner.data.tags["sweep.val_bpc"]))
    assert parent.data.tags["stop_reason"] == "trials"
    assert parent.data.tags["sweep.best_trial"] == winner.data.tags["sweep.trial_number"]

    version = resolve_model_version(client, "shakespeare-gpt@sweep-best")
    assert version.run_id == winner.info.run_id
    assert parent.data.tags["registered_model"] == "shakespeare-gpt/1"
    assert sorted(t["state"] for t in study_trials("tiny-sweep")) == ["COMPLETE", "COMPLETE", "PRUNED"]


def wait_for(predicate, timeout=180.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out")


def running_trial(name, number):
    """Whether trial ``number`` of sweep ``name`` is training (its run exists), read from the study."""
    try:
        trials = study_trials(name)  # opening the storage while the sweep creates it must not break either
    except UsageError:
        return False  # not created yet
    return any(t["number"] == number and t["state"] == "RUNNING" and t["run_id"] for t in trials)


@pytest.mark.slow
def test_a_killed_sweep_resumes_with_its_parent_run_and_redoes_the_killed_trial(store, tmp_path, tiny_corpus, capsys):
    from core.store import connect
    from pipelines.sweep import main

    argv = [*TINY_ARGS, "--max-steps", "16", "--data", str(tiny_corpus), "--checkpoint-root", str(tmp_path / "ckpt")]
    argv += ["--param", "lr=loguniform:1e-3:1e-2", "--sampler", "random", "--pruner", "none"]
    argv += ["--trials", "3", "--name", "killed"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.sweep", *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: running_trial("killed", 1) or first.poll() is not None)
        assert first.poll() is None, "the sweep ended before its second trial trained"
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the trial and the parent run stay RUNNING
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    client = connect()
    [parent], trials = sweep_runs(client)
    assert parent.info.status == "RUNNING" and trials[1].info.status == "RUNNING"
    killed_params = study_trials("killed")[1]["params"]

    assert main(["--resume", "killed"]) == 0
    out = capsys.readouterr().out
    assert "sweep killed: resume lr=loguniform:1e-3:1e-2 (3 trials, up to 16 steps)" in out
    [again], trials = sweep_runs(client)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert [t.data.tags["mlflow.parentRunId"] for t in trials] == [parent.info.run_id] * 4
    assert [t.info.status for t in trials] == ["FINISHED", "KILLED", "FINISHED", "FINISHED"]
    assert "exited without finishing" in trials[1].data.tags["error"]
    states = study_trials("killed")
    assert [(t["state"], t["interrupted"]) for t in states] == [
        ("COMPLETE", False),
        ("FAIL", True),
        ("COMPLETE", False),
        ("COMPLETE", False),
    ]
    assert states[2]["params"] == killed_params  # the killed trial's values, tried again first
    best = min(states, key=lambda t: t["value"] if t["state"] == "COMPLETE" else float("inf"))
    assert client.get_model_version_by_alias("shakespeare-gpt", "sweep-best").run_id == best["run_id"]
    code, _, err = sweep_cli(["--resume", "killed"], capsys)
    assert code == 2 and "sweep 'killed' is finished" in err


def sweep_spec(argv: list[str]):
    """The job a user of ``python -m pipelines.sweep <argv>`` would start (the CLI's own parsing and rules)."""
    from pipelines.sweep import build_parser, make_spec

    return make_spec(build_parser().parse_args(argv))


@pytest.mark.slow
def test_a_sweep_job_shows_its_trials_and_cancel_leaves_it_resumable(empty_store, tmp_path, tiny_corpus):
    from core.jobs import cancel_job, get_job, start_job
    from core.store import connect
    from core.sweep import plan_resume

    args = [*TINY_ARGS, "--max-steps", "100000", "--data", str(tiny_corpus), "--name", "in-the-background"]
    args += ["--checkpoint-root", str(tmp_path / "ckpt"), "--param", "lr=loguniform:1e-3:1e-2", "--trials", "3"]
    with pytest.raises(UsageError, match="--param lr=loguniform:0:1: a loguniform range needs LOW > 0"):
        start_job(sweep_spec([*args[:-4], "--param", "lr=loguniform:0:1"]))
    job = start_job(sweep_spec(args), label="sweep in-the-background")
    assert job.kind == "sweep" and "pipelines.sweep" in job.argv
    seen = wait_for(lambda: (j := get_job(job.job_id)).sweep and j.sweep.get("trial_run_id") and j.progress and j)
    assert seen.sweep["trial_index"] == 1 and seen.sweep["n_trials"] == 3 and seen.state == "running"
    cancelled = cancel_job(job.job_id, timeout=60)
    assert cancelled.state == "killed", cancelled.reason
    assert cancelled.result["status"] == "KILLED" and cancelled.result["stop_reason"] == "stopped: SIGTERM"
    client = connect()
    assert client.get_run(cancelled.run_id).info.status == "KILLED"  # the parent run
    trial_run = client.get_run(seen.sweep["trial_run_id"])
    assert trial_run.info.status == "KILLED" and trial_run.data.tags["sweep.state"] == "FAIL"
    assert [(t["state"], t["interrupted"]) for t in study_trials("in-the-background")] == [("FAIL", True)]
    assert plan_resume("in-the-background").parent_run_id == cancelled.run_id  # resumable


def test_a_sweep_spec_round_trips_and_is_a_new_sweep_or_a_resume(shakespeare_path):
    import json

    from core.errors import UsageError
    from core.sweep_jobs import SweepJob

    spec = sweep_spec(["--trials", "2", "--param", "lr=loguniform:1e-4:1e-2", "--name", "round", "--data", "c.txt"])
    assert SweepJob.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.settings.name == "round" and spec.configs.data.source == "c.txt"
    assert SweepJob.from_dict({"kind": "sweep", "resume": "round"}) == SweepJob(resume="round")
    with pytest.raises(UsageError, match="not both"):
        SweepJob(settings=spec.settings, configs=spec.configs, resume="round")
    with pytest.raises(ValueError, match="not a sweep job's spec"):
        SweepJob.from_dict({"kind": "train"})
