"""`state tx train` side by side with arc-state 0.11.1: steps/s and cells/s of the training loop, peak RSS.

    python bench/bench_tx_train.py [--sizes tiny big] [--reps 3] [--threads 1] [--write-md] [--md-only]

Both tools get the same generated data (3 cell types x 10 perturbations, 9,000 cells, 2,000 HVGs in
obsm['X_hvg']), the same Hydra overrides (model=state_sm, embed_key X_hvg, output_space gene,
num_workers 0, val_freq above max_steps so no validation runs) and the same environment
(OMP_NUM_THREADS, WANDB_MODE=disabled). Start-up (imports, data module set-up, checkpoint writes) is
excluded by running every configuration at two step counts and dividing the extra steps by the extra
wall time. Runs alternate ours, arc, ours, arc, ... so both see the same background load; the
ratio is computed per repetition and the median reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

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

NOTES = (
    "Both tools run cell-load's data module, Lightning's loop, geomloss' energy loss and HF's Llama layers with "
    "arc-state's 'medium' float32 matmul precision. What ours does differently per step: dense obsm rows come "
    "from memory (arc-state: one h5py read per cell, ~5 ms per tiny step); PyTorch's fused Adam (2.4 -> 0.85 ms "
    "per tiny step); the llama attention skips the cos=1/sin=0 rotary multiply and, under medium precision on "
    "CPU, uses PyTorch's math SDPA kernel, because the CPU flash kernel is ~4x slower once matmuls take bf16 "
    "inputs (forward + backward of one big-size layer: 148 -> 38 ms); glibc malloc keeps freed blocks (page "
    "faults on re-allocated activations were ~30% of an in-process tiny step); FLOPs metrics are logged only on "
    "steps the logger writes. What is left is shared by both tools and fixes the ratio: at the big size ~60% of "
    "a step is the same matmuls (aten::mm at ~380 GFLOP/s on one core), so a step can only shrink by what the "
    "attention and Adam changes save (2.7 -> 2.0 s); at the tiny size an in-process step (no data, no "
    "Lightning) is 16-20 ms of forward + backward, about a third of it geomloss' elementwise passes over the "
    "[4, 32, 2000] sets, plus ~15% waiting for cell-load's per-sample Python. Reaching 2x would take changing "
    "the model math (e.g. bf16 autocast) or replacing those libraries."
)
TINY_BACKBONE = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
                 "intermediate_size": 256}
SIZES = {
    # name: (model overrides, batch_size, cell_set_len, (short, long) step counts)
    "tiny": ([f"model.kwargs.transformer_backbone_kwargs.{k}={v}" for k, v in TINY_BACKBONE.items()]
             + ["model.kwargs.hidden_dim=64"], 4, 32, (20, 520)),
    "big": (["model.kwargs.hidden_dim=672"], 16, 128, (2, 8)),
}


def overrides(toml: Path, out: Path, size: str, steps: int) -> list[str]:
    model, batch, set_len, _ = SIZES[size]
    return [f"data.kwargs.toml_config_path={toml}", "data.kwargs.embed_key=X_hvg", "data.kwargs.output_space=gene",
            "data.kwargs.num_workers=0", "data.kwargs.pert_col=gene", "data.kwargs.cell_type_key=cell_type",
            "data.kwargs.batch_col=gem_group", "data.kwargs.control_pert=non-targeting", "use_wandb=false",
            "model=state_sm", *model, f"model.kwargs.cell_set_len={set_len}", f"training.batch_size={batch}",
            f"training.max_steps={steps}", "training.val_freq=100000", "training.ckpt_every_n_steps=100000",
            f"output_dir={out}", "overwrite=true"]


def data_wait_fraction(run_dir: Path) -> float | None:
    """Our BatchSpeedMonitor's share of loop time spent waiting for the loader (median over reports)."""
    path = run_dir / "version_0" / "metrics.csv"
    if not path.is_file():
        return None
    values = [float(r["data_wait_fraction"]) for r in csv.DictReader(path.open()) if r.get("data_wait_fraction")]
    return median(values) if values else None


def bench_size(size: str, *, toml: Path, reps: int, threads: int) -> dict:
    env = bench_env(threads)
    out = WORK / "tx" / "runs"
    short, long = SIZES[size][3]
    cells_per_step = SIZES[size][1] * SIZES[size][2]
    series = {(tool, n): Series() for tool in ("ours", "arc") for n in (short, long)}
    ratios, rates = [], {"ours": [], "arc": []}
    for rep in range(reps):
        for n in (short, long):
            for tool, exe in (("ours", OURS), ("arc", ARC)):
                name = f"{tool}_{size}_{n}"
                cmd = [exe, "tx", "train", *overrides(toml, out, size, n), f"name={name}"]
                log_path = WORK / "tx" / f"{name}.log"
                run = run_cmd(cmd, env=env, log_path=log_path)
                series[(tool, n)].add(run, cmd, log_path)
                print(f"[{size} rep {rep}] {tool} {n} steps: {run.seconds:.1f} s, {run.peak_rss_mib:.0f} MiB, "
                      f"load {run.load_before:.1f}->{run.load_after:.1f}", flush=True)
        rep_rate = {}
        for tool in ("ours", "arc"):
            extra = series[(tool, long)].runs[-1].seconds - series[(tool, short)].runs[-1].seconds
            rep_rate[tool] = (long - short) / extra
            rates[tool].append(rep_rate[tool])
        ratios.append(rep_rate["ours"] / rep_rate["arc"])
    example = {tool: shown_command([exe, "tx", "train", *overrides(toml, out, size, long),
                                    f"name={tool}_{size}_{long}"])
               for tool, exe in (("ours", "state"), ("arc", ARC))}
    return {
        "size": size, "steps": (short, long), "cells_per_step": cells_per_step,
        "rate": {t: median(v) for t, v in rates.items()}, "ratio": median(ratios), "ratios": ratios,
        "startup": {t: median(r.seconds for r in series[(t, short)].runs) for t in ("ours", "arc")},
        "rss": {t: max(series[(t, short)].peak_rss_mib, series[(t, long)].peak_rss_mib) for t in ("ours", "arc")},
        "wait": data_wait_fraction(out / f"ours_{size}_{long}"), "cmd": example,
        "loads": list(loads(list(series.values()))), "reps": reps,
    }


def markdown(results: list[dict], *, threads: int) -> str:
    lines = ["## `state tx train` vs arc-state 0.11.1 (`bench/bench_tx_train.py`)", "",
             "Commands: " + ", ".join(f"`python bench/bench_tx_train.py --sizes {r['size']} --reps {r['reps']} "
                                      f"--threads {threads} --write-md`" for r in results)
             + " (each size's result is kept in bench/_work/tx/train_results.json; the table shows all sizes run)",
             "",
             "Data: generated by `state.datasets.synthetic.make_processed_dataset` (9,000 cells = 3 cell types x "
             "(10 perturbations + controls) x ~300 cells, 2,000 genes, obsm['X_hvg'] 2,000 wide), fewshot split "
             "(8,370 training cells). Same overrides for both tools; start-up excluded by timing two step counts "
             "and dividing the extra steps by the extra wall time; ours and arc-state alternate; medians over "
             "repetitions.", "",
             "| size | steps/s ours | steps/s arc | cells/s ours | cells/s arc | ratio ours/arc (median; per rep) "
             "| peak RSS MiB ours / arc | wall of the short run s ours / arc |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        o, a = r["rate"]["ours"], r["rate"]["arc"]
        per_rep = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['size']} ({r['cells_per_step']} cells/step, {r['steps'][0]} vs {r['steps'][1]} steps) "
                     f"| {o:.2f} | {a:.2f} | {o * r['cells_per_step']:,.0f} | {a * r['cells_per_step']:,.0f} "
                     f"| **{r['ratio']:.2f}** ({per_rep}) | {r['rss']['ours']:,.0f} / {r['rss']['arc']:,.0f} "
                     f"| {r['startup']['ours']:.1f} / {r['startup']['arc']:.1f} |")
    lines += ["", "Exact commands (long run; the short run differs only in `training.max_steps`):", ""]
    for r in results:
        lines += [f"- {r['size']}, ours: `OMP_NUM_THREADS={threads} WANDB_MODE=disabled {r['cmd']['ours']}`",
                  f"- {r['size']}, arc-state: `OMP_NUM_THREADS={threads} WANDB_MODE=disabled {r['cmd']['arc']}`"]
    waits = [f"{r['size']} {r['wait']:.2f}" for r in results if r["wait"] is not None]
    if waits:
        lines += ["", "Share of our training-loop time spent waiting for the data loader (`data_wait_fraction` in "
                  f"our metrics.csv, num_workers 0): {', '.join(waits)}."]
    seen = [v for r in results for v in r["loads"]]
    lines += ["", NOTES, "", machine_line(threads, (min(seen), max(seen)))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "big"], choices=list(SIZES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-md", action="store_true")
    parser.add_argument("--md-only", action="store_true",
                        help="re-render BENCHMARKS.md from the kept results without running anything")
    args = parser.parse_args()
    cache = WORK / "tx" / "train_results.json"
    if args.md_only:
        kept = json.loads(cache.read_text())
        write_section("bench_tx_train", markdown([kept[s] for s in SIZES if s in kept], threads=args.threads))
        return
    data = make_data(WORK / "tx" / "train" / "train.h5ad", n_cells=9000, n_genes=2000, n_hvgs=2000, n_perts=10,
                     n_celltypes=3)
    toml = write_all_train_toml(WORK / "tx" / "train.toml", dataset="bench", data=data)
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    for size in args.sizes:
        kept[size] = bench_size(size, toml=toml, reps=args.reps, threads=args.threads)
        cache.write_text(json.dumps(kept, indent=1))
    results = [kept[size] for size in SIZES if size in kept]
    text = markdown(results, threads=args.threads)
    print(text)
    if args.write_md:
        write_section("bench_tx_train", text)
    shutil.rmtree(WORK / "tx" / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
