"""Amortized posteriors q(z|x): encoders that return distributions.

:class:`Encoder` is the declared interface; :class:`GaussianEncoder` (a diagonal Gaussian)
is the one the models use today. Flow posteriors plug in as further encoders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from .nn import MLP

__all__ = ["Encoder", "GaussianEncoder"]


class Encoder(nn.Module, ABC):
    """The declared amortized posterior ``q(z | x, s)``.

    ``forward(x, covs)`` takes the encoder's input (dense, or :class:`cellvi.nn.SparseRows`)
    and the covariate codes and returns a :class:`torch.distributions.Distribution` over
    ``z`` with event dimension 1, which has ``rsample``, ``log_prob``, ``mean`` and
    ``variance``.
    """

    n_latent: int

    @abstractmethod
    def forward(self, x, covs: torch.Tensor | None = None) -> Distribution:
        """``q(z | x, s)``."""


class GaussianEncoder(Encoder):
    """Diagonal Gaussian q(z | x, s) with an MLP trunk.

    Args:
        n_in: input width (genes or markers).
        n_latent: latent dimension.
        n_hidden, n_layers, dropout, norm: trunk settings (see :class:`cellvi.nn.MLP`).
        n_cats_per_cov: categorical covariates entering the encoder.
        min_scale: floor on the posterior standard deviation, for numerical stability.

    ``forward(x, covs)`` returns ``Independent(Normal(loc, scale), 1)``.
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        *,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        dropout: float = 0.1,
        norm: str | None = "batch",
        min_scale: float = 1e-4,
    ):
        super().__init__()
        self.n_latent = int(n_latent)
        self.trunk = MLP(n_in, n_hidden, n_layers, n_cats_per_cov, dropout, norm)
        self.loc = nn.Linear(n_hidden, n_latent)
        self.raw_scale = nn.Linear(n_hidden, n_latent)
        self.min_scale = min_scale

    def forward(self, x: torch.Tensor, covs: torch.Tensor | None = None) -> Independent:
        h = self.trunk(x, covs)
        scale = F.softplus(self.raw_scale(h)) + self.min_scale
        return Independent(Normal(self.loc(h), scale), 1)
