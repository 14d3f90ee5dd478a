"""Fine-tuning heads: a small MLP trained on cell embeddings to predict an obs column.

Any per-cell representation works as input: SE embeddings (``obsm['X_state']`` from
:func:`state.api.embed`), ST inputs or predictions (``obsm['X_hvg']``, ``obsm['X_state_pred']``).
Classification predicts a label column (cell type, perturbation, ...), regression a numeric one.
Training is mini-batch Adam on the CPU, deterministic for a given ``seed`` (the
global torch RNG is left untouched).

A head saves as a folder: ``head.pt`` (a plain tensor state dict, read back through the
restricted unpickler) and ``head.json`` (task, classes, input key and width, layer sizes).

>>> from state.datasets.synthetic import make_processed_adata
>>> adata = make_processed_adata(n_cells=200, n_genes=40, n_perts=3, n_celltypes=2, n_hvgs=12, seed=0)
>>> head = fit_head(adata, embed_key="X_hvg", target="cell_type", epochs=30, seed=0)
>>> float((head.predict(adata) == adata.obs["cell_type"].astype(str).to_numpy()).mean()) > 0.9
True
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from state.utils.errors import StateError, first_line

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

TASKS = ("classification", "regression")
FORMAT = "state.head"
FORMAT_VERSION = 1
WEIGHTS_FILE = "head.pt"
META_FILE = "head.json"


class MLPHead(nn.Module):
    """Standardize inputs, then Linear-ReLU(-Dropout) blocks and a Linear output layer."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(size)
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in_dim] -> [N, out_dim]
        return self.layers((x - self.input_mean) / self.input_std)


@dataclass
class Head:
    """A trained head: ``predict(adata)`` reads ``obsm[embed_key]`` and returns one value per cell."""

    module: MLPHead
    task: str
    embed_key: str
    target: str
    in_dim: int
    hidden: tuple[int, ...]
    classes: list[str] | None = None  # classification: output index -> label
    target_mean: float = 0.0  # regression: the model predicts standardized targets
    target_std: float = 1.0
    dropout: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch

    @torch.inference_mode()
    def _outputs(self, adata: ad.AnnData) -> torch.Tensor:
        x = _features(adata, self.embed_key)
        if x.shape[1] != self.in_dim:
            raise StateError(f"obsm['{self.embed_key}'] has {x.shape[1]} columns, the head was trained on {self.in_dim}",
                             hint="use embeddings from the same model (and key) as for training")
        self.module.eval()
        return self.module(torch.from_numpy(x))

    def predict(self, adata: ad.AnnData) -> np.ndarray:
        """Labels (classification, array of str) or values (regression, float32), one per cell."""
        out = self._outputs(adata)
        if self.task == "classification":
            return np.asarray(self.classes, dtype=object)[out.argmax(dim=1).numpy()].astype(str)
        return (out[:, 0].numpy() * self.target_std + self.target_mean).astype(np.float32)

    def predict_proba(self, adata: ad.AnnData) -> np.ndarray:
        """Class probabilities [cells, classes], columns in the order of ``classes``."""
        if self.task != "classification":
            raise StateError("predict_proba is only defined for classification heads", hint="use predict()")
        return torch.softmax(self._outputs(adata), dim=1).numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/head.pt`` (tensor state dict) and ``path/head.json``; returns the folder."""
        from state.io.atomic import atomic_torch_save, atomic_write_text

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise StateError(f"{folder} is a file; a head is saved as a folder", hint="pass a folder path")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "task": self.task, "embed_key": self.embed_key,
            "target": self.target, "in_dim": self.in_dim, "hidden": list(self.hidden), "dropout": self.dropout,
            "classes": self.classes, "target_mean": self.target_mean, "target_std": self.target_std,
            "losses": self.losses,
        }  # fmt: skip
        atomic_torch_save(state, folder / WEIGHTS_FILE)
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> Head:
        """Read a folder written by :meth:`save` (weights through the restricted unpickler)."""
        from state.io.safe_load import safe_torch_load

        folder = Path(path)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise StateError(f"{meta_path} not found", hint="pass the folder written by Head.save")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
            raise StateError(f"{meta_path} is not a state head (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r})", hint="save it again with this version of state")
        out_dim = len(meta["classes"]) if meta["task"] == "classification" else 1
        module = MLPHead(int(meta["in_dim"]), out_dim, hidden=meta["hidden"], dropout=float(meta["dropout"]))
        state = safe_torch_load(folder / WEIGHTS_FILE, what="head weights")
        try:
            module.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise StateError(f"{folder / WEIGHTS_FILE} does not match {meta_path}: {first_line(exc)}",
                             hint="keep head.pt and head.json from the same save") from exc
        return cls(module=module, task=meta["task"], embed_key=meta["embed_key"], target=meta["target"],
                   in_dim=int(meta["in_dim"]), hidden=tuple(meta["hidden"]), classes=meta["classes"],
                   target_mean=float(meta["target_mean"]), target_std=float(meta["target_std"]),
                   dropout=float(meta["dropout"]), losses=list(meta.get("losses") or []))


def load_head(path: str | os.PathLike) -> Head:
    """Same as :meth:`Head.load`."""
    return Head.load(path)


def _features(adata: ad.AnnData, embed_key: str) -> np.ndarray:
    from state.io.anndata_checks import obsm_matrix

    return obsm_matrix(adata, embed_key, hint="pass embed_key=<existing obsm key>, e.g. X_state after api.embed")


def _targets(adata: ad.AnnData, target: str, task: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(kept-row mask, encoded targets, classes) with missing targets dropped."""
    import pandas as pd

    if target not in adata.obs.columns:
        raise StateError(f"target '{target}' is not an obs column (columns: {', '.join(map(str, adata.obs.columns))})",
                         hint="pass target=<obs column to predict>")
    column = adata.obs[target]
    if task == "classification":
        keep = column.notna().to_numpy()
        labels = column[keep].astype(str).to_numpy()
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise StateError(f"obs['{target}'] has {len(classes)} distinct label(s); classification needs 2 or more")
        lookup = {c: i for i, c in enumerate(classes)}
        return keep, np.array([lookup[v] for v in labels], dtype=np.int64), classes
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).all() and column.notna().any():
        raise StateError(f"obs['{target}'] is not numeric", hint="use task='classification' for labels")
    keep = np.isfinite(values)
    return keep, values[keep].astype(np.float32), None


def fit_head(
    adata: ad.AnnData,
    *,
    embed_key: str,
    target: str,
    task: str = "classification",
    hidden: Sequence[int] = (64,),
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    dropout: float = 0.0,
    seed: int = 0,
) -> Head:
    """Train an MLP from ``obsm[embed_key]`` to ``obs[target]``; returns a :class:`Head`.

    ``task="classification"`` (cross-entropy over the distinct labels, sorted) or
    ``"regression"`` (mean squared error on the standardized target). Cells whose target is
    missing are left out. Inputs are standardized with the training cells' mean and standard
    deviation, stored in the head. Same data, options and ``seed`` give the same head.

    >>> import numpy as np, anndata as ad, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 5)).astype(np.float32)
    >>> cells = ad.AnnData(obs=pd.DataFrame({"y": 2 * x[:, 0] - x[:, 1]}, index=[f"c{i}" for i in range(300)]))
    >>> cells.obsm["emb"] = x
    >>> head = fit_head(cells, embed_key="emb", target="y", task="regression", hidden=(16,), epochs=80, seed=1)
    >>> float(np.corrcoef(head.predict(cells), cells.obs["y"])[0, 1]) > 0.95
    True
    """
    if task not in TASKS:
        raise StateError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise StateError("epochs, batch_size and lr must be positive")
    x_all = _features(adata, embed_key)
    keep, y, classes = _targets(adata, target, task)
    x = x_all[keep]
    if x.shape[0] < 2:
        raise StateError(f"only {x.shape[0]} cell(s) have a value in obs['{target}']; need at least 2")
    target_mean, target_std = 0.0, 1.0
    if task == "regression":
        target_mean = float(y.mean())
        target_std = float(y.std()) or 1.0
        y = ((y - target_mean) / target_std).astype(np.float32)
    out_dim = len(classes) if classes is not None else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MLPHead(x.shape[1], out_dim, hidden=tuple(hidden), dropout=dropout)
        module.input_mean.copy_(torch.from_numpy(x.mean(axis=0)))
        module.input_std.copy_(torch.from_numpy(np.where(x.std(axis=0) > 1e-6, x.std(axis=0), 1.0)))
        losses = _train(module, torch.from_numpy(x), torch.from_numpy(y), task=task, epochs=epochs, lr=lr,
                        batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    module.eval()
    log.info("trained a %s head on obsm['%s'] -> obs['%s']: %d cells, final loss %.4f", task, embed_key, target,
             x.shape[0], losses[-1])
    return Head(module=module, task=task, embed_key=embed_key, target=target, in_dim=int(x.shape[1]),
                hidden=tuple(int(h) for h in hidden), classes=classes, target_mean=target_mean,
                target_std=target_std, dropout=dropout, losses=losses)


def _train(module: MLPHead, x: torch.Tensor, y: torch.Tensor, *, task: str, epochs: int, lr: float,
           batch_size: int, weight_decay: float, seed: int) -> list[float]:
    loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    losses = []
    module.train()
    for _ in range(epochs):
        total = 0.0
        for rows in torch.randperm(x.shape[0], generator=order_rng).split(batch_size):
            out = module(x[rows])
            loss = loss_fn(out, y[rows]) if task == "classification" else loss_fn(out[:, 0], y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * rows.numel()
        losses.append(total / x.shape[0])
    return losses
