"""``bench_emb_transform.py sharded``: one process vs ``--devices 2``, the tokenize/model overlap, kill -9 + rerun.

For each model (se_tiny, and a random mid-size SE model written to bench/_work/emb/mid_model), on the
same synthetic CSR input and ``--seed 0``:

* ``inline``: one process, tokenization in line with the model (``transform(..., prefetch=0)``, the old loop);
* ``1 process``: ``state emb transform`` (tokenization in a background thread ahead of the model);
* ``--devices 2``: ``state emb transform --devices 2`` (two gloo processes, one thread each, merged by rank 0).

All three outputs must be identical. Cells/s are wall-clock, start-up included. The share of the
time spent tokenizing (in line) is measured in-process on one 8192-row chunk.
Then kill -9: a ``--shard 0/1 --unit-rows 1024`` run is killed once ~40% of its units are done, the
same command is rerun, and the units computed by each run are counted; the output is compared with
the uninterrupted one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import OURS, ROOT, WORK, bench_env, machine_line, run_cmd, shown_command, write_section

SE_TINY = ROOT / "tests" / "data" / "fixtures" / "emb" / "se_tiny" / "model"
MID = {"d_model": 128, "nhead": 8, "d_hid": 512, "nlayers": 4, "output_dim": 128, "pad_length": 256}


def mid_model() -> Path:
    """A random SE checkpoint, se_tiny's vocabulary, d_model 128, 4 layers, 256-token sentences."""
    import torch

    from state.emb.lightning_module import StateEmbeddingModel
    from state.io.safe_load import safe_torch_load

    folder = WORK / "emb" / "mid_model"
    if (folder / "last.ckpt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tiny = safe_torch_load(SE_TINY / "last.ckpt", what="SE checkpoint")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(tiny["cfg_yaml"])
    cfg.model.update(emsize=MID["d_model"], nhead=MID["nhead"], d_hid=MID["d_hid"], nlayers=MID["nlayers"],
                     output_dim=MID["output_dim"], batch_size=64)
    cfg.dataset.pad_length = MID["pad_length"]
    genes = torch.load(SE_TINY / "protein_embeddings.pt")
    torch.manual_seed(0)
    model = StateEmbeddingModel(token_dim=32, d_model=MID["d_model"], nhead=MID["nhead"], d_hid=MID["d_hid"],
                                nlayers=MID["nlayers"], output_dim=MID["output_dim"], dropout=0.0, cfg=cfg)
    model.set_gene_embeddings(genes)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, folder / "last.ckpt")
    torch.save(genes, folder / "protein_embeddings.pt")
    return folder


def tokenize_share(model: Path, path: Path, threads: int) -> float:
    """Fraction of in-line time spent reading + tokenizing, on the first 8192 rows."""
    import anndata as ad
    import scipy.sparse as sp
    import torch

    from state.emb.checkpoint import load_se_model
    from state.emb.embed import SEEmbedder
    from state.emb.tokenize import SAMPLING_BLOCK, map_genes

    torch.set_num_threads(threads)
    adata = ad.read_h5ad(path, backed="r")
    loaded = load_se_model(model_folder=model, device="cpu")
    embedder = SEEmbedder(loaded, map_genes(adata.var, loaded.gene_to_index), seed=0)
    rows = sp.csr_matrix(adata.X[:8192])
    t0 = time.perf_counter()
    blocks = [embedder.tokenize(b, rows[b * SAMPLING_BLOCK : (b + 1) * SAMPLING_BLOCK]) for b in range(8)]
    t1 = time.perf_counter()
    for ids, counts in blocks:
        embedder.embed_sentences(ids, counts)
    t2 = time.perf_counter()
    return (t1 - t0) / (t2 - t0)


def _inline_cmd(model: Path, path: Path, out: Path) -> list[str]:
    code = ("import sys; from state.emb.transform import transform; "
            "transform(sys.argv[1], output=sys.argv[2], model_folder=sys.argv[3], seed=0, prefetch=0)")
    return [sys.executable, "-c", code, str(path), str(out), str(model)]


def throughput(model: Path, path: Path, n_cells: int, threads: int) -> dict:
    out = WORK / "emb" / "shard_out"
    out.mkdir(parents=True, exist_ok=True)
    base = [OURS, "emb", "transform", "--model-folder", str(model), "--input", str(path), "--seed", "0"]
    plan = {
        "inline": (_inline_cmd(model, path, out / "inline.npy"), out / "inline.npy", threads),
        "1 process": (base + ["--output", str(out / "one.npy")], out / "one.npy", threads),
        "--devices 2": (base + ["--output", str(out / "two.npy"), "--devices", "2", "--unit-rows", "1024", "--work-dir",
                                str(out / "two.parts")], out / "two.npy", 1),
    }
    rows = {}
    for name, (cmd, target, t) in plan.items():
        target.unlink(missing_ok=True)
        subprocess.run(["rm", "-rf", str(out / "two.parts")], check=True)
        run = run_cmd(cmd, env=bench_env(t), log_path=out / f"{name.strip('-').replace(' ', '_')}.log")
        if run.returncode:
            raise RuntimeError(f"{name} failed: {(out / (name.strip('-').replace(' ', '_') + '.log')).read_text()[-3000:]}")
        rows[name] = {"cmd": shown_command(cmd), "seconds": run.seconds, "cells_s": n_cells / run.seconds,
                      "load": (run.load_before, run.load_after)}
        print(f"  {name}: {run.seconds:.1f} s = {n_cells / run.seconds:,.0f} cells/s", flush=True)
    same = all(np.array_equal(np.load(out / "inline.npy"), np.load(out / f)) for f in ("one.npy", "two.npy"))
    return {"rows": rows, "identical": same}


def kill_rerun(model: Path, path: Path, threads: int) -> dict:
    out = WORK / "emb" / "kill"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    base = [OURS, "emb", "transform", "--model-folder", str(model), "--input", str(path), "--seed", "0"]
    reference = run_cmd(base + ["--output", str(out / "reference.npy")], env=bench_env(threads))
    if reference.returncode:
        raise RuntimeError("uninterrupted reference run failed")
    cmd = base + ["--output", str(out / "o.npy"), "--work-dir", str(out / "parts"), "--unit-rows", "1024"]
    import h5py

    with h5py.File(path) as f:
        total = -(-int(f["X"].attrs["shape"][0]) // 1024)
    env = bench_env(threads)
    with open(out / "killed.log", "w") as log:
        child = subprocess.Popen(cmd + ["--shard", "0/1"], env=env, stdout=log, stderr=subprocess.STDOUT)
        while len(list((out / "parts").glob("*/u*.json"))) < 0.4 * total and child.poll() is None:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    done_at_kill = len(list((out / "parts").glob("*/u*.json")))
    run = run_cmd(cmd, env=env, log_path=out / "rerun.log")
    computed = int(re.search(r"(\d+) work units computed by this run", (out / "rerun.log").read_text())[1])
    same = np.array_equal(np.load(out / "o.npy"), np.load(out / "reference.npy"))
    return {"total": total, "done_at_kill": done_at_kill, "rerun_computed": computed, "identical": same,
            "rerun_seconds": run.seconds, "cmd": shown_command(cmd)}


def run(args, input_file) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    results, loads = [], []
    for name, model, n in (("se_tiny", SE_TINY, args.cells[0]), ("mid-size", mid_model(), args.mid_cells)):
        path = input_file(n, args)
        share = tokenize_share(model, path, args.threads)
        print(f"{name}: {n} cells, tokenize share in line {share:.0%}", flush=True)
        res = throughput(model, path, n, args.threads)
        results.append((name, model, n, share, res))
        loads += [v for r in res["rows"].values() for v in r["load"]]
    kill = kill_rerun(SE_TINY, input_file(args.kill_cells, args), args.threads)
    print(f"kill -9: {kill}", flush=True)
    if args.write_md:
        write_md(args, results, kill, (min(loads), max(loads)))


def write_md(args, results, kill, load) -> None:
    lines = [
        "## Sharded `emb transform`: `--devices 2`, tokenize/model overlap, kill -9 + rerun (issue #24)", "",
        f"Command: `python bench/bench_emb_transform.py sharded --cells {args.cells[0]} "
        f"--mid-cells {args.mid_cells} --kill-cells {args.kill_cells} --threads {args.threads} --write-md` (synthetic CSR input, "
        f"{args.genes:,} genes, se_tiny's 200-gene vocabulary; `--seed 0`; wall-clock cells/s, start-up included).",
        "", machine_line(args.threads, load), "",
        "| model | cells | tokenize share (in line) | in line, 1 process | overlapped, 1 process | `--devices 2` | "
        "overlap gain | 2 processes / 1 | outputs identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, _, n, share, res in results:
        r = res["rows"]
        a, b, c = (r[k]["cells_s"] for k in ("inline", "1 process", "--devices 2"))
        lines.append(f"| {name} | {n:,} | {share:.0%} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {b / a:.2f}x | "
                     f"{c / b:.2f}x | {'yes' if res['identical'] else 'NO'} |")
    lines += ["", "Commands timed (se_tiny row; the mid-size row uses bench/_work/emb/mid_model, a random SE model "
              f"with d_model {MID['d_model']}, {MID['nlayers']} layers, {MID['pad_length']}-token sentences):", ""]
    lines += [f"    {r['cmd']}" for r in results[0][4]["rows"].values()]
    lines += ["", f"kill -9 (se_tiny, {kill['total']} units of 1024 rows): `{kill['cmd']} --shard 0/1` killed with "
              f"SIGKILL once {kill['done_at_kill']} units were done; the same command without `--shard` then computed "
              f"**{kill['rerun_computed']}** units (= {kill['total']} - {kill['done_at_kill']}: none recomputed) and "
              f"merged in {kill['rerun_seconds']:.1f} s; output identical to the uninterrupted run: "
              f"**{'yes' if kill['identical'] else 'NO'}**."]
    write_section("bench_emb_transform_sharded", "\n".join(lines))
