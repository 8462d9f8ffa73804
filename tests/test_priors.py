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
