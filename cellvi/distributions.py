"""Count likelihoods: negative binomial, zero-inflated NB and Poisson.

All three are :class:`torch.distributions.Distribution` objects parameterised by the
**log mean** (``log_mu``), which a log-softmax decoder plus the log library size gives for
free, and (for the NB family) the inverse dispersion ``theta``.

The log-densities are written so that their cost follows the non-zeros of the data
(see the house guide, section 6): ``lgamma(x + theta) - lgamma(theta)`` is exactly zero
where ``x == 0`` and ``lgamma(x + 1)`` does not depend on the parameters, so both are only
evaluated on the non-zero entries. The dense part is one ``log(theta + mu)`` per entry.
Pyro's ``GammaPoisson``, ``ZeroInflatedNegativeBinomial`` and ``Poisson`` are the references
in the tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch.distributions import Distribution, Independent, constraints

__all__ = ["CellLikelihood", "Factorized", "NegativeBinomial", "ZeroInflatedNegativeBinomial",
           "Poisson", "sparse_lgamma_terms", "nonzeros_of"]


class CellLikelihood(ABC):
    """What every decoder's ``p(x | z, s)`` declares: the log-likelihood of each cell.

    ``log_prob_cells(x, nonzero)`` returns one value per cell (summed over features);
    ``nonzero = (rows, cols, values)`` of ``x``'s non-zero entries is a hint that a count
    likelihood may use to skip work on the zeros, and that others ignore.
    """

    @abstractmethod
    def log_prob_cells(self, value: torch.Tensor, nonzero=None) -> torch.Tensor:
        """``log p(x | z)`` per cell, shape ``value.shape[:-1]``."""


class Factorized(Independent, CellLikelihood):
    """Independent features (e.g. ``Factorized(Normal(loc, scale), 1)``): the per-cell
    log-likelihood is the log-density of the event, features summed."""

    def log_prob_cells(self, value: torch.Tensor, nonzero=None) -> torch.Tensor:
        return self.log_prob(value)


def sparse_lgamma_terms(x: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)`` evaluated on non-zeros only.

    Returns a dense tensor shaped like ``x`` that is zero wherever ``x == 0``. With
    ``theta=None`` only ``-lgamma(x + 1)`` is computed (the Poisson normaliser).
    """
    if x.device.type != "cpu":
        # On accelerators the boolean gather would synchronise with the host every step and
        # dense lgamma is cheap: the same terms, computed everywhere (all exactly 0 at x = 0).
        terms = -torch.lgamma(x + 1.0)
        if theta is not None:
            terms = terms + torch.lgamma(x + theta) - torch.lgamma(theta)
        return terms
    if theta is not None and theta.shape != x.shape:
        shape = torch.broadcast_shapes(x.shape, theta.shape)
        x, theta = x.expand(shape), theta.expand(shape)
    mask = x > 0
    x_nz = x[mask]
    terms = -torch.lgamma(x_nz + 1.0)
    if theta is not None:
        theta_nz = theta[mask]
        terms = terms + torch.lgamma(x_nz + theta_nz) - torch.lgamma(theta_nz)
    return torch.zeros(x.shape, dtype=terms.dtype, device=x.device).masked_scatter(mask, terms)


NonZeros = tuple  # (rows, cols, values): coordinates and values of a batch's non-zeros


def nonzeros_of(x: torch.Tensor) -> NonZeros:
    """``(rows, cols, values)`` of the non-zero entries of a 2-D tensor (no gradient)."""
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols]


def _per_cell(n_cells: int, rows: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Sums of ``terms`` ``(..., nnz)`` per cell: ``(..., n_cells)``."""
    out = torch.zeros(*terms.shape[:-1], n_cells, dtype=terms.dtype, device=terms.device)
    return out.index_add(-1, rows, terms)


def _gather(param: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Entries (rows, cols) of a per-gene ``(G,)``/``(..., 1, G)`` or per-cell ``(..., B, G)``
    tensor, leading sample dimensions kept: ``(..., nnz)``."""
    if param.dim() == 1:
        return param[cols]
    if param.shape[-2] == 1:
        return param[..., 0, cols]
    return param[..., rows, cols]


def _nb_lgamma_nz(v: torch.Tensor, theta_nz: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        const = torch.lgamma(v + 1.0)
    return torch.lgamma(v + theta_nz) - torch.lgamma(theta_nz) - const


class _NBCore(torch.autograd.Function):
    """``x * s - (theta + x) * softplus(s)`` with ``s = log_mu - log(theta)``, elementwise.

    This is ``log NB(x; mu, theta)`` without its ``lgamma`` terms. The hand-written gradient
    (``d/ds = x - (theta + x) * sigmoid(s)``) takes about half the passes over the dense
    cells x genes block that autograd's graph of the same expression takes.
    """

    @staticmethod
    def forward(ctx, x, log_mu, theta):
        s = log_mu - torch.log(theta)
        sp = F.softplus(s)
        theta_x = theta + x
        ctx.save_for_backward(x, s, sp, theta, theta_x)
        return x * s - theta_x * sp

    @staticmethod
    def backward(ctx, grad):
        x, s, sp, theta, theta_x = ctx.saved_tensors
        g_s = grad * (x - theta_x * torch.sigmoid(s))
        grad_theta = None
        if ctx.needs_input_grad[2]:
            grad_theta = (-(grad * sp)).sum_to_size(theta.shape) - g_s.sum_to_size(theta.shape) / theta
        return None, g_s if ctx.needs_input_grad[1] else None, grad_theta


class _CountDistribution(Distribution, CellLikelihood):
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, log_mu: torch.Tensor, validate_args: bool | None = False):
        self.log_mu = log_mu
        super().__init__(batch_shape=log_mu.shape, validate_args=validate_args)

    @property
    def mu(self) -> torch.Tensor:
        return self.log_mu.exp()

    def log_prob_cells(self, value: torch.Tensor, nonzero: NonZeros | None = None) -> torch.Tensor:
        """``log_prob(value).sum(-1)``: the log-likelihood of each cell.

        With ``nonzero = (rows, cols, values)`` of ``value``'s non-zero entries (a 2-D
        ``value``), the parameter-dependent ``lgamma`` terms are evaluated on those entries
        only and summed per cell with ``index_add`` -- no boolean masks, no dense gathers.
        """
        return self.log_prob(value).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.mu


class Poisson(_CountDistribution):
    """Poisson with rate ``exp(log_mu)``."""

    arg_constraints = {"log_mu": constraints.real}

    @property
    def variance(self) -> torch.Tensor:
        return self.mu

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.log_mu - self.mu + sparse_lgamma_terms(value, None)

    def log_prob_cells(self, value: torch.Tensor, nonzero: NonZeros | None = None) -> torch.Tensor:
        if nonzero is None or value.dim() != 2:
            return super().log_prob_cells(value)
        rows, cols, v = nonzero
        with torch.no_grad():
            const = _per_cell(value.shape[0], rows, torch.lgamma(v + 1.0))
        return (value * self.log_mu - self.log_mu.exp()).sum(-1) - const

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            rate = self.mu.expand(torch.Size(sample_shape) + self.batch_shape)
            return torch.poisson(rate)


class NegativeBinomial(_CountDistribution):
    """Negative binomial with mean ``mu = exp(log_mu)`` and inverse dispersion ``theta``.

    ``Var = mu + mu^2 / theta``. Equals ``pyro.distributions.GammaPoisson(theta, theta / mu)``.

    Args:
        log_mu: log mean, shape ``(..., n_genes)``.
        theta: inverse dispersion, broadcastable to ``log_mu`` (per gene, or per cell and
            gene when it depends on the batch).
    """

    arg_constraints = {"log_mu": constraints.real, "theta": constraints.positive}

    def __init__(self, log_mu: torch.Tensor, theta: torch.Tensor, validate_args: bool | None = False):
        self.theta = theta
        super().__init__(log_mu, validate_args=validate_args)

    @property
    def variance(self) -> torch.Tensor:
        mu = self.mu
        return mu + mu.pow(2) / self.theta

    def _log_nb_dense(self, value: torch.Tensor) -> torch.Tensor:
        # theta*log(theta) - (theta + x)*log(theta + mu) + x*log(mu)
        #   = x*s - (theta + x)*softplus(s),  s = log(mu) - log(theta)
        return _NBCore.apply(value, self.log_mu, self.theta)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._log_nb_dense(value) + sparse_lgamma_terms(value, self.theta)

    def log_prob_cells(self, value: torch.Tensor, nonzero: NonZeros | None = None) -> torch.Tensor:
        if nonzero is None or value.dim() != 2:
            return super().log_prob_cells(value)
        rows, cols, v = nonzero  # of the cells x genes value; parameters may have samples in front
        if not (torch.is_grad_enabled() and (self.log_mu.requires_grad or self.theta.requires_grad)):
            return self._log_prob_cells_inference(value.shape[0], rows, cols, v)
        sparse = _nb_lgamma_nz(v, _gather(self.theta, rows, cols))
        return self._log_nb_dense(value).sum(-1) + _per_cell(value.shape[0], rows, sparse)

    def _log_prob_cells_inference(self, n_cells: int, rows, cols, v) -> torch.Tensor:
        """The per-cell sum without gradients, in two dense passes instead of six: with
        ``s = log mu - log theta``, ``Σ_g [x s - (theta + x) softplus(s)]`` is
        ``-Σ_g theta softplus(s)`` (dense; a matrix product for per-gene ``theta``) plus
        ``Σ_nz x log sigmoid(s)`` over the non-zeros only."""
        theta = self.theta
        s = self.log_mu - torch.log(theta)
        s_nz = _gather(s, rows, cols)
        sp = F.softplus(s)
        if theta.dim() == 1:
            dense = -(sp @ theta)
        elif theta.dim() == 2 and theta.shape[0] == 1:
            dense = -(sp @ theta[0])
        else:
            dense = -(sp * theta).sum(-1)
        sparse = v * F.logsigmoid(s_nz) + _nb_lgamma_nz(v, _gather(theta, rows, cols))
        return dense + _per_cell(n_cells, rows, sparse)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            theta = self.theta.expand(self.batch_shape).expand(shape)
            rate = torch.distributions.Gamma(theta, theta / self.mu.expand(shape)).sample()
            return torch.poisson(rate)


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB with an extra point mass at zero of probability ``sigmoid(gate_logits)``.

    Equals ``pyro.distributions.ZeroInflatedNegativeBinomial(total_count=theta,
    logits=log_mu - log(theta), gate_logits=gate_logits)``.
    """

    arg_constraints = {
        "log_mu": constraints.real,
        "theta": constraints.positive,
        "gate_logits": constraints.real,
    }

    def __init__(
        self,
        log_mu: torch.Tensor,
        theta: torch.Tensor,
        gate_logits: torch.Tensor,
        validate_args: bool | None = False,
    ):
        self.gate_logits = gate_logits
        super().__init__(log_mu, theta, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.gate_logits) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        p0 = torch.sigmoid(self.gate_logits)
        mu = self.mu
        return (1 - p0) * (mu + mu.pow(2) / self.theta) + p0 * (1 - p0) * mu.pow(2)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_nb = self._log_nb_dense(value)  # equals log NB(0) where value == 0
        log_not_gate = -F.softplus(self.gate_logits)  # log(1 - p_gate)
        log_gate = self.gate_logits + log_not_gate  # log(p_gate)
        zero_case = torch.logaddexp(log_gate, log_not_gate + log_nb)
        nonzero_case = log_not_gate + log_nb + sparse_lgamma_terms(value, self.theta)
        return torch.where(value > 0, nonzero_case, zero_case)

    def log_prob_cells(self, value: torch.Tensor, nonzero: NonZeros | None = None) -> torch.Tensor:
        if nonzero is None or value.dim() != 2:
            return super().log_prob_cells(value)
        rows, cols, v = nonzero
        log_nb = self._log_nb_dense(value)
        log_not_gate = -F.softplus(self.gate_logits)
        zero_case = torch.logaddexp(self.gate_logits + log_not_gate, log_not_gate + log_nb)
        # at the non-zeros, swap the zero case for log(1 - gate) + log NB(x)
        swap = (_gather(log_not_gate, rows, cols) + _gather(log_nb, rows, cols)
                - _gather(zero_case, rows, cols) + _nb_lgamma_nz(v, _gather(self.theta, rows, cols)))
        return zero_case.sum(-1) + _per_cell(value.shape[0], rows, swap)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            counts = super().sample(sample_shape)
            gate = torch.bernoulli(torch.sigmoid(self.gate_logits).expand(counts.shape))
            return counts * (1 - gate)
