import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from cellvi.train import DeviceData, DeviceMatrix, TrainingDiverged, default_max_epochs, train


def test_device_matrix_rows_match_dense():
    rng = np.random.default_rng(0)
    X = sp.random(200, 37, density=0.1, format="csr", random_state=0, dtype=np.float32)
    X = X.tolil()
    X[5] = 0  # an empty row
    X = X.tocsr()
    dm = DeviceMatrix(X, torch.device("cpu"))
    assert dm.sparse
    idx = torch.as_tensor(rng.permutation(200)[:64])
    np.testing.assert_array_equal(dm.rows(idx).numpy(), X[idx.numpy()].toarray())
    np.testing.assert_array_equal(dm.rows(torch.tensor([5])).numpy(), np.zeros((1, 37)))
    dense = DeviceMatrix(X.toarray(), torch.device("cpu"))
    assert not dense.sparse
    np.testing.assert_array_equal(dense.rows(idx).numpy(), X[idx.numpy()].toarray())


def test_device_data_batches_keep_rows_aligned():
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    data = DeviceData.from_arrays(X, torch.device("cpu"), covs=np.arange(10).reshape(-1, 1),
                                  log_library=np.ones((10, 1)), absent=None)
    assert set(data.obs) == {"covs", "log_library"}
    assert data.obs["covs"].dtype == torch.long and data.obs["log_library"].dtype == torch.float32
    b = data.batch(torch.tensor([3, 7]))
    np.testing.assert_array_equal(b["x"][:, 0].numpy(), [6, 14])
    np.testing.assert_array_equal(b["covs"][:, 0].numpy(), [3, 7])
    chunks = list(data.iter_batches(torch.arange(10), 4))
    assert [len(c["x"]) for c in chunks] == [4, 4, 2]


def test_default_max_epochs_scales_with_data():
    assert default_max_epochs(100) == 400
    assert default_max_epochs(10_000_000) == 10
    assert default_max_epochs(1_000) > default_max_epochs(100_000)


class _Toy(nn.Module):
    """A tiny module with the loss/elbo interface; optionally returns NaN after some calls."""

    def __init__(self, nan_after=None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.calls = 0
        self.betas = []
        self.nan_after = nan_after

    def elbo(self, batch, beta=1.0):
        return -((batch["x"] - self.w) ** 2).sum(-1)

    def loss(self, batch, beta=1.0):
        self.calls += 1
        self.betas.append(beta)
        value = -self.elbo(batch, beta).mean()
        if self.nan_after is not None and self.calls > self.nan_after:
            value = value * math.nan
        return value


def _toy_data(n=200):
    rng = np.random.default_rng(0)
    return DeviceData.from_arrays(rng.normal(2.0, 1.0, (n, 3)).astype(np.float32), torch.device("cpu"))


def test_train_history_warmup_in_steps_and_fit():
    module = _Toy()
    hist = train(module, _toy_data(), max_epochs=30, batch_size=32, kl_warmup_steps=50, lr=0.05,
                 early_stopping=False, verbose=False)
    assert hist["epoch"] == list(range(30))
    assert len(hist["train_elbo"]) == len(hist["validation_elbo"]) == 30
    assert module.betas[0] == 0.0 and module.betas[-1] == 1.0
    assert module.betas[25] == pytest.approx(0.5)  # counted in steps, not epochs
    np.testing.assert_allclose(module.w.detach().numpy(), 2.0, atol=0.3)


def test_kl_weight_is_the_end_of_the_warmup():
    module = _Toy()
    hist = train(module, _toy_data(), max_epochs=5, batch_size=32, kl_warmup_steps=20,
                 kl_weight=0.5, early_stopping=False, verbose=False)
    assert module.betas[0] == 0.0 and module.betas[10] == pytest.approx(0.25)
    assert module.betas[-1] == 0.5 and hist["beta"][-1] == 0.5
    with pytest.raises(ValueError, match="kl_weight must be positive"):
        train(_Toy(), _toy_data(), max_epochs=1, kl_weight=0.0, verbose=False)


def test_early_stopping_stops_and_restores_best():
    module = _Toy()
    hist = train(module, _toy_data(), max_epochs=500, batch_size=32, lr=0.05, patience=5,
                 kl_warmup_steps=0, verbose=False)
    assert len(hist["epoch"]) < 500
    best = max(hist["validation_elbo"])
    from cellvi.train import evaluate

    val = evaluate(module, _toy_data(), torch.as_tensor(np.sort(np.random.default_rng(0).permutation(200)[:20])))
    assert val == pytest.approx(best, rel=1e-5)


def test_nan_guard_raises_clear_error():
    with pytest.raises(TrainingDiverged, match="learning rate"):
        train(_Toy(nan_after=3), _toy_data(), max_epochs=5, batch_size=32, verbose=False)


def test_train_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _Toy(), _Toy()
    train(a, _toy_data(), max_epochs=3, batch_size=16, seed=4, verbose=False)
    train(b, _toy_data(), max_epochs=3, batch_size=16, seed=4, verbose=False)
    torch.testing.assert_close(a.w, b.w)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tiny_data_without_validation():
    data = DeviceData.from_arrays(np.ones((10, 3), np.float32), torch.device("cpu"))
    hist = train(_Toy(), data, max_epochs=2, verbose=False)
    assert all(math.isnan(v) for v in hist["validation_elbo"])


def test_batches_carry_the_nonzeros_on_cpu():
    from cellvi.distributions import nonzeros_of

    X = sp.random(50, 20, density=0.2, format="csr", random_state=1, dtype=np.float32)
    X.data[:3] = 0  # explicitly stored zeros are not non-zeros
    data = DeviceData.from_arrays(X, torch.device("cpu"))
    assert data.nonzeros
    b = data.batch(torch.tensor([4, 1, 30, 7]))
    expected = nonzeros_of(b["x"])
    for got, want in zip(b["x_nonzero"], expected, strict=True):
        torch.testing.assert_close(got, want)
    dense = DeviceData.from_arrays(X.toarray(), torch.device("cpu"))
    bd = dense.batch(torch.tensor([4, 1, 30, 7]))
    for got, want in zip(bd["x_nonzero"], expected, strict=True):
        torch.testing.assert_close(got, want)
