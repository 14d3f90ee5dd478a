"""Lightning DataModule for SE pretraining: train / validation loaders over the profile's datasets."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from state.emb.data.collator import SentenceCollator, SentenceSpec
from state.emb.data.dataset import H5adCellDataset
from state.emb.data.profile import TrainingProfile
from state.utils.worker_signals import leave_signals_to_parent


class EpochShuffle(RandomSampler):
    """A shuffled order that depends only on ``(seed, epoch)``.

    torch's RandomSampler draws each epoch's order from one generator that a resumed run would
    restart, so a run resumed in epoch 3 would replay epoch 0's order. Lightning calls ``set_epoch``
    before each epoch (and before each validation); being a RandomSampler, it is still recognised as
    shuffling and swapped for a DistributedSampler under DDP.
    """

    def __init__(self, data_source, seed: int) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class SEDataModule(L.LightningDataModule):
    """Builds shuffled loaders with ``model.batch_size`` and the ``dataset.num_*_workers`` workers.

    Lightning swaps in a DistributedSampler under DDP, so each rank sees its own shard. The order of
    an epoch and every batch's random draws are functions of ``dataset.seed`` (see :class:`EpochShuffle`
    and ``SentenceCollator(seed=...)``), so a run resumed mid-epoch continues exactly.
    """

    def __init__(self, cfg, profile: TrainingProfile) -> None:
        super().__init__()
        self.cfg = cfg
        self.profile = profile
        self.spec = SentenceSpec.from_config(cfg)
        self.batch_size = int(cfg.model.batch_size)
        self.seed = int(cfg.dataset.get("seed", 42))
        self.train_dataset = H5adCellDataset(profile.train_entries)
        self.val_dataset = H5adCellDataset(profile.val_entries)

    def _collator(self, *, training: bool) -> SentenceCollator:
        return SentenceCollator(
            self.spec, self.profile.genes, vocab_size=self.profile.vocab_size, training=training, seed=self.seed
        )

    def _loader(self, dataset, *, workers: int, training: bool) -> DataLoader:
        generator = torch.Generator()  # only seeds the workers (their base seed)
        generator.manual_seed(self.seed)
        extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
        return leave_signals_to_parent(DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(dataset, self.seed),
            num_workers=workers,
            collate_fn=self._collator(training=training),
            pin_memory=torch.cuda.is_available(),
            generator=generator,
            **extra,
        ))

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.dataset.get("num_train_workers", 0) or 0)
        return self._loader(self.train_dataset, workers=workers, training=True)

    def val_dataloader(self) -> DataLoader:
        workers = int(self.cfg.dataset.get("num_val_workers", 0) or 0)
        return self._loader(self.val_dataset, workers=workers, training=False)
