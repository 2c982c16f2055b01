"""POSIX process control for jobs: is a job's process alive (same pid *and* start time, not a zombie), reaping the
children this process started, the members of a process group and a process's descendants, and waiting for them to
go. Nothing here knows what a job folder holds."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from core.errors import JobError

_CREATE_TIME_TOLERANCE = 1.0  # seconds; psutil's start times of one process agree far closer than this
POLL_INTERVAL = 0.1
"""Seconds between two looks at a process that is expected to exit."""
SIGKILL_WAIT = 5.0
"""Seconds to wait for a SIGKILLed group to disappear."""

# Popen objects of the jobs this process started: polling them reaps the exited child (no zombie) and keeps
# subprocess from warning that a child it still tracks was garbage-collected while running.
children: dict[int, subprocess.Popen] = {}
# Exit codes of children this process reaped (Popen convention: negative = killed by that signal).
exit_codes: dict[int, int] = {}


def require_posix() -> None:
    """Raise :class:`~core.errors.JobError` off POSIX (jobs work on Linux and macOS)."""
    if os.name != "posix":
        raise JobError("background training jobs need POSIX process groups and signals (Linux or macOS)")


def reap_child(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is an exited child of this process, so it is no zombie."""
    if os.name != "posix":
        return
    process = children.get(pid)
    if process is not None:
        if process.poll() is not None:
            exit_codes[pid] = process.returncode
            del children[pid]
        return
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # not our child (started by another process, or already reaped): its parent reaps it
    if reaped == pid:
        exit_codes[pid] = os.waitstatus_to_exitcode(status)


def process_alive(pid: int | None, create_time: float | None) -> bool:
    """Whether the job's process still runs: same pid and start time (not a reused pid), and not a zombie."""
    if pid is None:
        return False
    reap_child(pid)
    if pid in children:
        # Our own child, not reapable yet: still running, or exiting. (A multi-threaded process can already look
        # like a zombie while its other threads finish; it has ended only once it can be reaped.)
        return True
    if create_time is None:
        return False  # start_job could not read it: the process had exited already
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
            return False  # the pid now belongs to another process
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False  # another user's process: jobs run as the user who started them, so not one of ours


def describe_exit(pid: int | None) -> str:
    """How a reaped child exited ("; killed by SIGKILL", "; exit code 1"), or "" when unknown."""
    code = exit_codes.get(pid) if pid is not None else None
    if code is None:
        return ""
    if code < 0:
        try:
            return f"; killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"; killed by signal {-code}"
    return f"; exit code {code}"


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are not zombies."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # it exited while we looked, or it is another user's: not a member of our job's group
    return members


def descendants(pid: int) -> list[psutil.Process]:
    """Every process that ``pid`` has started, in its group or not: torchrun starts each worker in a session of its
    own, out of reach of the group's signals."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []  # it exited while we looked


def wait_until_gone(
    pid: int, pgid: int, create_time: float | None, descendants: list[psutil.Process], timeout: float
) -> bool:
    """Wait until the job's process has exited (and is reaped, if it is our child), its group has no live member
    left and none of ``descendants`` runs; False if that takes more than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (
        process_alive(pid, create_time)
        or live_group_members(pgid)
        or any(process_alive(process.pid, process.create_time()) for process in descendants)
    ):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True
