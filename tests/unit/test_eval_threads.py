"""cell-eval's thread count follows the CPU affinity (arc-state PR 267: SLURM / Docker / taskset pin a
job to fewer CPUs than the machine has; os.cpu_count() would oversubscribe them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

# Runs evaluate_and_plot with cell-eval's MetricsEvaluator replaced by a recorder, and prints the
# thread count it was given next to os.cpu_count().
_PROBE = textwrap.dedent("""
    import os, sys
    import anndata as ad, numpy as np, pandas as pd
    import cell_eval
    from state.tx.predict.evaluate import evaluate_and_plot

    class Seen(Exception):
        pass

    class Recorder:
        def __init__(self, **kwargs):
            raise Seen(kwargs["num_threads"])

    cell_eval.MetricsEvaluator = Recorder
    obs = pd.DataFrame({"gene": ["ctrl", "ctrl", "A", "A"], "cell_type": ["c"] * 4}, index=list("0123"))
    adata = ad.AnnData(np.ones((4, 3), dtype=np.float32), obs=obs)
    try:
        evaluate_and_plot(adata, adata.copy(), outdir=sys.argv[1], control_pert="ctrl", pert_col="gene",
                          cell_type_key="cell_type", embed_key=None, profile="minimal")
    except Seen as seen:
        print(seen.args[0], os.cpu_count())
""")


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2,
                    reason="needs taskset and at least 2 CPUs")
def test_cell_eval_threads_follow_taskset_affinity(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", _PROBE, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    threads, machine = int(out[-2]), int(out[-1])
    assert threads == 1 and machine >= 2  # one allowed CPU, not the machine's count
