"""The Train page: form defaults and estimate, starting a real background job, its live view, and cancelling."""

import time

import pytest

from core.jobs import list_jobs
from tests.conftest import app_page

PAGE = "pages/1_Train.py"


@pytest.fixture
def corpus_env(monkeypatch, shakespeare_path):
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(shakespeare_path))


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


def test_the_form_shows_the_trainer_defaults_and_an_estimate(empty_store, corpus_env):
    app = app_page(PAGE).run()
    assert not app.exception
    inputs = {n.label: n.value for n in app.number_input}
    assert inputs["Max steps"] == 20_000 and inputs["Target avg loss (0 = off)"] == 0.1
    assert inputs["Peak learning rate"] == 6e-4 and inputs["Gradient clip (0 = off)"] == 0.5
    assert inputs["Batch size B (sequences)"] * inputs["Block size T (tokens per sequence)"] == 2048
    metrics = {m.label: m.value for m in app.metric}
    # 301,966 training tokens in whole batches of 16 × 128.
    assert metrics["Tokens per epoch"] == f"{(301_966 - 1) // 2048 * 2048:,}"
    assert metrics["Time per step"].endswith(" ms")
    assert "No training jobs yet" in app.info[0].value


@pytest.mark.slow
def test_a_started_job_runs_in_the_background_shows_progress_and_registers(empty_store, corpus_env, tmp_path):
    app = app_page(PAGE).run()
    app.selectbox[0].set_value("tiny")
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


@pytest.mark.slow
def test_cancel_stops_the_job_and_the_run_ends_killed(empty_store, corpus_env):
    from core.store import connect

    app = app_page(PAGE).run()
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
