"""Variational objectives and KL (β) schedules.

The ELBO per cell is one line::

    elbo = log_likelihood(px, x) - beta * kl(qz, pz, z)

and the importance-weighted bound (IWAE) draws ``K`` samples and takes a log-mean-exp of
``log p(x|z) + log p(z) - log q(z|x)``. Both return one value per cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributions import Distribution, kl_divergence

from .distributions import CellLikelihood

__all__ = ["log_likelihood", "kl", "elbo", "iwae", "batch_mmd", "BatchAdversary", "ELBO", "IWAE",
           "LinearWarmup", "Constant", "as_objective"]


def log_likelihood(px: Distribution, x: torch.Tensor, nonzero=None) -> torch.Tensor:
    """``log p(x|z)`` per cell.

    A :class:`cellvi.distributions.CellLikelihood` (what cellvi's decoders return) gives it
    itself; ``nonzero = (rows, cols, values)`` of ``x`` lets the count likelihoods spend
    their ``lgamma``s on the non-zeros only. Any other torch distribution is summed over
    features unless it already treats them as its event (e.g. ``Independent``).
    """
    if isinstance(px, CellLikelihood):
        return px.log_prob_cells(x, nonzero)
    lp = px.log_prob(x)
    return lp if len(px.event_shape) else lp.sum(-1)


def kl(qz: Distribution, pz: Distribution, z: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q || p): closed form when torch knows one, else the one-sample estimate at ``z``."""
    try:
        return kl_divergence(qz, pz)
    except NotImplementedError:
        if z is None:
            raise ValueError("no closed-form KL for these distributions: pass the sample z") from None
        return qz.log_prob(z) - pz.log_prob(z)


def elbo(log_px: torch.Tensor, qz: Distribution, pz: Distribution, z: torch.Tensor | None = None,
         beta: float = 1.0) -> torch.Tensor:
    """Per-cell ELBO ``log p(x|z) - beta * KL(q(z|x) || p(z))``.

    Args:
        log_px: ``log p(x|z)`` summed over features, one value per cell.
        qz, pz: posterior and prior distributions (event dim = latent).
        z: the sample used for ``log_px`` (needed only when the KL has no closed form).
        beta: weight of the KL term.
    """
    return log_px - beta * kl(qz, pz, z)


def iwae(
    x: torch.Tensor,
    qz: Distribution,
    pz: Distribution,
    decode: Callable[[torch.Tensor], Distribution],
    n_samples: int = 16,
) -> torch.Tensor:
    """Importance-weighted bound with ``n_samples`` draws per cell (``n_samples=1`` is the
    single-sample ELBO estimate).

    ``decode(z)`` must return p(x|z) for ``z`` of shape ``(n_samples, n_cells, n_latent)``.
    """
    z = qz.rsample((n_samples,))
    log_w = log_likelihood(decode(z), x) + pz.log_prob(z) - qz.log_prob(z)
    return torch.logsumexp(log_w, dim=0) - math.log(n_samples)


#: bandwidths of the multi-scale RBF kernel of :func:`batch_mmd`, as multiples of the
#: latent dimension (squared distances between N(0, I) draws are about 2 d)
MMD_SCALES = (0.2, 1.0, 5.0)


#: cells per block of :func:`batch_mmd`: a larger mini-batch is split into blocks of about
#: this many cells, so the penalty's cost grows linearly with the batch and its value (a
#: biased V-statistic, whose bias shrinks with the cells compared) does not depend on it
MMD_BLOCK = 512

#: what :class:`ELBO`'s batch penalty measures: :func:`batch_mmd` or a :class:`BatchAdversary`
PENALTIES = ("mmd", "adversary")


def batch_mmd(z: torch.Tensor, covs: torch.Tensor, block: int = MMD_BLOCK,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """How much the latent depends on the batch within a mini-batch: for each batch key and
    each category with at least 2 cells here, the squared maximum mean discrepancy (biased
    V-statistic, multi-scale RBF kernel) between that category's cells and all the cells,
    weighted by the category's share of the cells and summed over categories; averaged over
    keys. Zero when every batch's cells are distributed alike, differentiable in ``z``.

    A mini-batch of more than ``block`` cells (:data:`MMD_BLOCK`) is split into
    ``k = ceil(n / block)`` interleaved blocks (every ``k``-th cell, so that cells sorted by
    batch still give blocks with every batch in them), and the blocks' values are averaged,
    weighted by their cells: the kernel matrices cost ``O(n * block)``, not ``O(n^2)``, and a batch of
    2,048 cells is penalised as four batches of 512 would be.

    With ``groups`` (one integer label per cell, e.g. clusters that hold cells of every
    batch, :func:`cellvi.clustering.batch_balanced_groups`), each category is compared with all
    the cells *reweighted to the category's own mix of groups* (within the block): a group
    that a batch lacks (a cell type missing from it) is left out of that batch's target, so
    composition that differs between batches is not penalised, only the batch's difference
    from the others within each group (cluster-conditional alignment; the class-weighted MMD
    of domain adaptation under label shift). A group held by one batch alone contributes
    nothing.
    """
    n = z.shape[0]
    if n > block:
        k = math.ceil(n / block)
        return sum(_mmd_block(z[i::k], covs[i::k], None if groups is None else groups[i::k])
                   * len(range(i, n, k)) for i in range(k)) / n
    return _mmd_block(z, covs, groups)


def _mmd_block(z: torch.Tensor, covs: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    d2 = torch.cdist(z, z).square()
    n, dim = z.shape
    K = sum(torch.exp(-d2 / (s * dim)) for s in MMD_SCALES)
    total = z.new_zeros(())
    if groups is not None:
        G = torch.nn.functional.one_hot(groups).to(z.dtype)  # n x groups
        group_cells = G.sum(0).clamp_min(1.0)[:, None]
    for j in range(covs.shape[1]):
        onehot = torch.nn.functional.one_hot(covs[:, j]).to(z.dtype)  # n x categories
        counts = onehot.sum(0)
        # categories with fewer than 2 cells here get weight 0 (masks, not boolean indexing:
        # no host synchronisation); a single batch gives W = 0, so no penalty
        weight = counts * (counts >= 2)
        if groups is None:
            target = 1.0 / n  # every cell alike
        else:  # cell i's weight in batch b's target: b's share of i's group / the group's cells
            share = (G.T @ onehot) / counts.clamp_min(1.0)  # groups x categories
            target = G @ (share / group_cells)  # n x categories, columns sum to 1
        W = onehot / counts.clamp_min(1.0) - target  # columns: mean of batch b minus its target
        mmd2 = ((K @ W) * W).sum(0).clamp_min(0.0)
        total = total + (mmd2 * weight).sum() / weight.sum().clamp_min(1.0)
    return total / covs.shape[1]


def _batch_targets(onehot: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Each cell's batch distribution that carries no information beyond its group: the
    mini-batch's share of each category (without groups), or the share of each category
    among the cells of the cell's group. ``n x categories``, rows summing to 1."""
    if groups is None:
        return onehot.mean(0, keepdim=True).expand_as(onehot)
    G = torch.nn.functional.one_hot(groups).to(onehot.dtype)
    share = (G.T @ onehot) / G.sum(0).clamp_min(1.0)[:, None]  # groups x categories
    return G @ share


class BatchAdversary(torch.nn.Module):
    """A classifier of the batch from the latent means, the alternative to :func:`batch_mmd`
    (domain-adversarial training, Ganin et al. 2016; scvi-tools' ``adversarial_classifier``).

    It is a submodule of the VAE while it trains (``module.batch_adversary``), so the one
    optimiser, the checkpoints, the NaN roll-back and the gradient averaging of a
    data-parallel run all cover it. :meth:`forward` gives two terms of the loss:

    - the classifier's cross-entropy on the *detached* means (its parameters learn to tell
      the batches apart; the encoder is not moved by it);
    - the encoder's penalty, computed through a detached copy of the classifier's parameters
      (the classifier is not moved by it): the cross-entropy of its prediction against the
      batch distribution that carries no information, ``KL(target || q(b | z))``. Without
      groups the target is the mini-batch's batch shares; with ``groups`` the classifier
      also sees the cell's group (one-hot) and the target is the batch shares *within that
      group*, so a cell type that one batch lacks is not pushed towards that batch (the
      conditional adversary of domain adaptation under label shift). The encoder's gradient
      vanishes once the classifier can do no better than the target.

    Args:
        n_latent: the latent's dimension.
        n_categories: categories of each batch key.
        n_groups: groups the classifier also sees (0: none).
        n_hidden: width of the classifier's one hidden layer.
        seed: seeds its initial weights (torch's global generator is left as it was).
    """

    def __init__(self, n_latent: int, n_categories: list[int], n_groups: int = 0,
                 n_hidden: int = 64, seed: int = 0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(n_latent + n_groups, n_hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(n_hidden, sum(n_categories)))
        torch.random.set_rng_state(generator_state)
        self.n_categories, self.n_groups = list(n_categories), n_groups

    def logits(self, z: torch.Tensor, groups: torch.Tensor | None = None,
               detach_params: bool = False) -> list[torch.Tensor]:
        """The classifier's logits per batch key (``detach_params``: through a detached copy
        of its parameters)."""
        if self.n_groups:
            z = torch.cat([z, torch.nn.functional.one_hot(groups, self.n_groups).to(z.dtype)], 1)
        if detach_params:
            params = {k: v.detach() for k, v in self.net.named_parameters()}
            out = torch.func.functional_call(self.net, params, (z,))
        else:
            out = self.net(z)
        return list(out.split(self.n_categories, dim=1))

    def classifier_loss(self, z: torch.Tensor, covs: torch.Tensor,
                        groups: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's cross-entropy on ``z`` (detached), averaged over keys."""
        logits = self.logits(z.detach(), groups)
        return sum(torch.nn.functional.cross_entropy(lg, covs[:, j])
                   for j, lg in enumerate(logits)) / len(logits)

    def penalty(self, z: torch.Tensor, covs: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's term, differentiable in ``z`` only: per key, the mean over cells of
        ``KL(target || q(b | z))``, averaged over keys."""
        total = z.new_zeros(())
        for j, lg in enumerate(self.logits(z, groups, detach_params=True)):
            onehot = torch.nn.functional.one_hot(covs[:, j], self.n_categories[j]).to(z.dtype)
            target = _batch_targets(onehot, groups)
            log_q = torch.log_softmax(lg, dim=1)
            total = total + (target * (torch.log(target.clamp_min(1e-12)) - log_q)).sum(1).mean()
        return total / len(self.n_categories)

    def forward(self, z: torch.Tensor, covs: torch.Tensor,
                groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classifier cross-entropy, encoder penalty)`` of a mini-batch's latent means."""
        return self.classifier_loss(z, covs, groups), self.penalty(z, covs, groups)


@dataclass(frozen=True)
class LinearWarmup:
    """β rises linearly from ``start`` to ``end`` over ``n_steps`` optimiser **steps**.

    Counting steps (not epochs) makes the warm-up finish for any dataset size.
    """

    n_steps: int
    start: float = 0.0
    end: float = 1.0

    def __call__(self, step: int) -> float:
        if self.n_steps <= 0 or step >= self.n_steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.n_steps

    def done(self, step: int) -> bool:
        return step >= self.n_steps


@dataclass(frozen=True)
class Constant:
    """A constant β (no warm-up)."""

    value: float = 1.0

    def __call__(self, step: int) -> float:
        return self.value

    def done(self, step: int) -> bool:
        return True


@dataclass(frozen=True)
class ELBO:
    """The training objective: the per-cell ELBO ``log p(x|z) - β KL``, averaged over the
    mini-batch, minus the prior's own log hyperprior spread over the ``n_obs`` cells.

    Args:
        beta: β schedule (``schedule(step) -> β`` with ``done(step)``); ``None`` lets the
            training loop use its linear KL warm-up.
        prior: a fixed prior used instead of the model's own, for training and validation
            alike (the GMVAE's warm-up uses ``StandardNormal``); ``None``: the model's prior.
        batch_penalty: weight λ (nats per cell) of a penalty on the latent's dependence on
            the batch: ``λ β batch_mmd(posterior means, batch codes)`` (:func:`batch_mmd`),
            annealed with the KL warm-up's β. ``0`` (default): the plain ELBO. Validation
            and the history report the ELBO without it.
        penalty: ``"mmd"`` (:func:`batch_mmd`) or ``"adversary"``: the module's
            ``batch_adversary`` (:class:`BatchAdversary`) gives the encoder's penalty, and
            its classifier's cross-entropy is added to the loss (weight 1, from the first
            step), so the one optimiser trains both.
    """

    beta: Callable[[int], float] | None = None
    prior: torch.nn.Module | None = None
    batch_penalty: float = 0.0
    penalty: str = "mmd"

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            from .errors import InvalidInputError

            raise InvalidInputError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")

    def penalty_loss(self, module, qz, batch, beta: float) -> torch.Tensor:
        """What the batch penalty adds to the loss of a mini-batch."""
        groups = batch.get("mmd_groups")
        if self.penalty == "mmd":
            return self.batch_penalty * beta * batch_mmd(qz.mean, batch["covs"], groups=groups)
        classifier, encoder = module.batch_adversary(qz.mean, batch["covs"], groups)
        return classifier + self.batch_penalty * beta * encoder

    def terms(self, module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(x|z), KL)`` per cell, from one reparameterised sample."""
        return module.elbo_terms(batch, prior=self.prior)

    def loss(self, module, batch, beta: float, n_obs: int):
        """``(loss, log p(x|z), KL)``: the scalar to minimise and its per-cell parts."""
        if self.batch_penalty and batch.get("covs") is not None:
            log_px, kl_z, qz = module.elbo_terms(batch, prior=self.prior, with_posterior=True)
            penalty = self.penalty_loss(module, qz, batch, beta)
        else:
            log_px, kl_z = self.terms(module, batch)
            penalty = 0.0
        loss = -(log_px - beta * kl_z).mean() + penalty
        hyper = (self.prior or module.prior).log_hyperprior(n_obs)
        if hyper is not None:
            loss = loss - hyper / n_obs
        return loss, log_px, kl_z


@dataclass(frozen=True)
class IWAE(ELBO):
    """The importance-weighted training objective (Burda et al. 2016) with ``n_samples``
    samples per cell: a tighter bound on ``log p(x)`` than the ELBO, which it is at
    ``n_samples=1``. During a KL warm-up the prior/posterior ratio of each weight is raised
    to the power β. The history's reconstruction and KL are those of the first sample;
    validation reports the ELBO.
    """

    n_samples: int = 8

    def loss(self, module, batch, beta: float, n_obs: int):
        qz = module.encode(batch)
        z = qz.rsample((self.n_samples,))
        log_px = log_likelihood(module.decode(z, batch), batch["x"], batch.get("x_nonzero"))
        log_ratio = (self.prior or module.prior)().log_prob(z) - qz.log_prob(z)
        bound = torch.logsumexp(log_px + beta * log_ratio, dim=0) - math.log(self.n_samples)
        loss = -bound.mean()
        if self.batch_penalty and batch.get("covs") is not None:
            loss = loss + self.penalty_loss(module, qz, batch, beta)
        hyper = (self.prior or module.prior).log_hyperprior(n_obs)
        if hyper is not None:
            loss = loss - hyper / n_obs
        return loss, log_px[0], -log_ratio[0]


def as_objective(objective) -> ELBO:
    """``"elbo"``, ``"iwae"`` (8 samples), ``"iwae16"`` (16 samples) or an objective object."""
    if isinstance(objective, ELBO):
        return objective
    if isinstance(objective, str) and objective == "elbo":
        return ELBO()
    if isinstance(objective, str) and objective.startswith("iwae"):
        k = objective[4:]
        if k == "" or (k.isdigit() and int(k) >= 1):
            return IWAE(n_samples=int(k or 8))
    from .errors import InvalidInputError

    raise InvalidInputError(f"objective must be 'elbo', 'iwae', 'iwae<K>' (e.g. 'iwae16') or a "
                            f"cellvi.objectives.ELBO object, got {objective!r}")
