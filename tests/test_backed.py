"""Training and inference on a backed AnnData (``anndata.read_h5ad(path, backed="r")``):
the counts are read in row chunks and never held in memory whole."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import cellvi
from cellvi.data import BackedRows, prepare_counts
from cellvi.device import DeviceData, StreamedMatrix


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory, sim_adata):
    path = tmp_path_factory.mktemp("backed") / "counts.h5ad"
    adata = sim_adata.copy()
    adata.X = sp.csr_matrix(adata.X)
    adata.write_h5ad(path)
    return path, adata


def _backed(path):
    return ad.read_h5ad(path, backed="r")


def test_prepare_counts_streams_the_same_arrays(counts_file, monkeypatch):
    path, memory = counts_file
    monkeypatch.setattr(cellvi.data, "CHUNK_ROWS", 256)
    backed = _backed(path)
    d = prepare_counts(backed, batch_key="batch")
    want = prepare_counts(memory, batch_key="batch")
    assert isinstance(d.X, BackedRows) and d.X.chunk_rows == 256
    np.testing.assert_array_equal(d.log_library, want.log_library)
    np.testing.assert_array_equal(d.covs, want.covs)
    np.testing.assert_array_equal(sp.vstack([b for _, b in d.X.chunks()]).toarray(), want.X.toarray())
    from cellvi.models.nbvae import batch_log_ratios
    for a, b in zip(batch_log_ratios(d), batch_log_ratios(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_streamed_rows_and_block_shuffled_order(counts_file, monkeypatch):
    import torch

    path, memory = counts_file
    monkeypatch.setattr(cellvi.data, "CHUNK_ROWS", 100)
    d = prepare_counts(_backed(path), batch_key="batch")
    data = DeviceData.from_arrays(d.X, torch.device("cpu"), covs=d.covs, log_library=d.log_library)
    assert isinstance(data.x, StreamedMatrix)
    dense = memory.X.toarray()
    idx = torch.tensor([1499, 3, 250, 251, 0, 777, 3])
    x, (rows, cols, vals) = data.x.rows(idx, with_nonzeros=True)
    np.testing.assert_array_equal(x.numpy(), dense[idx.numpy()])
    assert bool((rows[1:] >= rows[:-1]).all())  # row-major, as the encoder's SparseRows needs
    rebuilt = torch.zeros_like(x)
    rebuilt[rows, cols] = vals
    np.testing.assert_array_equal(rebuilt.numpy(), dense[idx.numpy()])
    torch.manual_seed(0)
    order = data.shuffle(torch.arange(1500))
    assert sorted(order.tolist()) == list(range(1500))  # a permutation
    # consecutive cells come from a window of 4 chunks of 100 rows
    windows = [len(set((order[i:i + 400] // 100).tolist())) for i in range(0, 1500, 400)]
    assert max(windows) <= 4 and order[:400].tolist() != sorted(order[:400].tolist())
    held, local = data.holdout(torch.tensor([900, 5, 1200]))
    assert not held.streamed
    np.testing.assert_array_equal(held.x.rows(local).numpy(), dense[[5, 900, 1200]])


def test_nbvae_on_a_backed_file_equals_the_in_memory_fit_when_it_fits_one_window(counts_file,
                                                                                 monkeypatch):
    path, memory = counts_file
    monkeypatch.setattr(cellvi.settings, "deterministic", True)  # one thread: bitwise results
    backed = _backed(path)
    kw = dict(batch_key="batch", max_epochs=3, verbose=False, return_model=True)
    model = cellvi.tl.nbvae(backed, **kw)
    want = memory.copy()
    cellvi.tl.nbvae(want, **kw)
    assert backed.isbacked and isinstance(model, cellvi.models.NBVAE)
    np.testing.assert_array_equal(backed.obsm["X_nbvae"], want.obsm["X_nbvae"])
    np.testing.assert_allclose(backed.obs["nbvae_outlier_score"], want.obs["nbvae_outlier_score"],
                               rtol=1e-5, atol=1e-5)


def test_nbvae_on_many_chunks_trains_as_well_and_reads_each_chunk_about_once_a_pass(
        counts_file, monkeypatch):
    from sklearn.cluster import KMeans

    from cellvi.metrics import ari

    path, memory = counts_file
    monkeypatch.setattr(cellvi.data, "CHUNK_ROWS", 100)  # 15 chunks
    reads = []
    chunk = BackedRows.chunk
    monkeypatch.setattr(BackedRows, "chunk", lambda self, a, b: reads.append(a) or chunk(self, a, b))
    backed = _backed(path)
    model = cellvi.models.NBVAE(backed, batch_key="batch")
    before = len(reads)
    per_epoch = []
    model.fit(max_epochs=20, verbose=False,
              callbacks=[lambda epoch, history: per_epoch.append(len(reads))])
    z = model.get_latent(backed)
    labels = memory.obs["group"].to_numpy()

    def score(latent):
        return ari(labels, KMeans(3, n_init=5, random_state=0).fit_predict(latent))

    want = cellvi.models.NBVAE(memory, batch_key="batch").fit(max_epochs=20, verbose=False)
    assert score(z) > 0.8 and score(z) > score(want.get_latent(memory)) - 0.1
    # construction: one pass for the checks and library sizes, one for the batch offsets
    assert before == 30
    steps = np.diff(per_epoch)
    assert steps.max() <= 2 * 15, steps  # an epoch reads each chunk about once


def test_backed_input_errors_are_the_in_memory_ones(tmp_path, small_adata):
    bad = small_adata.copy()
    bad.X = sp.csr_matrix(bad.X, dtype=np.float32)
    bad.X.data[0] = 0.5
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(cellvi.errors.InvalidInputError, match="non-integer"):
        cellvi.models.NBVAE(_backed(tmp_path / "bad.h5ad"))
    small_adata.write_h5ad(tmp_path / "ok.h5ad")
    backed = _backed(tmp_path / "ok.h5ad")
    with pytest.raises(cellvi.errors.InvalidInputError, match="to_memory"):
        cellvi.tl.nbvae(backed, copy=True)


def test_gmvae_reads_a_backed_file_into_memory_markers(tmp_path):
    adata = cellvi.datasets.synthetic_cytometry(600, n_markers=5, seed=0)
    adata.write_h5ad(tmp_path / "cyto.h5ad")
    backed = _backed(tmp_path / "cyto.h5ad")
    kw = dict(n_components=3, max_epochs=3, verbose=False)
    cellvi.tl.gmvae(backed, **kw)
    want = cellvi.tl.gmvae(adata, copy=True, **kw)
    np.testing.assert_array_equal(backed.obsm["X_gmvae"], want.obsm["X_gmvae"])


def test_nbvae_streams_a_zarr_store_as_it_does_a_backed_file(counts_file, tmp_path, monkeypatch):
    """``cellvi.io.open_zarr``: X stays on disk (anndata's sparse dataset), the fit equals
    the in-memory one, results land in the object, and the in-memory-only paths say how to
    load it."""
    _, memory = counts_file
    monkeypatch.setattr(cellvi.settings, "deterministic", True)
    memory.write_zarr(tmp_path / "counts.zarr")
    streamed = cellvi.io.open_zarr(tmp_path / "counts.zarr")
    assert cellvi.data.is_streamed(streamed) and not sp.issparse(streamed.X)
    assert list(streamed.obs_names) == list(memory.obs_names)
    kw = dict(batch_key="batch", max_epochs=3, verbose=False)
    model = cellvi.tl.nbvae(streamed, return_model=True, **kw)
    want = cellvi.tl.nbvae(memory, copy=True, **kw)
    np.testing.assert_array_equal(streamed.obsm["X_nbvae"], want.obsm["X_nbvae"])
    with pytest.raises(cellvi.errors.InvalidInputError, match="read_zarr"):
        cellvi.tl.nbvae(streamed, copy=True, **kw)
    with pytest.raises(cellvi.errors.InvalidInputError, match="read_zarr"):
        cellvi.diagnostics.doublet_scores(model, streamed)
    csc = memory.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_zarr(tmp_path / "csc.zarr")
    with pytest.raises(cellvi.errors.InvalidInputError, match="as CSR"):
        cellvi.io.open_zarr(tmp_path / "csc.zarr")
    with pytest.raises(FileNotFoundError):
        cellvi.io.open_zarr(tmp_path / "missing.zarr")
    dense = memory.copy()
    dense.X = np.asarray(memory.X.todense())
    dense.write_zarr(tmp_path / "dense.zarr")
    opened = cellvi.io.open_zarr(tmp_path / "dense.zarr")
    assert cellvi.data.is_streamed(opened)
    assert not cellvi.data.is_streamed(memory)
