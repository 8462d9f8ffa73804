import math

import torch

from cellvi.priors import StandardNormal


def test_standard_normal_log_prob_closed_form():
    prior = StandardNormal(3)
    z = torch.randn(7, 3)
    expected = -0.5 * (z**2).sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(prior().log_prob(z), expected)
    assert prior().event_shape == (3,)


def test_prior_has_no_parameters_and_moves_with_module():
    prior = StandardNormal(2)
    assert list(prior.parameters()) == []
    assert {n for n, _ in prior.named_buffers()} == {"loc", "scale"}
    prior = prior.double()
    assert prior().mean.dtype == torch.float64


# -- mixture prior -----------------------------------------------------------------------
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as pdist  # noqa: E402
import pytest  # noqa: E402
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal  # noqa: E402

from cellvi.objectives import elbo, log_likelihood  # noqa: E402
from cellvi.priors import MixturePrior  # noqa: E402


def _mixture(k=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = MixturePrior(d, k).double()
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    prior.init_from((w / w.sum()).numpy(), torch.randn(k, d, generator=g, dtype=torch.float64).numpy() * 2,
                    (torch.rand(k, d, generator=g, dtype=torch.float64) + 0.3).numpy())
    return prior


def _reference(prior):
    return MixtureSameFamily(Categorical(logits=prior.log_weights),
                             Independent(Normal(prior.loc, prior.scale), 1))


def test_mixture_log_prob_matches_mixture_same_family():
    prior = _mixture()
    z = torch.randn(50, 3, dtype=torch.float64) * 3
    torch.testing.assert_close(prior().log_prob(z), _reference(prior).log_prob(z), atol=1e-5, rtol=0)
    zs = torch.randn(7, 5, 3, dtype=torch.float64)  # sample dimensions in front (IWAE)
    torch.testing.assert_close(prior().log_prob(zs), _reference(prior).log_prob(zs), atol=1e-5, rtol=0)


def test_responsibilities_are_bayes_rule():
    prior = _mixture()
    z = torch.randn(20, 3, dtype=torch.float64)
    ref = _reference(prior)
    comp = ref.component_distribution.log_prob(z.unsqueeze(-2))
    expected = torch.softmax(comp + prior.log_weights, -1)
    torch.testing.assert_close(prior.responsibilities(z), expected)
    torch.testing.assert_close(prior.responsibilities(z).sum(-1), torch.ones(20, dtype=torch.float64))


def test_init_from_sets_parameters():
    prior = MixturePrior(2, 3)
    prior.init_from([0.5, 0.3, 0.2], [[0, 0], [1, 1], [2, 2]], [[1, 1], [0.5, 0.5], [2, 2]])
    torch.testing.assert_close(prior.weights, torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(prior.scale, torch.tensor([[1.0, 1], [0.5, 0.5], [2, 2]]))


def test_pruned_components_have_zero_weight_and_responsibility():
    prior = _mixture(k=4)
    with torch.no_grad():
        prior.logits[1] = -20.0
    dropped = prior.prune(1e-3)
    assert dropped == [1] and prior.n_active == 3
    assert float(prior.weights.detach()[1]) == 0.0
    assert torch.isfinite(prior().log_prob(torch.randn(5, 3, dtype=torch.float64))).all()
    assert float(prior.responsibilities(torch.randn(5, 3, dtype=torch.float64)).detach()[:, 1].abs().max()) == 0.0
    # at least one component always stays
    assert len(prior.prune(2.0)) == 2 and prior.n_active == 1


def test_dirichlet_map_update_of_weights():
    prior = MixturePrior(2, 4, sparsity=0.1)
    prior.update_weights(torch.tensor([50.0, 30.0, 15.0, 5.0]))  # M = 100 cells, s*M = 10
    # π ∝ max(0, N_c - 10): 40, 20, 5, 0 -> the last component is switched off
    torch.testing.assert_close(prior.weights, torch.tensor([40.0, 20.0, 5.0, 0.0]) / 65)
    assert prior.active.tolist() == [True, True, True, False]
    flat = MixturePrior(2, 2)
    flat.update_weights(torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(flat.weights, torch.tensor([0.75, 0.25]))


def test_sparse_dirichlet_log_density():
    prior = _mixture(k=3)
    prior.sparsity = 0.01
    n = 1000
    alpha = 1 - 0.01 * n
    expected = (alpha - 1) * prior.log_weights.sum()
    torch.testing.assert_close(prior.log_prior_weights(n), expected)
    prior.sparsity = None
    assert float(prior.log_prior_weights(n)) == 0.0


@pytest.mark.parametrize("n_particles", [1, 3])
def test_elbo_with_c_summed_out_equals_pyro_trace_enum_elbo(n_particles):
    """Our per-cell ELBO (log p(x|z) + log Σ_c π_c N(z; μ_c, σ_c) - log q(z|x)) against
    Pyro's TraceEnum_ELBO, which enumerates c exactly, on the same fixed parameters and the
    same reparameterised draws (same seed, same sample shape)."""
    torch.set_default_dtype(torch.float64)
    try:
        prior = _mixture(k=3, d=2, seed=1)
        g = torch.Generator().manual_seed(2)
        n, f = 5, 4
        x = torch.randn(n, f, generator=g)
        w, b = torch.randn(2, f, generator=g), torch.randn(f, generator=g)
        noise = torch.rand(f, generator=g) + 0.5
        q_loc, q_scale = torch.randn(n, 2, generator=g), torch.rand(n, 2, generator=g) + 0.2
        log_pi, mu, sigma = prior.log_weights.detach(), prior.loc.detach(), prior.scale.detach()

        def model(x):
            with pyro.plate("cells", n):
                c = pyro.sample("c", pdist.Categorical(logits=log_pi), infer={"enumerate": "parallel"})
                z = pyro.sample("z", pdist.Normal(mu[c], sigma[c]).to_event(1))
                pyro.sample("x", pdist.Normal(z @ w + b, noise).to_event(1), obs=x)

        def guide(x):
            with pyro.plate("cells", n):
                pyro.sample("z", pdist.Normal(q_loc, q_scale).to_event(1))

        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        loss = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1, num_particles=n_particles,
                                         vectorize_particles=n_particles > 1).loss(model, guide, x)
        torch.manual_seed(123)
        qz = Independent(Normal(q_loc, q_scale), 1)
        z = qz.rsample((n_particles,)) if n_particles > 1 else qz.rsample()
        ours = elbo(log_likelihood(Independent(Normal(z @ w + b, noise), 1), x), qz, prior(), z)
        assert abs(-loss - float(ours.sum(-1).mean() if n_particles > 1 else ours.sum())) < 1e-5 * (1 + abs(loss))
    finally:
        torch.set_default_dtype(torch.float32)
        np.random.seed(None)


def test_responsibilities_after_pruning_match_the_full_mixture():
    import torch

    from cellvi.priors import GaussianMixture, MixturePrior

    torch.manual_seed(0)
    prior = MixturePrior(4, 6)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(6))
        prior.active[[1, 4]] = False
    z = torch.randn(3, 50, 4)
    full = GaussianMixture(prior.log_weights, prior.loc, prior.scale).responsibilities(z)
    r = prior.responsibilities(z)
    assert r.shape == (3, 50, 6) and torch.all(r[..., [1, 4]] == 0)
    torch.testing.assert_close(r, full)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 50))


def test_pruned_components_are_left_out_of_log_prob_with_the_same_values_and_gradients():
    """``prior()`` keeps the active components only; ``log p(z)``, its gradients (zero for
    switched-off components) and a later change of ``active`` agree with the full mixture."""
    prior = _mixture(k=6, d=3)
    z = torch.randn(4, 30, 3, dtype=torch.float64)
    with torch.no_grad():
        prior.active[[1, 4]] = False
    assert prior().loc.shape == (4, 3)
    out = prior().log_prob(z).sum()
    ref = _reference(prior).log_prob(z).sum()
    grads = torch.autograd.grad(out, [prior.logits, prior.loc, prior.raw_scale])
    refs = torch.autograd.grad(ref, [prior.logits, prior.loc, prior.raw_scale])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r)
    assert torch.all(grads[1][[1, 4]] == 0)
    with torch.no_grad():  # in place, as pruning and merging do: the cached index follows
        prior.active[0] = False
    assert prior().loc.shape == (3, 3)
    torch.testing.assert_close(prior().log_prob(z), _reference(prior).log_prob(z))
    prior.load_state_dict({**prior.state_dict(), "active": torch.ones(6, dtype=torch.bool)})
    assert prior().loc.shape == (6, 3)
