"""Input validation: each bad input gets an error that names the problem and the fix."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellvi.data import encode_covariates, get_matrix, prepare_counts


def test_prepare_counts_outputs(small_adata):
    d = prepare_counts(small_adata, batch_key="batch")
    assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32
    assert d.covs.shape == (small_adata.n_obs, 1) and d.covs.dtype == np.int64
    assert d.categories == {"batch": ["b0", "b1"]}
    np.testing.assert_allclose(np.exp(d.log_library[:, 0]), small_adata.obs["library"], rtol=1e-5)
    assert d.var_names == list(small_adata.var_names)


def test_several_batch_keys(small_adata):
    small_adata.obs["site"] = np.where(np.arange(small_adata.n_obs) % 3 == 0, "x", "y")
    d = prepare_counts(small_adata, batch_key=["batch", "site"])
    assert d.covs.shape == (small_adata.n_obs, 2)
    assert d.categories["site"] == ["x", "y"]


def test_missing_layer_and_key(small_adata):
    with pytest.raises(KeyError, match="layer 'raw' is not in adata.layers.*counts"):
        prepare_counts(small_adata, layer="raw")
    with pytest.raises(KeyError, match="batch key 'donor' is not a column"):
        prepare_counts(small_adata, batch_key="donor")


def test_x_none(small_adata):
    a = ad.AnnData(obs=small_adata.obs, var=small_adata.var, layers={"counts": small_adata.layers["counts"]})
    with pytest.raises(ValueError, match="adata.X is None.*layer="):
        get_matrix(a)
    assert prepare_counts(a, layer="counts").X.shape == small_adata.shape


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf(small_adata, bad):
    X = small_adata.X.toarray()
    X[0, 0] = bad
    small_adata.X = X
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_counts(small_adata)


def test_negative_values(small_adata):
    X = small_adata.X.toarray()
    X[1, 1] = -1
    small_adata.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="negative.*layer='counts'"):
        prepare_counts(small_adata)


def test_log_normalized_data_is_refused_with_hint(small_adata):
    import scanpy as sc

    sc.pp.normalize_total(small_adata)
    sc.pp.log1p(small_adata)
    with pytest.raises(ValueError, match="log-normalized.*layer='counts'"):
        prepare_counts(small_adata)
    # the raw counts in the layer work
    assert prepare_counts(small_adata, layer="counts").X.shape == small_adata.shape


def test_empty_cells_error_counts_them(small_adata):
    X = small_adata.X.tolil()
    X[[2, 5, 9]] = 0
    small_adata.X = X.tocsr()
    with pytest.raises(ValueError, match=r"3 cells have zero total counts.*filter_cells"):
        prepare_counts(small_adata)


def test_empty_genes_warn(small_adata):
    X = small_adata.X.tolil()
    X[:, [0, 1]] = 0
    small_adata.X = X.tocsr()
    with pytest.warns(UserWarning, match="2 genes have zero counts"):
        prepare_counts(small_adata)


def test_single_cell_batch(small_adata):
    small_adata.obs["batch"] = small_adata.obs["batch"].astype(str)
    small_adata.obs.iloc[0, small_adata.obs.columns.get_loc("batch")] = "lonely"
    with pytest.raises(ValueError, match="'lonely'.*fewer than 2 cells"):
        prepare_counts(small_adata, batch_key="batch")


def test_missing_batch_values(small_adata):
    small_adata.obs["batch"] = small_adata.obs["batch"].astype(object)
    small_adata.obs.iloc[3, small_adata.obs.columns.get_loc("batch")] = None
    with pytest.raises(ValueError, match="missing values"):
        prepare_counts(small_adata, batch_key="batch")


def test_unknown_categories_when_applying(small_adata):
    covs, cats = encode_covariates(small_adata, ["batch"])
    other = small_adata.copy()
    other.obs["batch"] = "b9"
    with pytest.raises(ValueError, match="not trained on.*b9"):
        encode_covariates(other, ["batch"], cats)


def test_backed_is_streamed_by_models_and_refused_where_memory_is_needed(small_adata, tmp_path):
    from cellvi.data import BackedRows

    small_adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    assert isinstance(prepare_counts(backed).X, BackedRows)
    with pytest.raises(ValueError, match="to_memory"):
        get_matrix(backed)
    import cellvi

    with pytest.raises(ValueError, match="to_memory"):
        cellvi.pp.arcsinh(backed)


def test_not_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        get_matrix(np.ones((3, 3)))


def test_dense_input_and_views_can_be_read(small_adata):
    dense = small_adata.copy()
    dense.X = dense.X.toarray()
    assert isinstance(prepare_counts(dense).X, np.ndarray)
    view = small_adata[:100]
    assert prepare_counts(view, batch_key="batch").X.shape[0] == 100


@pytest.mark.parametrize("bad, match", [(np.nan, "2 NaN or infinite"), (-1.0, r"negative values \(2\)"),
                                        (0.5, "2 non-integer values")])
def test_value_checks_look_past_the_first_chunk(monkeypatch, bad, match):
    """The checks run chunk by chunk: a bad value in a later chunk is still found and
    counted over the whole matrix."""
    import cellvi.data as D

    monkeypatch.setattr(D, "CHECK_CHUNK", 7)
    X = sp.random(40, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    X.data[:] = np.ceil(X.data * 5)
    X.data[-1] = X.data[-9] = bad  # both past the first 7 stored values
    adata = ad.AnnData(X)
    with pytest.raises(ValueError, match=match):
        prepare_counts(adata)
    X.data[-1] = X.data[-9] = 2.0
    prepare_counts(adata)  # clean again: no error
