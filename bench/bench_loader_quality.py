"""Quality parity of the fast set loader: the same trainings with ``data.kwargs.fast_loader=false`` and ``true``.

Issue #13 item 5: the layout loader draws each cell set from a few contiguous windows of its group
instead of cell-load's random draw, so the models it trains must be as good as cell-load's beyond seed
noise. Two tasks, each trained and scored through the CLI with both loaders and several seeds:

* ``bench_quality`` few-shot task (data with known true effects, from ``bench/bench_quality.py``, whose
  data generation, training and scoring are reused unchanged): truth correlation, cell-eval's
  ``pearson_delta``, PDS (``discrimination_score_l1``), ``pr_auc``, ``mae``;
* the README demo (``+experiment=demo`` on ``examples/fewshot.toml``): cell-eval's metrics only (the
  bundled example has no stored truth).

The fast path reads a layout written by ``state tx index`` into ``bench/_work/loader_quality`` (the data
files stay as they are; training gets ``data.kwargs.fast_loader_dir``). Usage::

    python bench/bench_loader_quality.py                               # state_plus, seeds 0 1 2, + demo
    python bench/bench_loader_quality.py --models state_plus state --no-demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as quality  # noqa: E402
from common import OURS, ROOT, WORK, bench_env, run_cmd, write_section  # noqa: E402
from quality_report import CELL_EVAL, markdown  # noqa: E402

PATHS = {"cell-load": ["data.kwargs.fast_loader=false"], "fast": ["data.kwargs.fast_loader=true"]}
DEMO_TOML = "examples/fewshot.toml"  # relative to the repository root, as the demo runs it


def index(toml: Path | str, layout_dir: Path, *, cwd: Path | None = None) -> None:
    """``state tx index`` of a TOML's files into ``layout_dir``, unless their layouts there are up to date
    (a rewrite under a training that reads them would only waste time)."""
    from state.tx.data import layout as layouts

    columns = {"pert_col": "gene", "cell_type_key": "cell_type", "batch_col": "gem_group"}
    here = Path.cwd()
    try:
        os.chdir(cwd or here)  # relative dataset paths are read from the working directory
        sources = layouts.toml_sources(toml)
        if all(layouts.layout_problem(s, layout_dir, keys=["X_hvg"], columns=columns) is None for s in sources):
            return
    finally:
        os.chdir(here)
    cmd = [OURS, "tx", "index", "--toml", str(toml), "--keys", "X_hvg", "--layout-dir", str(layout_dir)]
    if run_cmd(cmd, env=bench_env(2), log_path=layout_dir.parent / "index.log", cwd=cwd).returncode:
        raise SystemExit(f"state tx index failed: see {layout_dir.parent / 'index.log'}")


def path_overrides(path: str, layout_dir: Path) -> list[str]:
    return PATHS[path] + ([f"data.kwargs.fast_loader_dir={layout_dir}"] if path == "fast" else [])


def quality_rows(root: Path, seeds: list[int], models: list[str], steps: int, loaders: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        toml, _ = quality.make_task(root, seed, "fewshot")
        layout_dir = root / f"seed{seed}" / "layout"
        index(toml, layout_dir)
        for model in models:
            for path in loaders:
                load = os.getloadavg()[0]
                started = time.perf_counter()
                row = quality.run_one(root, seed, "fewshot", f"{model}-{path}",
                                      quality.MODELS[model] + path_overrides(path, layout_dir), steps,
                                      threads=2, eval2=False)
                rows.append({**row, "model": model, "loader": path, "wall_s": time.perf_counter() - started,
                             "load": max(load, os.getloadavg()[0])})
                record(root, rows[-1])
                print(json.dumps(rows[-1]), flush=True)
    return rows


def demo_rows(root: Path, seeds: list[int], loaders: list[str]) -> list[dict]:
    layout_dir = root / "demo" / "layout"
    layout_dir.parent.mkdir(parents=True, exist_ok=True)
    index(DEMO_TOML, layout_dir, cwd=ROOT)
    rows = []
    for seed in seeds:
        for path in loaders:
            name = f"demo-{path}-s{seed}"
            run_dir, logs = root / "demo" / name, root / "demo" / f"{name}"
            load, started = os.getloadavg()[0], time.perf_counter()
            train = [OURS, "tx", "train", "+experiment=demo", f"output_dir={run_dir.parent}", f"name={name}",
                     "overwrite=true", f"training.train_seed={seed}", *path_overrides(path, layout_dir)]
            predict = [OURS, "tx", "predict", "--output-dir", str(run_dir), "--checkpoint", "final.ckpt"]
            for step, cmd in (("train", train), ("predict", predict)):
                if run_cmd(cmd, env=bench_env(2), log_path=Path(f"{logs}_{step}.log"), cwd=ROOT).returncode:
                    raise SystemExit(f"demo {step} failed: see {logs}_{step}.log")
            per_pert = pd.concat([pd.read_csv(f) for f in (run_dir / "eval_final.ckpt").glob("*_results.csv")
                                  if "_agg_" not in f.name])
            row = {"task": "demo", "seed": seed, "model": "state (demo)", "loader": path,
                   **{m: float(pd.to_numeric(per_pert[m], errors="coerce").mean())
                      for m in CELL_EVAL if m in per_pert},
                   "wall_s": time.perf_counter() - started, "load": max(load, os.getloadavg()[0])}
            rows.append(row)
            record(root, row)
            print(json.dumps(row), flush=True)
    return rows


METRIC_COLS = ["truth_corr_model", "pearson_delta", "discrimination_score_l1", "pr_auc", "mae"]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, model, loader): mean and standard deviation over seeds of each metric."""
    cols = [c for c in METRIC_COLS if c in table]
    grouped = table.groupby(["task", "model", "loader"], sort=True)[cols]
    mean, std = grouped.mean(), grouped.std()
    out = pd.DataFrame(index=mean.index)
    for col in cols:
        out[col] = [f"{m:.3f} ± {s:.3f}" if np.isfinite(m) else "-" for m, s in zip(mean[col], std[col])]
    out["seeds"] = grouped.size()
    return out


def differences(table: pd.DataFrame) -> pd.DataFrame:
    """fast - cell-load, paired by seed: mean and the spread of the paired differences."""
    cols = [c for c in METRIC_COLS if c in table]
    wide = table.pivot_table(index=["task", "model", "seed"], columns="loader", values=cols)
    out = {}
    for col in cols:
        diff = (wide[(col, "fast")] - wide[(col, "cell-load")]).groupby(level=["task", "model"])
        out[col] = [f"{m:+.3f} ± {s:.3f}" if np.isfinite(m) else "-" for m, s in zip(diff.mean(), diff.std())]
        index = diff.mean().index
    return pd.DataFrame(out, index=index)


def render(table: pd.DataFrame) -> str:
    per_seed = table.pivot_table(index=["task", "model", "loader"], columns="seed",
                                 values=["truth_corr_model", "discrimination_score_l1"]
                                 if "truth_corr_model" in table else ["discrimination_score_l1"])
    per_seed.columns = [f"{'truth r' if m == 'truth_corr_model' else 'PDS l1'}, seed {s}" for m, s in per_seed.columns]
    return "\n".join([
        "## Quality parity of the fast set loader (`bench/bench_loader_quality.py`)", "",
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(table["command"])) + " (2 CPU threads per run; "
        f"1-minute load average during the runs "
        f"{table['load'].min():.1f}-{table['load'].max():.1f} on this shared 2-core machine). Each row trains the "
        "same model with `data.kwargs.fast_loader=false` (cell-load's sampler) and `=true` (the layout written by "
        "`state tx index`), same seeds, then `state tx predict` (cell-eval). Few-shot task: "
        "`bench/bench_quality.py`'s data with known effects; `truth_corr_model` as there (Pearson of predicted "
        "vs true change, mean over test perturbations). Demo: `state tx train +experiment=demo` on the bundled "
        "example (no stored truth: cell-eval metrics only). `discrimination_score_l1` is cell-eval's PDS "
        "(higher is better; `mae`: lower is better).", "",
        "Mean ± standard deviation over seeds:", "", markdown(summary(table)), "",
        "Fast minus cell-load, paired by seed (mean ± standard deviation of the paired differences):", "",
        markdown(differences(table)), "", "Per seed:", "", markdown(per_seed), ""])


def record(root: Path, row: dict) -> None:
    """Append one finished row to results.jsonl at once, so an interrupted run keeps what it measured."""
    command = " ".join(["python bench/bench_loader_quality.py", *sys.argv[1:]])
    with open(root / "results.jsonl", "a") as sink:
        sink.write(json.dumps({**row, "command": command}) + "\n")


def recorded(root: Path) -> pd.DataFrame:
    """Every row of results.jsonl, the latest one per (task, model, loader, seed)."""
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).drop_duplicates(["task", "model", "loader", "seed"], keep="last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="*", default=["state_plus"], choices=["state_plus", "state"])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the few-shot runs")
    parser.add_argument("--loaders", nargs="+", default=list(PATHS), choices=list(PATHS),
                        help="which loaders to train with (rows of earlier runs stay in results.jsonl)")
    parser.add_argument("--no-demo", action="store_true", help="skip the README demo runs")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true",
                        help="no runs: write the table from every row in bench/_work/loader_quality/results.jsonl")
    args = parser.parse_args()
    root = WORK / "loader_quality"
    root.mkdir(parents=True, exist_ok=True)
    if not args.render_only and args.models:
        quality_rows(root, args.seeds, args.models, args.steps, args.loaders)
    if not args.render_only and not args.no_demo:
        demo_rows(root, args.seeds, args.loaders)
    table = recorded(root)
    print(summary(table).to_string())
    print(differences(table).to_string())
    if not args.no_write:
        write_section("bench_loader_quality", render(table))


if __name__ == "__main__":
    main()
