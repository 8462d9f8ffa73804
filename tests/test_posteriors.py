import pytest
import torch
from torch.distributions import Independent, Normal

from cellvi.posteriors import GaussianEncoder


def test_encoder_returns_diagonal_gaussian():
    torch.manual_seed(0)
    enc = GaussianEncoder(12, 4, n_hidden=16, n_cats_per_cov=[3]).eval()
    q = enc(torch.randn(9, 12), torch.randint(0, 3, (9, 1)))
    assert isinstance(q, Independent) and isinstance(q.base_dist, Normal)
    assert q.batch_shape == (9,) and q.event_shape == (4,)
    assert torch.all(q.base_dist.scale >= 1e-4)
    z = q.rsample()
    assert z.requires_grad


def test_reparameterised_gradient_reaches_encoder():
    enc = GaussianEncoder(5, 2, n_hidden=8)
    q = enc(torch.randn(6, 5))
    q.rsample().sum().backward()
    assert enc.loc.weight.grad is not None and enc.raw_scale.weight.grad is not None


# -- flow posteriors --------------------------------------------------------------------------
def _flow(seed=0):
    from cellvi.posteriors import IAFEncoder

    torch.manual_seed(seed)
    enc = IAFEncoder(7, 3, n_flows=3, n_hidden=16).eval()
    for made in enc.flows:  # away from the identity start
        for p in made.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return enc


def test_flow_log_prob_is_base_density_minus_summed_log_determinants():
    enc = _flow()
    x = torch.randn(6, 7)
    with torch.no_grad():
        q = enc(x)
        h = enc.trunk(x)
        base = enc._base(h)
        z0 = base.sample((5,))
        z, logdet = z0, torch.zeros(5, 6)
        for made in enc.flows:  # the IAF steps by hand
            shift, gate = made(z, h)
            sigma = torch.sigmoid(gate)
            logdet = logdet + torch.log(sigma).sum(-1)
            z = sigma * z + (1 - sigma) * shift
        expected = base.log_prob(z0) - logdet
        # a value q did not sample itself: the autoregressive inverse is exercised
        torch.testing.assert_close(q.log_prob(z.clone()), expected, atol=1e-4, rtol=1e-4)
        # its own samples (the cached path) agree with the same formula
        zs = q.rsample((5,))
        assert torch.isfinite(q.log_prob(zs)).all() and zs.shape == (5, 6, 3)
    assert q.mean.shape == (6, 3) and q.variance.shape == (6, 3)


def test_flow_is_autoregressive_and_starts_at_the_identity():
    from cellvi.posteriors import IAFEncoder

    made = _flow().flows[0]
    z, h = torch.randn(1, 3, requires_grad=True), torch.randn(1, 16)
    shift, _ = made(z, h)
    for i in range(3):  # output i depends on inputs before i in the order only
        (grad,) = torch.autograd.grad(shift[0, i], z, retain_graph=True)
        assert (grad[0, i:] == 0).all()
    fresh = IAFEncoder(7, 3, n_flows=2, n_hidden=16).eval()
    x = torch.randn(4, 7)
    with torch.no_grad():  # zero-initialised heads: sigma = sigmoid(2) scales the base only
        q, base = fresh(x), fresh._base(fresh.trunk(x))
        torch.testing.assert_close(q.mean, base.mean * torch.sigmoid(torch.tensor(2.0)) ** 2)


def test_models_train_save_and_load_with_a_flow_posterior(tmp_path):
    import numpy as np

    import cellvi

    adata = cellvi.datasets.synthetic_counts(200, 30, n_groups=2, n_batches=2, seed=1)
    model = cellvi.models.NBVAE(adata, batch_key="batch", n_latent=3, posterior="iaf", n_flows=2)
    model.fit(max_epochs=3, verbose=False)
    z = model.get_latent(adata)
    assert np.isfinite(z).all() and np.isfinite(model.history["train_elbo"]).all()
    assert np.isfinite(model.marginal_log_likelihood(adata[:20].copy(), n_samples=20)).all()
    model.save(tmp_path / "m")
    back = cellvi.models.NBVAE.load(tmp_path / "m", device="cpu")
    assert back.settings["posterior"] == "iaf"
    np.testing.assert_allclose(back.get_latent(adata), z, atol=1e-6)
    cyto = cellvi.datasets.synthetic_cytometry(300, 5, n_populations=2, seed=0)
    out = cellvi.tl.gmvae(cyto, n_components=2, posterior="iaf", max_epochs=3, warmup_epochs=1,
                          copy=True, verbose=False)
    assert out.uns["gmvae"]["settings"]["posterior"] == "iaf"
    with pytest.raises(ValueError, match="posterior must be one of"):
        cellvi.models.NBVAE(adata, posterior="maf")
