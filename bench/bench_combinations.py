"""Combinatorial perturbations: additive baseline, linear and state_plus on held-out doubles.

Data: :func:`state.datasets.synthetic_combinations.make_combination_adata` (one cell line, 100
singles ``P000+ctrl`` ..., 130 doubles, a share of them non-additive: synergy, buffering, one part
dominating), processed like ``preprocess_train`` (log1p, 128 HVGs). Split: GEARS' held-out groups
(:func:`state.api.combination_split`): ``seen2`` (both parts trained as singles), ``seen1``, ``seen0``,
plus the held-out singles. Every model runs with ``model.kwargs.pert_combination=additive`` through the
CLI (``state tx train``, then ``state tx predict``, which runs cell-eval). ``additive`` is
``model=perturb_mean`` (a double it never saw = the sum of its parts' mean shifts).

Scores per held-out group and on the interacting doubles (kind != additive): ``truth_corr`` (Pearson
over HVGs of the predicted change, mean prediction - mean observed control, with the true log-mean
shift; mean over the group's labels), ``truth_mse`` (mean squared error of that change against the
observed change of the held-out cells), and cell-eval's ``pearson_delta`` / ``mae`` per perturbation.

    python bench/bench_combinations.py                 # 3 seeds, writes BENCHMARKS.md's section
    python bench/bench_combinations.py --seeds 0 --steps 50 --no-write   # smoke
"""

from __future__ import annotations

import argparse
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

CONTROL, CELL_LINE = "ctrl", "K562"
SIZES = ["model.kwargs.cell_set_len=32", "model.kwargs.hidden_dim=64",
         "model.kwargs.transformer_backbone_kwargs.intermediate_size=128",
         "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
         "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
         "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
         "model.kwargs.transformer_backbone_kwargs.head_dim=16"]
COMBO = ["+model.kwargs.pert_combination=additive"]
MODELS = {  # name in the table -> (overrides, neural)
    "additive": (["model=perturb_mean", "model.kwargs.cell_set_len=32", *COMBO], False),
    "linear": (["model=linear", "model.kwargs.cell_set_len=32", "model.kwargs.pert_combination=additive"], False),
    "state_plus": (["model=state_plus", *SIZES, "model.kwargs.pert_combination=additive"], True),
}
GROUP_ORDER = ["all doubles", "interacting", "seen2", "seen1", "seen0", "unseen_single"]
STEPS = 400
N_HVGS = 128


def make_task(root: Path, seed: int) -> tuple[Path, Path]:
    """(split toml, facts json: groups and kinds); data, truth and split written once per seed."""
    from state.api import combination_split
    from state.datasets.synthetic_combinations import combination_kinds, make_combination_adata, truth_table
    from state.tx.preprocess import normalize_log1p_hvg

    folder = root / f"seed{seed}"
    data, toml, facts = folder / "data.h5ad", folder / "split.toml", folder / "facts.json"
    if not facts.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        adata = make_combination_adata(seed=seed)
        truth, kinds = truth_table(adata), combination_kinds(adata)
        normalize_log1p_hvg(adata, num_hvgs=N_HVGS)
        del adata.uns["true_effects"], adata.uns["combination_kinds"]
        adata.write_h5ad(data)
        truth.to_csv(folder / "truth.csv")
        labels = [str(x) for x in adata.obs["gene"].cat.categories]
        split = combination_split(labels, control=CONTROL, toml=toml, dataset="norman_like", data_path=data,
                                  cell_type=CELL_LINE, seed=seed)
        facts.write_text(json.dumps({"group": split.group, "kinds": kinds, "n_train": len(split.train),
                                     "n_val": len(split.val)}, indent=1))
    return toml, facts


def run_one(root: Path, seed: int, label: str, steps: int, threads: int) -> Path:
    toml, _ = make_task(root, seed)
    overrides, neural = MODELS[label]
    run_dir = root / f"seed{seed}" / label
    steps = steps if neural else 1
    env = bench_env(threads)
    train = [OURS, "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
             "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", f"data.kwargs.control_pert={CONTROL}",
             "data.kwargs.pert_col=gene", "data.kwargs.cell_type_key=cell_type", "data.kwargs.batch_col=gem_group",
             "use_wandb=false", f"output_dir={run_dir.parent}", f"name={label}", "overwrite=true",
             f"training.max_steps={steps}", f"training.val_freq={max(steps // 4, 1)}",
             f"training.ckpt_every_n_steps={steps}", "training.batch_size=8", "training.lr=5e-4",
             f"training.train_seed={seed}", *overrides]
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if run_cmd(train, env=env, log_path=logs / f"{label}_{seed}_train.log").returncode:
        raise SystemExit(f"train failed: see {logs}/{label}_{seed}_train.log")
    predict = [OURS, "tx", "predict", "--output-dir", str(run_dir), "--checkpoint", "final.ckpt"]
    if run_cmd(predict, env=env, log_path=logs / f"{label}_{seed}_predict.log").returncode:
        raise SystemExit(f"predict failed: see {logs}/{label}_{seed}_predict.log")
    return run_dir


def score(run_dir: Path, facts_path: Path, *, seed: int, label: str) -> list[dict]:
    """One row per group: truth correlation, MSE against the observed change, cell-eval means."""
    import anndata as ad

    facts = json.loads(facts_path.read_text())
    truth = pd.read_csv(facts_path.parent / "truth.csv", index_col=0)
    eval_dir = run_dir / "eval_final.ckpt"
    pred, real = ad.read_h5ad(eval_dir / "adata_pred.h5ad"), ad.read_h5ad(eval_dir / "adata_real.h5ad")
    genes = list(pred.var_names)
    labels = real.obs["gene"].astype(str).to_numpy()
    ctrl = np.asarray(real.X[labels == CONTROL]).mean(axis=0)
    per_label: dict[str, dict[str, float]] = {}
    for pert in sorted(set(labels) - {CONTROL}):
        rows = labels == pert
        change = np.asarray(pred.X[rows]).mean(axis=0) - ctrl
        observed = np.asarray(real.X[rows]).mean(axis=0) - ctrl
        true = truth.loc[pert, genes].to_numpy(dtype=float)
        ok = np.std(change) > 0 and np.std(true) > 0
        per_label[pert] = {"truth_corr": float(np.corrcoef(change, true)[0, 1]) if ok else 0.0,
                           "truth_mse": float(np.mean((change - observed) ** 2))}
    cell_eval = pd.concat([pd.read_csv(f) for f in eval_dir.glob("*_results.csv") if "_agg_" not in f.name])
    key = next(c for c in ("perturbation", "pert_name", "gene") if c in cell_eval.columns)
    cell_eval = cell_eval.set_index(key)
    groups = {g: [lab for lab, k in facts["group"].items() if k == g] for g in GROUP_ORDER[2:]}
    doubles = [lab for lab, k in facts["group"].items() if k in ("seen2", "seen1", "seen0")]
    groups["all doubles"] = doubles
    groups["interacting"] = [lab for lab in doubles if facts["kinds"].get(lab, "additive") != "additive"]
    out = []
    for group in GROUP_ORDER:
        members = [lab for lab in groups[group] if lab in per_label]
        if not members:
            continue
        row = {"seed": seed, "model": label, "group": group, "n": len(members)}
        for metric in ("truth_corr", "truth_mse"):
            row[metric] = float(np.mean([per_label[m][metric] for m in members]))
        for metric in ("pearson_delta", "mae"):
            if metric in cell_eval.columns:
                values = pd.to_numeric(cell_eval.reindex(members)[metric], errors="coerce")
                row[metric] = float(values.mean())
        out.append(row)
    return out


def render(table: pd.DataFrame, *, command: str, load: tuple[float, float], wall: float, steps: int) -> str:
    from quality_report import markdown

    metrics = [m for m in ("truth_corr", "truth_mse", "pearson_delta", "mae") if m in table]
    mean = table.groupby(["group", "model"], sort=False)[["n", *metrics]].mean()
    mean = mean.reindex([(g, m) for g in GROUP_ORDER for m in MODELS if (g, m) in mean.index])
    lines = [f"Command: `{command}`, alone on the machine (2 runs at a time, 1 CPU thread each; "
             f"1-minute load average {load[0]:.1f}-{load[1]:.1f}; wall {wall / 60:.1f} min).",
             "",
             "Data: `state.datasets.synthetic_combinations.make_combination_adata` (one cell line, 100 singles, 130 "
             "doubles, 200 genes, 20 cells per perturbation, 600 controls; log1p, 128 HVGs), split by "
             "`state.api.combination_split` (GEARS' groups: 15 % of the singles held out, 25 % of the seen2 doubles "
             "held out, 8 % of them for val). All models with `pert_combination=additive`; `additive` = "
             f"`model=perturb_mean` (a double = the sum of its parts' mean shifts). state_plus: hidden 64, 2 layers, "
             f"cell_set_len 32, batch 8, lr 5e-4, {steps} steps. Mean over seeds {sorted(set(table['seed']))}; "
             "`n` = labels in the group per seed. `truth_corr`: Pearson over HVGs of the predicted change with the "
             "true log-mean shift (higher is better); `truth_mse`: MSE of the predicted change against the observed "
             "change of the held-out cells (lower is better); `pearson_delta`, `mae`: cell-eval, mean over the "
             "group's perturbations. `interacting`: the held-out doubles whose truth is not additive (synergy, "
             "buffering, one part dominating).",
             "", markdown(mean)]
    wide = table[table["group"].isin(["all doubles", "interacting"])].pivot_table(
        index=["group", "seed"], columns="model", values="truth_corr")
    if {"additive", "state_plus"} <= set(wide.columns):
        delta = (wide["state_plus"] - wide["additive"]).groupby(level=0).agg(["mean", "min", "max"])
        lines += ["", "state_plus - additive, `truth_corr` per seed (mean, min, max):", "", markdown(delta)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of state_plus")
    parser.add_argument("--jobs", type=int, default=2, choices=[1, 2])
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    root = WORK / "combinations"
    for seed in args.seeds:
        make_task(root, seed)
    runs = sorted(((s, m) for s in args.seeds for m in args.models), key=lambda r: (r[0], not MODELS[r[1]][1]))
    loads = [os.getloadavg()[0]]
    start = time.perf_counter()

    def one(run):
        seed, label = run
        run_dir = run_one(root, seed, label, args.steps, threads=max(1, 2 // args.jobs))
        loads.append(os.getloadavg()[0])
        rows = score(run_dir, root / f"seed{seed}" / "facts.json", seed=seed, label=label)
        print(json.dumps(rows), flush=True)
        return rows

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [r for rs in pool.map(one, runs) for r in rs]
    wall = time.perf_counter() - start
    table = pd.DataFrame(rows)
    (root / "results.json").write_text(table.to_json(orient="records", indent=1))
    command = f"python bench/bench_combinations.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}"
    body = render(table, command=command, load=(min(loads), max(loads)), wall=wall, steps=args.steps)
    print(body)
    if not args.no_write:
        write_section("combinations", "## Combinatorial perturbations (`bench/bench_combinations.py`)\n\n" + body)


if __name__ == "__main__":
    main()
