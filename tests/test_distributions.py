import numpy as np
import pyro.distributions as pdist
import pytest
import torch

from cellvi.distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    sparse_lgamma_terms,
)


def _inputs(seed, shape=(64, 40), theta_shape=(40,)):
    g = torch.Generator().manual_seed(seed)
    log_mu = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    theta = torch.rand(theta_shape, generator=g, dtype=torch.float64) * 20 + 0.05
    x = torch.poisson(torch.rand(shape, generator=g, dtype=torch.float64) * 8, generator=g)
    x = x * (torch.rand(shape, generator=g, dtype=torch.float64) > 0.6)  # many zeros
    gate = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return x, log_mu, theta, gate


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("theta_shape", [(40,), (64, 40)])  # per gene, per cell-and-gene
def test_nb_matches_pyro_gamma_poisson(seed, theta_shape):
    x, log_mu, theta, _ = _inputs(seed, theta_shape=theta_shape)
    ours = NegativeBinomial(log_mu, theta).log_prob(x)
    ref = pdist.GammaPoisson(theta, theta / log_mu.exp()).log_prob(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_zinb_matches_pyro(seed):
    x, log_mu, theta, gate = _inputs(seed)
    ours = ZeroInflatedNegativeBinomial(log_mu, theta, gate).log_prob(x)
    ref = pdist.ZeroInflatedNegativeBinomial(
        total_count=theta, logits=log_mu - theta.log(), gate_logits=gate
    ).log_prob(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_poisson_matches_pyro(seed):
    x, log_mu, _, _ = _inputs(seed)
    torch.testing.assert_close(Poisson(log_mu).log_prob(x), pdist.Poisson(log_mu.exp()).log_prob(x),
                               rtol=1e-5, atol=1e-5)


def test_float32_matches_pyro_to_1e5():
    x, log_mu, theta, gate = (t.float() for t in _inputs(7))
    ours = NegativeBinomial(log_mu, theta).log_prob(x)
    ref = pdist.GammaPoisson(theta.double(), (theta / log_mu.exp()).double()).log_prob(x.double())
    assert torch.max((ours.double() - ref).abs() / (1 + ref.abs())) < 1e-5


def test_gradients_match_pyro():
    x, log_mu, theta, gate = _inputs(3)
    for which in ("nb", "zinb"):
        a = log_mu.clone().requires_grad_()
        b = log_mu.clone().requires_grad_()
        ta = theta.clone().requires_grad_()
        tb = theta.clone().requires_grad_()
        if which == "nb":
            NegativeBinomial(a, ta).log_prob(x).sum().backward()
            pdist.GammaPoisson(tb, tb / b.exp()).log_prob(x).sum().backward()
        else:
            ZeroInflatedNegativeBinomial(a, ta, gate).log_prob(x).sum().backward()
            pdist.ZeroInflatedNegativeBinomial(total_count=tb, logits=b - tb.log(),
                                               gate_logits=gate).log_prob(x).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(ta.grad, tb.grad)


def test_broadcast_over_sample_dimension():
    x, log_mu, theta, _ = _inputs(1)
    stacked = torch.stack([log_mu, log_mu + 0.5])  # (2, cells, genes) as in IWAE
    lp = NegativeBinomial(stacked, theta).log_prob(x)
    assert lp.shape == stacked.shape
    torch.testing.assert_close(lp[1], NegativeBinomial(log_mu + 0.5, theta).log_prob(x))


def test_sparse_terms_are_zero_on_zeros_and_exact_elsewhere():
    x, _, theta, _ = _inputs(2)
    terms = sparse_lgamma_terms(x, theta)
    assert torch.all(terms[x == 0] == 0)
    full = torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
    torch.testing.assert_close(terms, full)


def test_moments_and_sampling_monte_carlo():
    torch.manual_seed(0)
    log_mu = torch.tensor([[0.5, 2.0, 3.0]], dtype=torch.float64)
    theta = torch.tensor([0.7, 3.0, 50.0], dtype=torch.float64)
    gate = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    for d in (NegativeBinomial(log_mu, theta), ZeroInflatedNegativeBinomial(log_mu, theta, gate),
              Poisson(log_mu)):
        s = d.sample((40000,))
        assert s.shape == (40000, 1, 3)
        np.testing.assert_allclose(s.mean(0), d.mean, rtol=0.05)
        np.testing.assert_allclose(s.var(0), d.variance, rtol=0.1)
        # probabilities sum to one over the support
        grid = torch.arange(0, 3000, dtype=torch.float64).reshape(-1, 1, 1)
        total = d.log_prob(grid).exp().sum(0)
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("theta_shape", [(40,), (1, 40), (64, 40)])
def test_per_cell_sums_from_nonzeros_match_dense(which, theta_shape):
    from cellvi.distributions import nonzeros_of

    x, log_mu, theta, gate = _inputs(11, theta_shape=theta_shape)
    d = {"nb": lambda: NegativeBinomial(log_mu, theta),
         "zinb": lambda: ZeroInflatedNegativeBinomial(log_mu, theta, gate),
         "poisson": lambda: Poisson(log_mu)}[which]()
    dense = d.log_prob(x).sum(-1)
    torch.testing.assert_close(d.log_prob_cells(x, nonzeros_of(x)), dense)
    torch.testing.assert_close(d.log_prob_cells(x), dense)
    # gradients agree too
    a = log_mu.clone().requires_grad_()
    b = log_mu.clone().requires_grad_()
    make = {"nb": lambda m: NegativeBinomial(m, theta), "poisson": Poisson,
            "zinb": lambda m: ZeroInflatedNegativeBinomial(m, theta, gate)}[which]
    make(a).log_prob_cells(x, nonzeros_of(x)).sum().backward()
    make(b).log_prob(x).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("theta_shape", [(6,), (1, 6), (4, 6)])
def test_nb_core_gradcheck(theta_shape):
    from cellvi.distributions import _NBCore

    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(4, 6, generator=g, dtype=torch.float64) * 5)
    log_mu = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    theta = (torch.rand(theta_shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, t: _NBCore.apply(x, m, t), (log_mu, theta))
    # broadcasting over a leading sample dimension (IWAE)
    stacked = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t: _NBCore.apply(x, m, t), (stacked, theta))


@pytest.mark.parametrize("which", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("theta_shape", [(40,), (1, 40), (64, 40), (5, 64, 40)])
def test_per_cell_sums_from_nonzeros_with_sample_dimensions(which, theta_shape):
    """Parameters ``(samples, cells, genes)`` against cells x genes data (the ELBO, IWAE and
    outlier passes): the non-zero path equals the dense sum, gradients included."""
    from cellvi.distributions import nonzeros_of

    x, _, theta, _ = _inputs(12, theta_shape=theta_shape)
    g = torch.Generator().manual_seed(5)
    log_mu = torch.randn(5, 64, 40, generator=g, dtype=torch.float64) * 2
    gate = torch.randn(5, 64, 40, generator=g, dtype=torch.float64)
    make = {"nb": lambda m: NegativeBinomial(m, theta), "poisson": Poisson,
            "zinb": lambda m: ZeroInflatedNegativeBinomial(m, theta, gate)}[which]
    a = log_mu.clone().requires_grad_()
    b = log_mu.clone().requires_grad_()
    sparse = make(a).log_prob_cells(x, nonzeros_of(x))
    dense = make(b).log_prob(x).sum(-1)
    assert sparse.shape == (5, 64)
    torch.testing.assert_close(sparse, dense)
    with torch.no_grad():  # the inference path (NB: two dense passes) gives the same sums
        torch.testing.assert_close(make(log_mu).log_prob_cells(x, nonzeros_of(x)), dense.detach())
        torch.testing.assert_close(make(log_mu[0]).log_prob_cells(x, nonzeros_of(x)),
                                   make(log_mu[0]).log_prob(x).sum(-1))
    sparse.sum().backward()
    dense.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("theta_shape", [(40,), (1, 40), (64, 40)])
def test_softmax_nb_matches_pyro_with_gradients(theta_shape):
    """The decoder's NB (log mean = log_softmax(logits) + log library; the fused training path
    for per-gene theta) against Pyro's GammaPoisson: values and gradients in the logits and
    theta; the inference path and ``log_mu`` agree too."""
    from cellvi.distributions import SoftmaxNegativeBinomial, _NBCells, _SoftmaxNBCells, nonzeros_of

    x, _, theta0, _ = _inputs(13, theta_shape=theta_shape)
    g = torch.Generator().manual_seed(3)
    logits0 = torch.randn(64, 40, generator=g, dtype=torch.float64)
    log_lib = torch.rand(64, 1, generator=g, dtype=torch.float64) * 4 + 3
    w = torch.randn(64, generator=g, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        logits, theta = logits0.clone().requires_grad_(), theta0.clone().requires_grad_()
        if fused:
            out = SoftmaxNegativeBinomial(logits, log_lib, theta).log_prob_cells(x, nonzeros_of(x))
        else:
            mu = torch.softmax(logits, -1) * log_lib.exp()
            th = theta.expand(64, 40)
            out = pdist.GammaPoisson(th, th / mu).log_prob(x).sum(-1)
        grads.append((out, *torch.autograd.grad((out * w).sum(), (logits, theta))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    d = SoftmaxNegativeBinomial(logits0, log_lib, theta0)
    torch.testing.assert_close(d.log_mu, torch.log_softmax(logits0, -1) + log_lib)
    with torch.no_grad():
        torch.testing.assert_close(d.log_prob_cells(x, nonzeros_of(x)), grads[0][0].detach())
    # the hand-written backward passes of both fused functions, in float64
    small = (slice(0, 5), slice(0, 7))
    xs = x[small]
    rows, cols, v = nonzeros_of(xs)
    lg = logits0[small].clone().requires_grad_()
    th = theta0[..., :7] if theta0.dim() == 1 or theta0.shape[0] == 1 else theta0[small]
    th = th.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: _NBCells.apply(a, t, rows, cols, v), (lg, th))
    if th.dim() == 1 or th.shape[0] == 1:
        assert torch.autograd.gradcheck(
            lambda a, t: _SoftmaxNBCells.apply(a, log_lib[:5], t, rows, cols, v), (lg, th))


@pytest.mark.parametrize("theta_shape", [(40,), (1, 40)])
@pytest.mark.parametrize("samples", [(), (3,)])
def test_softmax_nb_inference_path_matches_pyro(theta_shape, samples):
    """Without gradients the decoder's NB sums each cell's log-likelihood in place in the
    log-softmax's output (leading sample dimensions kept): Pyro's GammaPoisson sums, and
    the distribution's ``log_mu`` is not formed on the way."""
    from cellvi.distributions import SoftmaxNegativeBinomial, nonzeros_of

    x, _, theta, _ = _inputs(17, theta_shape=theta_shape)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(*samples, 64, 40, generator=g, dtype=torch.float64) * 2
    log_lib = torch.rand(64, 1, generator=g, dtype=torch.float64) * 4 + 3
    d = SoftmaxNegativeBinomial(logits, log_lib, theta)
    with torch.no_grad():
        out = d.log_prob_cells(x, nonzeros_of(x))
    assert d._log_mu is None
    mu = torch.softmax(logits, -1) * log_lib.exp()
    th = theta.expand_as(mu)
    ref = pdist.GammaPoisson(th, th / mu).log_prob(x).sum(-1)
    assert out.shape == (*samples, 64)
    torch.testing.assert_close(out, ref)
