"""A trained tx run, ready to predict sets of cells: the model plus its vocabularies.

Used by ``infer`` (and the Python API). It reads our run directories and arc-state's alike,
always through the restricted unpickler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from state.io.columns import RunColumns
from state.tx.config.architecture import trained_set_length
from state.utils.device import batch_to_device, inference_device
from state.utils.errors import StateError

log = logging.getLogger(__name__)


@dataclass
class SetPredictor:
    module: Any  # TransitionInferenceModel (state runs) or a tx LightningModule, in eval mode
    pert_map: dict[str, np.ndarray]
    batch_map: dict[str, np.ndarray] | None
    control_pert: str | None
    cell_type_key: str | None
    batch_col: str | None
    cell_set_len: int
    output_space: str
    input_dim: int | None
    model_embed_key: str | None
    genes: list[str] | None = None  # the model's input gene order, when its input is .X
    checkpoint: Path | None = None  # the file the module was loaded from
    combinations: Any = None  # state.tx.combinations.Combinations when labels are encoded from their parts
    _batch_lookup: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_map:
            self._batch_lookup = {k: int(np.argmax(v)) for k, v in self.batch_map.items()}

    @property
    def pert_names(self) -> list[str]:
        return list(self.pert_map)

    @property
    def run_columns(self) -> RunColumns:
        """The roles the run remembers, for :func:`state.io.columns.resolve_columns`."""
        return RunColumns(control_pert=self.control_pert, cell_type_key=self.cell_type_key,
                          batch_col=self.batch_col, needs_batch=self.uses_batch)

    @property
    def uses_batch(self) -> bool:
        return bool(self.module.hparams.get("batch_encoder", False)) and getattr(
            self.module, "batch_encoder", None
        ) is not None

    def batch_indices(self, labels: np.ndarray) -> np.ndarray:
        unknown = sorted(set(labels) - set(self._batch_lookup))
        if unknown:
            log.warning("%d batch label(s) unknown to the model map to batch 0: %s", len(unknown),
                        ", ".join(unknown[:5]))
        return np.array([self._batch_lookup.get(lab, 0) for lab in labels], dtype=np.int64)

    def pert_vector(self, name: str) -> np.ndarray:
        if self.combinations is not None and name not in self.pert_map and self.composable(name):
            from state.tx.combinations import compose

            return compose(name, self.pert_map, self.combinations)
        vec = self.pert_map.get(name)
        if vec is None:
            vec = self.pert_map.get(str(self.control_pert)) if self.control_pert is not None else None
        if vec is None:
            vec = np.zeros(len(next(iter(self.pert_map.values()))), dtype=np.float32)
            vec[0] = 1.0
        return vec

    def composable(self, name: str) -> bool:
        """A combination never seen in training whose every part the model knows."""
        from state.tx.combinations import unknown_parts

        return self.combinations is not None and not unknown_parts(name, self.pert_map, self.combinations)

    def check_input_width(self, width: int, *, embed_key: str | None) -> None:
        if self.input_dim is not None and width != self.input_dim:
            source = f"obsm['{embed_key}']" if embed_key else ".X"
            raise StateError(
                f"input features {source} have {width} columns but the model expects {self.input_dim}",
                hint=f"pass --embed-key {self.model_embed_key}" if self.model_embed_key and not embed_key
                else "use the same features (genes / embedding) the model was trained on",
            )

    def align_genes(self, adata):
        """Input genes in the model's order: reorder (and drop extras) when needed, refuse missing ones."""
        import pandas as pd

        genes = self.genes
        if self.model_embed_key or not genes or self.input_dim is None or len(genes) != self.input_dim:
            return adata  # the model reads an embedding, or its gene list does not describe its input
        candidates = [adata.var_names.astype(str)]
        if "gene_name" in adata.var.columns:
            candidates.append(pd.Index(adata.var["gene_name"].astype(str)))
        names = max(candidates, key=lambda idx: len(set(idx) & set(genes)))
        if list(names) == genes:
            return adata
        missing = [g for g in genes if g not in set(names)]
        if missing:
            raise StateError(
                f"{len(missing)} of the model's {len(genes)} genes are missing from the input "
                f"(e.g. {', '.join(missing[:10])})",
                hint="use the genes the model was trained on (listed in vocab/genes.tsv of the run directory)",
            )
        if names.duplicated().any():
            raise StateError(f"the input has duplicated gene names (e.g. {names[names.duplicated()][0]})",
                             hint="make gene names unique (adata.var_names_make_unique())")
        log.info("input genes reordered to the model's gene order (%d genes, %d extra dropped)",
                 len(genes), len(names) - len(genes))
        return adata[:, names.get_indexer(genes)].copy()

    def predict_sets(self, *, ctrl, pert, batch, pert_names, own=None, cell_types=None):
        """Predict B independent sets: ctrl/own [B,S,D], pert [B,S,P], batch [B,S] or None.

        Returns (preds [B,S,O], decoded counts [B,S,G] or None).
        """
        fast = getattr(self.module, "predict_sets", None)
        if fast is not None:
            return fast(ctrl=ctrl, pert=pert, batch=batch, pert_names=pert_names)
        preds, counts = [], []
        for i in range(ctrl.shape[0]):
            set_size = ctrl.shape[1]
            item = {
                "ctrl_cell_emb": torch.from_numpy(np.ascontiguousarray(ctrl[i])),
                "pert_emb": torch.from_numpy(np.ascontiguousarray(pert[i], dtype=np.float32)),
                "pert_name": [pert_names[i]] * set_size,
            }
            if own is not None:
                item["pert_cell_emb"] = torch.from_numpy(np.ascontiguousarray(own[i]))
            if cell_types is not None:
                item["cell_type"] = [str(c) for c in cell_types[i]]
            if batch is not None:
                item["batch"] = torch.from_numpy(np.ascontiguousarray(batch[i]))
            out = self.module.predict_step(batch_to_device(item, self.module.device), 0, padded=False)
            preds.append(out["preds"].float().cpu().numpy())
            decoded = out.get("pert_cell_counts_preds")
            counts.append(None if decoded is None else decoded.float().cpu().numpy())
        stacked = np.stack(preds)
        has_counts = all(c is not None for c in counts)
        return stacked, (np.stack(counts) if has_counts else None)


def load_predictor(model_dir: str | Path, checkpoint: str | Path | None = None) -> SetPredictor:
    """Load a run directory (ours or arc-state's) and a checkpoint for inference.

    ``checkpoint``: None (``final.ckpt``), a name in the run (``best``, ``last.ckpt``) or a path;
    see :func:`state.tx.rundir.checkpoint_path`.
    """
    from state.tx.models.registry import load_inference_module
    from state.tx.rundir import INFER_CHECKPOINT, checkpoint_path, load_run_dir, refuse_se_folder

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise StateError(f"--model-dir {model_dir} is not a folder", hint="pass the run directory written by train")
    refuse_se_folder(model_dir)
    run = load_run_dir(model_dir)
    ckpt = checkpoint_path(model_dir, checkpoint, default=INFER_CHECKPOINT)
    module = load_inference_module(ckpt, model_name=((run.config or {}).get("model") or {}).get("name"))
    module.to(inference_device())
    module.eval()
    hp = module.hparams
    data_kwargs = run.config.get("data", {}).get("kwargs", {}) if run.config else {}
    cell_set_len = trained_set_length(hp, (run.config or {}).get("model"))
    return SetPredictor(
        module=module,
        pert_map={str(k): np.asarray(v, dtype=np.float32) for k, v in run.pert_map.items()},
        batch_map={str(k): np.asarray(v, dtype=np.float32) for k, v in run.batch_map.items()} if run.batch_map else None,
        control_pert=hp.get("control_pert") or data_kwargs.get("control_pert"),
        cell_type_key=data_kwargs.get("cell_type_key"),
        batch_col=data_kwargs.get("batch_col"),
        cell_set_len=cell_set_len,
        output_space=str(hp.get("output_space") or data_kwargs.get("output_space") or "gene"),
        input_dim=int(hp["input_dim"]) if hp.get("input_dim") is not None else None,
        model_embed_key=hp.get("embed_key") or data_kwargs.get("embed_key"),
        genes=[str(g) for g in run.genes] or None,
        checkpoint=ckpt,
        combinations=_combinations(run.config, hp),
    )


def _combinations(config: dict | None, hparams: Any):
    from state.tx.combinations import settings, settings_from_hparams

    found = settings_from_hparams(dict(hparams))
    if found is None and config:
        cfg_model, cfg_data = config.get("model") or {}, config.get("data") or {}
        found = settings(cfg_model.get("kwargs"), cfg_data.get("kwargs"), control=hparams.get("control_pert"))
    return found
