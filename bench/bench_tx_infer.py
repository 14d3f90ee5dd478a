"""`state tx infer` side by side with arc-state 0.11.1 on a 200,000-cell input: cells/s and peak RSS.

    python bench/bench_tx_infer.py [--cells 200000] [--reps 3] [--threads 1] [--write-md]

1. Generates one Perturb-seq data set with ``state.datasets.synthetic`` (obs gene / cell_type / gem_group,
   log1p CSR X, obsm['X_hvg']); its first 9,000 cells are the training file, all of it is the infer input.
2. Trains the same small State model (model=state_sm, smaller backbone) once with each tool.
3. Compatibility: arc-state infers with OUR run directory, and both tools infer with arc-state's run
   directory; the outputs are compared.
4. Timing, on arc-state's run directory, alternating ours / arc: the big input and a 2,000-cell input
   (to separate start-up from the per-cell rate). Peak RSS is the child's own ru_maxrss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ARC,
    OURS,
    WORK,
    Series,
    bench_env,
    loads,
    machine_line,
    make_data,
    median,
    run_cmd,
    shown_command,
    write_all_train_toml,
    write_section,
)

DIR = WORK / "tx" / "infer"
SMALL_CELLS = 2000
NOTES = (
    "Where our time goes (py-spy, 200,000 cells): ~7 s start-up (torch 1.8 s, anndata 1.3 s and 4.2 s for "
    "transformers' llama module, which arc-state imports too, besides Lightning), ~3.9 s in the model forward, "
    "~1.5 s reading and writing the h5ad and planning the windows. Changes behind these figures: a `state` run is "
    "rebuilt from its checkpoint as the plain network, without importing Lightning and torchmetrics (2-3 s of "
    "every run); windows of equal length run as one [B, S, .] pass (4,096 cells per call) with the perturbation "
    "encoded once per set, instead of one call per set; glibc malloc keeps freed blocks, so the activations of "
    "the next call are not page-faulted again (about 30% of the forward before); the llama layers skip "
    "arc-state's cos=1/sin=0 rotary multiply; windows are planned on integer codes instead of repeated string "
    "comparisons. Outputs stay float32 and equal arc-state's to ~1e-6 (above), which fixes the forward at about "
    "1.35 MFLOP per cell, run at the float32 matmul rate of one core for these small shapes. The 3x target would "
    "need the whole 200,000-cell run in about a third of arc-state's wall time, less than our imports plus that "
    "forward. Output predictions are clipped in place, so peak RSS is the interpreter + the input (458 MiB) + "
    "the output obsm (195 MiB) + one batch and the writer's buffers."
)
MODEL = ["model=state_sm", "model.kwargs.hidden_dim=128", "model.kwargs.cell_set_len=64",
         "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=2",
         "model.kwargs.transformer_backbone_kwargs.num_attention_heads=4",
         "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=4",
         "model.kwargs.transformer_backbone_kwargs.head_dim=32",
         "model.kwargs.transformer_backbone_kwargs.intermediate_size=512"]


def prepare_inputs(n_cells: int) -> tuple[Path, Path, Path]:
    import anndata as ad

    big = make_data(DIR / f"input_{n_cells}.h5ad", n_cells=n_cells, n_genes=512, n_hvgs=256, n_perts=10,
                    n_celltypes=3, seed=1)
    small, train = DIR / f"input_{SMALL_CELLS}.h5ad", DIR / "train" / "train.h5ad"
    if not (small.is_file() and train.is_file()):
        adata = ad.read_h5ad(big)
        train.parent.mkdir(parents=True, exist_ok=True)
        adata[:9000].copy().write_h5ad(train)
        adata[-SMALL_CELLS:].copy().write_h5ad(small)
    return big, small, train


def train_models(train: Path, env: dict[str, str]) -> dict[str, Path]:
    toml = write_all_train_toml(DIR / "train.toml", dataset="bench", data=train)
    runs = {}
    for tool, exe in (("ours", OURS), ("arc", ARC)):
        run_dir = DIR / "runs" / f"{tool}_model"
        if not (run_dir / "checkpoints" / "final.ckpt").is_file():
            cmd = [exe, "tx", "train", f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg",
                   "data.kwargs.output_space=gene", "data.kwargs.num_workers=0", "data.kwargs.pert_col=gene",
                   "data.kwargs.cell_type_key=cell_type", "data.kwargs.batch_col=gem_group",
                   "data.kwargs.control_pert=non-targeting", "use_wandb=false", *MODEL, "training.batch_size=8",
                   "training.max_steps=40", "training.val_freq=100000", "training.ckpt_every_n_steps=100000",
                   f"output_dir={run_dir.parent}", f"name={run_dir.name}", "overwrite=true"]
            log_path = DIR / f"train_{tool}.log"
            Series().add(run_cmd(cmd, env=env, log_path=log_path), cmd, log_path)
        runs[tool] = run_dir
    return runs


def infer_cmd(exe: str, run_dir: Path, adata: Path, out: Path) -> list[str]:
    return [exe, "tx", "infer", "--model-dir", str(run_dir), "--adata", str(adata), "--pert-col", "gene",
            "--embed-key", "X_hvg", "--output", str(out)]


def max_abs_diff(a: Path, b: Path) -> float:
    import anndata as ad

    x, y = ad.read_h5ad(a).obsm["X_hvg"], ad.read_h5ad(b).obsm["X_hvg"]
    return float(np.max(np.abs(np.asarray(x) - np.asarray(y))))


def compat(runs: dict[str, Path], small: Path, env: dict[str, str]) -> dict[str, str]:
    """Who can infer with whose run directory, and do the outputs agree (2,000-cell input)."""
    outs, notes = {}, {}
    for tool, exe in (("ours", OURS), ("arc", ARC)):
        for model in ("ours", "arc"):
            out = DIR / f"compat_{tool}_on_{model}.h5ad"
            log_path = DIR / f"compat_{tool}_on_{model}.log"
            run = run_cmd(infer_cmd(exe, runs[model], small, out), env=env, log_path=log_path)
            ok = run.returncode == 0 and out.is_file()
            outs[(tool, model)] = out if ok else None
            notes[(tool, model)] = "ok" if ok else "FAILED: " + log_path.read_text().strip().splitlines()[-1][:200]
    result = {f"{tool} infer on {model}'s run dir": note for (tool, model), note in notes.items()}
    for model in ("ours", "arc"):
        if outs[("ours", model)] and outs[("arc", model)]:
            diff = max_abs_diff(outs[("ours", model)], outs[("arc", model)])
            result[f"max |ours - arc| on {model}'s run dir"] = f"{diff:.2e}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-md", action="store_true")
    args = parser.parse_args()
    env = bench_env(args.threads)
    big, small, train = prepare_inputs(args.cells)
    runs = train_models(train, env)
    compat_notes = compat(runs, small, env)
    for key, value in compat_notes.items():
        print(f"{key}: {value}", flush=True)

    series = {(tool, n): Series() for tool in ("ours", "arc") for n in ("big", "small")}
    ratios = []
    inputs = {"big": (big, args.cells), "small": (small, SMALL_CELLS)}
    for rep in range(args.reps):
        for size in ("big", "small"):
            for tool, exe in (("ours", OURS), ("arc", ARC)):
                out = DIR / f"out_{tool}_{size}.h5ad"
                cmd = infer_cmd(exe, runs["arc"], inputs[size][0], out)
                log_path = DIR / f"infer_{tool}_{size}.log"
                run = run_cmd(cmd, env=env, log_path=log_path)
                series[(tool, size)].add(run, cmd, log_path)
                print(f"[rep {rep}] {tool} {size}: {run.seconds:.1f} s, {run.peak_rss_mib:.0f} MiB, "
                      f"load {run.load_before:.1f}->{run.load_after:.1f}", flush=True)
        ratios.append(series[("arc", "big")].runs[-1].seconds / series[("ours", "big")].runs[-1].seconds)
    diff = max_abs_diff(DIR / "out_ours_big.h5ad", DIR / "out_arc_big.h5ad")

    def marginal(tool: str) -> float:
        extra = median(series[(tool, "big")].runs[i].seconds - series[(tool, "small")].runs[i].seconds
                       for i in range(args.reps))
        return (args.cells - SMALL_CELLS) / extra

    text = markdown(args, series, ratios, marginal, compat_notes, diff, runs, big)
    print(text)
    if args.write_md:
        write_section("bench_tx_infer", text)


def markdown(args, series, ratios, marginal, compat_notes, diff, runs, big) -> str:
    import anndata as ad

    adata = ad.read_h5ad(big, backed="r")
    width = adata.obsm["X_hvg"].shape[1]
    in_mib, obsm_mib = big.stat().st_size / 2**20, args.cells * width * 4 / 2**20
    wall = {t: series[(t, "big")].median_seconds for t in ("ours", "arc")}
    rss = {t: series[(t, "big")].peak_rss_mib for t in ("ours", "arc")}
    startup = {t: series[(t, "small")].median_seconds for t in ("ours", "arc")}
    per_rep = ", ".join(f"{r:.2f}" for r in ratios)
    cmd = {t: shown_command(infer_cmd(e, runs["arc"], big, DIR / f"out_{t}_big.h5ad"))
           for t, e in (("ours", "state"), ("arc", ARC))}
    lines = [
        "## `state tx infer` vs arc-state 0.11.1 (`bench/bench_tx_infer.py`)", "",
        f"Command: `python bench/bench_tx_infer.py --cells {args.cells} --reps {args.reps} --threads {args.threads} "
        "--write-md`", "",
        f"Input: {args.cells:,} generated cells (obs gene / cell_type / gem_group, 3 cell types x (10 perturbations + "
        f"controls), log1p CSR X of 512 genes, obsm['X_hvg'] {width} wide = {obsm_mib:,.0f} MiB; file {in_mib:,.0f} "
        "MiB). Model: model=state_sm with hidden_dim 128, cell_set_len 64, 2 llama layers (4 heads x 32, "
        "intermediate 512), trained 40 steps by arc-state on the first 9,000 cells; both tools infer with "
        "arc-state's run directory, alternating ours / arc.", "",
        "| quantity | ours | arc-state | ours / arc |", "|---|---:|---:|---:|",
        f"| wall s, {args.cells:,} cells (median) | {wall['ours']:.1f} | {wall['arc']:.1f} | |",
        f"| cells/s end to end | {args.cells / wall['ours']:,.0f} | {args.cells / wall['arc']:,.0f} "
        f"| **{median(ratios):.2f}** (per rep {per_rep}) |",
        f"| cells/s without start-up (big minus {SMALL_CELLS:,}-cell run) | {marginal('ours'):,.0f} "
        f"| {marginal('arc'):,.0f} | {marginal('ours') / marginal('arc'):.2f} |",
        f"| wall s of a {SMALL_CELLS:,}-cell run (start-up) | {startup['ours']:.1f} | {startup['arc']:.1f} | |",
        f"| peak RSS MiB | {rss['ours']:,.0f} | {rss['arc']:,.0f} | {rss['ours'] / rss['arc']:.2f} |",
        "", f"Same run dir, same seed: max |ours - arc| over obsm['X_hvg'] of the {args.cells:,}-cell output = "
        f"{diff:.2e}.", "", "Run-directory compatibility (2,000-cell input):", "",
        *[f"- {k}: {v}" for k, v in compat_notes.items()], "", "Exact commands:", "",
        f"- ours: `OMP_NUM_THREADS={args.threads} {cmd['ours']}`",
        f"- arc-state: `OMP_NUM_THREADS={args.threads} WANDB_MODE=disabled {cmd['arc']}`", "", NOTES, "",
        machine_line(args.threads, loads(list(series.values()))),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
