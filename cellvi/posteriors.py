"""Amortized posteriors q(z|x): encoders that return distributions.

:class:`Encoder` is the declared interface; :class:`GaussianEncoder` is a diagonal Gaussian
(``posterior="normal"``, the default) and :class:`IAFEncoder` follows it with inverse
autoregressive flow steps conditioned on the encoder's hidden state (``posterior="iaf"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    TransformedDistribution,
    constraints,
)
from torch.distributions.transforms import Transform

from .nn import MLP, dense_heads

__all__ = ["Encoder", "GaussianEncoder", "IAFEncoder", "FlowPosterior", "POSTERIORS",
           "shared_noise_draws"]

POSTERIORS = ("normal", "iaf")


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
        return self._base(self.trunk(x, covs))

    def _base(self, h: torch.Tensor) -> Independent:
        loc, raw_scale = dense_heads(h, (self.loc, self.raw_scale))
        # no argument checks: the scale is positive by construction, and a NaN from a bad
        # step reaches the loss, where training rolls back (a check would raise instead)
        scale = F.softplus(raw_scale) + self.min_scale
        return Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)


class _MADE(nn.Module):
    """One conditional autoregressive network (Germain et al. 2015): from ``z`` (and the
    encoder's hidden state ``h``) the shift and gate of each dimension, each depending on
    the dimensions before it in ``order`` only (masks built with plain integers, so the
    module can be built on the ``meta`` device)."""

    def __init__(self, n_latent: int, n_context: int, n_hidden: int, order: list[int]):
        super().__init__()
        rank = torch.empty(n_latent, dtype=torch.long, device="cpu")
        rank[torch.tensor(order, device="cpu")] = torch.arange(n_latent, device="cpu")
        hidden_rank = torch.arange(n_hidden, device="cpu") % max(1, n_latent - 1)
        self.register_buffer("mask_in", (hidden_rank[:, None] >= rank[None, :]).float())
        self.register_buffer("mask_out", (rank[:, None] > hidden_rank[None, :]).float())
        self.inp = nn.Linear(n_latent, n_hidden)
        self.context = nn.Linear(n_context, n_hidden)
        self.shift = nn.Linear(n_hidden, n_latent)
        self.gate = nn.Linear(n_hidden, n_latent)
        for layer in (self.shift, self.gate):  # start near the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(F.linear(z, self.inp.weight * self.mask_in, self.inp.bias) + self.context(h))
        shift = F.linear(a, self.shift.weight * self.mask_out, self.shift.bias)
        gate = F.linear(a, self.gate.weight * self.mask_out, self.gate.bias) + 2.0
        return shift, gate


class _IAFStep(Transform):
    """``z' = σ ⊙ z + (1 - σ) ⊙ m`` with ``(m, logit σ)`` from a :class:`_MADE` of ``z`` and
    ``h`` (the numerically stable IAF of Kingma et al. 2016); ``log |det| = Σ log σ``. The
    inverse runs ``n_latent`` autoregressive passes (only needed for values the posterior did
    not sample itself)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, made: _MADE, h: torch.Tensor):
        super().__init__(cache_size=1)
        self.made, self.h = made, h

    def _call(self, z):
        shift, gate = self.made(z, self.h)
        sigma = torch.sigmoid(gate)
        return sigma * z + (1 - sigma) * shift

    def _inverse(self, y):
        z = torch.zeros_like(y)
        for _ in range(y.shape[-1]):  # dimension i is exact after i + 1 passes
            shift, gate = self.made(z, self.h)
            sigma = torch.sigmoid(gate)
            z = (y - (1 - sigma) * shift) / sigma
        return z

    def log_abs_det_jacobian(self, z, y):
        _, gate = self.made(z, self.h)
        return F.logsigmoid(gate).sum(-1)

    def detached(self) -> _IAFStep:
        """The same step, its conditioning state cut from the encoder's graph (and cache)."""
        return _IAFStep(self.made, self.h.detach())


class FlowPosterior(TransformedDistribution):
    """A diagonal Gaussian pushed through conditioned IAF steps. ``mean`` is the image of
    the base mean (a point estimate, used as the latent); ``variance`` a 64-sample Monte
    Carlo estimate."""

    arg_constraints: dict = {}

    @property
    def mean(self) -> torch.Tensor:
        z = self.base_dist.mean
        for t in self.transforms:
            z = t(z)
        return z

    @property
    def variance(self) -> torch.Tensor:
        with torch.no_grad():
            return self.sample((64,)).var(0)

    def with_base(self, base: Independent) -> FlowPosterior:
        """The same conditioned flow steps on another base Gaussian (per-cell refinement),
        cut from the encoder's graph."""
        return FlowPosterior(base, [t.detached() for t in self.transforms])


def shared_noise_draws(qz: Independent | FlowPosterior, n_samples: int,
                       seed: int | None = None) -> torch.Tensor:
    """``n_samples`` draws of each cell's posterior, ``(n_samples, cells, n_latent)``, made
    from one set of standard-normal draws shared by all cells (``loc + scale * eps``, then
    the flow steps): a cell's draws depend on its own posterior and the random state only,
    not on which other cells are in the call or where it stands among them. Each cell's
    draws still follow its ``q(z | x)``; the cells' Monte Carlo errors are correlated. The
    noise comes from ``seed`` when given (the same in every call with it), else from torch's
    random state."""
    flow = isinstance(qz, FlowPosterior)
    base = qz.base_dist if flow else qz
    normal = base.base_dist if isinstance(base, Independent) else base
    loc, scale = normal.loc, normal.scale
    generator = None if seed is None else torch.Generator(device=loc.device).manual_seed(int(seed))
    eps = torch.randn((n_samples, *([1] * (loc.dim() - 1)), loc.shape[-1]),
                      dtype=loc.dtype, device=loc.device, generator=generator)
    z = loc + scale * eps
    if flow:
        for t in qz.transforms:
            z = t(z)
    return z


class IAFEncoder(GaussianEncoder):
    """``q(z | x, s)``: the :class:`GaussianEncoder`'s diagonal Gaussian followed by
    ``n_flows`` inverse autoregressive steps conditioned on the trunk's hidden state, a
    posterior that can be skewed and correlated. Same arguments as
    :class:`GaussianEncoder`, plus ``n_flows``; returns a :class:`FlowPosterior`."""

    def __init__(self, n_in: int, n_latent: int, *, n_flows: int = 2, n_hidden: int = 128,
                 **kwargs):
        super().__init__(n_in, n_latent, n_hidden=n_hidden, **kwargs)
        orders = [list(range(n_latent)) if i % 2 == 0 else list(range(n_latent))[::-1]
                  for i in range(n_flows)]
        self.flows = nn.ModuleList(_MADE(n_latent, n_hidden, n_hidden, o) for o in orders)

    def forward(self, x: torch.Tensor, covs: torch.Tensor | None = None) -> FlowPosterior:
        h = self.trunk(x, covs)
        return FlowPosterior(self._base(h), [_IAFStep(made, h) for made in self.flows])
