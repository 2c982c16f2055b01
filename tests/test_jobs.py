"""Background training jobs: real training processes on the real corpus, and the state rules on hand-made folders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from core import reaper
from core.errors import UsageError
from core.jobs import (
    DIED_ERROR,
    JobError,
    JobInfo,
    JobProgressRecorder,
    JobRecorder,
    TrainingJob,
    cancel_job,
    delete_job,
    get_job,
    list_jobs,
    start_job,
)
from core.jobs import control as job_control
from core.jobs import recorder as job_recorder
from core.jobs.processes import process_alive
from core.recipes import RunConfigs
from core.store import REPO_ROOT, connect, ensure_experiment
from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG
from pipelines import jobs as jobs_cli

pytestmark = pytest.mark.skipif(os.name != "posix", reason="background jobs need POSIX process groups")

EXPERIMENT = "jobs-test"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module, created here: the schema migration is paid once, not by every job."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    ensure_experiment(connect(uri), EXPERIMENT)
    return uri


@pytest.fixture
def client(store_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)  # start_job's default store
    return connect(store_uri)


@pytest.fixture
def jobs_root(tmp_path):
    """A jobs folder whose still-running jobs are killed after the test, even a failed one."""
    root = tmp_path / "jobs"
    yield root
    for folder in root.glob("*/"):
        meta = json.loads((folder / "job.json").read_text()) if (folder / "job.json").is_file() else {}
        if meta.get("pid") and process_alive(meta["pid"], meta.get("create_time")):
            os.killpg(meta["pgid"], signal.SIGKILL)


def train_args(tmp_path: Path, corpus: Path, max_steps: int) -> list[str]:
    return [
        "--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "32",
        "--block-size", "32", "--batch-size", "4", "--max-steps", str(max_steps), "--target-loss", "0",
        "--eval-interval", "0", "--sample-interval", "0", "--device", "cpu", "--data", str(corpus),
        "--experiment", EXPERIMENT, "--checkpoint-root", str(tmp_path / "checkpoints"),
    ]  # fmt: skip


def training(argv: list[str]) -> TrainingJob:
    """The job a user of ``python -m pipelines.train <argv>`` would start: the CLI's own parsing and config rules,
    with its refusals as one-line UsageErrors (as the Train page shows them)."""
    from pipelines.train import build_configs, build_parser

    parser = build_parser()

    def refuse(message: str):
        raise UsageError(f"invalid training arguments: {message}")

    parser.error = refuse  # argparse's own error() prints and exits
    try:
        return TrainingJob(RunConfigs(*build_configs(parser.parse_args([str(a) for a in argv]))))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def wait_for(job_id: str, jobs_root: Path, predicate, timeout: float = 120.0) -> JobInfo:
    """Poll the job until ``predicate(info)`` holds; fail with its log if it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        info = get_job(job_id, jobs_root)
        if predicate(info):
            return info
        if time.monotonic() > deadline or (not info.is_active and not predicate(info)):
            pytest.fail(f"job {job_id} is {info.state} ({info.reason}); log:\n{info.log_tail()}")
        time.sleep(0.2)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# -- real training processes -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_trains_registers_and_records_its_run(tmp_path, jobs_root, client, shakespeare_head):
    spec = training(train_args(tmp_path, shakespeare_head, 8))
    job = start_job(spec, jobs_root=jobs_root, label="tiny job")
    # What the process runs is the spec on disk, rebuilt from JSON: never an argv.
    assert json.loads((job.job_dir / "spec.json").read_text()) == spec.to_dict() == job.spec
    assert job.argv[-4:] == ["--spec", str(job.job_dir / "spec.json"), "--job-dir", str(job.job_dir)]
    assert job.state == "starting" and job.label == "tiny job" and job.pid
    assert job.argv[-2:] == ["--job-dir", str(jobs_root / job.job_id)]

    info = wait_for(job.job_id, jobs_root, lambda j: not j.is_active)
    assert info.state == "finished", info.reason
    assert [j.job_id for j in list_jobs(jobs_root)] == [job.job_id]

    run_file = json.loads((info.job_dir / "run.json").read_text())
    assert run_file["run_id"] == info.run_id and run_file["pid"] == job.pid
    run = client.get_run(info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["studio.job_id"] == job.job_id
    assert run.data.tags["studio.job_pid"] == str(job.pid)
    # What reap_orphan_runs needs to tell this run's process from any other.
    assert run.data.tags[HOST_TAG] == socket.gethostname() and run.data.tags[PID_TAG] == str(job.pid)
    meta = json.loads((info.job_dir / "job.json").read_text())
    assert abs(float(run.data.tags[PROCESS_START_TAG]) - meta["create_time"]) < 1

    assert info.progress["step"] == info.progress["max_steps"] == 8
    assert info.progress["loss"] > 0 and info.progress["tokens_per_sec"] > 0
    assert info.result["status"] == "FINISHED" and info.result["exit_code"] == 0
    assert info.result["stop_reason"] == "max_steps" and info.result["error"] is None
    version = client.get_model_version(info.model_name, info.model_version)
    assert version.run_id == info.run_id
    assert f"mlflow run: {info.run_id}" in info.log_tail(max_lines=1000)


@pytest.mark.slow
def test_cancel_stops_the_process_group_and_ends_the_run_killed(tmp_path, jobs_root, client, shakespeare_head):
    job = start_job(training(train_args(tmp_path, shakespeare_head, 100_000)), jobs_root=jobs_root)
    running = wait_for(job.job_id, jobs_root, lambda j: j.state == "running" and j.progress["step"] >= 1)
    assert running.run_id is not None

    info = cancel_job(job.job_id, jobs_root)
    assert not group_exists(job.pgid)
    assert not psutil.pid_exists(job.pid)
    assert info.state == "killed", info.reason
    assert info.result["status"] == "KILLED" and info.result["stop_reason"] == "stopped: SIGTERM"
    run = client.get_run(running.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["stop_reason"] == "stopped: SIGTERM"
    assert cancel_job(job.job_id, jobs_root).state == "killed"  # cancelling again changes nothing
    delete_job(job.job_id, jobs_root)
    assert list_jobs(jobs_root) == []
    assert client.get_run(running.run_id).info.status == "KILLED"  # deleting a job keeps its run


@pytest.mark.slow
def test_a_killed_process_shows_as_died_and_its_run_ends_killed(tmp_path, jobs_root, client, shakespeare_head):
    job = start_job(training(train_args(tmp_path, shakespeare_head, 100_000)), jobs_root=jobs_root)
    started = wait_for(job.job_id, jobs_root, lambda j: j.run_id is not None)
    os.killpg(job.pgid, signal.SIGKILL)  # what an out-of-memory killer or `kill -9` does

    info = wait_for(job.job_id, jobs_root, lambda j: not j.is_active, timeout=10)
    assert info.state == "died"
    assert f"training process {job.pid} exited without finishing" in info.reason and "SIGKILL" in info.reason
    assert f"run {started.run_id} was still RUNNING and has been ended KILLED" in info.reason
    run = client.get_run(started.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == DIED_ERROR.format(pid=job.pid)
    assert (info.job_dir / "reconciled.json").is_file()  # later listings do not ask MLflow again
    assert [j.state for j in list_jobs(jobs_root)] == ["died"]


@pytest.mark.slow
def test_a_torchrun_job_is_one_run_and_cancel_or_kill_ends_it_killed(tmp_path, jobs_root, client, shakespeare_head):
    """A 2-process job: the launcher heads the group, rank 0 records the run; cancelling stops every process, and a
    job whose processes were SIGKILLed has its run ended KILLED although the run's pid tag names rank 0."""
    job = start_job(training(train_args(tmp_path, shakespeare_head, 100_000)), jobs_root=jobs_root, processes=2)
    assert job.processes == 2 and "--nproc_per_node=2" in job.argv
    running = wait_for(job.job_id, jobs_root, lambda j: j.state == "running" and j.progress["step"] >= 1)
    assert running.trainer_pid not in (None, job.pid)  # rank 0 is a child of the launcher
    run = client.get_run(running.run_id)
    assert run.data.params["world_size"] == "2" and run.data.tags[PID_TAG] == str(running.trainer_pid)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "pipelines.train" in p.cmdline()]
    assert len(workers) == 2

    info = cancel_job(job.job_id, jobs_root)
    assert info.state == "killed", info.reason
    assert not group_exists(job.pgid) and not any(w.is_running() for w in workers)
    run = client.get_run(running.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"].startswith("stopped: ")

    # torchrun starts its workers in sessions of their own: killing the launcher's group does not reach them, so
    # they notice that their launcher is gone, stop after their step and end the run KILLED themselves.
    second = start_job(training(train_args(tmp_path, shakespeare_head, 100_000)), jobs_root=jobs_root, processes=2)
    started = wait_for(second.job_id, jobs_root, lambda j: j.state == "running" and j.progress["step"] >= 1)
    workers = [p for p in psutil.Process(second.pid).children(recursive=True) if "pipelines.train" in p.cmdline()]
    assert len(workers) == 2
    os.killpg(second.pgid, signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "workers outlived their killed launcher"
    ended = wait_for(second.job_id, jobs_root, lambda j: not j.is_active, timeout=20)
    assert ended.state in ("died", "killed"), ended.reason  # "killed" once rank 0 has recorded how it ended
    run = client.get_run(started.run_id)
    assert run.info.status == "KILLED"


def test_bad_process_counts_are_refused_before_anything_starts(tmp_path, jobs_root, store_uri, shakespeare_head):
    for processes, message in ((0, "processes must be an integer from 1 to 64"), (65, "from 1 to 64")):
        with pytest.raises(UsageError, match=message):
            start_job(training(train_args(tmp_path, shakespeare_head, 5)), jobs_root=jobs_root, processes=processes)
    assert not jobs_root.exists()


@pytest.mark.slow
def test_reap_ends_a_killed_cli_run_killed(tmp_path, client, store_uri, shakespeare_head, capsys):
    """A `python -m pipelines.train` started in a terminal, not as a job, then killed with `kill -9`."""
    trainer = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", *train_args(tmp_path, shakespeare_head, 100_000)],
        cwd=REPO_ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": store_uri, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the SIGKILL below never reaches pytest
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("mlflow run: ")):
            line = trainer.stdout.readline()
            assert line, "".join(lines)  # it ended before creating its run
            lines.append(line)
        run_id = lines[-1].split()[-1]
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
        trainer.stdout.close()
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing else ends it

    assert jobs_cli.main(["--jobs-root", str(tmp_path / "no-jobs"), "reap"]) == 0
    out = capsys.readouterr().out
    died = DIED_ERROR.format(pid=trainer.pid)
    assert f"run {run_id} was RUNNING; ended KILLED ({died})" in out.splitlines()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == died
    assert jobs_cli.main(["--jobs-root", str(tmp_path / "no-jobs"), "reap"]) == 0
    assert run_id not in capsys.readouterr().out  # reaping twice changes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-steps", "many"], "invalid int value"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--n-layer", "0"], "positive integer"),
        (["--dropout", "1.5"], "dropout"),
        (["--data", "/no/such/corpus.txt"], "corpus file not found"),
    ],
)
def test_bad_arguments_raise_and_spawn_nothing(tmp_path, jobs_root, store_uri, args, message):
    children_before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(UsageError, match=message) as caught:
        start_job(training(["--device", "cpu", *args]), jobs_root=jobs_root, tracking_uri=store_uri)
    assert "\n" not in str(caught.value)
    assert not jobs_root.exists()
    assert {p.pid for p in psutil.Process().children()} <= children_before


# -- the state rules, on hand-made job folders (no training process) ---------------------------------------------


def make_job(root: Path, job_id: str, *, pid: int | None, create_time: float | None, **files: dict) -> Path:
    folder = root / job_id
    folder.mkdir(parents=True)
    meta = {"job_id": job_id, "pid": pid, "pgid": pid, "create_time": create_time, "argv": ["python"]}
    meta.update(train_args=[], label=None, tracking_uri=files.pop("tracking_uri", None), created_at=time.time())
    (folder / "job.json").write_text(json.dumps(meta))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture
def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = psutil.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_states_follow_the_process_and_its_files(tmp_path, gone_pid):
    me = psutil.Process()
    alive = make_job(tmp_path, "20260101-000001-aaaaaa", pid=me.pid, create_time=me.create_time())
    assert get_job(alive.name, tmp_path).state == "starting"
    (alive / "progress.json").write_text(json.dumps({"step": 3, "max_steps": 10}))
    assert get_job(alive.name, tmp_path).state == "running"
    (alive / "cancel.json").write_text("{}")
    assert get_job(alive.name, tmp_path).state == "cancelling"
    with pytest.raises(JobError, match="cancel it before deleting"):
        delete_job(alive.name, tmp_path)

    # Same pid, another start time: the pid was reused by an unrelated process, so the job's process is gone.
    reused = make_job(tmp_path, "20260101-000002-bbbbbb", pid=me.pid, create_time=me.create_time() - 3600)
    assert get_job(reused.name, tmp_path).state == "died"

    failed = make_job(
        tmp_path,
        "20260101-000003-cccccc",
        pid=gone_pid,
        create_time=1.0,
        result={"status": "FAILED", "exit_code": 2, "error": "UsageError: corpus is empty", "run_ended": True},
    )
    info = get_job(failed.name, tmp_path)
    assert (info.state, info.reason) == ("failed", "UsageError: corpus is empty")
    assert cancel_job(failed.name, tmp_path).state == "failed"  # a no-op on an ended job

    never = make_job(tmp_path, "20260101-000004-dddddd", pid=None, create_time=None)
    assert get_job(never.name, tmp_path).state == "starting"  # start_job is about to spawn it
    meta = json.loads((never / "job.json").read_text())
    (never / "job.json").write_text(json.dumps({**meta, "created_at": time.time() - 3600}))
    assert get_job(never.name, tmp_path).state == "died"

    assert [j.job_id for j in list_jobs(tmp_path)] == [never.name, failed.name, reused.name, alive.name]
    delete_job(failed.name, tmp_path)
    assert not failed.exists()
    with pytest.raises(JobError, match="no job"):
        get_job(failed.name, tmp_path)
    with pytest.raises(UsageError, match="invalid job id"):
        get_job("../outside", tmp_path)


def test_broken_job_folders_are_listed_as_unknown_not_dropped(tmp_path, gone_pid):
    good = make_job(tmp_path, "20260101-000001-aaaaaa", pid=gone_pid, create_time=1.0, result={"status": "KILLED"})
    corrupt = tmp_path / "20260101-000002-bbbbbb"
    corrupt.mkdir()
    (corrupt / "job.json").write_text('{"job_id": "20260101-0000')  # cut short
    empty = tmp_path / "20260101-000003-cccccc"
    empty.mkdir()
    bad_pid = make_job(tmp_path, "20260101-000000-ffffff", pid="12", create_time=None)
    (tmp_path / ".20260101-000004-dddddd.staging").mkdir()  # start_job mid-way: not a job yet

    listed = {j.job_id: j for j in list_jobs(tmp_path)}
    assert list(listed) == [empty.name, corrupt.name, good.name, bad_pid.name]
    assert listed[bad_pid.name].state == "unknown" and "bad pid" in listed[bad_pid.name].reason
    assert listed[good.name].state == "killed"
    assert listed[corrupt.name].state == "unknown" and "job.json is corrupt" in listed[corrupt.name].reason
    assert listed[empty.name].state == "unknown" and "job.json is missing" in listed[empty.name].reason
    delete_job(corrupt.name, tmp_path)
    assert not corrupt.exists()


def test_a_died_job_with_a_running_run_is_reconciled_once(tmp_path, client, store_uri, gone_pid, monkeypatch):
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    job_dir = make_job(
        tmp_path,
        "20260101-000001-aaaaaa",
        pid=gone_pid,
        create_time=1.0,
        tracking_uri=store_uri,
        run={"run_id": run_id},
        progress={"step": 5},
    )
    info = list_jobs(tmp_path)[0]
    assert info.state == "died" and info.run_id == run_id
    assert f"MLflow run {run_id} was still RUNNING and has been ended KILLED" in info.reason
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == DIED_ERROR.format(pid=gone_pid)
    assert json.loads((job_dir / "reconciled.json").read_text())["previous_status"] == "RUNNING"

    def no_mlflow(*args):
        raise AssertionError("an already reconciled job asked MLflow again")

    monkeypatch.setattr(job_control, "reconcile", no_mlflow)
    assert get_job(job_dir.name, tmp_path).state == "died"


def test_a_died_job_leaves_alone_a_run_another_process_has_resumed(tmp_path, client, store_uri, gone_pid):
    me = psutil.Process()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), PROCESS_START_TAG: repr(me.create_time())}
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id, tags=tags).info.run_id
    make_job(
        tmp_path,
        "20260101-000001-aaaaaa",
        pid=gone_pid,
        create_time=1.0,
        tracking_uri=store_uri,
        run={"run_id": run_id},
    )
    [info] = list_jobs(tmp_path)
    assert info.state == "died" and f"now trained by process {me.pid}" in info.reason
    assert client.get_run(run_id).info.status == "RUNNING"
    client.set_terminated(run_id, "FINISHED")


def test_an_unreadable_store_shows_in_the_reason_without_breaking_the_listing(tmp_path, gone_pid):
    broken_db = tmp_path / "not-a-database.db"
    broken_db.write_text("this is not SQLite")
    make_job(
        tmp_path / "jobs",
        "20260101-000001-aaaaaa",
        pid=gone_pid,
        create_time=1.0,
        tracking_uri=f"sqlite:///{broken_db}",
        run={"run_id": "0" * 32},
    )
    [info] = list_jobs(tmp_path / "jobs")
    assert info.state == "died"
    assert f"could not check MLflow run {'0' * 32}" in info.reason
    assert not (info.job_dir / "reconciled.json").exists()  # the next listing tries again


def test_cancel_kills_a_process_that_ignores_sigterm_and_ends_its_run_killed(tmp_path, client, store_uri):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready');"
         "time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as start_job does: the group signals never reach pytest
    )  # fmt: skip
    try:
        assert stubborn.stdout.readline().strip() == "ready"
        run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
        job_dir = make_job(
            tmp_path,
            "20260101-000001-aaaaaa",
            pid=stubborn.pid,
            create_time=psutil.Process(stubborn.pid).create_time(),
            tracking_uri=store_uri,
            run={"run_id": run_id},
            progress={"step": 1},
        )
        assert get_job(job_dir.name, tmp_path).state == "running"
        started = time.monotonic()
        info = cancel_job(job_dir.name, tmp_path, timeout=0.5)
        assert time.monotonic() - started < 5
        assert info.state == "killed" and "SIGKILL" in info.reason
        assert not group_exists(stubborn.pid)
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["stop_reason"] == f"cancelled: training process {stubborn.pid} was killed"
    finally:
        if stubborn.poll() is None and psutil.pid_exists(stubborn.pid):
            os.killpg(stubborn.pid, signal.SIGKILL)
        stubborn.wait()
        stubborn.stdout.close()


STUBBORN_LAUNCHER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
    start_new_session=True,
)
print(worker.pid, flush=True)
time.sleep(60)
"""


def test_cancel_also_kills_a_hung_worker_in_a_session_of_its_own(tmp_path):
    """Like a torchrun launcher whose workers hang: the group's SIGKILL cannot reach a worker in another session, so
    cancel kills every process the job started, and only returns once they are all gone."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", STUBBORN_LAUNCHER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    worker = psutil.Process(int(launcher.stdout.readline()))
    try:
        assert os.getpgid(worker.pid) != launcher.pid  # out of the launcher's group
        job_dir = make_job(
            tmp_path, "20260101-000001-aaaaaa", pid=launcher.pid, create_time=psutil.Process(launcher.pid).create_time()
        )
        info = cancel_job(job_dir.name, tmp_path, timeout=0.5)
        assert info.state == "killed"
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, and even reaped by its new parent
            assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, "the worker outlived the cancel"
    finally:
        for pid in (launcher.pid, worker.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
        launcher.stdout.close()


def test_an_unreachable_tracking_server_is_tried_once_per_listing(tmp_path, gone_pid, monkeypatch):
    from core import store

    checks = []
    real_check = store.check_server
    monkeypatch.setattr(store, "check_server", lambda uri: (checks.append(uri), real_check(uri, timeout=2)))
    for n in (1, 2):
        make_job(
            tmp_path,
            f"20260101-00000{n}-aaaaaa",
            pid=gone_pid,
            create_time=1.0,
            tracking_uri="http://127.0.0.1:9",  # the discard port: nothing answers
            run={"run_id": f"{n}" * 32},
        )
    listed = list_jobs(tmp_path)
    assert [j.state for j in listed] == ["died", "died"]
    assert all("cannot reach the MLflow tracking server" in j.reason for j in listed)
    assert checks == ["http://127.0.0.1:9"]


# -- the training process's side ---------------------------------------------------------------------------------


def test_progress_is_written_at_most_twice_a_second_and_always_at_the_end(tmp_path, monkeypatch):
    writes = []
    real_write = job_recorder.write_json
    monkeypatch.setattr(
        job_recorder, "write_json", lambda path, data: (writes.append(data["step"]), real_write(path, data))
    )
    recorder = JobProgressRecorder(tmp_path, max_steps=2000, min_interval=0.5)
    recorder.on_train_start({"device": "cpu", "total_params": 10, "tokens_per_batch": 128})
    metrics = {"loss": 3.0, "avg_loss": 3.5, "best_loss": 2.9, "lr": 1e-3, "tokens_per_sec": 1e5, "time_per_batch": 0}
    for step in range(1, 2001):
        recorder.on_step(step, metrics)
    recorder.on_eval(2000, {"val_loss": 3.2, "val_bpc": 1.5})
    assert len(writes) <= 6  # start, first step, last step, eval (+ a timed one on a slow machine)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["step"] == 2000 and progress["eta_s"] == 0 and progress["val_loss"] == 3.2
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_recorder_records_a_training_error_and_reraises(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"), JobRecorder(tmp_path / "job"):
        raise ValueError("corpus is empty")
    result = json.loads((tmp_path / "job" / "result.json").read_text())
    assert result["status"] == "FAILED" and result["exit_code"] == 2
    assert result["error"] == "ValueError: corpus is empty" and result["run_id"] is None


def test_log_tail(tmp_path):
    info = JobInfo("20260101-000001-aaaaaa", tmp_path, "running")
    assert info.log_tail() == ""
    info.log_path.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert info.log_tail(max_lines=2) == "line 998\nline 999"
    assert info.log_tail(max_lines=1000, max_bytes=100).splitlines()[0].startswith("line 9")


# -- reaping runs whose process is gone, and the jobs CLI ---------------------------------------------------------


def test_reap_ends_only_this_hosts_running_runs_whose_process_is_gone(client, store_uri, gone_pid):
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    me = psutil.Process()
    here = socket.gethostname()

    def run(status="RUNNING", **tags) -> str:
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    def process(host, pid, started):
        return {HOST_TAG: host, PID_TAG: str(pid), PROCESS_START_TAG: repr(started)}

    dead = run(**process(here, gone_pid, 1.0))
    reused = run(**process(here, me.pid, me.create_time() - 3600))  # the pid now belongs to another process
    alive = run(**process(here, me.pid, me.create_time()))
    elsewhere = run(**process("another-machine.example", gone_pid, 1.0))
    untagged = run()
    legacy_job = run(**{"studio.job_pid": str(gone_pid)})  # no host, no start time: left to the job's reconciliation
    garbled = run(**process(here, "x", "soon"))
    finished = run("FINISHED", **process(here, gone_pid, 1.0))

    reaped = {r.run_id: r for r in reaper.reap_orphan_runs(store_uri)}
    assert {dead, reused} <= set(reaped)
    assert not {alive, elsewhere, untagged, legacy_job, garbled, finished} & set(reaped)
    assert reaped[dead].status == "KILLED" and reaped[dead].pid == gone_pid and reaped[dead].job_id is None
    for run_id in (dead, reused):
        ended = client.get_run(run_id)
        assert ended.info.status == "KILLED" and ended.data.tags["error"].startswith("training process ")
    assert {client.get_run(r).info.status for r in (alive, elsewhere, untagged, legacy_job, garbled)} == {"RUNNING"}
    assert client.get_run(finished).info.status == "FINISHED"
    assert not {dead, reused} & {r.run_id for r in reaper.reap_orphan_runs(store_uri)}  # done once
    for run_id in (alive, elsewhere, untagged, legacy_job, garbled):  # not to be found by later tests' reaps
        client.set_terminated(run_id, "FINISHED")


def test_reap_reports_jobs_and_stores_it_could_not_check_and_still_does_the_rest(tmp_path, client, store_uri, gone_pid):
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    died = make_job(
        tmp_path,
        "20260101-000001-aaaaaa",
        pid=gone_pid,
        create_time=1.0,
        tracking_uri=store_uri,
        run={"run_id": run_id},
    )
    make_job(
        tmp_path,
        "20260101-000002-bbbbbb",
        pid=gone_pid,
        create_time=1.0,
        tracking_uri=f"sqlite:///{tmp_path / 'broken.db'}",
        run={"run_id": "0" * 32},
    )
    (tmp_path / "broken.db").write_text("this is not SQLite")
    report = reaper.reap(tmp_path, tracking_uri=store_uri)
    [mine] = [r for r in report.reaped if r.job_id == died.name]
    assert (mine.run_id, mine.status, mine.reason) == (run_id, "KILLED", DIED_ERROR.format(pid=gone_pid))
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(report.problems) == 1 and report.problems[0].startswith("job 20260101-000002-bbbbbb: could not check")
    again = reaper.reap(tmp_path, tracking_uri=store_uri)
    assert died.name not in {r.job_id for r in again.reaped}  # reconciled once
    assert len(again.problems) == 1  # the broken store is tried again each time


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """pipelines.jobs as its __main__ runs it (pipelines.cli.run): exit code, stdout, stderr."""
    from pipelines.cli import run

    with pytest.raises(SystemExit) as exited:
        run(jobs_cli.main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_the_jobs_cli_lists_a_table_and_json_and_refuses_unknown_jobs_in_one_line(tmp_path, gone_pid, capsys):
    me = psutil.Process()
    running = make_job(
        tmp_path, "20260101-000002-bbbbbb", pid=me.pid, create_time=me.create_time(), run={"run_id": "f" * 32}
    )
    (running / "progress.json").write_text(json.dumps({"step": 7, "max_steps": 50}))
    meta = json.loads((running / "job.json").read_text())
    (running / "job.json").write_text(json.dumps({**meta, "label": "my run"}))
    make_job(tmp_path, "20260101-000001-aaaaaa", pid=gone_pid, create_time=1.0)
    root = ["--jobs-root", str(tmp_path)]

    code, out, _ = run_cli([*root, "list"], capsys)
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["JOB", "ID", "STATE", "PID", "RUN", "ID", "STEP", "LABEL"]
    assert first.split() == ["20260101-000002-bbbbbb", "running", str(me.pid), "f" * 32, "7/50", "my", "run"]
    assert second.split() == ["20260101-000001-aaaaaa", "died", str(gone_pid), "-", "-", "-"]
    code, out, _ = run_cli([*root, "list", "--json"], capsys)
    listed = json.loads(out)
    assert [(j["job_id"], j["state"], j["step"], j["max_steps"]) for j in listed] == [
        ("20260101-000002-bbbbbb", "running", 7, 50),
        ("20260101-000001-aaaaaa", "died", None, None),
    ]
    assert "exited without finishing" in listed[1]["reason"]

    code, out, err = run_cli([*root, "cancel", "20260101-000001-aaaaaa"], capsys)
    assert code == 0 and out.startswith("job 20260101-000001-aaaaaa had already ended died")
    for argv, fragment in [
        ([*root, "cancel", "20260101-000009-cccccc"], "no job 20260101-000009-cccccc"),
        ([*root, "cancel", "../job"], "invalid job id"),
        ([*root, "cancel", "20260101-000001-aaaaaa", "--timeout", "-1"], "--timeout"),
        ([*root, "frobnicate"], "invalid choice"),
    ]:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert [j.state for j in list_jobs(tmp_path)] == ["running", "died"]  # nothing was signalled


# -- what a job runs: its spec ----------------------------------------------------------------------------------


def test_a_training_spec_round_trips_and_is_a_new_run_or_a_resume(tmp_path, shakespeare_head):
    spec = training(train_args(tmp_path, shakespeare_head, 5))
    assert TrainingJob.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert TrainingJob.from_dict({"kind": "train", "resume": "abc"}) == TrainingJob(resume="abc")
    with pytest.raises(UsageError, match="not both"):
        TrainingJob(configs=spec.configs, resume="abc")
    with pytest.raises(UsageError, match="not both"):
        TrainingJob()
    with pytest.raises(ValueError, match="not a training job's spec"):
        TrainingJob.from_dict({"kind": "sweep"})
