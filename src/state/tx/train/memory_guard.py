"""Refuse a training step that cannot fit in memory, before anything is written.

The scGPT baselines as shipped (12 layers of width 512, 2,048 cells x every gene token per step)
need tens of GB of activations for one step; on a laptop the kernel kills the process without a
word. The estimate below counts what autograd keeps for the backward pass of
:class:`state.tx.nn.scgpt_modules.ScGPTNet` (floats per token: ~12 x embsize outside the layers and
14 x embsize + 4 x d_hid + 3 x nhead x tokens per layer, measured with saved-tensor hooks; the
test checks that it never underestimates) plus weights, gradients and Adam's two moments.
Set ``STATE_SKIP_MEMORY_CHECK=1`` to train anyway (swap, or a memory figure this check misreads).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from state.utils.errors import StateError

log = logging.getLogger(__name__)

SCGPT_SIZES = {"embsize": 512, "nhead": 8, "d_hid": 512, "nlayers": 12, "max_seq_len": 1536}


def scgpt_step_bytes(*, cells: int, genes: int, kwargs: Mapping[str, Any]) -> int:
    """Bytes one scGPT training step needs: saved activations + weights, gradients and Adam state."""
    size = {k: int(kwargs.get(k) or d) for k, d in SCGPT_SIZES.items()}
    e, h, d, n_layers = size["embsize"], size["nhead"], size["d_hid"], size["nlayers"]
    tokens = 1 + min(genes, size["max_seq_len"] - 1)  # <cls> + the genes (sampled above max_seq_len)
    per_token = 12 * e + n_layers * (14 * e + 4 * d + 3 * h * tokens)
    params = n_layers * (4 * e * e + 2 * e * d) + 5 * e * e + (genes + 8) * e  # layers + encoders, decoder
    return 4 * cells * tokens * per_token + 16 * params


def available_bytes() -> tuple[int, str] | None:
    """Memory a step can use now, and where it lives: the CUDA device's free memory, else the
    machine's (MemAvailable, capped by a cgroup limit). None when it cannot be told."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free), "free on the GPU"
    except Exception:  # a broken CUDA set-up is reported by Lightning later, not here
        pass
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        free = info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            free = min(free, int(limit))
    except OSError:
        pass
    return free, "available in RAM"


def check_step_memory(model_name: str, model_kwargs: Mapping[str, Any], *, cells: int, genes: int) -> None:
    """One-line refusal when a training step of ``model_name`` would not fit (scGPT baselines only)."""
    if not str(model_name).lower().startswith("scgpt") or os.environ.get("STATE_SKIP_MEMORY_CHECK") == "1":
        return
    found = available_bytes()
    if found is None:
        return
    free, where = found
    need = scgpt_step_bytes(cells=cells, genes=genes, kwargs=model_kwargs)
    if need <= free:
        log.info("memory check: a training step needs ~%.1f GB, %.1f GB %s", need / 1e9, free / 1e9, where)
        return
    raise StateError(
        f"one {model_name} training step needs ~{need / 1e9:.1f} GB ({cells} cells x {1 + genes} tokens, "
        f"embsize={model_kwargs.get('embsize', 512)}, nlayers={model_kwargs.get('nlayers', 12)}) but only "
        f"{free / 1e9:.1f} GB are {where}",
        hint="shrink model.kwargs.cell_sentence_len, model.kwargs.embsize, model.kwargs.nlayers, model.kwargs.d_hid "
             "or model.kwargs.max_seq_len (or set STATE_SKIP_MEMORY_CHECK=1 to try anyway)",
    )
