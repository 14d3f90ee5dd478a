"""Training data loading: cell-load's paths against the fast set loader, loader-only and end to end.

    python bench/bench_tx_loader.py [--cells 1000000] [--files 1] [--workers 0 1 2] [--batches 20]
                                    [--fast-batches 200] [--e2e] [--write-md] [--clean]

Data (generated once under bench/_work/loader_<cells>/, see loader_data.py): random-order files for
cell-load's default path and ours, a copy sorted by (cell type, perturbation) for cell-load's
``use_consecutive_loading``; then ``state tx index --toml`` writes our layout (time and peak RSS
reported). Loader-only: each (path, workers) runs in a fresh process that builds the data module as
``state tx train`` does (batch 16 sets x 128 cells, embed_key X_hvg, output_space gene, our obsm cache
off: STATE_OBSM_CACHE_MB=0, as in arc-state), takes 3 warm-up batches, then times a fixed number of
batches. cells/s counts perturbed cells; every one comes with its control row, so rows/s is twice
that. Each file is read once before its path is measured (page-cached, as the targets assume). Peak
RSS: the measuring process (ru_maxrss) and its largest DataLoader worker (RUSAGE_CHILDREN).
End to end (--e2e): ``state tx train model=state_sm`` steps/s on the big file with cell-load's path
and ours, and on a 50k-cell file served by our in-memory obsm cache; start-up is excluded by running
two step counts and dividing the extra steps by the extra time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OURS, WORK, bench_env, machine_line, run_cmd, write_section  # noqa: E402
from loader_data import write_dataset, write_toml  # noqa: E402

SET_LEN, BATCH = 128, 16
DATA_KW = {"embed_key": "X_hvg", "output_space": "gene", "control_pert": "non-targeting", "pert_col": "gene",
           "cell_type_key": "cell_type", "batch_col": "gem_group", "barcode": True}
PATHS = {"cell-load default (cache off)": ("false", False, "random"),
         "cell-load consecutive (sorted copy)": ("false", True, "grouped"),
         "ours (layout)": ("true", False, "random")}


def measure(args) -> None:
    """Child mode: one loader, one JSON line."""
    import os

    os.environ["STATE_OBSM_CACHE_MB"] = "0"
    from state.tx.data.module import build_data_module, setup_data_module
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # as `state tx train` does

    kw = {**DATA_KW, "toml_config_path": args.toml, "num_workers": args.workers[0], "fast_loader": args.fast,
          "use_consecutive_loading": args.consecutive}
    dm = build_data_module("PerturbationDataModule", kw, batch_size=BATCH, cell_sentence_len=SET_LEN)
    setup_data_module(dm)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    cells, start = 0, time.perf_counter()
    for _ in range(args.batches):
        cells += next(it)["pert_cell_emb"].shape[0]
    seconds = time.perf_counter() - start
    workers = [w.pid for w in getattr(it, "_workers", [])]
    pss = sum(proportional_mib(pid) for pid in [os.getpid(), *workers])  # shared pages counted once
    del it
    import gc

    gc.collect()
    time.sleep(0.5)
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"cells_per_s": cells / seconds, "main_rss_mib": main_rss,
                      "worker_rss_mib": worker_rss if args.workers[0] else 0.0, "total_pss_mib": pss}))


def proportional_mib(pid: int) -> float:
    """Pss of a process (its private pages plus its share of pages shared with others), MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return float(line.split()[1]) / 1024
    return float("nan")


def warm(files: list[Path]) -> None:
    """Read the files once so that the measurement sees them page-cached."""
    for f in files:
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)


def loader_rows(tomls: dict[str, Path], folders: dict[str, Path], layout: Path, workers: list[int],
                batches: int, fast_batches: int) -> list[dict]:
    rows = []
    for label, (fast, consecutive, order) in PATHS.items():
        if fast == "true":
            warm(sorted(layout.glob("*.state_layout/*")))
        else:
            warm(sorted(folders[order].glob("*.h5ad")))
        for w in workers:
            n = fast_batches if fast == "true" else batches
            cmd = [sys.executable, __file__, "--measure", "--toml", str(tomls[order]), "--workers", str(w),
                   "--batches", str(n), "--fast", fast] + (["--consecutive"] if consecutive else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(1), check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"path": label, "workers": w, "batches": n, **result})
            print(rows[-1], flush=True)
    return rows


def e2e_seconds(toml: Path, fast: str, steps: int, out: Path, env: dict) -> float:
    data = {**DATA_KW, "toml_config_path": toml, "num_workers": 0, "fast_loader": fast}
    cmd = [OURS, "tx", "train", "model=state_sm", *(f"data.kwargs.{k}={v}" for k, v in data.items()),
           f"output_dir={out}", "name=run", "overwrite=true", f"training.max_steps={steps}",
           f"training.batch_size={BATCH}", "training.val_freq=100000", "use_wandb=false"]
    run = run_cmd(cmd, env=env, log_path=out / f"{fast}-{steps}.log")
    if run.returncode != 0:
        raise RuntimeError((out / f"{fast}-{steps}.log").read_text()[-3000:])
    return run.seconds


def e2e_rows(big_toml: Path, small_toml: Path, steps: tuple[int, int]) -> list[dict]:
    out = WORK / "loader_e2e"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, toml, fast, cache in (("1M file, cell-load path (cache off)", big_toml, "false", "0"),
                                     ("1M file, ours", big_toml, "true", "0"),
                                     ("50k file, cell-load path + our obsm cache", small_toml, "false", "2048")):
        env = {**bench_env(1), "STATE_OBSM_CACHE_MB": cache}
        short, long = (e2e_seconds(toml, fast, s, out, env) for s in steps)
        rows.append({"run": label, "steps_per_s": (steps[1] - steps[0]) / (long - short)})
        print(rows[-1], flush=True)
    return rows


def index_layout(toml: Path) -> tuple[float, float]:
    cmd = [OURS, "tx", "index", "--toml", str(toml), "--keys", "X_hvg"]
    run = run_cmd(cmd, env=bench_env(1))
    if run.returncode != 0:
        raise RuntimeError("state tx index failed")
    return run.seconds, run.peak_rss_mib


def markdown(args, index: tuple[float, float], rows: list[dict], e2e: list[dict]) -> str:
    flags = " --e2e-only" if args.e2e_only else (" --e2e" if args.e2e else "")
    lines = [f"Command: `python bench/bench_tx_loader.py --cells {args.cells} --files {args.files} --workers "
             f"{' '.join(map(str, args.workers))} --batches {args.batches} --fast-batches {args.fast_batches}"
             f"{flags} --write-md`", "",
             f"Data: {args.cells:,} cells x 2,000 float32 X_hvg in {args.files} file(s), batch {BATCH} sets x "
             f"{SET_LEN} cells. `state tx index`: {index[0]:.0f} s, peak RSS {index[1]:.0f} MiB.", ""]
    if rows:
        lines += ["| path | workers | batches timed | cells/s | main peak RSS (MiB) | largest worker peak RSS (MiB) "
                  "| main + workers PSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['workers']} | {r['batches']} | {r['cells_per_s']:,.0f} | "
                     f"{r['main_rss_mib']:.0f} | {r['worker_rss_mib']:.0f} | {r.get('total_pss_mib', 0):.0f} |")
    if e2e:
        lines += ["", "| end to end, `tx train model=state_sm`, 0 workers | steps/s |", "|---|---|"]
        lines += [f"| {r['run']} | {r['steps_per_s']:.3f} |" for r in e2e]
    lines += ["", machine_line(1, tuple(__import__("os").getloadavg()[:2]))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--fast-batches", type=int, default=200)
    parser.add_argument("--e2e", action="store_true", help="also time `tx train model=state_sm` end to end")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end timing")
    parser.add_argument("--e2e-steps", type=int, nargs=2, default=[2, 8])
    parser.add_argument("--write-md", action="store_true")
    parser.add_argument("--clean", action="store_true", help="delete the generated data afterwards")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--toml", help=argparse.SUPPRESS)
    parser.add_argument("--fast", default="false", help=argparse.SUPPRESS)
    parser.add_argument("--consecutive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    root = WORK / f"loader_{args.cells}"
    folders = {order: write_dataset(root / order, args.cells, n_files=args.files, order=order)
               for order in ("random", "grouped")}
    tomls = {order: write_toml(root / f"{order}.toml", folder) for order, folder in folders.items()}
    index = index_layout(tomls["random"])
    layout = root / "random"
    rows = [] if args.e2e_only else loader_rows(tomls, folders, layout, args.workers, args.batches, args.fast_batches)
    e2e = []
    if args.e2e or args.e2e_only:
        small = write_dataset(WORK / "loader_50000" / "random", 50_000)
        e2e = e2e_rows(tomls["random"], write_toml(WORK / "loader_50000" / "random.toml", small),
                       tuple(args.e2e_steps))
    body = markdown(args, index, rows, e2e)
    print(body)
    if args.write_md and rows:
        write_section("bench_tx_loader", "## Training data loader (`bench/bench_tx_loader.py`)\n\n" + body)
    elif args.write_md:
        write_section("bench_tx_loader_e2e", "### Training data loader, end to end\n\n" + body)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
