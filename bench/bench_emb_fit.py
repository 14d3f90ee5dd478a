"""SE pretraining throughput: cells/s and tokens/s of `state emb fit`, with peak RSS.

    python bench/bench_emb_fit.py [--write-md]

Generates a raw-count corpus (bench/_work/emb_fit), builds its profile with `state emb preprocess`,
then trains with `state.emb.fit.fit` for a fixed number of optimizer steps. Timing starts after
warm-up steps and covers whole training steps (data loading, collation, forward, backward,
optimizer); validation is switched off. It also times the sentence collator alone (the data side
of a step). ``--write-md`` replaces this benchmark's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from state.config_paths import configs_dir
from state.emb.data.collator import SentenceCollator, SentenceSpec
from state.emb.data.dataset import H5adCellDataset
from state.emb.data.profile import load_training_profile
from state.emb.data.synthetic import make_se_corpus
from state.emb.fit import fit
from state.emb.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work" / "emb_fit"
NOTES = (
    "On CPU a step is dominated by the model: attention runs SDPA's math kernel because of attention dropout "
    "(its Bernoulli mask alone was ~37% of a profiled step) and the binary decoder scores P+N+S genes per cell; "
    "the data side (h5py row reads + sentence collation) is two orders of magnitude faster. On CUDA the same "
    "command trains in bf16-mixed; run it on a GPU host to add a GPU row."
)
MARK_START, MARK_END = "<!-- bench_emb_fit:start -->", "<!-- bench_emb_fit:end -->"


class StepTimer(Callback):
    """Wall time of the training steps after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.steps = 0
        self.cells = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.steps == self.warmup and self.start is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.cells += int(batch[0].shape[0])
        self.steps += 1

    def elapsed(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - (self.start or time.perf_counter())


def _config(conf: Path, args, ckpt: Path):
    cfg = OmegaConf.load(conf)
    overrides = [
        "embeddings.current=bench", "dataset.current=bench", "experiment.name=bench", "wandb.enable=false",
        f"experiment.checkpoint.path={ckpt}", "experiment.num_epochs=1", f"experiment.profile.max_steps={args.steps}",
        "experiment.profile.enable_profiler=true", "experiment.limit_val_batches=0",
        "experiment.checkpoint.every_n_train_steps=100000", f"model.batch_size={args.batch_size}",
        f"model.emsize={args.d_model}", f"model.d_hid={2 * args.d_model}", "model.nhead=8",
        f"model.nlayers={args.nlayers}", f"model.output_dim={args.d_model}", f"dataset.pad_length={args.pad_length}",
        "dataset.P=128", "dataset.N=128", "dataset.S=128", f"dataset.num_train_workers={args.workers}",
        "dataset.num_val_workers=0", "optimizer.gradient_accumulation_steps=1",
    ]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def _collator_rate(cfg, n_cells: int) -> float:
    profile = load_training_profile(cfg)
    dataset = H5adCellDataset(profile.train_entries)
    collate = SentenceCollator(SentenceSpec.from_config(cfg), profile.genes, vocab_size=profile.vocab_size)
    size = int(cfg.model.batch_size)
    start = time.perf_counter()
    for first in range(0, n_cells, size):
        collate([dataset[i] for i in range(first, min(first + size, n_cells))])
    return n_cells / (time.perf_counter() - start)


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000, help="cells per training dataset (2 datasets)")
    parser.add_argument("--genes", type=int, default=4000, help="genes per dataset")
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--width", type=int, default=128, help="gene vector width")
    parser.add_argument("--pad-length", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--nlayers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (including warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--write-md", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    corpus = make_se_corpus(WORK / "corpus", n_vocab=args.vocab, width=args.width, train_cells=(args.cells,) * 2,
                            val_cells=(64,), genes_per_dataset=args.genes, n_unknown_genes=10, seed=0)
    conf = WORK / "conf.yaml"
    shutil.copy(configs_dir() / "state-defaults.yaml", conf)
    preprocess(profile_name="bench", train_csv=corpus.train_csv, val_csv=corpus.val_csv,
               output_dir=WORK / "profile", config_file=conf, all_embeddings=corpus.gene_embeddings)
    generate_s = time.perf_counter() - t0
    cfg = _config(conf, args, WORK / "ckpt")
    collate_rate = _collator_rate(cfg, 4 * args.batch_size)

    timer = StepTimer(args.warmup)
    result = fit(cfg, extra_callbacks=[timer])
    seconds = timer.elapsed()
    cells_s = timer.cells / seconds
    tokens_s = cells_s * (args.pad_length + 1)  # +1: the dataset token
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({args.threads} threads)"
    rows = [
        ("device / precision", f"{device} / {'bf16-mixed' if torch.cuda.is_available() else '32-true'}"),
        ("data", f"2 x {args.cells:,} cells x {args.genes:,} genes (CSR raw counts), vocabulary "
                 f"{args.vocab:,} x {args.width}"),
        ("model", f"d_model {args.d_model}, {args.nlayers} layers, pad_length {args.pad_length}, P/N/S 128, "
                  f"batch {args.batch_size}, {args.workers} loader worker(s)"),
        ("timed steps", f"{timer.steps - args.warmup} (after {args.warmup} warm-up), {seconds:.1f} s"),
        ("training throughput", f"**{cells_s:,.1f} cells/s**, **{tokens_s:,.0f} tokens/s**"),
        ("collator alone (1 process)", f"{collate_rate:,.0f} cells/s"),
        ("peak RSS (max of process, workers)", f"{_peak_rss_mib():,.0f} MiB"),
        ("wall: generate+preprocess", f"{generate_s:.0f} s"),
    ]
    command = "python bench/bench_emb_fit.py " + " ".join(sys.argv[1:])
    table = "\n".join(["| quantity | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])
    section = (
        f"{MARK_START}\n## `state emb fit` training throughput (`bench/bench_emb_fit.py`)\n\n"
        f"Command: `{command.strip()}`\n\n{table}\n\n"
        f"Steps = {result.global_step}. Tokens per cell = pad_length + 1 (dataset token). "
        f"Machine: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}; "
        f"measured {date.today().isoformat()}.\n\n{NOTES}\n{MARK_END}"
    )
    print(section)
    if args.write_md:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text() if md.exists() else "# Benchmarks\n"
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            text = head + section + rest.split(MARK_END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        md.write_text(text)


if __name__ == "__main__":
    main()
