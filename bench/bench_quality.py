"""Prediction quality against known true effects: does a model beat the free baselines?

Data: :func:`state.datasets.synthetic_effects.make_effects_adata` (3 contexts, 60 perturbations with
shared and context-specific programs, null and off-panel perturbations), processed like
``preprocess_train`` (log1p, 100 HVGs). Tasks (the State paper's settings):

* ``fewshot``: the last context keeps 30 % of its perturbations for training (3 for validation,
  the rest are the test set);
* ``zeroshot``: the last context is held out entirely.

Every model is trained and scored through the CLI (``state tx train`` then ``state tx predict``, which
runs cell-eval, and with cell-eval2 installed ``--scorer both --preset vcc2026`` for the 2026 challenge's
scaled scores; without it those columns are left out with a note). Truth correlation: per test (context, perturbation), Pearson over HVGs between the
predicted change (mean prediction - mean observed control of the context) and the true log-mean shift,
averaged; ``observed`` is the same for the observed cells (the ceiling from data). cell-eval columns
are means over test perturbations. Usage::

    python bench/bench_quality.py                      # full table (3 seeds x 2 tasks), writes BENCHMARKS.md
    python bench/bench_quality.py --seeds 0 --tasks fewshot --models state --steps 2000 --issue-recipe \
        --label state_2000 --jobs 1 --no-write         # the issue's model=state recipe, a reference row
    python bench/bench_quality.py --seeds 0 --tasks fewshot --models state_plus --extra model.kwargs.set_mean_weight=0
    python bench/bench_quality.py --grid --jobs 2      # the regime grid (issue #20), its own BENCHMARKS.md section

The grid (``--grid``, :mod:`quality_grid`, whose docstring gives the reasons in full) scores perturb_mean,
linear (CV'd ridge), state and state_plus on six few-shot regimes, each a stand-in for a kind of real screen:
``a_effects`` this bench's own generator; ``b_gain`` an independent latent-program generator
(:mod:`state.datasets.synthetic_programs`) whose contexts differ only by one gain, like Replogle's K562 vs
RPE1 CRISPRi screens sharing core programs at different strength; ``c_specific`` strong context-specific
programs, like Tahoe-100M's cell-line-specific drug responses; ``d_many`` 36 instead of 12 training
perturbations in the few-shot context (a real library vs a pilot); ``e_all_genes`` all genes instead of
an HVG subset (whole transcriptomes, most genes silent); ``f_few_cells`` 10 instead of 30 cells per
perturbation (genome-wide Perturb-seq and Norman-style combinatorial screens: noisy pseudo-bulk).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OURS, WORK, bench_env, run_cmd, write_section  # noqa: E402
from quality_grid import REGIMES, make_regime_task, render_grid  # noqa: E402
from quality_report import CELL_EVAL, VCC_SHORT, render  # noqa: E402

SIZES = ["model.kwargs.cell_set_len=32", "model.kwargs.hidden_dim=64",
         "model.kwargs.transformer_backbone_kwargs.intermediate_size=128",
         "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
         "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
         "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
         "model.kwargs.transformer_backbone_kwargs.head_dim=16"]
MODELS = {  # name in the table -> model overrides
    "state": ["model=state", *SIZES],
    "perturb_mean": ["model=perturb_mean", "model.kwargs.cell_set_len=32"],
    "context_mean": ["model=context_mean", "model.kwargs.cell_set_len=32"],
    "linear": ["model=linear", "model.kwargs.cell_set_len=32"],
    "state_plus": ["model=state_plus", *SIZES],
}
STEPS, STATE_STEPS = 300, 300  # default training steps of state_plus and of state
# the issue's original model=state recipe, for the reference rows (--label state_2000)
ISSUE_RECIPE = ["model.kwargs.hidden_dim=128", "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=4",
                "model.kwargs.transformer_backbone_kwargs.intermediate_size=256",
                "model.kwargs.transformer_backbone_kwargs.head_dim=32"]
ROW_NOTES = {  # what each label (a run directory name) changes from the shipped state_plus / state
    "state_plus": "shipped defaults (residual_base=linear, response features, set-mean MSE, cosine LR)",
    "state_2000": "model=state, the issue's recipe: hidden 128, 4 layers, lr 5e-4, 2000 steps (reference rows)",
    "plus_elsewhere_base": "residual_base=elsewhere (plain mean response in the other contexts)",
    "plus_no_features": "residual_base=elsewhere, response_features=false",
    "plus_no_set_mean": "residual_base=elsewhere, set_mean_weight=0",
    "plus_no_residual": "response_residual=false (the linear response is an encoder input only)",
    "plus_constant_lr": "lr_schedule=constant (otherwise the shipped defaults)",
}
NOTES = [  # about the measurement written to BENCHMARKS.md
    "Sizes: state and state_plus use hidden 64, 2 layers, cell_set_len 32, batch 8, lr 5e-4; the mean and linear "
    "baselines fit in one pass (1 step).",
]
EVAL2_HINT = "pip install 'state[eval2]'"
SECONDS_FILE = "bench_seconds.txt"  # train + predict wall seconds of a run, next to its run directory


def make_task(root: Path, seed: int, task: str) -> tuple[Path, Path]:
    """(split toml, truth csv) for one seed and task; the data is written once per seed."""
    from state.datasets.synthetic import write_toml
    from state.datasets.synthetic_effects import make_effects_adata, truth_table
    from state.tx.preprocess import normalize_log1p_hvg

    data, truth = root / f"seed{seed}" / "data.h5ad", root / f"seed{seed}" / "truth.csv"
    if not data.is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        adata = make_effects_adata(seed=seed)
        table = truth_table(adata)
        normalize_log1p_hvg(adata, num_hvgs=100)
        del adata.uns["true_effects"]
        adata.write_h5ad(data)
        table.to_csv(truth)
    obs = pd.read_csv(truth, index_col=[0, 1]).index
    contexts = sorted(set(obs.get_level_values(0)))
    perts = sorted(set(obs.get_level_values(1)))
    held = contexts[-1]
    order = np.random.default_rng(100 + seed).permutation(perts)
    n_test = round(0.7 * len(perts))
    if task == "fewshot":
        split = {"fewshot": {held: {"val": list(order[n_test:n_test + 3]), "test": list(order[:n_test])}}}
    else:
        split = {"zeroshot": {held: "test"}}
    toml = write_toml(root / f"seed{seed}" / f"{task}.toml", dataset_name="q", data_path=data, **split)
    return toml, truth


def truth_correlation(eval_dir: Path, truth_csv: Path) -> dict[str, float]:
    import anndata as ad

    pred, real = ad.read_h5ad(eval_dir / "adata_pred.h5ad"), ad.read_h5ad(eval_dir / "adata_real.h5ad")
    truth = pd.read_csv(truth_csv, index_col=[0, 1])
    genes = list(pred.var_names)
    scores: dict[str, list[float]] = {"model": [], "observed": []}
    for ctx in sorted(set(real.obs["cell_type"].astype(str))):
        in_ctx = (real.obs["cell_type"].astype(str) == ctx).to_numpy()
        labels = real.obs["gene"].astype(str).to_numpy()
        ctrl = np.asarray(real.X[in_ctx & (labels == "non-targeting")]).mean(axis=0)
        for pert in sorted(set(labels[in_ctx]) - {"non-targeting"}):
            rows = in_ctx & (labels == pert)
            true = truth.loc[(ctx, pert), genes].to_numpy(dtype=float)
            for name, source in (("model", pred), ("observed", real)):
                change = np.asarray(source.X[rows]).mean(axis=0) - ctrl
                ok = np.std(change) > 0 and np.std(true) > 0
                scores[name].append(float(np.corrcoef(change, true)[0, 1]) if ok else 0.0)
    return {f"truth_corr_{k}": float(np.mean(v)) for k, v in scores.items()}


def eval2_available() -> bool:
    return importlib.util.find_spec("cell_eval2") is not None


def merged(*groups: list[str]) -> list[str]:
    """Hydra overrides, a later value of the same key replacing an earlier one (``--extra`` over SIZES)."""
    by_key: dict[str, str] = {}
    for override in (o for group in groups for o in group):
        by_key[override.split("=", 1)[0]] = override
    return list(by_key.values())


def finished(run_dir: Path, *, eval2: bool) -> bool:
    eval_dir = run_dir / "eval_final.ckpt"
    scored = any(f for f in eval_dir.glob("*_results.csv") if "_agg_" not in f.name)
    return scored and (run_dir / SECONDS_FILE).is_file() and (not eval2 or (eval_dir / "cell_eval2_scores.csv").is_file())


def run_one(root: Path, seed: int, task: str, label: str, overrides: list[str], steps: int, *,
            threads: int, eval2: bool, reuse: bool = False, regime: str | None = None) -> dict:
    """Train and predict one model on one task (``regime``: a grid regime's few-shot task instead)."""
    if regime is None:
        toml, truth = make_task(root, seed, task)
        run_dir, tag = root / f"seed{seed}" / task / label, f"{task}_{label}_{seed}"
    else:
        toml, truth = make_regime_task(root, regime, seed)
        run_dir, tag = root / regime / f"seed{seed}" / label, f"{regime}_{label}_{seed}"
    extra = {"regime": regime} if regime else {}
    if reuse and finished(run_dir, eval2=eval2):
        seconds = float((run_dir / SECONDS_FILE).read_text())
        return {**extra, **score(run_dir, truth, seed=seed, task=task, label=label), "seconds": seconds,
                "reused": True}
    start = time.perf_counter()
    env = bench_env(threads)
    train = [OURS, "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
             "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "data.kwargs.control_pert=non-targeting",
             "use_wandb=false", f"output_dir={run_dir.parent}", f"name={label}", "overwrite=true",
             *merged([f"training.max_steps={steps}", f"training.val_freq={steps}",
                      f"training.ckpt_every_n_steps={steps}", "training.batch_size=8", "training.lr=5e-4",
                      f"training.train_seed={seed}"], overrides)]
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if run_cmd(train, env=env, log_path=logs / f"{tag}_train.log").returncode:
        raise SystemExit(f"train failed: see {logs}/{tag}_train.log")
    predict = [OURS, "tx", "predict", "--output-dir", str(run_dir), "--checkpoint", "final.ckpt",
               *(["--scorer", "both", "--preset", "vcc2026"] if eval2 else [])]
    log = logs / f"{tag}_predict.log"
    if run_cmd(predict, env=env, log_path=log).returncode and run_cmd(predict, env=env, log_path=log).returncode:
        raise SystemExit(f"predict failed: see {log}")
    seconds = time.perf_counter() - start
    (run_dir / SECONDS_FILE).write_text(f"{seconds:.1f}\n")
    return {**extra, **score(run_dir, truth, seed=seed, task=task, label=label), "seconds": seconds,
            "reused": False}


def score(run_dir: Path, truth: Path, *, seed: int, task: str, label: str) -> dict:
    """One table row from a predicted run: truth correlation, cell-eval means over perturbations
    (NaN-aware: cell-eval gives pr_auc NaN for a perturbation without DE genes, e.g. a null one) and,
    where cell-eval2 scored, the vcc2026 scaled scores."""
    eval_dir = run_dir / "eval_final.ckpt"
    row = {"task": task, "seed": seed, "model": label, **truth_correlation(eval_dir, truth)}
    per_pert = pd.concat([pd.read_csv(f) for f in eval_dir.glob("*_results.csv") if "_agg_" not in f.name])
    row.update({m: float(pd.to_numeric(per_pert[m], errors="coerce").mean()) for m in CELL_EVAL if m in per_pert})
    row.update(vcc_scores(eval_dir))
    return row


def vcc_scores(eval_dir: Path) -> dict[str, float]:
    """cell-eval2's scaled scores (0 = mean-response baseline, 1 = technical replicate) per metric,
    mean over the scored cell types; ``from_baseline`` (1 = perfect) where no replicate anchor exists."""
    path = eval_dir / "cell_eval2_scores.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    out: dict[str, float] = {}
    for metric, short in VCC_SHORT.items():
        rows = table[table["metric"] == metric]
        scaled = rows["from_replicate"] if rows["from_replicate"].notna().all() else rows["from_baseline"]
        out[short] = float(scaled.mean()) if len(rows) else float("nan")
        out["vcc_scale"] = "replicate" if rows["from_replicate"].notna().all() else "baseline"
    return out


def plan(args) -> list[tuple[int, str, str, list[str], int]]:
    """(seed, task, label, overrides, steps) of every run: task by task (the few-shot task first) and seed
    by seed, so an interrupted run still has whole blocks; within a block the slowest first."""
    runs = []
    for seed in args.seeds:
        for task in args.tasks:
            for name in args.models:
                neural = name.startswith("state")
                overrides = merged(MODELS[name], args.extra if neural else [])
                steps = (args.state_steps if name == "state" else args.steps) if neural else 1
                runs.append((seed, task, args.label or name, overrides, steps))
    order = {task: i for i, task in enumerate(args.tasks)}
    return sorted(runs, key=lambda r: (order[r[1]], r[0], -r[4]))


def run_all(root: Path, args) -> tuple[list[dict], tuple[float, float]]:
    """Every planned run, ``--jobs`` at a time (each with 2 / jobs threads); rows in plan order."""
    eval2 = eval2_available()
    runs = plan(args)
    for seed, task, *_ in runs:  # data written once, before any parallel job reads it
        make_task(root, seed, task)
    threads = max(1, 2 // args.jobs)
    loads = [os.getloadavg()[0]]

    def one(run):
        seed, task, label, overrides, steps = run
        row = run_one(root, seed, task, label, overrides, steps, threads=threads, eval2=eval2, reuse=args.reuse)
        loads.append(os.getloadavg()[0])
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, runs))
    return rows, (min(loads), max(loads))


GRID_MODELS = ("perturb_mean", "linear", "state", "state_plus")
GRID_STATE_STEPS = 150  # model=state in the grid: fewer steps (it is the slowest row and the reference, not the subject)
GRID_VAL_FREQ = 100  # state_plus validates (and so its gate judges) three times in 300 steps


def grid_plan(args) -> list[tuple[str, int, str, list[str], int]]:
    """(regime, seed, label, overrides, steps) of every grid run, regime by regime, the slowest first."""
    runs = []
    for regime in args.regimes:
        for seed in args.seeds:
            block = []
            for name in GRID_MODELS:
                overrides = list(MODELS[name])
                steps = {"state": args.grid_state_steps, "state_plus": args.steps}.get(name, 1)
                if name == "state_plus":
                    overrides.append(f"training.val_freq={GRID_VAL_FREQ}")
                block.append((regime, seed, name, overrides, steps))
            runs += sorted(block, key=lambda r: -r[4])
    return runs


def run_grid(args) -> None:
    root = WORK / "quality_grid"
    eval2 = eval2_available()
    runs = grid_plan(args)
    for regime, seed, *_ in runs:  # data written once, before any parallel job reads it
        make_regime_task(root, regime, seed)
    threads, loads = max(1, 2 // args.jobs), [os.getloadavg()[0]]
    start = time.perf_counter()

    def one(run):
        regime, seed, label, overrides, steps = run
        row = run_one(root, seed, "fewshot", label, overrides, steps, threads=threads, eval2=eval2,
                      reuse=args.reuse, regime=regime)
        loads.append(os.getloadavg()[0])
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = pd.DataFrame(list(pool.map(one, runs)))
    wall = time.perf_counter() - start
    with open(root / "results.jsonl", "a") as sink:
        for row in rows.to_dict("records"):
            sink.write(json.dumps(row) + "\n")
    reused = int(rows["reused"].sum())
    timing = (f"wall time {wall / 60:.1f} min ({reused} of {len(rows)} runs reused); sum of run times "
              f"{rows['seconds'].sum() / 60:.1f} min over {args.jobs} jobs; 1-minute load average "
              f"{min(loads):.1f}-{max(loads):.1f}")
    print(rows.drop(columns=["task"]).to_string(float_format=lambda v: f"{v:.3f}"))
    print(timing)
    command = (f"python bench/bench_quality.py --grid --regimes {' '.join(args.regimes)} --seeds "
               f"{' '.join(map(str, args.seeds))} --steps {args.steps} --grid-state-steps {args.grid_state_steps}")
    notes = [f"Sizes: state_plus {args.steps} steps (validation every {GRID_VAL_FREQ}), model=state "
             f"{args.grid_state_steps} steps, both hidden 64, 2 layers, cell_set_len 32, batch 8, lr 5e-4; "
             "perturb_mean and linear fit in one pass. Few-shot context: 3 val perturbations, the rest of its 60 "
             "minus the training ones are the test set.", f"Run: {timing}.", eval2_note(rows)]
    if not args.no_write:
        write_section("quality_grid", render_grid(rows, command=command, notes=notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["fewshot", "zeroshot"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of state_plus (and state)")
    parser.add_argument("--state-steps", type=int, default=None, help=f"of model=state (default {STATE_STEPS} "
                        "with the default --steps, else --steps)")
    parser.add_argument("--extra", nargs="*", default=[], help="extra overrides for the neural models")
    parser.add_argument("--issue-recipe", action="store_true",
                        help="the issue's model=state sizes (hidden 128, 4 layers) on top of --extra")
    parser.add_argument("--label", default=None, help="table label for the (single) model with --extra")
    parser.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="runs at once (2 cores in all)")
    parser.add_argument("--reuse", action="store_true",
                        help="score a run that an earlier (interrupted) invocation finished instead of redoing it")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score every run directory already under bench/_work/quality")
    parser.add_argument("--grid", action="store_true", help="the regime grid (quality_grid.py) instead of the tasks")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--grid-state-steps", type=int, default=GRID_STATE_STEPS, help="model=state's steps in the grid")
    args = parser.parse_args()
    if args.grid:
        run_grid(args)
        return
    args.extra = merged(args.extra, ISSUE_RECIPE if args.issue_recipe else [])
    if args.state_steps is None:
        args.state_steps = STATE_STEPS if args.steps == STEPS else args.steps
    if not eval2_available():
        print(f"note: cell-eval2 is not installed; no vcc2026 columns ({EVAL2_HINT})", file=sys.stderr)
    root = WORK / "quality"
    start = time.perf_counter()
    rows, load = rescore(root, args) if args.rescore else run_all(root, args)
    wall = time.perf_counter() - start
    table = pd.DataFrame(rows)
    with open(root / "results.jsonl", "a" if not args.rescore else "w") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    if not args.rescore:
        reused = int(table.get("reused", pd.Series(dtype=bool)).sum())
        print(f"wall time {wall / 60:.1f} min ({reused} runs reused); sum of run times "
              f"{table['seconds'].sum() / 60:.1f} min over {args.jobs} jobs; "
              f"1-minute load average {load[0]:.1f}-{load[1]:.1f}")
    if not args.no_write:
        write_section("quality", render(table, command=command_line(args), main_models=list(MODELS),
                                        row_notes=ROW_NOTES, notes=NOTES, eval2_note=eval2_note(table)))


def command_line(args) -> str:
    words = ["python bench/bench_quality.py", "--seeds", *map(str, args.seeds), "--tasks", *args.tasks]
    if args.models != list(MODELS):
        words += ["--models", *args.models]
    if args.steps != STEPS or args.state_steps != STATE_STEPS:
        words += ["--steps", str(args.steps), "--state-steps", str(args.state_steps)]
    return " ".join(words)


def eval2_note(table: pd.DataFrame) -> str:
    if "vcc_mean" not in table:
        return f"vcc2026 columns: not computed, cell-eval2 is not installed ({EVAL2_HINT})."
    scale = set(table.get("vcc_scale", pd.Series(dtype=str)).dropna())
    end = "a technical replicate" if scale == {"replicate"} else "a perfect prediction (no replicate anchor)"
    return ("vcc2026 columns: cell-eval2's scaled scores from `tx predict --scorer both --preset vcc2026` "
            f"(0 = its mean-response baseline, 1 = {end}), one per scored metric -- `vcc_pds` pds_cosine, "
            "`vcc_mse` expr_mse_unbiased_capped_norm, `vcc_de_jaccard` de_wilcoxon_sig_jaccard, `vcc_de_lfc` "
            "de_wilcoxon_lfc_nmae, `vcc_dir_fidelity` / `vcc_dir_reach` de_wilcoxon_direction_fidelity_yield_raw / "
            "_reach_raw -- and `vcc_mean` their mean (cell-eval2's avg_score); scored on predict's log1p values "
            "(input type lognorm), not the challenge's integer counts.")


def rescore(root: Path, args) -> tuple[list[dict], tuple[float, float]]:
    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            for run_dir in sorted((root / f"seed{seed}" / task).glob("*/eval_final.ckpt")):
                if not any(f for f in run_dir.glob("*_results.csv") if "_agg_" not in f.name):
                    continue  # still being predicted
                rows.append(score(run_dir.parent, root / f"seed{seed}" / "truth.csv", seed=seed, task=task,
                                  label=run_dir.parent.name))
    return rows, (float("nan"), float("nan"))


if __name__ == "__main__":
    main()
