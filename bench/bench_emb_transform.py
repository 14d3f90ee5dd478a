"""Benchmark ``state emb transform`` against arc-state 0.11.1, and its peak memory at scale.

Inputs are synthetic raw-count CSR h5ad files written block by block with h5py (the matrix is never
held in memory). Gene names: the se_tiny checkpoint's 200 vocabulary genes (SEG000..SEG199) spread
over ``--genes`` columns, the rest filler names. Each cell expresses ~``--nnz-per-cell`` genes in all;
its vocabulary genes are expressed with a per-cell probability drawn from ``--vocab-frac`` (default
0.1-0.6, i.e. ~20-120 of the 200), so cells take both sentence paths (fewer expressed vocabulary
genes than the 63 sentence slots: zero-gene filler; more: top-63 ranking).

Modes (each runs the CLI in child processes, se_tiny checkpoint, ``.npy`` output, default batch size):

* ``ratio``: ours and arc-state on the same files, alternating (ours, arc, ours, arc, ...), ``--repeats``
  times per size; wall times include start-up. With two sizes, steady-state cells/s is
  (n_big - n_small) / (t_big - t_small) from the medians. Also checks that both tools agree on a
  tie-free input (every cell expresses >= 63 distinct-valued vocabulary genes, so neither tool samples).
* ``scale``: ours alone on large files (ascending), peak RSS (``os.wait4``) and cells/s per size.

    python bench/bench_emb_transform.py ratio --cells 10000 40000 --repeats 3 --write-md
    python bench/bench_emb_transform.py scale --cells 200000 1000000 --write-md
    python bench/bench_emb_transform.py sharded --cells 200000 --mid-cells 4096 --kill-cells 50000 --threads 1 --write-md

``sharded`` (one process vs ``--devices 2``, the overlap, kill -9 + rerun) lives in emb_transform_sharded.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ARC, OURS, ROOT, WORK, Run, bench_env, machine_line, median, run_cmd, write_section  # noqa: E402

MODEL = ROOT / "tests" / "data" / "fixtures" / "emb" / "se_tiny" / "model"
N_VOCAB = 200
SLOTS = 63  # se_tiny pad_length 64 minus the CLS slot


def gene_names(n_genes: int) -> tuple[list[str], np.ndarray]:
    """Names and the column of each vocabulary gene (evenly spread, as in a real gene list)."""
    vocab_cols = np.linspace(0, n_genes - 1, N_VOCAB).astype(np.int64)
    names = [f"G{i:06d}" for i in range(n_genes)]
    for k, col in enumerate(vocab_cols):
        names[col] = f"SEG{k:03d}"
    return names, vocab_cols


def sample_rows(rng: np.random.Generator, *, rows: int, n_genes: int, nnz_per_cell: int,
                vocab_frac: tuple[float, float], tie_free: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` random cells as CSR (indptr, indices int32, data float32)."""
    _, vocab_cols = gene_names(n_genes)
    is_vocab = np.zeros(n_genes, dtype=bool)
    is_vocab[vocab_cols] = True
    other_cols = np.flatnonzero(~is_vocab)
    frac = rng.uniform(*vocab_frac, size=rows)
    vocab_mask = rng.random((rows, N_VOCAB)) < frac[:, None]
    if tie_free:
        vocab_mask[:, : SLOTS + 1] = True
    n_other = rng.integers(nnz_per_cell // 2, nnz_per_cell * 3 // 2, size=rows)
    # (row, column) keys; sorting them gives CSR order, unique drops the rare repeated draws
    row_of_other = np.repeat(np.arange(rows, dtype=np.int64), n_other)
    other = other_cols[rng.integers(0, other_cols.size, size=row_of_other.size)]
    v_row, v_k = np.nonzero(vocab_mask)
    keys = np.sort(np.concatenate([row_of_other * n_genes + other, v_row * n_genes + vocab_cols[v_k]]))
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # np.unique hashes first: much slower
    key_row, key_col = np.divmod(keys, n_genes)
    nnz = np.bincount(key_row, minlength=rows)
    if tie_free:  # distinct counts within each cell (a random permutation of 1..nnz)
        vals = np.concatenate([rng.permutation(k) + 1.0 for k in nnz])
    else:
        vals = rng.geometric(0.3, size=keys.size)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    return indptr, key_col.astype(np.int32), vals.astype(np.float32)


def write_csr_h5ad(path: Path, *, n_cells: int, n_genes: int, nnz_per_cell: int, vocab_frac: tuple[float, float],
                   tie_free: bool = False, seed: int = 0, pool: int = 10_000) -> None:
    """Raw-count CSR h5ad written in row blocks with h5py (never holds the matrix).

    Generating random rows is slower than the transform itself, so ``pool`` distinct random cells are
    drawn once and every block of ``pool`` rows writes them in a rotated order (a random start row).
    ``tie_free``: every cell expresses >= SLOTS vocabulary genes with distinct values in each cell.
    """
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    names, _ = gene_names(n_genes)
    pool = min(pool, n_cells)
    p_indptr, p_indices, p_data = sample_rows(rng, rows=pool, n_genes=n_genes, nnz_per_cell=nnz_per_cell,
                                              vocab_frac=vocab_frac, tie_free=tie_free)
    p_nnz = np.diff(p_indptr)
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
        write_elem(f, "var", pd.DataFrame(index=names))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        # int32 indptr while the values fit, as anndata writes scipy matrices; an int64 indptr beside int32
        # indices makes every scipy row access in arc-state copy the whole index array (~700x slower per row)
        max_nnz = int(p_indptr[-1]) * -(-n_cells // pool)
        index_dtype = np.int32 if max_nnz < np.iinfo(np.int32).max else np.int64
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=index_dtype, chunks=(1 << 20,))
        indptr = x.create_dataset("indptr", shape=(n_cells + 1,), dtype=index_dtype)
        indptr[0] = 0
        end = 0
        for start in range(0, n_cells, pool):
            rows = min(pool, n_cells - start)
            first = int(rng.integers(pool)) if start else 0
            order = (np.arange(rows) + first) % pool
            cut = p_indptr[first]
            block_data = np.concatenate([p_data[cut:], p_data[:cut]])
            block_indices = np.concatenate([p_indices[cut:], p_indices[:cut]])
            nnz = p_nnz[order]
            total = int(nnz.sum())
            data.resize((end + total,))
            indices.resize((end + total,))
            data[end:] = block_data[:total]
            indices[end:] = block_indices[:total]
            indptr[start + 1 : start + rows + 1] = end + np.cumsum(nnz)
            end += total
    tmp.rename(path)


def input_file(n_cells: int, args, *, tie_free: bool = False) -> Path:
    lo, hi = args.vocab_frac
    tag = "tiefree" if tie_free else f"v{lo:g}-{hi:g}"
    path = WORK / "emb" / f"x_{n_cells}x{args.genes}_nnz{args.nnz_per_cell}_{tag}_i32.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_csr_h5ad(path, n_cells=n_cells, n_genes=args.genes, nnz_per_cell=args.nnz_per_cell,
                       vocab_frac=tuple(args.vocab_frac), tie_free=tie_free)
        print(f"generated {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return path


def transform_cmd(tool: str, path: Path, out: Path, batch_size: int | None) -> list[str]:
    cmd = [tool, "emb", "transform", "--model-folder", str(MODEL), "--input", str(path), "--output", str(out)]
    return cmd + (["--batch-size", str(batch_size)] if batch_size else [])


def timed(tool: str, path: Path, out: Path, args) -> Run:
    """Wall time of one transform; peak RSS from GNU time's %M. (os.wait4 on a child that Python spawned
    reports at least the spawning process's own peak, because the child starts from its memory image.)"""
    log, rss = out.with_suffix(".log"), out.with_suffix(".maxrss")
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss)] + transform_cmd(tool, path, out, args.batch_size)
    run = run_cmd(cmd, env=bench_env(args.threads), log_path=log)
    if run.returncode != 0:
        raise RuntimeError(f"{tool} failed (rc {run.returncode}):\n{log.read_text()[-3000:]}")
    run.peak_rss_mib = int(rss.read_text().split()[-1]) / 1024  # KiB; the largest single process, not a sum
    return run


def agreement(args) -> dict[str, float]:
    """Both tools on a tie-free input: per-cell cosine of the normalised cell part, max |difference|,
    and (for scale) the median cosine between different cells of our output."""
    path = input_file(args.agree_cells, args, tie_free=True)
    outs = {}
    for name, tool in (("ours", OURS), ("arc", ARC)):
        out = WORK / "emb" / f"agree_{name}.npy"
        timed(tool, path, out, args)
        outs[name] = np.load(out)
    a, b = outs["ours"], outs["arc"]
    width = a.shape[1] - 10
    unit_a = a[:, :width] / np.linalg.norm(a[:, :width], axis=1, keepdims=True)
    unit_b = b[:, :width] / np.linalg.norm(b[:, :width], axis=1, keepdims=True)
    return {"cells": a.shape[0], "min_cos": float((unit_a * unit_b).sum(1).min()),
            "max_abs": float(np.abs(a - b).max()), "between_cells_cos": float(np.median(unit_a @ unit_a.T))}


def ratio(args) -> None:
    sizes = sorted(args.cells)
    ours_only = sorted(args.ours_cells or [])
    paths = {n: input_file(n, args) for n in sizes + ours_only}
    agree = agreement(args)
    print(f"agreement: {agree}", flush=True)
    runs: dict[tuple[str, int], list[Run]] = {}
    pairs = [(n, name, tool) for n in sizes for name, tool in (("ours", OURS), ("arc", ARC))]
    for rep in range(args.repeats):
        for n, name, tool in pairs + [(n, "ours", OURS) for n in ours_only]:
            run = timed(tool, paths[n], WORK / "emb" / f"out_{name}.npy", args)
            runs.setdefault((name, n), []).append(run)
            print(f"rep {rep} {name:4s} {n:>7} cells: {run.seconds:6.1f} s  peak RSS {run.peak_rss_mib:5.0f} MiB  "
                  f"load {run.load_before:.1f}/{run.load_after:.1f}", flush=True)
    if args.write_md:
        write_ratio_md(args, sizes, ours_only, paths, runs, agree)


def scale(args) -> None:
    rows = []
    for n in sorted(args.cells):
        path = input_file(n, args)
        out = WORK / "emb" / "scale_out.npy"
        run = timed(OURS, path, out, args)
        rows.append((n, path.stat().st_size / 2**20, run))
        print(f"{n} cells: {run.seconds:.1f} s, {n / run.seconds:.0f} cells/s, peak RSS {run.peak_rss_mib:.0f} MiB, "
              f"load {run.load_before:.1f}/{run.load_after:.1f}", flush=True)
        out.unlink(missing_ok=True)
        if args.delete_inputs:
            path.unlink()
    if args.write_md:
        write_scale_md(args, rows)


# ---------------------------------------------------------------------------------------------- markdown
def _common_args(args) -> str:
    lo, hi = args.vocab_frac
    extra = f" --batch-size {args.batch_size}" if args.batch_size else ""
    return (f"--genes {args.genes} --nnz-per-cell {args.nnz_per_cell} --vocab-frac {lo:g} {hi:g} "
            f"--threads {args.threads}{extra}")


def steady_rate(runs, name: str, lo: int, hi: int) -> float:
    """Cells/s from the difference of two sizes' median wall times (start-up cancels)."""
    return (hi - lo) / (median(r.seconds for r in runs[(name, hi)]) - median(r.seconds for r in runs[(name, lo)]))


def write_ratio_md(args, sizes, ours_only, paths, runs, agree) -> None:
    cells = " ".join(map(str, sizes)) + (" --ours-cells " + " ".join(map(str, ours_only)) if ours_only else "")
    loads = [v for rs in runs.values() for r in rs for v in (r.load_before, r.load_after)]
    lines = [
        "### ours vs arc-state 0.11.1 (`ratio`)", "",
        f"Command: `python bench/bench_emb_transform.py ratio --cells {cells} --repeats {args.repeats} "
        f"{_common_args(args)} --write-md`, which times, alternating ours / arc-state:", "",
        "    state emb transform --model-folder tests/data/fixtures/emb/se_tiny/model --input X.h5ad --output out.npy",
        f"    {ARC} emb transform --model-folder tests/data/fixtures/emb/se_tiny/model --input X.h5ad --output out.npy",
        "",
        machine_line(args.threads, (min(loads), max(loads))), "",
        "| cells | input MiB | ours s (median) | arc-state s (median) | ratio arc/ours (median of pairs) | "
        "ours peak RSS MiB | arc peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        ours, arc = runs[("ours", n)], runs[("arc", n)]
        pair_ratio = median(a.seconds / o.seconds for o, a in zip(ours, arc, strict=True))
        lines.append(
            f"| {n:,} | {paths[n].stat().st_size / 2**20:.0f} | {median(r.seconds for r in ours):.1f} | "
            f"{median(r.seconds for r in arc):.1f} | **{pair_ratio:.2f}x** | {max(r.peak_rss_mib for r in ours):.0f} | "
            f"{max(r.peak_rss_mib for r in arc):.0f} |")
    for n in ours_only:
        ours = runs[("ours", n)]
        lines.append(f"| {n:,} | {paths[n].stat().st_size / 2**20:.0f} | {median(r.seconds for r in ours):.1f} | "
                     f"not run | | {max(r.peak_rss_mib for r in ours):.0f} | |")
    lo, hi = sizes[0], sizes[-1]
    arc_rate = steady_rate(runs, "arc", lo, hi)
    o_lo, o_hi = (ours_only[0], ours_only[-1]) if len(ours_only) >= 2 else (lo, hi)
    ours_rate = steady_rate(runs, "ours", o_lo, o_hi)
    lines += ["", f"Steady state (cells/s from the difference of two sizes' median wall times, so start-up cancels): "
              f"arc-state {arc_rate:,.1f} cells/s ({lo:,} vs {hi:,} cells), ours **{ours_rate:,.0f} cells/s** "
              f"({o_lo:,} vs {o_hi:,} cells): **{ours_rate / arc_rate:,.1f}x**."]
    lines += ["", f"Agreement: on a tie-free input ({agree['cells']:,} cells, each with >= 63 distinct-valued "
              "vocabulary genes, so neither tool samples) the two outputs differ by at most "
              f"{agree['max_abs']:.1e} (all 42 columns); the per-cell cosine of the L2-normalised cell part is >= "
              f"{agree['min_cos']:.7f} (for scale: the median cosine between two different cells is "
              f"{agree['between_cells_cos']:.4f} with this tiny model)."]
    md_section("bench_emb_transform_ratio", lines)


def write_scale_md(args, rows) -> None:
    cells = " ".join(str(n) for n, _, _ in rows)
    loads = [v for _, _, r in rows for v in (r.load_before, r.load_after)]
    lines = [
        "### peak memory at scale (`scale`)", "",
        f"Command: `python bench/bench_emb_transform.py scale --cells {cells} {_common_args(args)} --write-md` "
        "(ours only; `state emb transform ... --output out.npy`).", "",
        machine_line(args.threads, (min(loads), max(loads))), "",
        "| cells x genes | input MiB | seconds | cells/s | peak RSS MiB |", "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n:,} x {args.genes:,} | {mib:,.0f} | {r.seconds:,.0f} | {n / r.seconds:,.0f} | "
              f"**{r.peak_rss_mib:,.0f}** |" for n, mib, r in rows]
    md_section("bench_emb_transform_scale", lines)


def md_section(name: str, lines: list[str]) -> None:
    write_section(name, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["ratio", "scale", "sharded"])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz-per-cell", type=int, default=1500, help="non-vocabulary expressed genes (mean)")
    parser.add_argument("--vocab-frac", type=float, nargs=2, default=[0.1, 0.6],
                        help="per-cell probability range that a vocabulary gene is expressed")
    parser.add_argument("--ours-cells", type=int, nargs="*", help="ratio: extra sizes timed for ours only "
                        "(arc-state is too slow for them); two sizes give ours' steady-state rate")
    parser.add_argument("--agree-cells", type=int, default=500, help="ratio: cells of the tie-free agreement input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's (se_tiny: 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--delete-inputs", action="store_true", help="scale: delete each input after its run")
    parser.add_argument("--mid-cells", type=int, default=4096, help="sharded: cells for the mid-size model")
    parser.add_argument("--kill-cells", type=int, default=50_000, help="sharded: cells of the kill -9 input")
    parser.add_argument("--write-md", action="store_true")
    args = parser.parse_args()
    if not shutil.which(OURS) and not Path(OURS).exists():
        sys.exit(f"`state` not found at {OURS}")
    (WORK / "emb").mkdir(parents=True, exist_ok=True)
    if args.mode == "sharded":
        import emb_transform_sharded

        emb_transform_sharded.run(args, input_file)
    else:
        ratio(args) if args.mode == "ratio" else scale(args)


if __name__ == "__main__":
    main()
