"""The VAE core and its declared components (Encoder, Decoder, Prior, CellLikelihood)."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from cellvi.decoders import ContinuousDecoder, CountDecoder, Decoder
from cellvi.distributions import CellLikelihood, Factorized, NegativeBinomial
from cellvi.objectives import ELBO, log_likelihood
from cellvi.posteriors import Encoder, GaussianEncoder
from cellvi.priors import MixturePrior, Prior, StandardNormal
from cellvi.vae import VAE, MixtureVAE


class WideNormal(Prior):
    """A user-written prior: N(0, 4 I)."""

    def __init__(self, n_latent):
        super().__init__()
        self.n_latent = n_latent
        self.register_buffer("scale", torch.full((n_latent,), 2.0))

    def forward(self):
        return Independent(Normal(torch.zeros_like(self.scale), self.scale), 1)


def _vae(prior=None, cls=VAE):
    torch.manual_seed(0)
    return cls(GaussianEncoder(5, 2, n_hidden=8), ContinuousDecoder(2, 5, n_hidden=8),
               prior if prior is not None else StandardNormal(2), log1p_input=False)


def test_components_are_declared_and_checked():
    assert isinstance(GaussianEncoder(5, 2), Encoder)
    assert isinstance(ContinuousDecoder(2, 5), Decoder) and isinstance(CountDecoder(2, 5), Decoder)
    assert isinstance(StandardNormal(2), Prior) and isinstance(MixturePrior(2, 3), Prior)
    with pytest.raises(TypeError, match="prior must be a cellvi.priors.Prior"):
        VAE(GaussianEncoder(5, 2), ContinuousDecoder(2, 5), torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="encoder must be"):
        VAE(torch.nn.Linear(5, 2), ContinuousDecoder(2, 5), StandardNormal(2))
    with pytest.raises(TypeError, match="MixturePrior"):
        _vae(StandardNormal(2), cls=MixtureVAE)
    with pytest.raises(TypeError):
        Prior()  # abstract


def test_every_decoder_gives_per_cell_log_probs():
    z = torch.randn(7, 2)
    px = ContinuousDecoder(2, 5)(z)
    assert isinstance(px, CellLikelihood) and isinstance(px, Factorized)
    x = torch.randn(7, 5)
    torch.testing.assert_close(px.log_prob_cells(x), px.base_dist.log_prob(x).sum(-1))
    counts = CountDecoder(2, 5)(z, None, torch.zeros(7, 1))
    assert isinstance(counts, NegativeBinomial) and isinstance(counts, CellLikelihood)
    with pytest.raises(ValueError, match="log_library"):
        CountDecoder(2, 5)(z)
    # a plain torch distribution still works, summed over features
    plain = Normal(torch.zeros(7, 5), 1.0)
    torch.testing.assert_close(log_likelihood(plain, x), plain.log_prob(x).sum(-1))


def test_a_user_prior_plugs_in_and_the_objective_can_override_the_prior():
    x = {"x": torch.randn(6, 5)}
    vae = _vae(WideNormal(2)).eval()
    torch.manual_seed(1)
    log_px, kl = vae.elbo_terms(x)
    qz = vae.encode(x)
    torch.testing.assert_close(kl, kl_divergence(qz, WideNormal(2)()))
    # the objective's fixed prior replaces the model's for this objective only
    torch.manual_seed(1)
    _, kl_std = ELBO(prior=StandardNormal(2)).terms(vae, x)
    torch.testing.assert_close(kl_std, kl_divergence(qz, StandardNormal(2)()))
    assert isinstance(vae.prior, WideNormal)


def test_objective_adds_the_mixture_hyperprior_once_per_dataset():
    mix = MixturePrior(2, 3, sparsity=0.01)
    vae = _vae(mix, cls=MixtureVAE).eval()
    x = {"x": torch.randn(6, 5)}
    torch.manual_seed(2)
    loss, log_px, kl = ELBO().loss(vae, x, beta=1.0, n_obs=100)
    expected = -(log_px - kl).mean() - mix.log_prior_weights(100) / 100
    torch.testing.assert_close(loss, expected)
    # with a fixed standard normal prior (the warm-up) there is no hyperprior term
    torch.manual_seed(2)
    loss_std, log_px, kl = ELBO(prior=StandardNormal(2)).loss(vae, x, beta=0.5, n_obs=100)
    torch.testing.assert_close(loss_std, -(log_px - 0.5 * kl).mean())


def test_count_decoder_offsets_in_one_matrix_product_equal_gathered_offsets():
    """With covariates, the logits come from one product with the one-hot codes (no gathered
    cells x genes offset block); they and their gradients equal ``logits(h) + offsets``, and
    with sample dimensions in front (IWAE) the gathered path gives the same values."""
    torch.manual_seed(0)
    dec = CountDecoder(3, 6, n_cats_per_cov=(2, 3))
    for emb in dec.batch_offset.embeddings:
        torch.nn.init.normal_(emb.weight)
    covs = torch.stack([torch.randint(0, 2, (9,)), torch.randint(0, 3, (9,))], 1)
    h = torch.randn(9, dec.logits.in_features)
    fused = dec._logits(h, covs)
    gathered = dec.logits(h) + dec.batch_offset(covs)
    torch.testing.assert_close(fused, gathered)
    w = torch.randn(9, 6)
    params = [dec.logits.weight, dec.logits.bias, *(e.weight for e in dec.batch_offset.embeddings)]
    for a, b in zip(torch.autograd.grad((fused * w).sum(), params),
                    torch.autograd.grad((gathered * w).sum(), params), strict=True):
        torch.testing.assert_close(a, b)
    stacked = dec._logits(h.expand(2, 9, -1), covs)
    torch.testing.assert_close(stacked[1], gathered)
