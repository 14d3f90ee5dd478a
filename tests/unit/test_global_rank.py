"""Which process is rank 0 before a process group exists (state.utils.logging.global_rank)."""

from __future__ import annotations

import pytest

from state.utils.logging import global_rank

RANK_VARS = ("RANK", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID", "NODE_RANK", "GROUP_RANK",
             "SLURM_NODEID", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")


@pytest.mark.parametrize(("env", "rank"), [
    ({}, 0),
    ({"RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "2"}, 5),  # torchrun
    ({"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}, 9),  # srun, one task per GPU
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1),  # first process of node 1 (Lightning starts the node's others)
    ({"NODE_RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "8"}, 10),
    ({"GROUP_RANK": "1", "LOCAL_RANK": "0"}, 1),
    ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, 1),
    ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, 0),
    # a batch script running python itself (no srun): Lightning's children carry SLURM_PROCID=0 and LOCAL_RANK
    ({"SLURM_PROCID": "0", "SLURM_NODEID": "0", "LOCAL_RANK": "3", "SLURM_NTASKS_PER_NODE": "8(x2)"}, 3),
    ({"SLURM_PROCID": "0", "SLURM_NODEID": "1", "LOCAL_RANK": "0", "SLURM_NTASKS_PER_NODE": "8(x2)"}, 8),
])
def test_global_rank_from_the_launchers_variables(monkeypatch, env, rank):
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank
