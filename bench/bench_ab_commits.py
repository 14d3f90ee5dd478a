"""Our own `state tx train` / `tx infer` at two source trees, alternating, to see what a change costs.

    git worktree add /tmp/old <commit>
    python bench/bench_ab_commits.py --old /tmp/old/src --new src train --size big --reps 2
    python bench/bench_ab_commits.py --old /tmp/old/src --new src infer --reps 3

Uses the data that `bench/bench_tx_train.py` and `bench/bench_tx_infer.py` leave under bench/_work (run those
first). Each run is a child process with PYTHONPATH set to one tree and OMP_NUM_THREADS=1; train steps/s come
from the difference of two step counts (start-up excluded), infer is the wall time of the 200,000-cell input.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tx_train import SIZES, overrides  # noqa: E402
from common import OURS, WORK, bench_env  # noqa: E402


def _run(cmd: list[str], src: str) -> float:
    env = dict(bench_env(1), PYTHONPATH=str(Path(src).resolve()))
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def train_rate(src: str, tag: str, size: str) -> float:
    short, long = SIZES[size][3]
    toml, out = WORK / "tx" / "train.toml", WORK / "ab" / "runs"
    wall = {steps: _run([OURS, "tx", "train", *overrides(toml, out, size, steps), f"name={tag}_{size}_{steps}"], src)
            for steps in (short, long)}
    return (long - short) / (wall[long] - wall[short])


def infer_wall(src: str, tag: str) -> float:
    base = WORK / "tx" / "infer"
    (WORK / "ab").mkdir(parents=True, exist_ok=True)
    return _run([OURS, "tx", "infer", "--model-dir", str(base / "runs" / "arc_model"), "--adata",
                 str(base / "input_200000.h5ad"), "--pert-col", "gene", "--embed-key", "X_hvg",
                 "--output", str(WORK / "ab" / f"out_{tag}.h5ad")], src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "infer"])
    parser.add_argument("--old", required=True, help="the src/ folder of the baseline tree")
    parser.add_argument("--new", required=True, help="the src/ folder of the changed tree")
    parser.add_argument("--size", default="big", choices=list(SIZES))
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    values: dict[str, list[float]] = {"old": [], "new": []}
    for rep in range(args.reps):
        for tag, src in (("old", args.old), ("new", args.new)):
            value = train_rate(src, tag, args.size) if args.what == "train" else infer_wall(src, tag)
            values[tag].append(value)
            print(f"{args.what} rep {rep} {tag}: {value:.3f} {'steps/s' if args.what == 'train' else 's'}", flush=True)
    ratios = [n / o if args.what == "train" else o / n for n, o in zip(values["new"], values["old"])]
    print(f"median old {statistics.median(values['old']):.3f}, new {statistics.median(values['new']):.3f}; "
          f"new is {', '.join(f'{r:.2f}' for r in ratios)}x as fast per rep")


if __name__ == "__main__":
    main()
