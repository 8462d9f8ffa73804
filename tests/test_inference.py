"""Bounds and refinement on probabilistic PCA, whose log p(x) and posterior are closed-form:
ELBO <= IWAE_K <= log p(x), the bound rising with K and within 0.05 nats/cell at K = 1,000;
refinement from a poor encoder reaches the exact posterior."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from cellvi.decoders import Decoder
from cellvi.distributions import Factorized
from cellvi.inference import elbo_per_cell, iwae_per_cell, log_weights, refine
from cellvi.posteriors import Encoder
from cellvi.priors import StandardNormal
from cellvi.vae import VAE

D, P, SIGMA = 2, 6, 0.5


def _ppca(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=g))
    W = q[:, :D] * torch.tensor([2.0, 1.0])  # orthogonal columns: a diagonal exact posterior
    b = torch.randn(P, generator=g)
    return W, b


class LinearGaussian(Decoder):
    def __init__(self, W, b):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)

    def forward(self, z, covs=None, log_library=None):
        return Factorized(Normal(z @ self.W.T + self.b, SIGMA), 1)


class ExactPosterior(Encoder):
    """The exact Gaussian posterior of pPCA, with its mean shifted and scale stretched."""

    def __init__(self, W, b, shift=0.0, stretch=1.0):
        super().__init__()
        self.n_latent = D
        cov = SIGMA**2 * torch.linalg.inv(W.T @ W + SIGMA**2 * torch.eye(D))
        self.register_buffer("gain", cov @ W.T / SIGMA**2)
        self.register_buffer("sd", cov.diagonal().sqrt())
        self.register_buffer("b", b)
        self.shift, self.stretch = shift, stretch

    def forward(self, x, covs=None):
        return Independent(Normal((x - self.b) @ self.gain.T + self.shift, self.sd * self.stretch), 1)


def _setup(shift=0.0, stretch=1.0, n=200):
    W, b = _ppca()
    torch.manual_seed(1)
    x = torch.randn(n, D) @ W.T + b + SIGMA * torch.randn(n, P)
    vae = VAE(ExactPosterior(W, b, shift, stretch), LinearGaussian(W, b), StandardNormal(D),
              log1p_input=False)
    log_px = MultivariateNormal(b, W @ W.T + SIGMA**2 * torch.eye(P)).log_prob(x)
    return vae, {"x": x}, log_px


def test_with_the_exact_posterior_every_bound_is_log_px():
    vae, batch, log_px = _setup()
    torch.manual_seed(0)
    # every importance weight is p(x) exactly: the IWAE has no variance at all
    torch.testing.assert_close(iwae_per_cell(vae, batch, n_samples=10), log_px, atol=1e-4, rtol=0)
    # the ELBO with its closed-form KL is log p(x) in expectation
    elbo = elbo_per_cell(vae, batch, n_samples=4000)
    assert float((elbo - log_px).abs().max()) < 0.1 and float((elbo - log_px).mean().abs()) < 0.01


def test_elbo_below_iwae_rising_with_k_up_to_log_px():
    vae, batch, log_px = _setup(shift=0.4, stretch=1.6)
    torch.manual_seed(0)
    elbo = elbo_per_cell(vae, batch, n_samples=2000).mean()
    # IWAE_1 is the ELBO in expectation (averaged here over 2,000 single-sample bounds)
    lw = log_weights(vae, batch, vae.encode(batch), 2000)
    assert float(elbo) == pytest.approx(float(lw.mean()), abs=0.02)
    bounds = [iwae_per_cell(vae, batch, n_samples=k).mean() for k in (10, 100, 1000)]
    assert all(float(a) < float(b) for a, b in zip(bounds, bounds[1:], strict=False))
    assert float(elbo) < float(bounds[0])
    assert float(bounds[-1]) <= float(log_px.mean()) + 0.01
    assert float(log_px.mean() - bounds[-1]) < 0.05, "IWAE_1000 within 0.05 nats per cell"
    assert float(log_px.mean() - elbo) > 0.2  # the perturbed posterior leaves a real gap


def test_refinement_reaches_the_exact_posterior_and_closes_the_gap():
    vae, batch, log_px = _setup(shift=0.6, stretch=2.0)
    exact = ExactPosterior(*_ppca())(batch["x"])
    torch.manual_seed(0)
    before = elbo_per_cell(vae, batch, n_samples=500).mean()
    q = refine(vae, batch, steps=300, lr=0.05, n_samples=8)
    after = elbo_per_cell(vae, batch, q, n_samples=500).mean()
    gap_before, gap_after = float(log_px.mean() - before), float(log_px.mean() - after)
    assert gap_after < 0.1 * gap_before and gap_after < 0.05
    assert float((q.mean - exact.mean).abs().mean()) < 0.05  # Adam's noise floor, 8 samples a step
    assert float((q.stddev - exact.stddev).abs().mean()) < 0.05
    # the module is left as it was: eval/train mode and its parameters' autograd flags
    assert vae.training and all(p.requires_grad for p in vae.parameters())


def test_iwae_with_a_mixture_prior_sums_the_components_out():
    """The marginal likelihood uses the model's actual prior: for a mixture, IWAE with the
    exact posterior of a one-component 'mixture' equals the standard-normal answer."""
    from cellvi.priors import MixturePrior

    vae, batch, log_px = _setup()
    mix = MixturePrior(D, 2)
    mix.init_from([0.5, 0.5], torch.zeros(2, D).numpy(), torch.ones(2, D).numpy())
    vae.prior = mix  # N(0, I) written as a mixture of two identical components
    torch.manual_seed(0)
    torch.testing.assert_close(iwae_per_cell(vae, batch, n_samples=20), log_px, atol=1e-4, rtol=0)
    assert math.isfinite(float(elbo_per_cell(vae, batch).mean()))


# -- the same tools on trained models, through the AnnData edge ------------------------------
@pytest.fixture(scope="module")
def nb_model():
    import cellvi

    adata = cellvi.datasets.synthetic_counts(300, 60, n_groups=3, n_batches=2, seed=4)
    model = cellvi.models.NBVAE(adata, batch_key="batch", n_latent=3, n_hidden=32)
    return model.fit(max_epochs=20, verbose=False), adata


def test_model_bounds_and_gaps_on_counts(nb_model):
    import numpy as np

    import cellvi

    model, adata = nb_model
    held = adata[:60].copy()
    elbo = model.elbo(held, n_samples=64)
    mll = model.marginal_log_likelihood(held, n_samples=200)
    assert elbo.shape == mll.shape == (60,) and np.isfinite(mll).all()
    assert mll.mean() > elbo.mean()
    refined = model.elbo(held, refine_steps=50, n_samples=64)
    assert refined.mean() > elbo.mean()  # the per-cell optimum beats the amortized q
    gaps = cellvi.diagnostics.amortization_gap(model, held, n_samples=200, refine_steps=50)
    assert list(gaps.index) == list(held.obs_names)
    assert gaps["amortization_gap"].mean() > 0 and gaps["approximation_gap"].mean() > -0.1
    np.testing.assert_allclose(gaps["log_px"] - gaps["elbo"],
                               gaps["approximation_gap"] + gaps["amortization_gap"])
    z0, z1 = model.get_latent(held), model.get_latent(held, refine_steps=20)
    assert z1.shape == z0.shape and not np.allclose(z0, z1)
    np.testing.assert_array_equal(model.elbo(held, seed=3), model.elbo(held, seed=3))


def test_marginal_likelihood_of_a_gmvae_uses_the_mixture():
    import numpy as np

    import cellvi

    cyto = cellvi.datasets.synthetic_cytometry(400, 6, n_populations=3, seed=2)
    model = cellvi.models.GMVAE(cyto, n_components=3).fit(max_epochs=6, warmup_epochs=2,
                                                          verbose=False)
    mll = model.marginal_log_likelihood(cyto[:50].copy(), n_samples=100)
    elbo = model.elbo(cyto[:50].copy(), n_samples=64)
    assert np.isfinite(mll).all() and mll.mean() > elbo.mean()


def test_iwae_objective_and_refined_outputs_through_tl():
    import numpy as np
    import torch

    import cellvi
    from cellvi.objectives import IWAE, as_objective

    adata = cellvi.datasets.synthetic_counts(200, 40, n_groups=2, n_batches=2, seed=5)
    out = cellvi.tl.nbvae(adata, batch_key="batch", max_epochs=3, objective="iwae4",
                          refine_steps=10, copy=True, verbose=False, return_model=True)
    a, model = out
    assert "IWAE(" in a.uns["nbvae"]["train_settings"]["objective"]
    assert a.uns["nbvae"]["refine_steps"] == 10 and np.isfinite(a.obsm["X_nbvae"]).all()
    assert np.isfinite(a.uns["nbvae"]["history"]["train_elbo"]).all()
    assert as_objective("iwae").n_samples == 8
    with pytest.raises(ValueError, match="objective must be"):
        as_objective("iwaeX")
    # the IWAE objective is the importance-weighted bound: with one sample, the ELBO's value
    batch = model._to_device(model._prepare(adata), model.device).batch(torch.arange(50))
    model.module.eval()
    torch.manual_seed(0)
    iw1 = IWAE(n_samples=1).loss(model.module, batch, 1.0, 200)[0]
    torch.manual_seed(0)
    qz = model.module.encode(batch)
    z = qz.rsample((1,))
    from cellvi.objectives import log_likelihood

    lw = (log_likelihood(model.module.decode(z, batch), batch["x"]) + model.module.prior().log_prob(z)
          - qz.log_prob(z))
    torch.testing.assert_close(iw1, -lw.mean())
    gm = cellvi.tl.gmvae(cellvi.datasets.synthetic_cytometry(300, 5, n_populations=2, seed=1),
                         n_components=2, max_epochs=3, warmup_epochs=1, refine_steps=5,
                         objective="iwae2", copy=True, verbose=False)
    np.testing.assert_allclose(gm.obsm["gmvae_probs"].sum(1), 1, atol=1e-5)


def test_refining_a_flow_posterior_keeps_its_flow_and_raises_its_elbo():
    import numpy as np

    import cellvi
    from cellvi.posteriors import FlowPosterior

    adata = cellvi.datasets.synthetic_counts(200, 40, n_groups=2, n_batches=1, seed=6)
    model = cellvi.models.NBVAE(adata, n_latent=3, n_hidden=32, posterior="iaf")
    model.fit(max_epochs=5, verbose=False)
    batch = model._to_device(model._prepare(adata), model.device).batch(torch.arange(40))
    qz = model.module.encode(batch)
    q = refine(model.module, batch, steps=40, qz=qz)
    assert isinstance(q, FlowPosterior)
    assert [t.made for t in q.transforms] == [t.made for t in qz.transforms]
    torch.manual_seed(0)
    before = elbo_per_cell(model.module, batch, qz, 256)
    torch.manual_seed(0)
    after = elbo_per_cell(model.module, batch, q, 256)
    assert after.mean() > before.mean() + 0.1
    # the refined flow's density is the refined base's minus the flows' log-determinants
    z0 = q.base_dist.sample()
    z, logdet = z0, torch.zeros(40)
    for t in q.transforms:
        y = t(z)
        logdet = logdet + t.log_abs_det_jacobian(z, y)
        z = y
    torch.testing.assert_close(q.log_prob(z), q.base_dist.log_prob(z0) - logdet, atol=1e-4, rtol=1e-4)
    refined = model.elbo(adata[:40].copy(), refine_steps=40, n_samples=64)
    assert np.isfinite(refined).all() and refined.mean() > model.elbo(adata[:40].copy(), n_samples=64).mean()
