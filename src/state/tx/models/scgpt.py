"""``scGPT-genetic`` / ``scGPT-chemical`` baselines: one class, the perturbation encoder is the variant.

Inputs must be gene expression (``data.kwargs.embed_key=X_hvg`` with ``output_space=gene``, or no
embed key): each control cell becomes a token sequence over the model's genes (the run's
``gene_names``) plus ``<cls>``; the network (:mod:`state.tx.nn.scgpt_modules`) predicts the perturbed
expression of every gene; the loss is MSE to ``pert_cell_emb``. Cells are independent (a batch is
one set of ``cell_sentence_len`` cells). When a cell has more genes than ``max_seq_len - 1``, each
training step attends over a random subset of that many genes (prediction uses all of them).

Vocabulary and weights:
* ``pretrained_path`` null: trained from scratch; the vocabulary is ``special_tokens`` + the genes.
* ``pretrained_path`` a scGPT folder: ``vocab.json`` (token -> id) gives the gene ids (genes it lacks
  use ``pad_token``), ``args.json`` overrides ``embsize``, ``nheads``, ``d_hid``, ``nlayers``, and
  ``best_model.pt`` (read through the restricted unpickler) provides the weights whose names start
  with one of ``load_param_prefixes`` and whose shapes match.
The resolved vocabulary (``gene_token_ids``, ``vocab_size``) and sizes are stored in the
hyper-parameters, so a checkpoint rebuilds without the pretrained folder.

Optimiser: Adam(lr, weight_decay=wd) with StepLR every ``step_size_lr`` epochs; arc-state trained
it in bf16 mixed precision (``training.precision`` in training/scgpt.yaml).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from state.io.safe_load import safe_torch_load
from state.tx.models.base import PerturbationModel
from state.tx.models.zoo_common import (
    NamedCheckpointMixin,
    decoder_mse,
    flat_rows,
    lightning_optimizer_config,
)
from state.tx.nn.scgpt_modules import FLAG_PERTURBED, FLAG_UNPERTURBED, ScGPTNet, rename_pretrained_keys
from state.utils.errors import StateError

log = logging.getLogger(__name__)

PRETRAINED_FILES = ("vocab.json", "args.json", "best_model.pt")
ATTENTION_BUDGET = 2**28  # attention-score elements per forward call when predicting
ARGS_OVERRIDES = {"embsize": "embsize", "nheads": "nhead", "nhead": "nhead", "d_hid": "d_hid", "nlayers": "nlayers"}


def read_pretrained_folder(path: str | Path) -> tuple[dict[str, int], dict[str, Any]]:
    """``vocab.json`` and ``args.json`` of a pretrained scGPT folder (checked, one-line errors)."""
    folder = Path(path).expanduser()
    missing = [name for name in PRETRAINED_FILES if not (folder / name).is_file()]
    if missing:
        raise StateError(f"model.kwargs.pretrained_path={path} lacks {', '.join(missing)}",
                         hint="point it at a scGPT model folder, or set model.kwargs.pretrained_path=null to train "
                              "from scratch")
    try:
        vocab = json.loads((folder / "vocab.json").read_text())
        args = json.loads((folder / "args.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StateError(f"{folder}: vocab.json / args.json are not readable JSON ({exc})") from exc
    if not isinstance(vocab, dict) or not isinstance(args, dict):
        raise StateError(f"{folder}: vocab.json and args.json must each hold a JSON object")
    return {str(k): int(v) for k, v in vocab.items()}, args


class ScGPTPerturbationModel(NamedCheckpointMixin, PerturbationModel):
    zoo_name = "scgpt-genetic"
    honours_optimizer_choice = False  # Adam(lr, training.wd) of its own training file

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("hidden_dim", kwargs.get("embsize", 512))
        kwargs.setdefault("dropout", 0.2)
        super().__init__(**kwargs)
        genes = [str(g) for g in (self.gene_names or [])]
        if len(genes) != self.input_dim or self.output_dim != self.input_dim:
            raise StateError(
                f"scGPT reads and predicts gene expression, but the inputs have {self.input_dim} features, the "
                f"outputs {self.output_dim} and the run has {len(genes)} gene names",
                hint="use data.kwargs.embed_key=X_hvg with data.kwargs.output_space=gene (or embed_key=null)",
            )
        self.perturbation_type = str(kwargs.get("perturbation_type", "genetic")).lower()
        self.zoo_name = f"scgpt-{self.perturbation_type}"
        special = [str(t) for t in kwargs.get("special_tokens") or ["<pad>", "<cls>", "<eoc>"]]
        pad_token = str(kwargs.get("pad_token", "<pad>"))
        sizes = {k: int(kwargs.get(k, d)) for k, d in (("embsize", 512), ("nhead", 8), ("d_hid", 512), ("nlayers", 12))}
        pretrained = kwargs.get("pretrained_path")
        state_dict = None
        if kwargs.get("gene_token_ids") is not None:  # rebuilt from a checkpoint: everything is recorded
            token_ids = [int(i) for i in kwargs["gene_token_ids"]]
            vocab_size, cls_id, pad_id = int(kwargs["vocab_size"]), int(kwargs["cls_token_id"]), kwargs["pad_token_id"]
        elif pretrained:
            vocab, args = read_pretrained_folder(pretrained)
            sizes.update({ARGS_OVERRIDES[k]: int(v) for k, v in args.items() if k in ARGS_OVERRIDES})
            pad_id = vocab.get(pad_token)
            token_ids = [vocab.get(g, pad_id if pad_id is not None else 0) for g in genes]
            known = sum(g in vocab for g in genes)
            if known == 0:
                raise StateError(f"none of the {len(genes)} genes of this run is in {pretrained}/vocab.json",
                                 hint="check that var names are gene symbols, or train from scratch "
                                      "(model.kwargs.pretrained_path=null)")
            log.info("scGPT vocabulary %s: %d of %d genes known", pretrained, known, len(genes))
            vocab_size = max(vocab.values()) + 1
            cls_id = vocab.get("<cls>", pad_id if pad_id is not None else 0)
            state_dict = rename_pretrained_keys(dict(safe_torch_load(Path(pretrained) / "best_model.pt",
                                                                     what="scGPT weights")))
        else:
            vocab = {token: i for i, token in enumerate(special + [g for g in genes if g not in special])}
            token_ids = [vocab[g] for g in genes]
            vocab_size, pad_id, cls_id = len(vocab), vocab.get(pad_token), vocab.get("<cls>", 0)
        self.add_hparams({**sizes, "gene_token_ids": token_ids, "vocab_size": vocab_size, "cls_token_id": cls_id,
                          "pad_token_id": pad_id})
        self.max_seq_len = int(kwargs.get("max_seq_len", 1536))
        self.pad_value = float(kwargs.get("pad_value", 0))
        self.pert_pad_id = int(kwargs.get("pert_pad_id", 2))
        self.settings = {"wd": kwargs.get("wd", 0.0), "step_size_lr": kwargs.get("step_size_lr")}
        self.register_buffer("gene_ids", torch.tensor([cls_id, *token_ids], dtype=torch.long), persistent=False)
        self._gene_index = {g: i for i, g in enumerate(genes)}
        self.net = ScGPTNet(
            vocab_size=vocab_size, pad_id=pad_id, embsize=sizes["embsize"], nhead=sizes["nhead"],
            d_hid=sizes["d_hid"], nlayers=sizes["nlayers"], dropout=self.dropout,
            input_emb_style=str(kwargs.get("input_emb_style", "continuous")),
            n_input_bins=int(kwargs.get("n_input_bins", 51)), perturbation_type=self.perturbation_type,
            pert_dim=self.pert_dim, pert_pad_id=self.pert_pad_id,
        )
        if state_dict is not None:
            self._load_pretrained(state_dict, prefixes=kwargs.get("load_param_prefixes") or [])

    def _load_pretrained(self, state_dict: Mapping[str, torch.Tensor], *, prefixes: list[str]) -> None:
        own = self.net.state_dict()
        wanted = {k: v for k, v in state_dict.items()
                  if (not prefixes or any(k.startswith(p) for p in prefixes)) and k in own}
        fitting = {k: v for k, v in wanted.items() if tuple(v.shape) == tuple(own[k].shape)}
        self.net.load_state_dict(fitting, strict=False)
        log.info("scGPT: loaded %d pretrained tensors (%d skipped for a shape mismatch) of %d in the model",
                 len(fitting), len(wanted) - len(fitting), len(own))

    # ------------------------------------------------------------------ tokens
    def _flags(self, pert_names: list[str], n_cells: int) -> torch.Tensor:
        """[N, 1 + G] perturbation flags: pad for <cls>, 1 on the perturbed genes' tokens."""
        flags = torch.full((n_cells, len(self._gene_index)), FLAG_UNPERTURBED, dtype=torch.long)
        for row, name in enumerate(pert_names):
            for target in str(name).split("+"):
                column = self._gene_index.get(target)
                if column is not None:
                    flags[row, column] = FLAG_PERTURBED
        pad = torch.full((n_cells, 1), self.pert_pad_id, dtype=torch.long)
        return torch.cat([pad, flags], dim=1).to(self.gene_ids.device)

    def _run(self, batch: Mapping[str, Any], *, genes: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted expression [N, G'] for ``genes`` (positions in 0..G-1; all genes when None)."""
        values = flat_rows(batch, "ctrl_cell_emb", like=self.gene_ids.float())  # [N, G]
        n_cells = values.shape[0]
        names = list(batch.get("pert_name") or [""] * n_cells)
        pert = flat_rows(batch, "pert_emb", like=values)
        flags = self._flags(names, n_cells)  # [N, 1 + G]
        tokens = torch.arange(1 + values.shape[1], device=values.device)
        if genes is not None:
            tokens = torch.cat([tokens[:1], genes + 1])  # keep <cls>
        values = torch.cat([values.new_full((n_cells, 1), self.pad_value), values], dim=1)[:, tokens]
        ids = self.gene_ids[tokens].expand(n_cells, -1)
        return self.net(ids, values, flags[:, tokens], pert)[:, 1:]  # drop <cls>

    def forward(self, batch: Mapping[str, Any], padded: bool = True) -> torch.Tensor:
        """Predicted expression [N, G]; outside training in chunks of cells, so attention over all genes
        of a whole set (thousands of cells x thousands of tokens) fits in memory."""
        n_cells = len(batch["pert_emb"])
        n_tokens = 1 + len(self._gene_index)
        chunk = max(1, ATTENTION_BUDGET // (n_tokens * n_tokens * self.hparams.get("nhead", 8)))
        if self.training or n_cells <= chunk:
            return self._run(batch)
        parts = []
        for start in range(0, n_cells, chunk):
            rows = slice(start, start + chunk)
            part = {k: batch[k][rows] for k in ("ctrl_cell_emb", "pert_emb")}
            part["pert_name"] = list(batch.get("pert_name") or [""] * n_cells)[rows]
            parts.append(self._run(part))
        return torch.cat(parts)

    def _loss(self, batch: Mapping[str, Any], *, sample_genes: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE to the perturbed expression and the predictions it scored [N, G or max_seq_len - 1]."""
        target = flat_rows(batch, "pert_cell_emb", like=self.gene_ids.float())
        n_genes = target.shape[1]
        genes = None
        if sample_genes and n_genes + 1 > self.max_seq_len:
            genes = torch.randperm(n_genes, device=target.device)[: self.max_seq_len - 1].sort().values
            target = target[:, genes]
        preds = self._run(batch, genes=genes)
        return nn.functional.mse_loss(preds, target), preds

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, preds = self._loss(batch, sample_genes=True)
        n_cells = len(batch["pert_name"])
        self.log("train_loss", loss, prog_bar=True, batch_size=n_cells)
        decoder = decoder_mse(self.gene_decoder, preds, batch) if preds.shape[-1] == self.output_dim else None
        if decoder is not None:
            self.log("decoder_loss", decoder, batch_size=n_cells)
            loss = loss + decoder
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch, sample_genes=False)
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["pert_name"]), sync_dist=True)
        return loss

    def configure_optimizers(self):
        return lightning_optimizer_config(self.parameters(), lr=self.lr, weight_decay=self.settings["wd"],
                                          step_size=self.settings["step_size_lr"])
