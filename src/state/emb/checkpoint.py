"""Load an SE checkpoint for inference, safely.

Everything goes through :func:`state.io.safe_load.safe_torch_load` (no code from the file runs).
The architecture is read from state-dict shapes (only ``nhead`` comes from the hyper-parameters or
config), old ``nn.TransformerEncoder`` / ``torch.compile`` keys are remapped, and the frozen gene
table is rebuilt from the resolved protein-embedding dict.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from state.emb.nn.model import SEArchitecture, StateEmbeddingNet
from state.io.safe_load import placeholder_to_plain, safe_torch_load
from state.utils.errors import StateError

log = logging.getLogger(__name__)

_TX_RUN_FILES = ("var_dims.pkl", "data_module.torch", "pert_onehot_map.pt", "cell_type_onehot_map.torch")
_TX_KEY_PREFIXES = ("pert_encoder.", "basal_encoder.", "transformer_backbone.", "project_out.", "gene_decoder.")
_SE_REQUIRED_KEYS = ("cls_token", "encoder.0.weight", "decoder.1.weight")
_LEGACY_ATTENTION_KEYS = {
    "self_attn.in_proj_weight": "qkv_proj.weight",
    "self_attn.in_proj_bias": "qkv_proj.bias",
    "self_attn.out_proj.weight": "out_proj.weight",
    "self_attn.out_proj.bias": "out_proj.bias",
}


@dataclass
class LoadedSE:
    """An SE model ready for inference plus what the tokenizer needs."""

    model: StateEmbeddingNet
    cfg: DictConfig
    vocab: list[str]
    checkpoint_path: Path
    protein_source: str
    device: torch.device
    gene_to_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.gene_to_index = {name: i for i, name in enumerate(self.vocab)}

    @property
    def arch(self) -> SEArchitecture:
        return self.model.arch

    @property
    def pad_length(self) -> int:
        return int(self.cfg.dataset.pad_length)

    @property
    def cls_token_idx(self) -> int:
        return int(self.cfg.dataset.cls_token_idx)

    @property
    def default_batch_size(self) -> int:
        return int(self.cfg.model.batch_size)


# ---------------------------------------------------------------------------------------------- paths
def is_tx_run_dir(folder: Path) -> list[str]:
    """Names of the files that mark ``folder`` as a State Transition run directory (empty if none)."""
    marks = [name for name in _TX_RUN_FILES if (folder / name).exists()]
    if marks and (folder / "checkpoints").is_dir():
        marks.append("checkpoints/")
    return marks


def resolve_checkpoint_path(model_folder: str | os.PathLike | None, checkpoint: str | os.PathLike | None) -> Path:
    """``--checkpoint`` wins; otherwise a deterministic choice among ``<model_folder>/*.ckpt``.

    arc-state takes the last entry of an unsorted glob (filesystem order). We sort by name and take
    the last, which is the same file whenever the folder holds one checkpoint, and log the choice.
    """
    if model_folder is None and checkpoint is None:
        raise StateError("no SE model given", hint="pass --model-folder DIR or --checkpoint FILE")
    if model_folder is not None:
        folder = Path(model_folder)
        if not folder.is_dir():
            raise StateError(f"model folder not found: {folder}", hint="pass an existing folder with *.ckpt")
        marks = is_tx_run_dir(folder)
        if marks:
            raise StateError(
                f"{folder} is a State Transition (tx) run directory ({', '.join(marks)}), not an SE model folder",
                hint="use `state tx infer --model-dir` for tx runs; `state emb transform` needs an SE checkpoint",
            )
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise StateError(f"checkpoint not found: {path}", hint="check the --checkpoint path")
        return path
    candidates = sorted(folder.glob("*.ckpt"))
    if not candidates:
        raise StateError(f"no *.ckpt file in model folder {folder}", hint="pass --checkpoint FILE")
    chosen = candidates[-1]
    if len(candidates) > 1:
        log.info(
            "model folder %s holds %d checkpoints; using %s (last in name order; pass --checkpoint to choose)",
            folder, len(candidates), chosen.name,
        )
    else:
        log.info("using checkpoint %s", chosen)
    return chosen


# ---------------------------------------------------------------------------------------------- config
def load_se_config(ckpt: dict, *, config_path: str | os.PathLike | None = None, source: Path) -> DictConfig:
    """``--config`` > top-level ``cfg_yaml`` > ``hyper_parameters.cfg_yaml`` > ``hyper_parameters.cfg``."""
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise StateError(f"config file not found: {path}", hint="check the --config path")
        cfg = OmegaConf.load(path)
        origin = str(path)
    else:
        hparams = ckpt.get("hyper_parameters") or {}
        if isinstance(ckpt.get("cfg_yaml"), str):
            cfg, origin = OmegaConf.create(ckpt["cfg_yaml"]), "checkpoint cfg_yaml"
        elif isinstance(hparams.get("cfg_yaml"), str):
            cfg, origin = OmegaConf.create(hparams["cfg_yaml"]), "checkpoint hyper_parameters.cfg_yaml"
        elif isinstance(plain := placeholder_to_plain(hparams.get("cfg")), dict) and plain:
            cfg, origin = OmegaConf.create(plain), "checkpoint hyper_parameters.cfg"
        else:
            raise StateError(f"{source} holds no training config", hint="pass --config with the SE training YAML")
    if not isinstance(cfg, DictConfig):
        raise StateError(f"config from {origin} is not a mapping", hint="pass --config with the SE training YAML")
    missing = [
        key
        for key in ("dataset.pad_length", "dataset.cls_token_idx", "model.batch_size")
        if OmegaConf.select(cfg, key, default=None) is None
    ]
    if missing:
        raise StateError(f"config from {origin} lacks {', '.join(missing)}", hint="pass --config with these keys")
    log.debug("SE config from %s", origin)
    return cfg


# ---------------------------------------------------------------------------------------------- weights
def remap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``torch.compile``'s ``_orig_mod.`` and rename ``nn.TransformerEncoder`` attention keys."""
    out = {}
    for key, value in state_dict.items():
        new = key.replace("_orig_mod.", "")
        for old_suffix, new_suffix in _LEGACY_ATTENTION_KEYS.items():
            if new.endswith(old_suffix) and ".layers." in new:
                new = new[: -len(old_suffix)] + new_suffix
        out[new] = value
    return out


def check_se_state_dict(state_dict: dict[str, Any], source: Path) -> None:
    if all(key in state_dict for key in _SE_REQUIRED_KEYS):
        return
    if any(key.startswith(_TX_KEY_PREFIXES) for key in state_dict):
        raise StateError(
            f"{source} is a State Transition (tx) checkpoint, not an SE checkpoint",
            hint="use it with `state tx ...`; `state emb` needs an SE model",
        )
    raise StateError(
        f"{source} does not look like an SE checkpoint (no {', '.join(_SE_REQUIRED_KEYS)} in its state_dict)",
        hint="pass a checkpoint written by `state emb fit`",
    )


def infer_architecture(state_dict: dict[str, torch.Tensor], *, nhead: int, num_datasets_hint: int = 1) -> SEArchitecture:
    """Sizes from tensor shapes; ``nhead`` cannot be read from shapes."""
    token_dim = state_dict["cls_token"].shape[1]
    d_model, _ = state_dict["encoder.0.weight"].shape
    output_dim = state_dict["decoder.1.weight"].shape[0]
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))}
    d_hid = state_dict["transformer_encoder.layers.0.linear1.weight"].shape[0] if layer_ids else d_model
    dataset_correction = "dataset_token" in state_dict
    counts = "bin_encoder.weight" in state_dict
    if "binary_decoder.2.weight" in state_dict:
        z_dim = state_dict["binary_decoder.2.weight"].shape[1] - output_dim - d_model
        rda = z_dim - (10 if dataset_correction else 0) == 1
    else:
        rda = True
    ds_head = state_dict.get("dataset_encoder.4.weight")
    num_datasets = ds_head.shape[0] if ds_head is not None else num_datasets_hint
    return SEArchitecture(
        token_dim=int(token_dim), d_model=int(d_model), nhead=int(nhead), d_hid=int(d_hid),
        nlayers=len(layer_ids), output_dim=int(output_dim), num_datasets=int(num_datasets),
        counts=counts, rda=rda, dataset_correction=dataset_correction, dropout=0.0,
    )


def _nhead(hparams: dict, cfg: DictConfig, d_model: int, source: Path) -> int:
    nhead = hparams.get("nhead") or OmegaConf.select(cfg, "model.nhead", default=None)
    if not nhead:
        raise StateError(f"{source}: number of attention heads unknown", hint="pass --config with model.nhead")
    if d_model % int(nhead):
        raise StateError(f"{source}: d_model {d_model} is not divisible by nhead {nhead}", hint="fix model.nhead")
    return int(nhead)


def build_model_from_state_dict(
    state_dict: dict[str, torch.Tensor], *, nhead: int, source: Path
) -> StateEmbeddingNet:
    """Create a :class:`StateEmbeddingNet` matching ``state_dict`` and load the weights into it."""
    state_dict = remap_state_dict(state_dict)
    check_se_state_dict(state_dict, source)
    arch = infer_architecture(state_dict, nhead=nhead)
    model = StateEmbeddingNet(arch)
    weights = {k: v for k, v in state_dict.items() if k != "pe_embedding.weight"}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("gene_embedding_layer.")]
    embedding_path = [k for k in missing if not k.startswith(("binary_decoder.", "dataset_encoder."))]
    if embedding_path:
        raise StateError(f"{source} lacks weights {', '.join(embedding_path[:5])}", hint="re-export the checkpoint")
    if missing:
        log.warning("%s lacks training-head weights (%s); embeddings are unaffected", source, ", ".join(missing[:3]))
    if unexpected:
        log.debug("ignored checkpoint keys: %s", ", ".join(unexpected[:10]))
    return model


# ---------------------------------------------------------------------------------------------- genes
def _as_gene_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise StateError(f"protein embeddings from {source} are not a non-empty dict gene -> vector",
                         hint="pass --protein-embeddings with a .pt dict")
    out = {}
    for name, vec in obj.items():
        tensor = torch.as_tensor(vec).float().reshape(-1)
        out[str(name)] = tensor
    return out


def resolve_protein_embeddings(
    *,
    protein_embeddings: str | os.PathLike | None,
    model_folder: str | os.PathLike | None,
    ckpt: dict,
    cfg: DictConfig,
) -> tuple[dict[str, torch.Tensor], str]:
    """First match wins: flag, folder/protein_embeddings.pt, last folder/protein_embeddings*.pt,
    the checkpoint's ``protein_embeds_dict``, then ``embeddings[current].all_embeddings``."""
    if protein_embeddings is not None:
        path = Path(protein_embeddings)
        return _as_gene_dict(safe_torch_load(path, what="protein embeddings"), str(path)), str(path)
    if model_folder is not None:
        folder = Path(model_folder)
        exact = folder / "protein_embeddings.pt"
        candidates = [exact] if exact.is_file() else sorted(folder.glob("protein_embeddings*.pt"))[-1:]
        for path in candidates:
            try:
                return _as_gene_dict(safe_torch_load(path, what="protein embeddings"), str(path)), str(path)
            except StateError as exc:  # arc-state only warns here and falls through
                log.warning("could not load %s (%s); trying the next source", path, exc)
    if isinstance(ckpt.get("protein_embeds_dict"), dict) and ckpt["protein_embeds_dict"]:
        return _as_gene_dict(ckpt["protein_embeds_dict"], "checkpoint"), "checkpoint protein_embeds_dict"
    current = OmegaConf.select(cfg, "embeddings.current", default=None)
    path = OmegaConf.select(cfg, f"embeddings.{current}.all_embeddings", default=None) if current else None
    if path and Path(path).is_file():
        return _as_gene_dict(safe_torch_load(path, what="protein embeddings"), path), path
    raise StateError(
        "no protein embeddings found (flag, model folder, checkpoint and config all lack them"
        + (f"; config path {path} does not exist)" if path else ")"),
        hint="pass --protein-embeddings FILE.pt",
    )


# ---------------------------------------------------------------------------------------------- entry point
def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_se_model(
    *,
    model_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    protein_embeddings: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> LoadedSE:
    """Load an SE checkpoint for inference (eval mode, dropout 0; bf16 weights on CUDA as arc-state)."""
    path = resolve_checkpoint_path(model_folder, checkpoint)
    ckpt = safe_torch_load(path, what="SE checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise StateError(f"{path} has no state_dict", hint="pass a Lightning checkpoint written by `state emb fit`")
    state_dict = remap_state_dict(ckpt["state_dict"])
    check_se_state_dict(state_dict, path)
    cfg = load_se_config(ckpt, config_path=config, source=path)
    hparams = ckpt.get("hyper_parameters") or {}
    nhead = _nhead(hparams if isinstance(hparams, dict) else {}, cfg, state_dict["encoder.0.weight"].shape[0], path)
    model = build_model_from_state_dict(state_dict, nhead=nhead, source=path)
    genes, source = resolve_protein_embeddings(
        protein_embeddings=protein_embeddings, model_folder=model_folder, ckpt=ckpt, cfg=cfg
    )
    widths = {v.numel() for v in genes.values()}
    if widths != {model.arch.token_dim}:
        raise StateError(
            f"protein embeddings from {source} have width {sorted(widths)}, the checkpoint expects {model.arch.token_dim}",
            hint="pass the protein embeddings the model was trained with (--protein-embeddings)",
        )
    model.set_gene_table(torch.stack(list(genes.values())))
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval()
    log.info(
        "SE model %s: d_model %d, %d layers, output %d (+%d), vocabulary %d genes from %s, device %s",
        path.name, model.arch.d_model, model.arch.nlayers, model.arch.output_dim,
        model.arch.embedding_width - model.arch.output_dim, len(genes), source, device,
    )
    return LoadedSE(model=model, cfg=cfg, vocab=list(genes), checkpoint_path=path, protein_source=source,
                    device=device)
