"""The Train page: form defaults and estimate, starting a real background job, its live view, and cancelling."""

import time

import pytest

from core.jobs import list_jobs
from core.recipes import BUDGET_PRESET, recipe_defaults
from core.sweep_jobs import SweepJob
from tests.conftest import app_page

PAGE = "pages/1_Train.py"


@pytest.fixture
def corpus_env(monkeypatch, shakespeare_path):
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(shakespeare_path))


@pytest.fixture
def head_corpus_env(monkeypatch, shakespeare_head):
    """The form's corpus is the head of Tiny Shakespeare: a job's evaluations take a moment, not a minute."""
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(shakespeare_head))


def fill(app, **numbers):
    inputs = {n.label: n for n in app.number_input}
    for label, value in numbers.items():
        inputs[label].set_value(value)


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_the_form_offers_the_cpu_recipe_with_a_time_budget_first(empty_store, corpus_env):
    app = app_page(PAGE).run()
    assert not app.exception
    assert app.selectbox[0].value == BUDGET_PRESET
    recipe = recipe_defaults(BUDGET_PRESET)
    inputs = {n.label: n.value for n in app.number_input}
    assert inputs["Peak learning rate"] == recipe["lr"] and inputs["Target avg loss (0 = off)"] == 0
    assert inputs["Batch size B (sequences)"] == recipe["batch_size"]
    assert inputs["Block size T (tokens per sequence)"] == recipe["block_size"]
    assert next(t for t in app.text_input if t.label == "Time budget").value == "10m"
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Steps in the budget"].startswith("~") and "Time for max steps" not in metrics
    assert "No training jobs yet" in app.info[0].value


def test_a_bad_time_budget_is_one_message_and_starts_nothing(empty_store, corpus_env):
    app = app_page(PAGE).run()
    for bad in ("ten", "-5m", "0"):
        next(t for t in app.text_input if t.label == "Time budget").set_value(bad)
        app.button[0].click().run()
        assert not app.exception
        assert any(e.value.startswith("Time budget:") for e in app.error)
        assert any("Not started" in e.value for e in app.error)
    assert list_jobs() == []


def test_the_form_shows_the_trainer_defaults_and_an_estimate(empty_store, corpus_env):
    app = app_page(PAGE).run()
    app.selectbox[0].set_value("tiny").run()
    assert not app.exception
    inputs = {n.label: n.value for n in app.number_input}
    assert inputs["Max steps"] == 20_000 and inputs["Target avg loss (0 = off)"] == 0.1
    assert inputs["Peak learning rate"] == 6e-4 and inputs["Gradient clip (0 = off)"] == 0.5
    assert inputs["Batch size B (sequences)"] * inputs["Block size T (tokens per sequence)"] == 2048
    assert next(t for t in app.text_input if t.label == "Time budget").value == ""  # the reference: no budget
    metrics = {m.label: m.value for m in app.metric}
    # 301,966 training tokens in whole batches of 16 × 128.
    assert metrics["Tokens per epoch"] == f"{(301_966 - 1) // 2048 * 2048:,}"
    assert metrics["Time per step"].endswith(" ms")
    assert "Time for max steps" in metrics


def test_changing_the_preset_resets_the_form_to_its_defaults_and_nothing_else_does(empty_store, corpus_env):
    app = app_page(PAGE).run()
    fill(app, **{"Max steps": 77})
    app.selectbox[0].set_value("tiny").run()
    fill(app, **{"Batch size B (sequences)": 3})
    next(b for b in app.button if b.label == "Update estimate").click().run()
    inputs = {n.label: n.value for n in app.number_input}
    assert inputs["Max steps"] == 20_000 and inputs["Batch size B (sequences)"] == 3  # the edit after the change stays
    app.selectbox[0].set_value(BUDGET_PRESET).run()
    inputs = {n.label: n.value for n in app.number_input}
    assert inputs["Batch size B (sequences)"] == recipe_defaults(BUDGET_PRESET)["batch_size"]
    assert next(t for t in app.text_input if t.label == "Time budget").value == "10m"
    assert len([n for n in app.number_input if n.label.startswith("Block size")]) == 1


def upload_and_update(app, name: str, content: bytes) -> None:
    app.file_uploader[0].set_value((name, content, "text/plain"))
    next(b for b in app.button if b.label == "Update estimate").click().run()


def test_unusable_corpora_and_uploads_are_one_message_each(empty_store, monkeypatch, tmp_path):
    import core.store

    # The page keeps uploads (and their token caches) under REPO_ROOT/data: here, a temporary folder.
    monkeypatch.setattr(core.store, "REPO_ROOT", tmp_path)
    corpus = tmp_path / "latin-1.txt"
    corpus.write_bytes("Ç'est la vie".encode("latin-1"))
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(corpus))
    app = app_page(PAGE).run()
    assert not app.exception
    [error] = app.error
    assert "The corpus cannot be used" in error.value and "not UTF-8" in error.value
    [uploader] = app.file_uploader
    assert "upload a text corpus" in uploader.label

    for content, message in ((bytes(range(256)), "binary"), (b"\xff\xfe\x00", "UTF-16"), (b" \n", "empty")):
        upload_and_update(app, "../../etc/passwd", content)
        assert not app.exception
        [error] = app.error
        assert "The uploaded corpus cannot be used" in error.value and message in error.value
    assert not (tmp_path / "data").exists()  # nothing written


@pytest.mark.slow  # the page times a few training steps for the upload's estimate
def test_an_uploaded_corpus_is_stored_under_data_uploads_and_used(empty_store, corpus_env, monkeypatch, tmp_path):
    import core.store

    monkeypatch.setattr(core.store, "REPO_ROOT", tmp_path)
    app = app_page(PAGE).run()
    text = "ROMEO:\nBut soft, what light through yonder window breaks? 🌅\n" * 800
    fill(app, **{"Max steps": 10})
    upload_and_update(app, "../../etc/passwd", text.encode())
    assert not app.exception and not app.error
    [stored] = (tmp_path / "data" / "uploads").iterdir()
    assert stored.name.startswith("passwd-") and stored.read_text() == text
    assert any(f"data/uploads/{stored.name}" in c.value for c in app.caption)
    tokens = {m.label: m.value for m in app.metric}["Tokens per epoch"]
    assert int(tokens.replace(",", "")) < 20_000  # the upload's size, not Tiny Shakespeare's 301,966


@pytest.mark.slow
def test_a_started_job_runs_in_the_background_shows_progress_and_registers(empty_store, head_corpus_env, tmp_path):
    app = app_page(PAGE).run()
    app.selectbox[0].set_value("tiny").run()  # the form's fields follow the preset: fill tiny's
    fill(
        app,
        **{
            "Block size T (tokens per sequence)": 16,
            "Batch size B (sequences)": 2,
            "Max steps": 6,
            "Eval interval (steps, 0 = end only)": 3,
            "Sample interval (steps)": 0,
        },
    )
    next(t for t in app.text_input if t.label == "Run name (optional)").set_value("from-the-page")
    app.button[0].click().run()
    assert not app.exception
    [job] = list_jobs()
    assert job.label == "from-the-page" and job.pid
    finished = wait_for(lambda: (j := list_jobs()[0]).state == "finished" and j)
    assert finished.model_version == "1"
    # A fresh session (a refresh, another tab) finds the job on disk and shows its outcome.
    again = app_page(PAGE).run()
    assert not again.exception
    assert any("Registered **shakespeare-gpt** version **1**" in s.value for s in again.success)
    assert any("step 6 of 6" in (p.proto.text or "") for p in again.get("progress"))
    assert again.get("plotly_chart")  # the loss chart of the run
    again.button[-1].click().run()  # "Remove from list" keeps the MLflow run
    assert not list_jobs()


def test_the_processes_field_starts_a_torchrun_job(empty_store, corpus_env, monkeypatch):
    """The page hands the Processes field to core.jobs.start_job (which tests/test_jobs.py runs for real with 2
    processes) and shows a multi-process job as such."""
    import core.jobs

    started = []

    def start_job(spec, *, label=None, processes=1):
        started.append((spec, processes))
        return core.jobs.JobInfo("20260101-000000-abcdef", core.jobs.default_jobs_root(), "starting", pid=4242)

    monkeypatch.setattr(core.jobs, "start_job", start_job)
    app = app_page(PAGE).run()
    fill(app, **{"Block size T (tokens per sequence)": 16, "Batch size B (sequences)": 2, "Processes": 2})
    app.button[0].click().run()
    assert not app.exception
    [(spec, processes)] = started
    assert processes == 2 and spec.configs.data.batch_size == 2


@pytest.mark.slow
def test_cancel_stops_the_job_and_the_run_ends_killed(empty_store, head_corpus_env):
    from core.store import connect

    app = app_page(PAGE).run()
    app.selectbox[0].set_value("tiny").run()  # a small model: the job reaches its first step sooner
    fill(app, **{"Block size T (tokens per sequence)": 16, "Batch size B (sequences)": 2, "Max steps": 100_000})
    app.button[0].click().run()
    wait_for(lambda: (j := list_jobs()[0]).progress and j.progress.get("step", 0) >= 1)
    view = app_page(PAGE).run()
    cancel = [b for b in view.button if b.label == "Cancel"]
    assert len(cancel) == 1
    cancel[0].click().run()
    assert not view.exception
    job = list_jobs()[0]
    assert job.state == "killed"
    assert connect().get_run(job.run_id).info.status == "KILLED"


@pytest.mark.slow  # the page times a few training steps for its estimate
def test_a_died_job_shows_as_died_with_why_and_its_run_ends_killed(empty_store, head_corpus_env):
    import json
    import sys

    import psutil

    from core.jobs import default_jobs_root
    from core.store import connect, ensure_experiment

    client = connect(empty_store)
    run_id = client.create_run(ensure_experiment(client, "train-page")).info.run_id
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = default_jobs_root() / "20260101-000001-aaaaaa"
    folder.mkdir(parents=True)
    meta = {"job_id": folder.name, "pid": dead.pid, "pgid": dead.pid, "create_time": 1.0, "argv": ["python"]}
    meta.update(label="lost run", tracking_uri=empty_store, created_at=time.time())
    (folder / "job.json").write_text(json.dumps(meta))
    (folder / "run.json").write_text(json.dumps({"run_id": run_id}))
    (folder / "progress.json").write_text(json.dumps({"step": 5, "max_steps": 100}))

    app = app_page(PAGE).run()
    assert not app.exception
    assert any("**lost run** · 💀 process died" in m.value for m in app.markdown)
    [error] = [e.value for e in app.error]
    assert f"training process {dead.pid} exited without finishing" in error
    assert f"MLflow run {run_id} was still RUNNING and has been ended KILLED" in error
    assert not [b for b in app.button if b.label == "Cancel"]  # only a running job can be cancelled
    assert any("Training jobs (0 running)" in h.value for h in app.subheader)
    assert client.get_run(run_id).info.status == "KILLED"


# ---- the Sweep section -------------------------------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch):
    """core.jobs.start_job replaced: the (spec, kwargs) of every start, and a job in state starting."""
    import core.jobs

    calls = []

    def start_job(spec, **kwargs):
        calls.append((spec, kwargs))
        return core.jobs.JobInfo("20260101-000000-abcdef", core.jobs.default_jobs_root(), "starting", pid=4242)

    monkeypatch.setattr(core.jobs, "start_job", start_job)
    return calls


def test_the_sweep_section_starts_a_sweep_job_with_the_forms_settings(empty_store, corpus_env, started):
    app = app_page(PAGE).run()
    fill(app, **{"Block size T (tokens per sequence)": 16, "Batch size B (sequences)": 2})
    next(b for b in app.button if b.label == "Update estimate").click().run()  # applies the training form
    fill(app, Trials=3)
    [space] = app.text_area
    space.set_value("# a comment\nlr=loguniform:1e-4:3e-3\n\nn_layer=int:1:3\n")
    inputs = {t.label: t for t in app.text_input}
    inputs["Time per trial"].set_value("90s")
    inputs["Sweep name (optional)"].set_value("page-sweep")
    next(b for b in app.button if b.label == "Start sweep").click().run()
    assert not app.exception and not app.error
    [(spec, kwargs)] = started
    assert spec.kind == "sweep" and kwargs == {"label": "sweep page-sweep"}
    settings, configs = spec.settings, spec.configs
    assert configs.data.batch_size == 2 and configs.data.block_size == 16
    assert [p.text for p in settings.space] == ["lr=loguniform:1e-4:3e-3", "n_layer=int:1:3"]
    assert settings.n_trials == 3 and settings.trial_budget == 90 and configs.train.time_budget == 90
    assert (settings.metric, settings.pruner, settings.name) == ("val_bpc", "median", "page-sweep")
    assert configs.tracking.alias == "sweep-best"
    assert settings.time_budget is None  # the sweep's total budget is optional and was left empty


def test_a_bad_search_space_is_one_message_and_starts_nothing(empty_store, corpus_env, started):
    app = app_page(PAGE).run()
    app.text_area[0].set_value("lr=uniform:3e-3:1e-4")
    next(b for b in app.button if b.label == "Start sweep").click().run()
    assert not app.exception
    [error] = app.error
    assert error.value == (
        "The sweep was not started: --param lr=uniform:3e-3:1e-4: LOW must be below HIGH, got 0.003 and 0.0001 "
        "(for one value use choice:0.003)"
    )
    assert not started


def test_a_stopped_sweep_job_shows_its_trials_and_best_and_can_be_resumed(empty_store, corpus_env, started):
    import json
    import sys

    import psutil

    from core.jobs import default_jobs_root

    gone = psutil.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = default_jobs_root() / "20260101-000002-bbbbbb"
    folder.mkdir(parents=True)
    meta = {"job_id": folder.name, "kind": "sweep", "pid": gone.pid, "pgid": gone.pid, "create_time": 1.0}
    meta.update(argv=["python", "-m", "pipelines.sweep"], label="sweep lr-search", created_at=time.time())
    (folder / "job.json").write_text(json.dumps(meta))
    status = {"name": "lr-search", "metric": "val_bpc", "n_trials": 4, "phase": "ended", "trial_number": None}
    status.update(complete=1, pruned=1, failed=0, best_value=4.6851, best_trial=0)
    status["last_trial"] = {"number": 1, "state": "PRUNED", "value": 5.4012, "error": None}
    (folder / "sweep.json").write_text(json.dumps(status))
    result = {"status": "KILLED", "exit_code": 130, "run_id": None, "stop_reason": "stopped: SIGTERM"}
    (folder / "result.json").write_text(json.dumps({**result, "run_ended": True}))

    app = app_page(PAGE).run()
    assert not app.exception
    lines = [m.value for m in app.markdown]
    assert any(
        "🔎 Sweep **lr-search** · 2 of 4 trials done · 1 complete, 1 pruned, 0 failed · best val_bpc **4.6851** "
        "(trial 0)" in line
        for line in lines
    ), lines
    assert any("Latest: trial 1 pruned, val_bpc 5.4012" in c.value for c in app.caption)
    assert any("sweep: 2 of 4 trials done" in (p.proto.text or "") for p in app.get("progress"))
    next(b for b in app.button if b.label == "Resume sweep").click().run()
    assert not app.exception
    [(spec, kwargs)] = started
    assert spec == SweepJob(resume="lr-search") and kwargs == {"label": "sweep lr-search"}
