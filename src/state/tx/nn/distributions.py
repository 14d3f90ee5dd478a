"""Expression likelihoods for the autoencoder baselines (scVI, CPA): Gaussian, NB and ZINB.

A :class:`LikelihoodHead` turns a decoder's hidden state into the parameters of one distribution
per gene; ``nll`` scores observed values, ``mean`` is the prediction. For the count likelihoods
the mean is ``softmax(...) * library`` (the cell's total), with one learned inverse dispersion
per gene, as in scVI. Values need not be integers (log-normalised inputs work), but they must be
non-negative.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from state.utils.errors import StateError

LIKELIHOODS = ("gauss", "nb", "zinb")
_EPS = 1e-8


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-cell negative log-likelihood: [N, G] inputs -> [N]."""
    return F.gaussian_nll_loss(mean, x, var, reduction="none", full=True).sum(-1)


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(x; mean mu, inverse dispersion theta), elementwise [N, G]."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    return (
        theta * (torch.log(theta + _EPS) - log_theta_mu)
        + x * (torch.log(mu + _EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB, elementwise [N, G]: a point mass at zero (weight sigmoid(zi_logits)) mixed with NB."""
    nb = nb_log_prob(x, mu, theta)
    log_pi = F.logsigmoid(zi_logits)  # log P(structural zero)
    log_not_pi = F.logsigmoid(-zi_logits)
    nb_zero = theta * (torch.log(theta + _EPS) - torch.log(theta + mu + _EPS))  # log NB(0)
    at_zero = torch.logaddexp(log_pi, log_not_pi + nb_zero)
    return torch.where(x < _EPS, at_zero, log_not_pi + nb)


class LikelihoodHead(nn.Module):
    """Hidden [N, H] -> distribution parameters over ``n_genes`` outputs."""

    def __init__(self, hidden_dim: int, n_genes: int, *, kind: str = "gauss") -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise StateError(f"unknown recon_loss '{kind}'",
                             hint=f"set model.kwargs.recon_loss to one of {', '.join(LIKELIHOODS)}")
        self.kind = kind
        self.mean = nn.Linear(hidden_dim, n_genes)
        self.register_module("var", None)
        self.register_module("zi_logits", None)
        self.register_parameter("log_theta", None)
        if kind == "gauss":
            self.var = nn.Linear(hidden_dim, n_genes)
        else:
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        if kind == "zinb":
            self.zi_logits = nn.Linear(hidden_dim, n_genes)

    def forward(self, hidden: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.kind == "gauss":
            return {"mean": self.mean(hidden), "var": F.softplus(self.var(hidden)) + 1e-4}  # [N, G] each
        if library is None:
            raise StateError(f"the {self.kind} likelihood needs each cell's library size")
        mu = torch.softmax(self.mean(hidden), dim=-1) * library  # [N, G]
        params = {"mu": mu, "theta": self.log_theta.exp().expand_as(mu)}
        if self.zi_logits is not None:
            params["zi_logits"] = self.zi_logits(hidden)
        return params

    def nll(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-cell negative log-likelihood [N]."""
        if self.kind == "gauss":
            return gaussian_nll(x, params["mean"], params["var"])
        if self.kind == "nb":
            return -nb_log_prob(x, params["mu"], params["theta"]).sum(-1)
        return -zinb_log_prob(x, params["mu"], params["theta"], params["zi_logits"]).sum(-1)

    def expected(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distribution mean [N, G] (the prediction)."""
        if self.kind == "gauss":
            return params["mean"]
        if self.kind == "zinb":
            return torch.sigmoid(-params["zi_logits"]) * params["mu"]
        return params["mu"]
