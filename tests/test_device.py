import numpy as np
import scipy.sparse as sp
import torch

from cellvi.device import DeviceData, DeviceMatrix


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


def test_device_matrix_rows_add_up_a_repeated_csr_entry():
    # a CSR matrix that stores (0, 1) twice, as scipy allows: its dense rows and its
    # non-zeros (what the likelihood and the encoder use) both count it 3 + 4 = 7
    X = sp.csr_matrix((np.array([3.0, 4.0, 2.0], np.float32), np.array([1, 1, 0]),
                       np.array([0, 2, 3])), shape=(2, 3))
    assert not X.has_canonical_format
    out, (rows, cols, vals) = DeviceMatrix(X, torch.device("cpu")).rows(torch.tensor([0, 1]),
                                                                          with_nonzeros=True)
    np.testing.assert_array_equal(out.numpy(), X.toarray())
    dense = np.zeros((2, 3), np.float32)
    np.add.at(dense, (rows.numpy(), cols.numpy()), vals.numpy())
    np.testing.assert_array_equal(dense, X.toarray())

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
