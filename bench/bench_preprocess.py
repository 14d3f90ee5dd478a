"""Peak memory of ``state tx preprocess_train`` on a 50,000 x 5,000 sparse count matrix.

Generates raw negative-binomial counts with the project's synthetic generator, runs
``python -m state tx preprocess_train`` in a child process, and compares the child's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss`` in a small launcher process) with the size of the input CSR matrix (data + indices +
indptr bytes). The goal is a ratio below 3. Results are printed and written to BENCHMARKS.md
(section between the ``bench_preprocess`` markers) unless ``--no-write``.

    python bench/bench_preprocess.py                      # 50,000 cells x 5,000 genes, 2,000 HVGs
    python bench/bench_preprocess.py --n-cells 5000 --no-write   # quick check
"""

from __future__ import annotations

import argparse
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_preprocess:start -->", "<!-- bench_preprocess:end -->"


def _csr_bytes(path: Path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        x = f["X"]
        return sum(x[k].dtype.itemsize * x[k].size for k in ("data", "indices", "indptr")), x["data"].size


# Linux keeps a process's peak RSS across fork+exec, so a child started from a parent holding the generated
# matrix would report the parent's size. Generation therefore runs in its own process, and the measured
# command is started from a tiny launcher whose only child it is.
_LAUNCHER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _peak_rss_mib(cmd: list[str]) -> float:
    """Peak RSS (MiB) of ``cmd``, from ``getrusage(RUSAGE_CHILDREN)`` in a launcher process (Linux: KiB)."""
    out = subprocess.check_output([sys.executable, "-c", _LAUNCHER, *cmd], text=True)
    return int(out.strip().splitlines()[-1]) / 1024


def _generate(path: Path, args: argparse.Namespace) -> None:
    code = (
        "import sys; from state.datasets.synthetic import make_perturbation_adata as make;"
        f"make(n_cells={args.n_cells}, n_genes={args.n_genes}, n_perts=100, n_celltypes=3, n_batches=4,"
        f" counts_per_gene={args.counts_per_gene}, seed=0).write_h5ad(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def _baseline_rss_mib() -> float:
    """Peak RSS of a process that only imports what preprocess_train imports (interpreter + libraries)."""
    code = (
        "import resource, anndata, scanpy, state.tx.preprocess, state.cli;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    return int(subprocess.check_output([sys.executable, "-c", code], text=True)) / 1024


def _update_benchmarks_md(section: str) -> Path:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{START}\n{section.rstrip()}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=50_000)
    parser.add_argument("--n-genes", type=int, default=5_000)
    parser.add_argument("--num-hvgs", type=int, default=2_000)
    parser.add_argument("--counts-per-gene", type=float, default=0.5, help="mean UMIs per gene and cell")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        raw, out = work / "raw.h5ad", work / "processed.h5ad"
        t0 = time.perf_counter()
        _generate(raw, args)
        gen_s = time.perf_counter() - t0
        csr, nnz = _csr_bytes(raw)

        cmd = [sys.executable, "-m", "state", "--log-quiet", "tx", "preprocess_train", "--adata", str(raw),
               "--output", str(out), "--num_hvgs", str(args.num_hvgs)]
        t0 = time.perf_counter()
        peak = _peak_rss_mib(cmd)
        run_s = time.perf_counter() - t0
        with h5py.File(out, "r") as f:
            n_hvg_cols = f["obsm/X_hvg"].shape[1]
        baseline = _baseline_rss_mib()

    mib = csr / 2**20
    ratio = peak / mib
    density = nnz / (args.n_cells * args.n_genes)
    shown = "python bench/bench_preprocess.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in {"n_cells", "n_genes", "num_hvgs", "counts_per_gene"}
    )
    section = f"""## preprocess_train peak memory (`bench/bench_preprocess.py`)

Command: `{shown}` (runs `{shlex.join(['python', '-m', 'state', 'tx', 'preprocess_train', '--adata', 'raw.h5ad', '--output', 'processed.h5ad', '--num_hvgs', str(args.num_hvgs)])}` in a child process)

| quantity | value |
|---|---|
| cells x genes | {args.n_cells:,} x {args.n_genes:,} (density {density:.1%}, {nnz:,} stored counts) |
| input CSR bytes (data + indices + indptr) | {mib:,.0f} MiB |
| obsm['X_hvg'] written | {args.n_cells:,} x {n_hvg_cols:,} float32 = {args.n_cells * n_hvg_cols * 4 / 2**20:,.0f} MiB |
| peak RSS of the child (ru_maxrss) | {peak:,.0f} MiB |
| peak RSS / CSR bytes (goal < 3) | **{ratio:.2f}** |
| interpreter + imports alone | {baseline:,.0f} MiB |
| wall time: generate / preprocess | {gen_s:.0f} s / {run_s:.0f} s |

Machine: {platform.machine()}, Python {platform.python_version()}, {platform.system()}; measured {time.strftime('%Y-%m-%d')}.
"""
    print(section)
    if not args.no_write:
        print(f"updated {_update_benchmarks_md(section)}")
    return 0 if ratio < 3 else 1


if __name__ == "__main__":
    sys.exit(main())
