"""The bounds against closed forms and Pyro's ELBO implementations."""

import math

import pyro
import pyro.distributions as pdist
import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from cellvi.objectives import Constant, LinearWarmup, elbo, iwae, kl


def _linear_gaussian(seed=0, d_z=2, d_x=3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_x, d_z, generator=g, dtype=torch.float64)
    b = torch.randn(d_x, generator=g, dtype=torch.float64)
    sigma = 0.5
    x = torch.randn(5, d_x, generator=g, dtype=torch.float64)
    prior = Independent(Normal(torch.zeros(d_z, dtype=torch.float64), torch.ones(d_z, dtype=torch.float64)), 1)

    def decode(z):
        return Independent(Normal(z @ W.T + b, sigma), 1)

    # exact posterior and evidence
    cov_x = W @ W.T + sigma**2 * torch.eye(d_x, dtype=torch.float64)
    log_px = MultivariateNormal(b, cov_x).log_prob(x)
    prec = torch.eye(d_z, dtype=torch.float64) + W.T @ W / sigma**2
    post_cov = torch.linalg.inv(prec)
    post_mean = (x - b) @ W @ post_cov.T / sigma**2
    return x, W, b, sigma, prior, decode, log_px, post_mean, post_cov


def test_kl_closed_form_and_monte_carlo_agree():
    torch.manual_seed(0)
    q = Independent(Normal(torch.randn(4, 3), torch.rand(4, 3) + 0.3), 1)
    p = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    z = q.sample((200000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(kl(q, p), mc, rtol=0.02, atol=0.02)


def test_kl_without_closed_form_uses_sample():
    q = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    p = pdist.MixtureOfDiagNormals(torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2))
    z = torch.randn(2)
    torch.testing.assert_close(kl(q, p, z), q.log_prob(z) - p.log_prob(z))
    with pytest.raises(ValueError, match="sample"):
        kl(q, p)


def test_elbo_equals_evidence_at_exact_posterior():
    """With q = p(z|x) (full covariance) the bound is tight for every sample."""
    x, W, b, sigma, prior, decode, log_px, post_mean, post_cov = _linear_gaussian()
    q = MultivariateNormal(post_mean, post_cov)
    z = q.rsample()
    value = decode(z).log_prob(x) - (q.log_prob(z) - prior.log_prob(z))
    torch.testing.assert_close(value, log_px)
    iw = iwae(x, q, prior, decode, n_samples=3)
    torch.testing.assert_close(iw, log_px)


def test_iwae_tightens_towards_evidence_with_mean_field_q():
    x, W, b, sigma, prior, decode, log_px, post_mean, post_cov = _linear_gaussian(1)
    q = Independent(Normal(post_mean, post_cov.diagonal().sqrt()), 1)
    torch.manual_seed(0)
    z = q.rsample((20000,))
    single = (decode(z).log_prob(x) - (q.log_prob(z) - prior.log_prob(z))).mean(0)
    analytic = elbo(decode(z).log_prob(x).mean(0), q, prior)
    torch.testing.assert_close(single, analytic, rtol=0, atol=0.02)
    assert torch.all(analytic < log_px)
    bounds = [torch.stack([iwae(x, q, prior, decode, k) for _ in range(200)]).mean(0) for k in (1, 10, 200)]
    assert torch.all(bounds[0] < bounds[1]) and torch.all(bounds[1] < bounds[2])
    assert torch.all(bounds[2] <= log_px + 1e-3)
    assert torch.all(log_px - bounds[2] < 0.1 * (log_px - bounds[0]))


def test_elbo_matches_pyro_trace_mean_field_elbo():
    """Same model and guide in Pyro: its analytic-KL ELBO must equal ours."""
    x, W, b, sigma, prior, decode, log_px, post_mean, post_cov = _linear_gaussian(2)
    loc = post_mean + 0.3
    scale = post_cov.diagonal().sqrt().expand_as(loc) * 1.5

    def model(x):
        with pyro.plate("cells", x.shape[0]):
            z = pyro.sample("z", pdist.Normal(torch.zeros_like(loc), 1.0).to_event(1))
            pyro.sample("x", pdist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("cells", x.shape[0]):
            pyro.sample("z", pdist.Normal(loc, scale).to_event(1))

    pyro.set_rng_seed(0)
    loss = pyro.infer.TraceMeanField_ELBO(num_particles=20000, vectorize_particles=True).loss(model, guide, x)
    q = Independent(Normal(loc, scale), 1)
    torch.manual_seed(1)
    z = q.rsample((20000,))
    ours = elbo(decode(z).log_prob(x).mean(0), q, prior).sum()
    assert abs(-loss - float(ours)) < 0.05


def test_beta_weights_only_the_kl():
    q = Independent(Normal(torch.ones(3, 2), torch.ones(3, 2)), 1)
    p = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    lp = torch.tensor([-1.0, -2.0, -3.0])
    torch.testing.assert_close(elbo(lp, q, p, beta=0.0), lp)
    torch.testing.assert_close(elbo(lp, q, p, beta=0.5), lp - 0.5 * kl(q, p))


def test_linear_warmup_counts_steps():
    s = LinearWarmup(100)
    assert s(0) == 0.0 and s(50) == 0.5 and s(100) == 1.0 and s(10**6) == 1.0
    assert not s.done(99) and s.done(100)
    assert LinearWarmup(0)(0) == 1.0
    assert LinearWarmup(10, start=0.5, end=2.0)(5) == pytest.approx(1.25)
    c = Constant(0.3)
    assert c(0) == c(10**9) == 0.3 and c.done(0)
    assert math.isclose(LinearWarmup(3)(1), 1 / 3)


def _mmd2_reference(a: torch.Tensor, b: torch.Tensor, scales, dim: int) -> float:
    """MMD² as the three kernel means, written out (biased V-statistic)."""
    def k(x, y):
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (s * dim)) for s in scales)
    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())


def test_batch_mmd_matches_kernel_means_and_sees_a_shift():
    from cellvi.objectives import MMD_SCALES, batch_mmd

    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 4, generator=g)
    codes = torch.randint(0, 3, (300, 1), generator=g)
    same = float(batch_mmd(z, codes))
    shifted = z + 1.5 * (codes == 1).float()
    moved = float(batch_mmd(shifted, codes))
    ref = sum(float((codes[:, 0] == b).float().mean())
              * _mmd2_reference(shifted[codes[:, 0] == b], shifted, MMD_SCALES, 4)
              for b in range(3))
    assert moved == pytest.approx(ref, rel=1e-4)
    assert same < 0.02 and moved > 10 * same
    # a single batch in the mini-batch: nothing to compare, no penalty
    assert float(batch_mmd(z, torch.zeros(300, 1, dtype=torch.long))) == 0.0
    # gradients flow to the latent
    zz = shifted.clone().requires_grad_(True)
    batch_mmd(zz, codes).backward()
    assert zz.grad.abs().sum() > 0


def test_batch_mmd_of_a_large_batch_averages_interleaved_blocks():
    from cellvi.objectives import batch_mmd

    g = torch.Generator().manual_seed(1)
    codes = torch.sort(torch.randint(0, 2, (1000, 1), generator=g), dim=0).values  # sorted by batch
    z = torch.randn(1000, 3, generator=g) + 2.0 * (codes == 1).float()
    got = float(batch_mmd(z, codes, block=256))  # 4 blocks: cells 0, 4, 8, ... then 1, 5, ...
    blocks = [(z[i::4], codes[i::4]) for i in range(4)]
    ref = sum(float(batch_mmd(zb, cb, block=256)) * len(zb) for zb, cb in blocks) / 1000
    assert got == pytest.approx(ref, rel=1e-6)
    # every block holds both batches although the cells are sorted, so the shift is seen
    assert got > 0.5 * float(batch_mmd(z, codes, block=1000))
    # at or below the block size it is the one-block statistic
    zs, cs = z[::4][:256], codes[::4][:256]
    one = float(batch_mmd(zs, cs, block=256))
    assert one > 0.1 and one == pytest.approx(float(batch_mmd(zs, cs, block=10_000)), rel=1e-6)


def test_batch_mmd_with_groups_ignores_composition_but_sees_a_shift_within_a_group():
    from cellvi.objectives import MMD_SCALES, batch_mmd

    g = torch.Generator().manual_seed(2)
    a = torch.randn(60, 3, generator=g)  # type A: the same cells in both batches
    b = torch.randn(40, 3, generator=g) + 4.0  # type B: only in batch 0
    z = torch.cat([a, b, a])
    codes = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(60, dtype=torch.long)])[:, None]
    types = torch.cat([torch.zeros(60), torch.ones(40), torch.zeros(60)]).long()
    plain = float(batch_mmd(z, codes))
    assert plain > 0.05  # batch 1 lacks type B: the plain penalty pulls it
    # grouped by type, batch 1's target is type A alone, which it matches exactly
    assert float(batch_mmd(z, codes, groups=types)) == pytest.approx(0.0, abs=1e-6)
    # one group for all cells is the plain statistic
    assert float(batch_mmd(z, codes, groups=torch.zeros(160, dtype=torch.long))) == pytest.approx(plain, rel=1e-6)
    # a shift of batch 1 within type A is still seen: against A's cells of both batches
    moved = z.clone()
    moved[100:] += 1.0
    got = float(batch_mmd(moved, codes, groups=types))
    w0, w1 = 100 / 160, 60 / 160
    # batch 0's target: its own mix (60% A, 40% B), A's half from each batch
    n0 = torch.cat([torch.full((60,), 0.6 / 120), torch.full((40,), 0.4 / 40), torch.full((60,), 0.6 / 120)])
    n1 = torch.cat([torch.full((60,), 1 / 120), torch.zeros(40), torch.full((60,), 1 / 120)])
    ref = (w0 * _weighted_mmd2(moved[:100], moved, n0, MMD_SCALES, 3)
           + w1 * _weighted_mmd2(moved[100:], moved, n1, MMD_SCALES, 3))
    assert got > 0.01 and got == pytest.approx(ref, rel=1e-4)
    # gradients flow, and interleaved blocks pass the groups along
    zz = moved.clone().requires_grad_(True)
    batch_mmd(zz, codes, groups=types).backward()
    assert zz.grad.abs().sum() > 0
    perm = torch.randperm(160, generator=g)
    blocks = float(batch_mmd(moved[perm], codes[perm], block=80, groups=types[perm]))
    ref_blocks = sum(float(batch_mmd(moved[perm][i::2], codes[perm][i::2], groups=types[perm][i::2])) * 80
                     for i in range(2)) / 160
    assert blocks == pytest.approx(ref_blocks, rel=1e-6)


def _weighted_mmd2(x, y, w, scales, dim):
    """Squared MMD between the uniform measure on ``x`` and the ``w``-weighted one on ``y``,
    written out from the kernel means."""
    def k(a, b):
        d2 = torch.cdist(a, b).square()
        return sum(torch.exp(-d2 / (s * dim)) for s in scales)
    u = torch.full((len(x),), 1.0 / len(x))
    return float(u @ k(x, x) @ u - 2 * u @ k(x, y) @ w + w @ k(y, y) @ w)


def test_batch_adversary_learns_the_batch_and_its_penalty_is_the_kl_to_the_uninformed_target():
    from cellvi.objectives import BatchAdversary

    g = torch.Generator().manual_seed(3)
    a = torch.randn(60, 3, generator=g)  # type A in both batches, batch 1 shifted
    b = torch.randn(40, 3, generator=g) + 4.0  # type B only in batch 0
    z = torch.cat([a, b, a + 2.0])
    codes = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(60, dtype=torch.long)])[:, None]
    types = torch.cat([torch.zeros(60), torch.ones(40), torch.zeros(60)]).long()
    adv = BatchAdversary(3, [2], n_groups=2, n_hidden=16, seed=0)
    opt = torch.optim.Adam(adv.parameters(), lr=1e-2)
    # the classifier's term moves the classifier only, the penalty moves z only
    zz = z.clone().requires_grad_(True)
    ce, pen = adv(zz, codes, types)
    ce.backward()
    assert zz.grad is None and all(p.grad.abs().sum() > 0 for p in adv.parameters())
    opt.zero_grad()
    pen.backward()
    assert zz.grad.abs().sum() > 0 and all(p.grad is None for p in adv.parameters())
    first = float(ce.detach())
    for _ in range(300):
        opt.zero_grad()
        ce, _ = adv(z, codes, types)
        ce.backward()
        opt.step()
    assert float(ce.detach()) < 0.3 * first  # the shift of batch 1 within type A is learnt
    # the penalty is the mean KL(target || q(b | z, g)), written out: type B's target is batch 0
    # alone, type A's the batches' 50/50 share of A
    zz = z.clone().requires_grad_(True)
    got = adv.penalty(zz, codes, types)
    with torch.no_grad():
        q = torch.softmax(adv.net(torch.cat([z, torch.nn.functional.one_hot(types, 2).float()], 1)), 1)
    t = torch.where(types[:, None] == 1, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    ref = (t * (torch.log(t.clamp_min(1e-12)) - torch.log(q))).sum(1).mean()
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert float(got.detach()) > 0.2  # the classifier tells the batches apart: the encoder is pushed
    got.backward()
    assert zz.grad[:60].abs().sum() > 0 and zz.grad[100:].abs().sum() > 0
    # cells of a type one batch holds alone: their target is that batch, which the classifier
    # already predicts, so they are (almost) not pushed
    assert zz.grad[60:100].abs().mean() < 0.05 * zz.grad[100:].abs().mean()
    # without groups the target is the mini-batch's batch shares, whatever the cell
    plain = BatchAdversary(3, [2], seed=0)
    with torch.no_grad():
        p = torch.softmax(plain.net(z), 1)
    t0 = torch.tensor([100 / 160, 60 / 160])
    ref0 = (t0 * (torch.log(t0) - torch.log(p))).sum(1).mean()
    assert float(plain.penalty(z, codes).detach()) == pytest.approx(float(ref0), rel=1e-5)
    # the same seed gives the same classifier, and building it leaves torch's global generator alone
    state = torch.random.get_rng_state()
    again = BatchAdversary(3, [2], seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(plain.state_dict().values(), again.state_dict().values(),
                                                   strict=True))
