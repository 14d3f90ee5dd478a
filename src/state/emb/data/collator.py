"""Turn cells into SE training batches: a ranked "cell sentence" plus task genes.

For every cell the collator builds

* the sentence: slot 0 is the CLS slot, then the most expressed vocabulary genes (ties broken at
  random), padded with random unexpressed genes; each slot carries 100 x the gene's share of the
  cell's (log1p) expression;
* the task genes the decoder is trained on: P expressed genes, N genes with log value < 1 and, for
  the tabular loss, S global genes drawn once per batch and shared by all cells;
* the targets ``Y`` (log1p values of the task genes) and the read depth inputs.

The batch is a 9-tuple whose positions are part of the model's internal API:
``(sentence_ids, task_gene_ids, Y, idx, filtered_counts, mask, total_counts, sentence_counts,
dataset_nums)``. Random draws use torch's global RNG (seeded per DataLoader worker) unless a
generator is given. With ``seed`` (training and validation in ``emb fit``) every batch draws from its
own generator, seeded from ``seed`` and the batch's cell indices: the draws for a batch are then the
same whichever process collates it and whatever was drawn before, so a resumed run, a run with
DataLoader workers and an uninterrupted run see identical batches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from state.emb.data.gene_mapping import DatasetGenes

log = logging.getLogger(__name__)

# A cell whose maximum exceeds this holds raw counts; smaller values are taken as log1p already.
RAW_COUNT_MAX = 35.0
# ... unless undoing the log1p gives an implausible number of UMIs.
RAW_UMI_LIMIT = 5_000_000

# One dataset item: (dense row [G], global cell index, dataset name, dataset number).
Item = tuple[np.ndarray | torch.Tensor, int, str, int]


@dataclass(frozen=True)
class SentenceSpec:
    """Sentence and task sizes, read from ``dataset.*``, ``model.*`` and ``loss.name``."""

    pad_length: int = 2048
    cls_token_idx: int = 3
    P: int = 512
    N: int = 512
    S: int = 512
    loss_name: str = "tabular"
    rda: bool = True
    counts: bool = True
    dataset_correction: bool = True
    num_downsample: int = 1

    @classmethod
    def from_config(cls, cfg) -> SentenceSpec:
        return cls(
            pad_length=int(cfg.dataset.pad_length),
            cls_token_idx=int(cfg.dataset.cls_token_idx),
            P=int(cfg.dataset.P),
            N=int(cfg.dataset.N),
            S=int(cfg.dataset.S),
            loss_name=str(cfg.loss.name),
            rda=bool(cfg.model.rda),
            counts=bool(cfg.model.counts),
            dataset_correction=bool(cfg.model.get("dataset_correction", False)),
            num_downsample=int(cfg.model.get("num_downsample", 1) or 1),
        )

    @property
    def shared(self) -> int:
        return self.S if self.loss_name == "tabular" else 0

    @property
    def task_size(self) -> int:
        return self.P + self.N + self.shared


def to_log_space(x: torch.Tensor) -> torch.Tensor:
    """Clip negatives, then log1p the row if it looks like raw counts (else it is log1p already)."""
    if torch.isnan(x).any():
        log.error("a cell holds NaN values; they propagate into its sentence")
    x = x.clamp_min(0)
    peak = float(x.max()) if x.numel() else 0.0
    if peak > RAW_COUNT_MAX or float(torch.expm1(x).sum()) > RAW_UMI_LIMIT:
        return torch.log1p(x)
    return x


def _draw(pool: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k elements of ``pool``: without replacement when it has more than k, else with replacement."""
    if pool.numel() > k:
        return pool[torch.randperm(pool.numel(), generator=generator)[:k]]
    if pool.numel() == 0:
        return torch.zeros(k, dtype=torch.long)
    return pool[torch.randint(pool.numel(), (k,), generator=generator)]


class SentenceCollator:
    """``collate_fn`` for SE training, validation and inference DataLoaders."""

    def __init__(
        self,
        spec: SentenceSpec,
        genes: Mapping[str, DatasetGenes],
        *,
        vocab_size: int,
        training: bool = True,
        precision: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        self.spec = spec
        self.genes = dict(genes)
        self.vocab_size = int(vocab_size)
        self.training = training
        self.precision = precision
        self.generator = generator
        self.seed = seed

    def _batch_generator(self, batch: Sequence[Item]) -> torch.Generator | None:
        if self.seed is None:
            return self.generator
        words = np.random.SeedSequence([self.seed, *(int(item[1]) for item in batch)]).generate_state(2)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def cell_sentence(self, x_log: torch.Tensor, genes: DatasetGenes, *,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global ids [L], counts [L]) for one cell given its unfiltered log1p row."""
        spec, gen = self.spec, generator if generator is not None else self.generator
        xf = x_log[genes.valid_mask]
        gids = genes.valid_global_ids
        total = xf.sum()
        weights = xf / total if total > 0 else torch.full_like(xf, 1.0 / max(xf.numel(), 1))
        perm = torch.randperm(xf.numel(), generator=gen)
        ranked = perm[torch.argsort(xf[perm], descending=True)]
        slots = spec.pad_length - 1
        local = torch.empty(spec.pad_length, dtype=torch.long)
        # The CLS slot holds a local gene index; its id is replaced by the CLS token inside the model,
        # but its count (100 x weight of that gene) reaches the model, as in arc-state.
        local[0] = min(spec.cls_token_idx, xf.numel() - 1)
        if ranked.numel() >= slots:
            local[1:] = ranked[:slots]
        else:
            n_expressed = min(int((xf > 0).sum()), slots)
            local[1 : n_expressed + 1] = ranked[:n_expressed]
            filler = ranked[n_expressed:] if ranked.numel() > n_expressed else ranked
            local[n_expressed + 1 :] = filler[torch.randint(filler.numel(), (slots - n_expressed,), generator=gen)]
        return gids[local], 100.0 * weights[local]

    def task_genes(
        self, x_log: torch.Tensor, genes: DatasetGenes, shared: torch.Tensor | None, *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global ids, log1p targets) of the P positive, N negative and S shared task genes."""
        spec, gen = self.spec, generator if generator is not None else self.generator
        xf = x_log[genes.valid_mask]
        positives = _draw(torch.nonzero(xf > 0).flatten(), spec.P, gen)
        # Quirk kept from arc-state: "negative" means log value < 1, so count 1 is in both pools.
        negatives = _draw(torch.nonzero(xf < 1).flatten(), spec.N, gen)
        local = torch.cat([positives, negatives])
        ids = genes.valid_global_ids[local]
        targets = xf[local]
        if shared is not None:
            columns = genes.global_to_local[shared]
            shared_targets = torch.where(columns >= 0, x_log[columns.clamp_min(0)], torch.zeros(()))
            ids = torch.cat([ids, shared])
            targets = torch.cat([targets, shared_targets])
        return ids, targets

    def __call__(self, batch: Sequence[Item]) -> tuple:
        spec = self.spec
        if spec.num_downsample > 1 and self.training:
            batch = [item for item in batch for _ in range(spec.num_downsample)]
        size = len(batch)
        sentence_ids = torch.zeros(size, spec.pad_length, dtype=torch.int32)
        sentence_counts = torch.zeros(size, spec.pad_length)
        task_ids = torch.zeros(size, spec.task_size, dtype=torch.int32)
        targets = torch.zeros(size, spec.task_size)
        widest = max(int(np.shape(item[0])[-1]) for item in batch)
        filtered = torch.zeros(size, widest)
        idx = torch.zeros(size, dtype=torch.int32)
        dataset_nums = torch.zeros(size, dtype=torch.int32)
        gen = self._batch_generator(batch)
        shared = None
        if spec.shared:
            shared = torch.randint(0, self.vocab_size, (spec.S,), generator=gen, dtype=torch.long)
        for i, (row, cell_idx, name, dataset_num) in enumerate(batch):
            genes = self.genes[name]
            x_log = to_log_space(torch.as_tensor(row, dtype=torch.float32).reshape(-1))
            sentence_ids[i], sentence_counts[i] = self.cell_sentence(x_log, genes, generator=gen)
            task_ids[i], targets[i] = self.task_genes(x_log, genes, shared, generator=gen)
            kept = x_log[genes.valid_mask]
            filtered[i, : kept.numel()] = kept
            idx[i] = int(cell_idx)
            dataset_nums[i] = int(dataset_num)
        total_counts = targets.sum(dim=1) if spec.rda else None
        if spec.loss_name == "cross_entropy":
            targets = (targets > 0).float()
        if self.precision is not None:
            targets, filtered, sentence_counts = (t.to(self.precision) for t in (targets, filtered, sentence_counts))
            total_counts = None if total_counts is None else total_counts.to(self.precision)
        mask = torch.zeros(size, spec.pad_length, dtype=torch.bool)
        return (
            sentence_ids,
            task_ids,
            targets,
            idx,
            filtered,
            mask,
            total_counts,
            sentence_counts if spec.counts else None,
            dataset_nums if spec.dataset_correction else None,
        )
