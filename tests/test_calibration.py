"""Oracles with exact posteriors, and the calibration report: the exact posterior passes,
an over-confident one fails; ECE and cluster matching on known cases."""

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import cellvi
from cellvi.diagnostics import calibration_report, expected_calibration_error, match_clusters


def test_exact_posterior_of_the_linear_gaussian_is_gaussian_conditioning():
    a = cellvi.datasets.linear_gaussian(300, 8, n_latent=2, noise=0.4, seed=1)
    post = cellvi.datasets.exact_posterior(a)
    o = a.uns["oracle"]
    W, b = o["W"], o["b"]
    # covariance form: E[z|x] = W^T (W W^T + s2 I)^-1 (x - b), Cov = I - W^T (...)^-1 W
    Sxx = W @ W.T + 0.16 * np.eye(8)
    mean = (a.X - b) @ np.linalg.solve(Sxx, W)
    np.testing.assert_allclose(post.means[:, 0], mean, atol=1e-4)
    np.testing.assert_allclose(post.covariances[0], np.eye(2) - W.T @ np.linalg.solve(Sxx, W),
                               atol=1e-6)
    np.testing.assert_allclose(post.probs, 1.0)


def test_exact_cluster_posterior_matches_monte_carlo_integration():
    a = cellvi.datasets.gaussian_mixture(50, 6, n_populations=3, n_latent=2, noise=0.8, seed=2)
    post = cellvi.datasets.exact_posterior(a)
    o = a.uns["oracle"]
    rng = np.random.default_rng(0)
    logp = []
    for w, mu, cov in zip(o["weights"], o["means"], o["covariances"], strict=True):
        z = rng.multivariate_normal(mu, cov, 50000)  # p(x|c) = E_{p(z|c)} p(x|z)
        lik = multivariate_normal(np.zeros(6), o["noise"] ** 2 * np.eye(6))
        ll = np.stack([lik.logpdf(xi - (z @ o["W"].T + o["b"])) for xi in a.X])
        logp.append(np.log(w) + logsumexp(ll, 1) - np.log(len(z)))
    logp = np.stack(logp, 1)
    mc = np.exp(logp - logsumexp(logp, 1, keepdims=True))
    np.testing.assert_allclose(post.probs, mc, atol=0.015)
    codes = a.obs["population"].cat.codes.to_numpy()
    assert (post.probs.argmax(1) == codes).mean() > 0.5


def test_expected_calibration_error_and_matching():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), 20000)
    labels = (rng.random((20000, 1)) > np.cumsum(p, 1)[:, :-1]).sum(1)  # drawn from p
    assert expected_calibration_error(p, labels) < 0.02
    onehot = np.eye(4)[p.argmax(1)]
    acc = (p.argmax(1) == labels).mean()
    assert expected_calibration_error(onehot, labels) == pytest.approx(1 - acc)
    permuted = p[:, [2, 0, 3, 1]]  # clusters named differently: matching undoes it
    np.testing.assert_allclose(match_clusters(permuted, labels, 4), p)
    extra = np.concatenate([p[:, :3], p[:, 3:] / 2, p[:, 3:] / 2], 1)  # one label split in two
    np.testing.assert_allclose(match_clusters(extra, labels, 4), p, atol=1e-12)


@pytest.fixture(scope="module")
def linear_fit():
    a = cellvi.datasets.linear_gaussian(600, 8, n_latent=2, seed=3)
    model = cellvi.models.GMVAE(a, n_components=1, n_latent=2).fit(max_epochs=30, warmup_epochs=5,
                                                                   batch_size=64, verbose=False)
    return model, a


def test_report_passes_the_exact_posterior_and_fails_an_overconfident_one(linear_fit):
    model, a = linear_fit
    r = calibration_report(model, a, n_samples=199)
    exact = r.summary.loc["exact"]
    assert abs(exact["coverage_50"] - 0.5) < 0.02 and abs(exact["coverage_90"] - 0.9) < 0.02
    assert exact["sbc_pvalue"] > 0.01
    assert r.sbc_ranks["model"].shape == (10, 8) and r.sbc_ranks["model"].sum() == 600 * 8
    assert r.reliability is None and "ece" not in r.summary
    with torch_no_scale(model):  # posterior collapsed to its mean: intervals far too narrow
        bad = calibration_report(model, a, n_samples=99).summary.loc["model"]
    assert bad["coverage_90"] < 0.5 and bad["sbc_pvalue"] < 1e-6
    with pytest.raises(cellvi.errors.MissingKeyError, match="oracle"):
        calibration_report(model, cellvi.datasets.synthetic_cytometry(100, 8, seed=0))


class torch_no_scale:
    def __init__(self, model):
        self.layer = model.module.encoder.raw_scale

    def __enter__(self):
        import torch

        self.saved = [t.detach().clone() for t in (self.layer.weight, self.layer.bias)]
        with torch.no_grad():
            self.layer.weight.zero_()
            self.layer.bias.fill_(-30.0)

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            self.layer.weight.copy_(self.saved[0])
            self.layer.bias.copy_(self.saved[1])


def test_report_scores_cluster_probabilities_on_the_mixture_oracle():
    a = cellvi.datasets.gaussian_mixture(600, 8, n_populations=3, separation=2.0, seed=4)
    model = cellvi.models.GMVAE(a, n_components=3).fit(max_epochs=30, warmup_epochs=5,
                                                       batch_size=64, verbose=False)
    r = calibration_report(model, a, n_samples=49)
    s = r.summary
    # the model's probabilities are those tl.gmvae writes: its ECE is recomputable from them
    probs = match_clusters(model.transform(a).probs.astype(float), codes := a.obs["population"].cat.codes.to_numpy(), 3)
    assert s.loc["model", "ece"] == pytest.approx(expected_calibration_error(probs, codes))
    assert {"ece", "tv", "accuracy"} <= set(s.columns)
    assert s.loc["exact", "tv"] == 0 and s.loc["exact", "ece"] < 0.05
    assert 0 <= s.loc["model", "ece"] <= 1 and s.loc["model", "accuracy"] > 0.5
    assert r.reliability["n"].sum() == 600
