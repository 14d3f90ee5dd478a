"""The run-directory lock (state.training.runlock): one job per run directory, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from state.training.runlock import LOCK_FILE, RunDirLock, is_stale
from state.utils.errors import StateError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, **owner) -> None:
    (folder / LOCK_FILE).write_text(json.dumps(owner))


def test_a_live_job_holding_the_folder_is_named_in_one_line(tmp_path):
    other = os.getppid()  # alive, and not this process
    _write_lock(tmp_path, host=socket.gethostname(), pid=other, started="2026-01-02T03:04:05+00:00",
                heartbeat=time.time())
    for attempt in (RunDirLock(tmp_path).check_free, RunDirLock(tmp_path).acquire):
        with pytest.raises(StateError) as info:
            attempt()
        message = info.value.one_line()
        assert "\n" not in message
        assert f"pid {other}" in message and socket.gethostname() in message and "2026-01-02T03:04:05" in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == other  # untouched


def test_a_lock_left_by_a_killed_job_on_this_host_is_taken_over(tmp_path, state_log):
    _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), started="x", heartbeat=time.time())
    lock = RunDirLock(tmp_path)
    with state_log.at_level("WARNING", logger="state"):
        lock.acquire()
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
    assert "stale lock" in state_log.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no temporary or set-aside files
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_other_hosts_are_judged_by_their_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_LOCK_STALE_S", "600")
    fresh = {"host": "node-elsewhere", "pid": 123, "started": "x", "heartbeat": time.time() - 60}
    old = {**fresh, "heartbeat": time.time() - 3600}
    assert not is_stale(fresh) and is_stale(old)
    assert is_stale({"garbage": True})  # unreadable owner: nobody to wait for
    _write_lock(tmp_path, **fresh)
    with pytest.raises(StateError, match="node-elsewhere"):
        RunDirLock(tmp_path).acquire()
    _write_lock(tmp_path, **old)
    RunDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_holder_refreshes_its_heartbeat_and_releases_only_its_own_lock(tmp_path):
    lock = RunDirLock(tmp_path)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.01)
    lock.heartbeat(force=True)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    RunDirLock(tmp_path).acquire()  # the same process again (a second fit in one process): allowed
    _write_lock(tmp_path, host="node-elsewhere", pid=1, started="x", heartbeat=time.time())  # someone took it
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()  # not ours any more: left alone


def test_run_directories_know_the_lock_file_name():
    from state.tx import rundir

    assert rundir.RUN_LOCK_FILE == LOCK_FILE


def _other_host_lock(folder, slurm_job) -> None:
    _write_lock(folder, host="node-that-died", pid=4242, started="2026-01-02T03:04:05+00:00",
                heartbeat=time.time(), slurm_job=slurm_job)


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock_at_once(tmp_path, monkeypatch):
    """Same SLURM_JOB_ID, a later SLURM_RESTART_COUNT, another host, a fresh heartbeat: taken over."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _other_host_lock(tmp_path, ["777", "0"])
    lock = RunDirLock(tmp_path)
    lock.acquire()
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["slurm_job"] == ["777", "1"]
    lock.release()


@pytest.mark.parametrize("slurm_job", [["777", "1"], ["778", "0"], None])
def test_another_live_slurm_run_keeps_its_lock(tmp_path, monkeypatch, slurm_job):
    """The same run of the job (another step of the allocation), another job, or no SLURM at all: refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _other_host_lock(tmp_path, slurm_job)
    with pytest.raises(StateError, match="in use by another job"):
        RunDirLock(tmp_path).acquire()
