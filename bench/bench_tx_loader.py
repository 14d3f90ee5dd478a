"""Training data loading: cell-load's paths against the fast set loader, loader-only and end to end.

    python bench/bench_tx_loader.py [--cells 1000000] [--files 1] [--workers 0 1 2] [--batches 20]
                                    [--fast-batches 200] [--reps 1] [--paths default consecutive ours]
                                    [--compress gzip] [--section NAME] [--e2e] [--write-md] [--clean]

Data (generated once under bench/_work/loader_<cells>/, see loader_data.py): random-order files for
cell-load's default path and ours, a copy sorted by (cell type, perturbation) for cell-load's
``use_consecutive_loading``; then ``state tx index --toml`` writes our layout (time and peak RSS
reported). Loader-only: each (path, workers) runs in a fresh process that builds the data module as
``state tx train`` does (batch 16 sets x 128 cells, embed_key X_hvg, output_space gene, our obsm cache
off: STATE_OBSM_CACHE_MB=0, as in arc-state), takes 3 warm-up batches, then times a fixed number of
batches. cells/s counts perturbed cells; every one comes with its control row, so rows/s is twice
that. Each file is read once before its path is measured (page-cached, as the targets assume). Peak
RSS: the measuring process (ru_maxrss) and its largest DataLoader worker (RUSAGE_CHILDREN). With
``--reps N`` every (path, workers) is measured N times, interleaved, and the median is reported with
the range. Files larger than about half the machine's memory cannot stay page-cached: they are not
warmed, and the rates then include disk reads (said in the output). ``--compress gzip`` writes the
generated source compressed (see loader_data.py), for sizes whose raw copy and layout would not both
fit on the disk.
End to end (--e2e): ``state tx train model=state_sm`` steps/s on the big file with cell-load's path
and ours, and on a 50k-cell file served by our in-memory obsm cache: every step's wall time is taken
inside the run (train_step_times.py) and the figure is 1 / the median step time after each run's
first two steps, over ``--e2e-reps`` interleaved runs, so start-up and its variance stay out.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OURS, WORK, bench_env, machine_line, run_cmd, write_section  # noqa: E402
from loader_data import write_dataset, write_toml  # noqa: E402

SET_LEN, BATCH = 128, 16
DATA_KW = {"embed_key": "X_hvg", "output_space": "gene", "control_pert": "non-targeting", "pert_col": "gene",
           "cell_type_key": "cell_type", "batch_col": "gem_group", "barcode": True}
PATHS = {"cell-load default (cache off)": ("false", False, "random"),
         "cell-load consecutive (sorted copy)": ("false", True, "grouped"),
         "ours (layout)": ("true", False, "random")}
PATH_FLAGS = dict(zip(("default", "consecutive", "ours"), PATHS))  # --paths value -> table label
SPACES = {"hvg": {}, "all": {"embed_key": None, "output_space": "all"}}  # --genes N: the shipped defaults


def measure(args) -> None:
    """Child mode: one loader, one JSON line."""
    import os

    os.environ["STATE_OBSM_CACHE_MB"] = "0"
    from state.tx.data.module import build_data_module, setup_data_module
    from state.utils.allocator import reuse_freed_memory

    reuse_freed_memory()  # as `state tx train` does

    kw = {**DATA_KW, **SPACES[args.space], "toml_config_path": args.toml, "num_workers": args.workers[0],
          "fast_loader": args.fast, "use_consecutive_loading": args.consecutive}
    dm = build_data_module("PerturbationDataModule", kw, batch_size=BATCH, cell_sentence_len=SET_LEN)
    setup_data_module(dm)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    cells, start, host = 0, time.perf_counter(), []
    for _ in range(args.batches):
        if args.compute_ms:  # a stand-in model step: the workers get ahead, what is left is this process's work
            time.sleep(args.compute_ms / 1000)
        t0 = time.perf_counter()
        batch = next(it)
        host.append(time.perf_counter() - t0)
        cells += len(batch["pert_name"])  # the loader's work only: our X rows stay sparse (dense on the device)
        del batch
    seconds = time.perf_counter() - start
    workers = [w.pid for w in getattr(it, "_workers", [])]
    if args.val:  # a validation pass with its own workers, alive beside the training ones
        val_it = iter(dm.val_dataloader())
        for _ in val_it:
            pass
        workers += [w.pid for w in getattr(val_it, "_workers", [])]
    pss = sum(proportional_mib(pid) for pid in [os.getpid(), *workers])  # shared pages counted once
    del it
    import gc

    gc.collect()
    time.sleep(0.5)
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"cells_per_s": cells / seconds, "main_rss_mib": main_rss,
                      "host_ms_median": 1000 * float(np.median(host)), "host_ms_p90": 1000 * float(np.percentile(host, 90)),
                      "worker_rss_mib": worker_rss if args.workers[0] else 0.0, "total_pss_mib": pss}))


def proportional_mib(pid: int) -> float:
    """Pss of a process (its private pages plus its share of pages shared with others), MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return float(line.split()[1]) / 1024
    return float("nan")


def memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def warm(files: list[Path]) -> bool:
    """Read the files once so that the measurement sees them page-cached; False when they cannot fit."""
    if sum(f.stat().st_size for f in files) > memory_bytes() // 2:
        return False
    for f in files:
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    return True


CHILD = {"space": "hvg"}  # --genes: the children read X (shipped defaults) instead of X_hvg


def measure_once(toml: Path, workers: int, batches: int, fast: str, consecutive: bool, *, compute_ms: int = 0,
                 val: bool = False, src: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--measure", "--toml", str(toml), "--workers", str(workers),
           "--batches", str(batches), "--fast", fast, "--space", CHILD["space"], "--compute-ms", str(compute_ms)]
    cmd += (["--consecutive"] if consecutive else []) + (["--val"] if val else [])
    env = bench_env(1)
    if src:  # another checkout's package (the baseline of a before/after comparison)
        env["PYTHONPATH"] = src
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_rows(tomls: dict[str, Path], folders: dict[str, Path], layout: Path, workers: list[int],
                batches: int, fast_batches: int, paths: list[str], reps: int) -> list[dict]:
    rows = []
    for label in (PATH_FLAGS[p] for p in paths):
        fast, consecutive, order = PATHS[label]
        files = sorted(layout.glob("*.state_layout/*")) if fast == "true" else sorted(folders[order].glob("*.h5ad"))
        cached = warm(files)
        n = fast_batches if fast == "true" else batches
        runs: dict[int, list[dict]] = {w: [] for w in workers}
        for _ in range(reps):  # interleaved, so a burst of other load touches every worker count alike
            for w in workers:
                runs[w].append(measure_once(tomls[order], w, n, fast, consecutive))
                print(label, w, runs[w][-1], flush=True)
        for w in workers:
            rates = sorted(r["cells_per_s"] for r in runs[w])
            peak = {k: max(r[k] for r in runs[w]) for k in ("main_rss_mib", "worker_rss_mib", "total_pss_mib")}
            rows.append({"path": label, "workers": w, "batches": n, "page_cached": cached,
                         "cells_per_s": float(np.median(rates)), "rates": rates, **peak})
    return rows


def e2e_step_seconds(toml: Path, fast: str, steps: int, out: Path, env: dict) -> list[float]:
    """Wall seconds of every training step of one ``tx train model=state_sm`` run (train_step_times.py)."""
    data = {**DATA_KW, "toml_config_path": toml, "num_workers": 0, "fast_loader": fast}
    cmd = [sys.executable, str(Path(__file__).with_name("train_step_times.py")), "model=state_sm",
           *(f"data.kwargs.{k}={v}" for k, v in data.items()), f"output_dir={out}", "name=run", "overwrite=true",
           f"training.max_steps={steps}", f"training.batch_size={BATCH}", "training.val_freq=100000",
           "use_wandb=false"]
    log = out / f"{fast}-{steps}.log"
    run = run_cmd(cmd, env=env, log_path=log)
    if run.returncode != 0:
        raise RuntimeError(log.read_text()[-3000:])
    lines = [line for line in log.read_text().splitlines() if line.startswith('{"step_seconds"')]
    return json.loads(lines[-1])["step_seconds"]


def e2e_rows(big_toml: Path, big_cells: int, small_toml: Path, steps: int, reps: int) -> list[dict]:
    """Median step time after the first two steps, runs of the three set-ups interleaved ``reps`` times."""
    out = WORK / "loader_e2e"
    out.mkdir(parents=True, exist_ok=True)
    big = f"{big_cells:,}-cell file"
    setups = ((f"{big}, cell-load path (cache off)", big_toml, "false", "0"),
              (f"{big}, ours", big_toml, "true", "0"),
              ("50,000-cell file, cell-load path + our obsm cache", small_toml, "false", "2048"))
    steady: dict[str, list[float]] = {label: [] for label, *_ in setups}
    for _ in range(reps):
        for label, toml, fast, cache in setups:
            env = {**bench_env(1), "STATE_OBSM_CACHE_MB": cache}
            steady[label] += e2e_step_seconds(toml, fast, steps, out, env)[2:]
            print(label, f"{len(steady[label])} steady steps so far", flush=True)
    return [{"run": label, "steps_per_s": 1.0 / float(np.median(times)), "steps": len(times)}
            for label, times in steady.items()]


def host_rows(toml: Path, baseline_src: str | None, compute_ms: int, batches: int) -> list[dict]:
    """Main-process time per step in the loader (``next``) with a stand-in model step of ``compute_ms``
    (2 workers get ahead of it), ours against a baseline checkout; and main + workers PSS with 1 and 4
    workers, a validation pass included."""
    rows = []
    for label, src in (("this branch", None), ("baseline", baseline_src)):
        if label == "baseline" and not src:
            continue
        r = measure_once(toml, 2, batches, "true", False, compute_ms=compute_ms, src=src)
        rows.append({"what": f"host ms per step in next(), {label}", **r})
        print(rows[-1], flush=True)
    for w, label, src in ((1, "this branch", None), (4, "this branch", None), (4, "baseline", baseline_src)):
        if src or label == "this branch":
            r = measure_once(toml, w, batches, "true", False, val=True, src=src)
            rows.append({"what": f"memory, {w} worker(s) + a validation pass, {label}", **r})
            print(rows[-1], flush=True)
    return rows


def host_markdown(rows: list[dict]) -> list[str]:
    lines = ["| measurement | host ms per step: median | p90 | cells/s | main + workers PSS (MiB) | main peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['host_ms_median']:.2f} | {r['host_ms_p90']:.2f} | {r['cells_per_s']:,.0f} | "
              f"{r['total_pss_mib']:.0f} | {r['main_rss_mib']:.0f} |" for r in rows]
    return lines


def index_layout(toml: Path, keys: str = "X_hvg") -> tuple[float, float]:
    cmd = [OURS, "tx", "index", "--toml", str(toml), "--keys", keys]
    run = run_cmd(cmd, env=bench_env(1))
    if run.returncode != 0:
        raise RuntimeError("state tx index failed")
    return run.seconds, run.peak_rss_mib


def markdown(args, index: tuple[float, float], rows: list[dict], e2e: list[dict]) -> str:
    flags = " --e2e-only" if args.e2e_only else (" --e2e" if args.e2e else "")
    flags += f" --reps {args.reps}" if args.reps > 1 else ""
    flags += f" --paths {' '.join(args.paths)}" if args.paths != list(PATH_FLAGS) else ""
    flags += f" --compress {args.compress}" if args.compress else ""
    flags += f" --section {args.section}" if args.section != "bench_tx_loader" else ""
    flags += f" --e2e-steps {args.e2e_steps} --e2e-reps {args.e2e_reps}" if e2e else ""
    loader_flags = "" if args.e2e_only else (f" --files {args.files} --workers {' '.join(map(str, args.workers))} "
                                             f"--batches {args.batches} --fast-batches {args.fast_batches}")
    lines = [f"Command: `python bench/bench_tx_loader.py --cells {args.cells}{loader_flags}{flags} --write-md`", "",
             f"Data: {args.cells:,} cells x 2,000 float32 X_hvg in {args.files} file(s), batch {BATCH} sets x "
             f"{SET_LEN} cells. `state tx index`: {index[0]:.0f} s, peak RSS {index[1]:.0f} MiB.", ""]
    if args.genes:
        lines[2] = (f"Data: {args.cells:,} cells, CSR X of {args.genes:,} genes with ~2,000 values per cell (plus a "
                    f"2,000-wide X_hvg) in {args.files} file(s); loaders as the shipped defaults (embed_key null, "
                    f"output_space all), batch {BATCH} sets x {SET_LEN} cells; ours delivers X as CSR parts (made "
                    f"dense on the device), cell-load dense rows. `state tx index --keys X`: {index[0]:.0f} s, peak "
                    f"RSS {index[1]:.0f} MiB.")
        lines[0] = lines[0].replace(" --write-md", f" --genes {args.genes} --write-md")
    if rows:
        reps = len(rows[0]["rates"])
        lines += [f"| path | workers | batches timed | cells/s (median of {reps}) | range | main peak RSS (MiB) "
                  "| largest worker peak RSS (MiB) | main + workers PSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f"{r['rates'][0]:,.0f}-{r['rates'][-1]:,.0f}" if len(r["rates"]) > 1 else "-"
        lines.append(f"| {r['path']} | {r['workers']} | {r['batches']} | {r['cells_per_s']:,.0f} | {spread} | "
                     f"{r['main_rss_mib']:.0f} | {r['worker_rss_mib']:.0f} | {r['total_pss_mib']:.0f} |")
    if any(not r["page_cached"] for r in rows):
        lines += ["", "Files larger than half the machine's memory were not page-cached: those rates include disk "
                  "reads."]
    if e2e:
        lines += ([""] if rows else []) + ["| end to end, `tx train model=state_sm`, 0 workers | steps/s (1 / median step time) "
                  "| steps timed |", "|---|---|---|"]
        lines += [f"| {r['run']} | {r['steps_per_s']:.3f} | {r['steps']} |" for r in e2e]
    lines += ["", machine_line(1, tuple(__import__("os").getloadavg()[:2]))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--fast-batches", type=int, default=200)
    parser.add_argument("--reps", type=int, default=1, help="measurements per (path, workers); median reported")
    parser.add_argument("--paths", nargs="+", choices=list(PATH_FLAGS), default=list(PATH_FLAGS))
    parser.add_argument("--compress", choices=["gzip", "lzf"], help="write the generated source compressed")
    parser.add_argument("--section", default="bench_tx_loader", help="BENCHMARKS.md section to (re)write")
    parser.add_argument("--e2e", action="store_true", help="also time `tx train model=state_sm` end to end")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end timing")
    parser.add_argument("--e2e-steps", type=int, default=10, help="training steps per end-to-end run")
    parser.add_argument("--e2e-reps", type=int, default=2, help="interleaved end-to-end runs per set-up")
    parser.add_argument("--write-md", action="store_true")
    parser.add_argument("--clean", action="store_true", help="delete the generated data afterwards")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--toml", help=argparse.SUPPRESS)
    parser.add_argument("--fast", default="false", help=argparse.SUPPRESS)
    parser.add_argument("--consecutive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--genes", type=int, help="full-gene data: X with this many genes (~2,000 values per "
                        "cell), loaders read it as the shipped defaults do (embed_key null, output_space all)")
    parser.add_argument("--host", action="store_true", help="instead of the loader table: main-process time per "
                        "step and memory with 1 / 4 workers and a validation pass")
    parser.add_argument("--baseline-src", help="with --host: src/ folder of the checkout to compare with")
    parser.add_argument("--space", default="hvg", choices=list(SPACES), help=argparse.SUPPRESS)
    parser.add_argument("--compute-ms", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--val", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    CHILD["space"] = "all" if args.genes else "hvg"
    root = WORK / (f"loader_{args.cells}" + (f"_genes{args.genes}" if args.genes else ""))
    orders = ["random"] + (["grouped"] if "consecutive" in args.paths and not args.e2e_only else [])
    folders = {order: write_dataset(root / order, args.cells, n_files=args.files, order=order, compress=args.compress,
                                    n_genes=args.genes) for order in orders}
    tomls = {order: write_toml(root / f"{order}.toml", folder) for order, folder in folders.items()}
    index = index_layout(tomls["random"], "X" if args.genes else "X_hvg")
    layout = root / "random"
    if args.host:
        warm(sorted(layout.glob("*.state_layout/*")))
        body = "\n".join(host_markdown(host_rows(tomls["random"], args.baseline_src, 150, args.fast_batches)))
        body += "\n\n" + machine_line(1, tuple(__import__("os").getloadavg()[:2]))
        print(body)
        if args.write_md:
            write_section(args.section, body)
        return None
    rows = [] if args.e2e_only else loader_rows(tomls, folders, layout, args.workers, args.batches, args.fast_batches,
                                                args.paths, args.reps)
    e2e = []
    if args.e2e or args.e2e_only:
        small = write_dataset(WORK / "loader_50000" / "random", 50_000)
        e2e = e2e_rows(tomls["random"], args.cells, write_toml(WORK / "loader_50000" / "random.toml", small),
                       args.e2e_steps, args.e2e_reps)
    body = markdown(args, index, rows, e2e)
    print(body)
    if args.write_md and rows:
        title = "## Training data loader" if args.section == "bench_tx_loader" else f"### {args.cells:,} cells"
        write_section(args.section, f"{title} (`bench/bench_tx_loader.py`)\n\n" + body)
    elif args.write_md:
        write_section("bench_tx_loader_e2e", "### Training data loader, end to end\n\n" + body)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
