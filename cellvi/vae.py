"""The VAE core shared by every model: encoder + prior + decoder, on tensors only.

Nothing here knows about AnnData. A mini-batch is a dict of tensors:

- ``"x"``: data, ``(n_cells, n_features)``, dense, on the module's device;
- ``"covs"``: integer codes of the categorical covariates, ``(n_cells, n_keys)``, or absent;
- ``"log_library"``: ``(n_cells, 1)`` log library size (count models only);
- ``"x_nonzero"``: optional ``(rows, cols, values)`` of the non-zeros of ``x`` (on the CPU the
  count likelihoods then evaluate their ``lgamma`` terms on those entries only).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution

from .decoders import Decoder
from .nn import SparseRows
from .objectives import iwae, kl, log_likelihood
from .posteriors import Encoder, shared_noise_draws
from .priors import MixturePrior, Prior

__all__ = ["VAE", "MixtureVAE"]


class VAE(nn.Module):
    """Amortized VAE: ``q(z|x,s)`` from ``encoder``, ``p(z)`` from ``prior``, ``p(x|z,s)`` from
    ``decoder``.

    Args:
        encoder: an :class:`cellvi.posteriors.Encoder`, ``encoder(x_in, covs) -> q(z|x)``.
        decoder: a :class:`cellvi.decoders.Decoder`, ``decoder(z, covs, log_library) -> p(x|z)``.
        prior: a :class:`cellvi.priors.Prior`, ``prior() -> p(z)``.
        log1p_input: encode ``log1p(x)`` instead of ``x`` (count data).
        input_scale: if given, the encoder sees each cell scaled to this total,
            ``x / library * input_scale`` (then ``log1p``), as in ``normalize_total`` +
            ``log1p``; needs ``"log_library"`` in the batch. ``None``: the counts as they are.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: Prior,
                 log1p_input: bool = True, input_scale: float | None = None):
        super().__init__()
        for name, value, kind in (("encoder", encoder, Encoder), ("decoder", decoder, Decoder),
                                  ("prior", prior, Prior)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a cellvi.{kind.__module__.split('.')[-1]}."
                                f"{kind.__name__}, got {type(value).__name__}")
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.log1p_input = log1p_input
        self.input_scale = input_scale

    def encode(self, batch: dict[str, torch.Tensor]) -> Distribution:
        nz = batch.get("x_nonzero")
        factor = None
        if self.input_scale is not None:  # per-cell factor input_scale / library
            factor = torch.exp(math.log(self.input_scale) - batch["log_library"])
        if nz is not None:  # the encoder's first layer then works on the non-zeros only
            rows, cols, values = nz
            if factor is not None:
                values = values * factor[rows, 0]
            x = SparseRows(rows, cols, torch.log1p(values) if self.log1p_input else values,
                           batch["x"].shape[0])
        else:
            x = batch["x"] if factor is None else batch["x"] * factor
            x = torch.log1p(x) if self.log1p_input else x
        return self.encoder(x, batch.get("covs"))

    def decode(self, z: torch.Tensor, batch: dict[str, torch.Tensor]) -> Distribution:
        covs = batch.get("covs")
        if covs is not None and z.dim() > covs.dim():  # sample dimensions in front (IWAE)
            covs = covs.expand(*z.shape[:-1], covs.shape[-1])
        return self.decoder(z, covs, batch.get("log_library"))

    def forward(self, batch: dict[str, torch.Tensor]):
        """Returns ``(qz, z, px)`` with one reparameterised sample ``z``."""
        qz = self.encode(batch)
        z = qz.rsample()
        return qz, z, self.decode(z, batch)

    def elbo_terms(self, batch: dict[str, torch.Tensor], prior: Prior | None = None,
                   with_posterior: bool = False):
        """``(log p(x|z), KL(q(z|x) || p(z)))`` per cell from one sample; ``prior`` replaces
        the model's prior (the GMVAE's warm-up); ``with_posterior`` appends ``q(z|x)``."""
        qz, z, px = self(batch)
        pz = (prior or self.prior)()
        terms = (log_likelihood(px, batch["x"], batch.get("x_nonzero")), kl(qz, pz, z))
        return (*terms, qz) if with_posterior else terms

    def elbo(self, batch: dict[str, torch.Tensor], beta: float = 1.0,
             prior: Prior | None = None) -> torch.Tensor:
        """Single-sample ELBO per cell."""
        log_px, kl_z = self.elbo_terms(batch, prior)
        return log_px - beta * kl_z

    def iwae(self, batch: dict[str, torch.Tensor], n_samples: int = 16) -> torch.Tensor:
        """Importance-weighted bound per cell."""
        return iwae(batch["x"], self.encode(batch), self.prior(),
                    lambda z: self.decode(z, batch), n_samples)


class MixtureVAE(VAE):
    """VAE with a :class:`cellvi.priors.MixturePrior`: VaDE-style clustering.

    The ELBO is the VAE's, with ``log p(z)`` the mixture density (``c`` summed out exactly);
    the cluster posterior ``q(c | x)`` is the prior's responsibilities ``p(c | z)`` averaged
    over ``z ~ q(z | x)`` (:meth:`cluster_posterior`). The training objective adds the prior's sparse Dirichlet on ``π``
    (:meth:`cellvi.priors.MixturePrior.log_hyperprior`).
    """

    prior: MixturePrior

    def __init__(self, encoder: Encoder, decoder: Decoder, prior: MixturePrior, **kwargs):
        if not isinstance(prior, MixturePrior):
            raise TypeError(f"MixtureVAE needs a cellvi.priors.MixturePrior, got {type(prior).__name__}")
        super().__init__(encoder, decoder, prior, **kwargs)

    def responsibilities(self, batch: dict[str, torch.Tensor], n_samples: int = 0) -> torch.Tensor:
        """``q(c | x)`` of the encoder's posterior (:meth:`cluster_posterior`)."""
        return self.cluster_posterior(self.encode(batch), n_samples)

    def cluster_posterior(self, qz: Distribution, n_samples: int = 0,
                          seed: int | None = None) -> torch.Tensor:
        """``q(c | x) = E_{q(z|x)}[p(c | z)]`` averaged over ``n_samples`` draws of ``qz``;
        ``n_samples=0``: ``p(c | z)`` at the posterior mean (what training's M-step uses).
        The average carries the posterior's uncertainty about ``z`` into the probabilities,
        which at the mean alone are over-confident for cells between clusters. The draws
        share one set of standard-normal noise over the cells
        (:func:`cellvi.posteriors.shared_noise_draws`), drawn from ``seed`` when given (the
        same noise in every call with that seed: a cell's probabilities then do not depend
        on the other cells of the call or of its chunk) or else from torch's random state."""
        if n_samples <= 0:
            return self.prior.responsibilities(qz.mean)
        return self.prior.responsibilities(shared_noise_draws(qz, n_samples, seed)).mean(0)
