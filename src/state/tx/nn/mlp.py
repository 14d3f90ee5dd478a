"""Small MLP helpers shared by the tx models.

The layer layout is part of the checkpoint format: ``build_mlp`` must place its Linear layers at
indices 0, 3, 6, ... so that arc-state checkpoints load unchanged.
"""

from __future__ import annotations

from torch import nn

from state.utils.errors import StateError

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation_class(name: str) -> type[nn.Module]:
    """The activation module class for a config name such as ``gelu`` (case-insensitive)."""
    key = str(name).lower().replace("_", "")
    if key not in _ACTIVATIONS:
        raise StateError(
            f"unknown activation '{name}'",
            hint=f"set model.kwargs.activation to one of {', '.join(sorted(_ACTIVATIONS))}",
        )
    return _ACTIVATIONS[key]


def build_mlp(
    in_dim: int,
    out_dim: int,
    *,
    hidden_dim: int,
    n_layers: int,
    dropout: float = 0.0,
    activation: type[nn.Module] = nn.GELU,
) -> nn.Sequential:
    """An MLP as a ``Sequential``.

    ``n_layers == 1`` gives a single Linear at index 0. ``n_layers == k > 1`` gives
    ``[Linear, act, Dropout] * (k - 1) + [Linear]``, i.e. Linear layers at 0, 3, ..., 3(k-1).
    """
    if n_layers < 1:
        raise StateError(f"an MLP needs at least one layer, got n_layers={n_layers}")
    if n_layers == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    layers: list[nn.Module] = []
    width_in = in_dim
    for _ in range(n_layers - 1):
        layers += [nn.Linear(width_in, hidden_dim), activation(), nn.Dropout(dropout)]
        width_in = hidden_dim
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)
