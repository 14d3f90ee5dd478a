"""The memory guard of `state tx train` for the scGPT baselines: an estimate that never undercounts
what autograd keeps, and a one-line refusal when a step would not fit."""

from __future__ import annotations

import pytest
import torch

from state.tx.nn.scgpt_modules import ScGPTNet
from state.tx.train import memory_guard
from state.utils.errors import StateError


def _measured_step_bytes(cells: int, genes: int, e: int, h: int, d: int, layers: int) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass, + 16 B per weight."""
    net = ScGPTNet(vocab_size=genes + 4, pad_id=0, embsize=e, nhead=h, d_hid=d, nlayers=layers, dropout=0.2,
                   input_emb_style="continuous", n_input_bins=51, perturbation_type="genetic", pert_dim=5,
                   pert_pad_id=2).train()
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    tokens = genes + 1
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        net(torch.randint(0, genes, (cells, tokens)), torch.rand(cells, tokens),
            torch.zeros(cells, tokens, dtype=torch.long), torch.rand(cells, 5))
    return sum(storages.values()) + 16 * sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("cells", "genes", "e", "h", "d", "layers"),
                         [(16, 64, 64, 4, 64, 1), (8, 128, 64, 8, 128, 2), (12, 40, 128, 4, 256, 3),
                          (8, 64, 512, 8, 512, 2), (8, 300, 32, 2, 600, 2)])
def test_estimate_covers_what_autograd_keeps(cells, genes, e, h, d, layers):
    measured = _measured_step_bytes(cells, genes, e, h, d, layers)
    kwargs = {"embsize": e, "nhead": h, "d_hid": d, "nlayers": layers}
    estimate = memory_guard.scgpt_step_bytes(cells=cells, genes=genes, kwargs=kwargs)
    assert measured <= estimate <= 1.6 * measured


def test_shipped_scgpt_sizes_are_refused_where_they_do_not_fit(monkeypatch):
    monkeypatch.setattr(memory_guard, "available_bytes", lambda: (24 * 10**9, "available in RAM"))
    with pytest.raises(StateError) as err:
        memory_guard.check_step_memory("scgpt-genetic", {}, cells=2048, genes=64)
    line = str(err.value)
    assert "\n" not in line and "GB" in line and "24.0 GB are available in RAM" in line
    assert "model.kwargs.cell_sentence_len" in line and "model.kwargs.embsize" in line
    memory_guard.check_step_memory("scgpt-genetic", {"embsize": 32, "nlayers": 2}, cells=64, genes=64)  # fits
    memory_guard.check_step_memory("state", {}, cells=10**6, genes=10**4)  # other models: no estimate
    monkeypatch.setenv("STATE_SKIP_MEMORY_CHECK", "1")
    memory_guard.check_step_memory("scgpt-genetic", {}, cells=2048, genes=64)


def test_available_memory_is_read():
    found = memory_guard.available_bytes()
    assert found is None or (found[0] > 0 and isinstance(found[1], str))
