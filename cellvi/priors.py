"""Priors p(z) as modules that return :mod:`torch.distributions` objects."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, Normal

__all__ = ["StandardNormal"]


class StandardNormal(nn.Module):
    """p(z) = N(0, I) in ``n_latent`` dimensions (buffers follow the module's device)."""

    def __init__(self, n_latent: int):
        super().__init__()
        self.n_latent = n_latent
        self.register_buffer("loc", torch.zeros(n_latent))
        self.register_buffer("scale", torch.ones(n_latent))

    def forward(self) -> Independent:
        return Independent(Normal(self.loc, self.scale), 1)
