"""SLURM requeue after a preemption checkpoint: which job is requeued, and a failing scontrol never raises."""

from __future__ import annotations

import logging
import os

import pytest

from state.training.preemption import preempt_exit_code, requeue_slurm_job


def _scontrol(tmp_path, monkeypatch, body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize(("env", "expected"), [({"SLURM_JOB_ID": "4242"}, "requeue 4242"),
                                               ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242",
                                                 "SLURM_ARRAY_TASK_ID": "7"}, "requeue 4242_7")])
def test_requeue_names_the_job_or_its_array_task(tmp_path, monkeypatch, env, expected):
    _scontrol(tmp_path, monkeypatch, f'echo "$*" >> "{tmp_path}/calls"')
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert requeue_slurm_job() is True
    assert (tmp_path / "calls").read_text().splitlines() == [expected]


def test_failed_requeue_warns_with_the_command_to_run_and_does_not_raise(tmp_path, monkeypatch, state_log):
    _scontrol(tmp_path, monkeypatch, 'echo "scontrol: error: Invalid job id specified" >&2; exit 1')
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with state_log.at_level(logging.WARNING, logger="state"):
        assert requeue_slurm_job() is False
    assert "Invalid job id specified" in state_log.text and "scontrol requeue 4242" in state_log.text


def test_no_scontrol_on_path_is_a_warning(tmp_path, monkeypatch, state_log):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with state_log.at_level(logging.WARNING, logger="state"):
        assert requeue_slurm_job() is False
    assert "could not requeue SLURM job 4242" in state_log.text


def test_exit_status_follows_the_signal_unless_configured(monkeypatch):
    monkeypatch.delenv("STATE_PREEMPT_EXIT_CODE", raising=False)
    assert (preempt_exit_code(15), preempt_exit_code(10)) == (143, 138)
    monkeypatch.setenv("STATE_PREEMPT_EXIT_CODE", "3")
    assert preempt_exit_code(10) == 3


def test_ranks_agree_on_a_signal_only_every_n_steps(monkeypatch, tmp_path):
    """Several ranks: the signal is acted on at the next multiple of STATE_PREEMPT_CHECK_EVERY (the same step on
    every rank), not at the next batch; one process acts at the next step."""
    import signal
    from types import SimpleNamespace

    from state.training import preemption

    monkeypatch.setenv("STATE_PREEMPT_CHECK_EVERY", "4")
    exchanges = []
    monkeypatch.setattr(preemption, "_any_rank", lambda flag, group: exchanges.append(flag) or flag)
    for world, expected_stop in ((2, 8), (1, 5)):
        exchanges.clear()
        callback = preemption.PreemptionCheckpoint(tmp_path / "last.ckpt")
        trainer = SimpleNamespace(world_size=world, accumulate_grad_batches=1, global_step=0, should_stop=False,
                                  is_global_zero=True, saved=[],
                                  fit_loop=SimpleNamespace(_data_fetcher=None, epoch_loop=SimpleNamespace()))
        trainer.save_checkpoint = lambda path, weights_only, t=trainer: t.saved.append(t.global_step)
        for step in range(1, 12):
            trainer.global_step = step
            if step == 5:
                callback.signum = int(signal.SIGTERM)
            callback.on_train_batch_end(trainer)
            if trainer.should_stop:
                break
        assert trainer.saved == [expected_stop] and callback.stopped_at == expected_stop
        assert exchanges == ([False, True, False] if world == 2 else [])  # steps 4 and 8, then the requeue question


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_check_interval_must_be_a_positive_number(monkeypatch, value):
    from state.training.preemption import check_every
    from state.utils.errors import StateError

    monkeypatch.setenv("STATE_PREEMPT_CHECK_EVERY", value)
    with pytest.raises(StateError, match="STATE_PREEMPT_CHECK_EVERY"):
        check_every()
