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
