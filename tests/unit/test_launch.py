"""The launch handshake (state.training.launch): one decision by rank 0, read by every other rank."""

from __future__ import annotations

import pytest

from state.training import launch
from state.utils.errors import StateError

LAUNCH_ENV = (*launch.LAUNCH_VARS, "STATE_LAUNCH_ID", launch.INHERITED, "WORLD_SIZE", "SLURM_NTASKS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_ranks_started_later_by_rank_0_keep_its_identity_when_the_launch_variables_change(clean_env, tmp_path):
    """Rank 0 derives the identity from MASTER_PORT; Lightning then sets MASTER_ADDR before starting rank 1,
    which must still find rank 0's decision (a leaked MASTER_PORT once made rank 1 wait for another file)."""
    clean_env.setenv("MASTER_PORT", "12400")
    zero = launch.decision_for(tmp_path, "run", rank=0, processes=2)
    zero.publish({"resume_from": None})
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")  # what Lightning's launcher does next
    clean_env.delenv(launch.INHERITED)  # not inherited: rank 1 must find the file by the same key
    one = launch.decision_for(tmp_path, "run", rank=1, processes=2)
    assert one.path == zero.path and one.receive(rank=1)["resume_from"] is None


def test_a_refusal_reaches_the_other_ranks_as_one_line(clean_env, tmp_path):
    clean_env.setenv("STATE_LAUNCH_ID", "job-1")
    zero = launch.decision_for(tmp_path, "run", rank=0, processes=2)
    zero.refuse(StateError("run directory /x is in use by another job (host h, pid 1)", hint="wait for it"))
    clean_env.delenv(launch.INHERITED)
    with pytest.raises(StateError) as info:
        launch.decision_for(tmp_path, "run", rank=1, processes=2).receive(rank=1)
    assert info.value.one_line() == ("rank 0 refused to start: run directory /x is in use by another job "
                                     "(host h, pid 1) (fix: wait for it)")


def test_no_decision_in_time_names_the_file_and_a_stale_one_is_ignored(clean_env, tmp_path):
    clean_env.setenv("STATE_LAUNCH_ID", "job-2")
    clean_env.setenv("STATE_LAUNCH_WAIT_S", "0.2")
    decision = launch.decision_for(tmp_path, "run", rank=1, processes=2)
    decision.path.parent.mkdir(parents=True)
    decision.path.write_text('{"resume_from": null, "written": 1.0}')  # left by an earlier launch
    with pytest.raises(StateError, match="rank 0 did not decide within 0.2 s") as info:
        decision.receive(rank=1)
    assert str(decision.path) in info.value.one_line()


def test_one_process_needs_no_handshake_and_a_rank_without_identity_says_how_to_give_one(clean_env, tmp_path):
    assert launch.decision_for(tmp_path, "run", rank=0, processes=1) is None
    with pytest.raises(StateError, match="STATE_LAUNCH_ID"):
        launch.decision_for(tmp_path, "run", rank=3, processes=1)
