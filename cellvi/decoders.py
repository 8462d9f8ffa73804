"""Decoders p(x | z, s) that return distributions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, StudentT

from .distributions import (
    CellLikelihood,
    Factorized,
    NegativeBinomial,
    Poisson,
    SoftmaxNegativeBinomial,
    ZeroInflatedNegativeBinomial,
)
from .errors import InvalidInputError
from .nn import MLP, CovariateEmbedding, dense_heads
from .nn import addmm as nn_addmm

__all__ = ["Decoder", "CountDecoder", "ContinuousDecoder", "LIKELIHOODS", "CONTINUOUS_LIKELIHOODS",
           "DISPERSIONS"]


class Decoder(nn.Module, ABC):
    """The declared likelihood head ``p(x | z, s)``.

    ``forward(z, covs, log_library)`` returns a :class:`cellvi.distributions.CellLikelihood`
    (per-cell log-probabilities); ``z`` may carry sample dimensions in front (IWAE).
    ``log_library`` is the ``(cells, 1)`` log library size, used by count decoders and
    ignored by the others. ``init_batch_offsets`` starts the per-batch offsets at values
    computed from the data.
    """

    @abstractmethod
    def forward(self, z: torch.Tensor, covs: torch.Tensor | None = None,
                log_library: torch.Tensor | None = None) -> CellLikelihood:
        """``p(x | z, s)``."""

    @torch.no_grad()
    def init_batch_offsets(self, offsets) -> None:
        """Start the per-batch output offsets (one array per covariate) at given values."""
        for emb, values in zip(self.batch_offset.embeddings, offsets, strict=True):
            emb.weight.copy_(torch.as_tensor(values, dtype=emb.weight.dtype))

LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")
CONTINUOUS_LIKELIHOODS = ("normal", "studentt")


class CountDecoder(Decoder):
    """Decoder for counts: ``log mu = log_softmax(f(z, s)) + log library``.

    The softmax output is the cell's expression *proportions* over genes; the observed
    library size enters as an offset, so ``mu`` sums to the library size.

    Args:
        n_latent: latent dimension.
        n_genes: number of genes.
        likelihood: ``"nb"``, ``"zinb"`` or ``"poisson"``.
        dispersion: ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"``
            (one per gene and category of the first covariate).
        n_cats_per_cov: categorical covariates entering the decoder.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        *,
        likelihood: str = "nb",
        dispersion: str = "gene",
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        dropout: float = 0.0,
        norm: str | None = "batch",
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise InvalidInputError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if dispersion not in DISPERSIONS:
            raise InvalidInputError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
        if dispersion == "gene-batch" and not n_cats_per_cov:
            raise InvalidInputError("dispersion='gene-batch' needs a batch covariate (batch_key=...)")
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.trunk = MLP(n_latent, n_hidden, n_layers, n_cats_per_cov, dropout, norm)
        self.logits = nn.Linear(n_hidden, n_genes)
        # A per-gene log-fold change for each batch category, added to the output logits: a
        # multiplicative batch effect is then explained without any help from z.
        self.batch_offset = CovariateEmbedding(n_cats_per_cov, n_genes)
        self.gate = nn.Linear(n_hidden, n_genes) if likelihood == "zinb" else None
        if likelihood != "poisson":
            n_rows = n_cats_per_cov[0] if dispersion == "gene-batch" else 1
            self.log_theta = nn.Parameter(torch.randn(n_rows, n_genes) * 0.1 + 1.0)

    def proportions(self, z: torch.Tensor, covs: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized expression (rows sum to one), the denoised expression profile."""
        return torch.softmax(self._logits(self.trunk(z, covs), covs), dim=-1)

    def _logits(self, h: torch.Tensor, covs: torch.Tensor | None) -> torch.Tensor:
        offsets = self.batch_offset
        if h.dim() == 2 and covs is not None and offsets.embeddings:
            # the per-batch offsets as rows of one matrix product with the one-hot codes:
            # no gathered (cells x genes) offset block to add (and to back-propagate)
            one_hot = torch.cat([F.one_hot(covs[:, i], n).to(h.dtype)
                                 for i, n in enumerate(offsets.n_cats_per_cov)], 1)
            weight = torch.cat([self.logits.weight.t(), *(e.weight for e in offsets.embeddings)])
            return nn_addmm(self.logits.bias, torch.cat([h, one_hot], 1), weight)
        if h.dim() == 2:
            return nn_addmm(self.logits.bias, h, self.logits.weight.t()) + offsets(covs)
        return self.logits(h) + offsets(covs)

    def theta(self, covs: torch.Tensor | None) -> torch.Tensor:
        if self.dispersion == "gene-batch":
            return self.log_theta[covs[..., 0]].exp()
        return self.log_theta[0].exp()

    def forward(
        self, z: torch.Tensor, covs: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
    ) -> NegativeBinomial | ZeroInflatedNegativeBinomial | Poisson:
        if log_library is None:
            raise InvalidInputError("a count decoder needs the cells' log library sizes (log_library)")
        h = self.trunk(z, covs)
        logits = self._logits(h, covs)
        if self.likelihood == "nb":
            return SoftmaxNegativeBinomial(logits, log_library, self.theta(covs))
        log_mu = torch.log_softmax(logits, dim=-1) + log_library
        if self.likelihood == "poisson":
            return Poisson(log_mu)
        theta = self.theta(covs)
        if self.likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(log_mu, theta, self.gate(h))
        return NegativeBinomial(log_mu, theta)


class ContinuousDecoder(Decoder):
    """Decoder for continuous markers (cytometry): ``p(x | z, s) = N(μ_θ(z, s), diag σ_θ²(z, s))``
    or, for outlier-rich data, a Student-t with the same location and scale and one learned
    degrees-of-freedom per marker.

    The batch enters the trunk (so its effect may depend on the cell state) and also as a
    per-marker additive offset on the mean, which explains a plain shift between batches
    without any help from ``z``.

    Args:
        n_latent: latent dimension.
        n_features: number of markers.
        likelihood: ``"normal"`` or ``"studentt"``.
        n_cats_per_cov: categorical covariates entering the decoder.
        min_scale: floor on the predicted standard deviation.
    """

    def __init__(
        self,
        n_latent: int,
        n_features: int,
        *,
        likelihood: str = "normal",
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        dropout: float = 0.0,
        norm: str | None = "batch",
        min_scale: float = 1e-3,
    ):
        super().__init__()
        if likelihood not in CONTINUOUS_LIKELIHOODS:
            raise InvalidInputError(f"likelihood must be one of {CONTINUOUS_LIKELIHOODS}, got {likelihood!r}")
        self.likelihood = likelihood
        self.min_scale = min_scale
        self.trunk = MLP(n_latent, n_hidden, n_layers, n_cats_per_cov, dropout, norm)
        self.loc = nn.Linear(n_hidden, n_features)
        self.raw_scale = nn.Linear(n_hidden, n_features)
        self.batch_offset = CovariateEmbedding(n_cats_per_cov, n_features)
        if likelihood == "studentt":
            self.log_df = nn.Parameter(torch.full((n_features,), 1.5))  # df = 1 + exp(.) ~ 5.5

    def mean(self, z: torch.Tensor, covs: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised marker values ``μ_θ(z, s)``."""
        return self.loc(self.trunk(z, covs)) + self.batch_offset(covs)

    def forward(self, z: torch.Tensor, covs: torch.Tensor | None = None,
                log_library: torch.Tensor | None = None) -> Factorized:
        h = self.trunk(z, covs)
        loc, raw_scale = dense_heads(h, (self.loc, self.raw_scale))
        loc = loc + self.batch_offset(covs)
        scale = F.softplus(raw_scale) + self.min_scale
        if self.likelihood == "studentt":
            return Factorized(StudentT(1.0 + self.log_df.exp(), loc, scale, validate_args=False), 1,
                              validate_args=False)
        return Factorized(Normal(loc, scale, validate_args=False), 1, validate_args=False)
