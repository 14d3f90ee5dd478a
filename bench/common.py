"""Shared helpers of the side-by-side tx benchmarks (ours vs arc-state 0.11.1).

* :func:`make_data`: a processed Perturb-seq h5ad (``obsm['X_hvg']``) from ``state.datasets.synthetic``,
  cached under ``bench/_work`` so repeated benchmark runs reuse it;
* :func:`run_cmd`: run one CLI command in a child process, returning wall seconds and the child's peak
  RSS (``os.wait4`` gives the rusage of that child alone, its waited-for descendants included);
* :func:`alternate`: run two tools' commands in alternation (ours, arc, ours, arc, ...) so both see the
  same background load, recording the 1-minute load average around every run;
* :func:`write_section`: replace only this benchmark's marked section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
OURS = str(Path(sys.executable).with_name("state"))
ARC = os.environ.get("ARC_STATE", "/root/arc/bin/state")


def bench_env(threads: int) -> dict[str, str]:
    """Same environment for both tools: fixed thread count, no W&B, no progress bars."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
                "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"})
    return env


def make_data(path: Path, *, n_cells: int, n_genes: int, n_hvgs: int, n_perts: int, n_celltypes: int,
              n_batches: int = 3, seed: int = 0) -> Path:
    """Write (once) a training-ready h5ad: log1p CSR X, obsm['X_hvg'], obs gene / cell_type / gem_group."""
    if path.is_file():
        return path
    from state.datasets.synthetic import make_processed_dataset

    return make_processed_dataset(path.parent, filename=path.name, n_cells=n_cells, n_genes=n_genes,
                                  n_hvgs=n_hvgs, n_perts=n_perts, n_celltypes=n_celltypes,
                                  n_batches=n_batches, seed=seed, counts_per_gene=0.5)


def write_all_train_toml(path: Path, *, dataset: str, data: Path) -> Path:
    """A split file with every cell type in training and one small few-shot val/test split."""
    from state.datasets.synthetic import write_toml

    return write_toml(path, dataset_name=dataset, data_path=data, kind="fewshot")


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float
    load_before: float
    load_after: float
    returncode: int


def run_cmd(cmd: list[str], *, env: dict[str, str], log_path: Path | None = None, cwd: Path | None = None) -> Run:
    """Run ``cmd``; wall time and the child's own peak RSS. Output goes to ``log_path`` (or is dropped).

    Peak RSS comes from GNU time's %M: ``ru_maxrss`` of a child that Python forked also counts the
    parent's resident pages at fork time, which overstates small children of a large parent.
    """
    import tempfile

    load_before = os.getloadavg()[0]
    sink = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        try:
            start = time.perf_counter()
            proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, cwd=cwd, check=False)
            seconds = time.perf_counter() - start
        finally:
            if log_path:
                sink.close()
        text = Path(rss.name).read_text().strip().splitlines()
        peak_kib = float(text[-1]) if text and text[-1].strip().isdigit() else float("nan")
    return Run(seconds=seconds, peak_rss_mib=peak_kib / 1024, load_before=load_before,
               load_after=os.getloadavg()[0], returncode=proc.returncode)


@dataclass
class Series:
    runs: list[Run] = field(default_factory=list)

    def add(self, run: Run, cmd: list[str], log_path: Path | None) -> None:
        if run.returncode != 0:
            tail = log_path.read_text()[-3000:] if log_path and log_path.is_file() else ""
            raise RuntimeError(f"command failed (rc {run.returncode}): {shlex.join(cmd)}\n{tail}")
        self.runs.append(run)

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max(r.peak_rss_mib for r in self.runs)


def loads(series: list[Series]) -> tuple[float, float]:
    values = [v for s in series for r in s.runs for v in (r.load_before, r.load_after)]
    return min(values), max(values)


def median(values) -> float:
    return statistics.median(list(values))


def machine_line(threads: int, load: tuple[float, float]) -> str:
    return (f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs, Python "
            f"{platform.python_version()}, OMP_NUM_THREADS={threads}; 1-minute load average seen during the runs "
            f"{load[0]:.1f}-{load[1]:.1f}; measured {time.strftime('%Y-%m-%d')}.")


def shown_command(cmd: list[str]) -> str:
    """A command as BENCHMARKS.md shows it: paths relative to the repository, arc-state as a placeholder.

    The file is read on other machines, so no one checkout's absolute paths or venv location go into it.
    """
    words = []
    for word in cmd:
        word = word.replace(ARC, "<arc-state venv>/bin/state").replace(f"{ROOT}/", "")
        words.append(word)
    return shlex.join(words).replace("'<arc-state venv>/bin/state'", "<arc-state venv>/bin/state")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- name:start --> ... <!-- name:end -->`` section of BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
