"""Lightning DataModule for SE pretraining: train / validation loaders over the profile's datasets."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from state.emb.data.collator import SentenceCollator, SentenceSpec
from state.emb.data.dataset import H5adCellDataset
from state.emb.data.profile import TrainingProfile


class SEDataModule(L.LightningDataModule):
    """Builds shuffled loaders with ``model.batch_size`` and the ``dataset.num_*_workers`` workers.

    Lightning swaps in a DistributedSampler under DDP, so each rank sees its own shard.
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
            self.spec, self.profile.genes, vocab_size=self.profile.vocab_size, training=training
        )

    def _loader(self, dataset, *, workers: int, training: bool) -> DataLoader:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        extra = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=self._collator(training=training),
            pin_memory=torch.cuda.is_available(),
            generator=generator,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.dataset.get("num_train_workers", 0) or 0)
        return self._loader(self.train_dataset, workers=workers, training=True)

    def val_dataloader(self) -> DataLoader:
        workers = int(self.cfg.dataset.get("num_val_workers", 0) or 0)
        return self._loader(self.val_dataset, workers=workers, training=False)
