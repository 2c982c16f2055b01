"""The Home page, run by Streamlit's AppTest against temporary stores."""

from streamlit.testing.v1 import AppTest

from tests.conftest import APP


def run_home() -> AppTest:
    return AppTest.from_file(str(APP / "Home.py"), default_timeout=60).run()


def test_home_explains_the_studio_and_counts_what_the_store_holds(studio_store):
    app = run_home()
    assert not app.exception
    assert "Shakespeare GPT studio" in app.title[0].value
    counts = {m.label: m.value for m in app.metric}
    assert counts == {
        "Runs": "2",
        "Finished runs": "2",
        "Registered models": "1",
        "Model versions": "1",
        "Best held-out bpc": "2.000",  # the fixture's runs logged val_bpc 2.0 (and no best: read from the history)
    }
    # The exact command that opens this store in the MLflow UI.
    assert any(code.value.startswith(f"mlflow ui --backend-store-uri {studio_store} ") for code in app.code)
    assert studio_store in app.markdown[1].value or any(studio_store in m.value for m in app.markdown)
    assert "No training is running." in [c.value for c in app.caption]
    latest = app.dataframe[0].value
    assert latest.iloc[0]["name"] == "shakespeare-gpt" and latest.iloc[0]["aliases"] == "champion"
    assert latest.iloc[0]["best_val_bpc"] == 2.0  # the source run's best held-out bits per character


def test_home_on_an_empty_store_points_to_training(empty_store):
    app = run_home()
    assert not app.exception
    assert {m.label: m.value for m in app.metric}["Runs"] == "0"
    assert any("No model is registered yet" in info.value for info in app.info)


def test_home_reports_an_unreachable_server_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    app = run_home()
    assert not app.exception
    assert len(app.error) == 1 and "cannot reach the MLflow tracking server" in app.error[0].value
    # The static guide still shows above the error.
    assert any(code.value.startswith("open http://127.0.0.1:9") for code in app.code)


def test_home_shows_a_died_job_as_died_never_as_running(empty_store):
    import json
    import sys
    import time

    import psutil

    from core.jobs import default_jobs_root
    from core.store import connect, ensure_experiment

    client = connect(empty_store)
    run_id = client.create_run(ensure_experiment(client, "home")).info.run_id
    dead = psutil.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = default_jobs_root() / "20260101-000001-aaaaaa"
    folder.mkdir(parents=True)
    meta = {"job_id": folder.name, "pid": dead.pid, "pgid": dead.pid, "create_time": 1.0, "argv": ["python"]}
    meta.update(label="lost run", tracking_uri=empty_store, created_at=time.time())
    (folder / "job.json").write_text(json.dumps(meta))
    (folder / "run.json").write_text(json.dumps({"run_id": run_id}))
    (folder / "progress.json").write_text(json.dumps({"step": 5, "max_steps": 100}))

    app = run_home()
    assert not app.exception
    captions = [c.value for c in app.caption]
    assert "No training is running." in captions
    assert any("1 job(s) died" in c and "lost run" in c for c in captions)
    assert not app.get("progress")  # no progress bar: nothing is shown as running
    assert client.get_run(run_id).info.status == "KILLED"  # listing the jobs ended the run it left RUNNING


def test_home_ends_a_run_whose_training_process_died_outside_the_app(studio_store):
    """A RUNNING run tagged by a training process of this machine that no longer exists ends KILLED on Home."""
    import socket

    from core.store import connect
    from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG

    client = connect(studio_store)
    experiment_id = client.get_experiment_by_name("shakespeare-gpt").experiment_id
    gone = {HOST_TAG: socket.gethostname(), PID_TAG: "999999", PROCESS_START_TAG: "1.0"}  # no such process
    run_id = client.create_run(experiment_id, run_name="killed-in-a-terminal", tags=gone).info.run_id
    app = run_home()
    assert not app.exception
    assert client.get_run(run_id).info.status == "KILLED"
    assert any(run_id in c.value and "died" in c.value for c in app.caption)
