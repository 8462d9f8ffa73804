import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.metrics import ari, ilisi, kbet_acceptance


def _pca_of_log_normalized(adata, n_comps=10):
    import scanpy as sc

    a = ad.AnnData(adata.layers["counts"].copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=n_comps, random_state=0)
    return a.obsm["X_pca"]


def test_recovery_groups_and_batch_mixing(fitted, sim_adata):
    """3 groups x 2 batches with a strong batch shift: the latent finds the groups
    (k-means ARI >= 0.9) and mixes the batches clearly better than PCA."""
    from sklearn.cluster import KMeans

    adata = fitted[0]
    z = adata.obsm["X_nbvae"]
    pca = _pca_of_log_normalized(sim_adata)
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert ari(adata.obs["group"], labels) >= 0.9
    # the batch effect is strong: PCA separates the batches
    assert ilisi(pca, adata.obs["batch"]) < 0.2
    assert ilisi(z, adata.obs["batch"]) > ilisi(pca, adata.obs["batch"]) + 0.4
    assert kbet_acceptance(z, adata.obs["batch"]) > kbet_acceptance(pca, adata.obs["batch"]) + 0.3


def test_outputs_written(fitted):
    adata, model = fitted
    z = adata.obsm["X_nbvae"]
    assert z.dtype == np.float32 and z.shape == (adata.n_obs, 10)
    uns = adata.uns["nbvae"]
    assert uns["cellvi_version"] == cellvi.__version__ and uns["seed"] == 0
    assert uns["obsm_key"] == "X_nbvae"
    assert uns["settings"]["likelihood"] == "nb"
    assert len(uns["history"]["validation_elbo"]) == uns["train_settings"]["epochs_trained"]
    np.testing.assert_array_equal(z, model.get_latent(adata))


def test_results_survive_h5ad_round_trip(fitted, tmp_path):
    adata = fitted[0]
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_nbvae"], adata.obsm["X_nbvae"])
    np.testing.assert_allclose(back.uns["nbvae"]["history"]["train_elbo"],
                               adata.uns["nbvae"]["history"]["train_elbo"])


def _snapshot(a):
    return (a.X.copy(), {k: v.copy() for k, v in a.layers.items()}, a.obs.copy(), a.var.copy(),
            set(a.obsm.keys()), set(a.uns.keys()))


def _assert_same(a, snap, new_obsm=(), new_uns=(), new_obs=()):
    X, layers, obs, var, obsm, uns = snap
    assert (a.X != X).nnz == 0 if sp.issparse(X) else np.array_equal(a.X, X)
    assert layers.keys() == a.layers.keys()
    for k in layers:
        assert (a.layers[k] != layers[k]).nnz == 0
    assert set(a.obs.columns) == set(obs.columns) | set(new_obs)
    pd.testing.assert_frame_equal(a.obs[list(obs.columns)], obs)
    pd.testing.assert_frame_equal(a.var, var)
    assert set(a.obsm.keys()) == obsm | set(new_obsm)
    assert set(a.uns.keys()) == uns | set(new_uns)


def test_copy_true_leaves_input_untouched(small_adata):
    snap = _snapshot(small_adata)
    out = cellvi.tl.nbvae(small_adata, batch_key="batch", max_epochs=2, copy=True, verbose=False)
    _assert_same(small_adata, snap)
    assert isinstance(out, ad.AnnData) and "X_nbvae" in out.obsm


def test_in_place_only_adds_documented_keys(small_adata):
    snap = _snapshot(small_adata)
    ret = cellvi.tl.nbvae(small_adata, layer="counts", batch_key="batch", max_epochs=2,
                          key_added="mine", verbose=False)
    assert ret is None
    _assert_same(small_adata, snap, new_obsm={"X_mine"}, new_uns={"mine"},
                 new_obs={"mine_outlier_score"})


def test_old_obsm_style_key_added_still_works_with_a_warning(small_adata):
    """key_added is the result's name for every tl function; nbvae's old "X_name" form
    writes the same keys as before, with a FutureWarning that says what to pass."""
    with pytest.warns(FutureWarning, match="key_added='mine'"):
        cellvi.tl.nbvae(small_adata, layer="counts", max_epochs=1, key_added="X_mine",
                        verbose=False)
    assert "X_mine" in small_adata.obsm and "mine" in small_adata.uns
    assert small_adata.uns["mine"]["obsm_key"] == "X_mine"
    with pytest.raises(TypeError, match="key_added"):
        cellvi.tl.nbvae(small_adata, layer="counts", max_epochs=1, key_added="", verbose=False)


def test_return_model_combinations(small_adata):
    m = cellvi.tl.nbvae(small_adata, max_epochs=1, return_model=True, verbose=False)
    assert isinstance(m, cellvi.models.NBVAE)
    out, m2 = cellvi.tl.nbvae(small_adata, max_epochs=1, copy=True, return_model=True, verbose=False)
    assert isinstance(out, ad.AnnData) and isinstance(m2, cellvi.models.NBVAE)


def test_nbvae_writes_what_transform_and_outlier_scores_give(small_adata):
    # tl.nbvae takes the latent and the outlier score in one pass over the data: the same
    # values as the model's own transform and cellvi.diagnostics.outlier_scores
    out, m = cellvi.tl.nbvae(small_adata, batch_key="batch", max_epochs=2, copy=True, seed=3,
                             return_model=True, verbose=False)
    np.testing.assert_allclose(out.obsm["X_nbvae"], m.transform(small_adata).latent, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(out.obs["nbvae_outlier_score"].to_numpy(),
                               cellvi.diagnostics.outlier_scores(m, small_adata, seed=3),
                               rtol=1e-5, atol=1e-5)
    z, elbo = m.latent_and_elbo(small_adata, n_samples=4, seed=1)
    np.testing.assert_allclose(elbo, m.elbo(small_adata, n_samples=4, seed=1), rtol=1e-6)
    assert z.shape == (small_adata.n_obs, m.settings["n_latent"])
    assert m.train_settings["large_data_cells"] == cellvi.train.LARGE_DATA_CELLS

def test_same_seed_same_latent_and_global_rng_untouched(small_adata):
    np.random.seed(123)
    torch.manual_seed(123)
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.random.get_rng_state().clone()
    a = cellvi.tl.nbvae(small_adata, batch_key="batch", max_epochs=3, copy=True, verbose=False)
    b = cellvi.tl.nbvae(small_adata, batch_key="batch", max_epochs=3, copy=True, verbose=False)
    c = cellvi.tl.nbvae(small_adata, batch_key="batch", max_epochs=3, copy=True, seed=1, verbose=False)
    np.testing.assert_array_equal(a.obsm["X_nbvae"], b.obsm["X_nbvae"])
    assert not np.allclose(a.obsm["X_nbvae"], c.obsm["X_nbvae"])
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_view_needs_copy(small_adata):
    view = small_adata[:200]
    with pytest.raises(ValueError, match="view.*copy=True"):
        cellvi.tl.nbvae(view, max_epochs=1, verbose=False)
    out = cellvi.tl.nbvae(view, max_epochs=1, copy=True, verbose=False)
    assert out.obsm["X_nbvae"].shape[0] == 200 and "X_nbvae" not in small_adata.obsm


def test_unknown_keyword_is_an_error(small_adata):
    with pytest.raises(TypeError, match="n_hiden.*model settings"):
        cellvi.tl.nbvae(small_adata, n_hiden=64)


def test_model_and_training_kwargs_are_routed(small_adata):
    m = cellvi.tl.nbvae(small_adata, max_epochs=2, n_hidden=16, batch_size=64, patience=3,
                        kl_warmup_steps=5, kl_weight=0.8, input_scale=1e4, return_model=True,
                        verbose=False)
    assert m.settings["n_hidden"] == 16 and m.module.input_scale == 1e4
    assert small_adata.uns["nbvae"]["settings"]["input_scale"] == 1e4
    assert m.train_settings["batch_size"] == 64 and m.train_settings["kl_warmup_steps"] == 5
    assert m.train_settings["kl_weight"] == 0.8 and m.history["beta"][-1] == pytest.approx(0.8)


def test_deterministic_setting_gives_the_same_latent_at_any_thread_count(small_adata):
    """cellvi.settings.deterministic: fit and transform on one thread with torch's
    deterministic algorithms, so 1 and 2 threads give identical latents; the caller's thread
    count and deterministic flag are restored."""
    threads = torch.get_num_threads()
    cellvi.settings.deterministic = True
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            a = cellvi.tl.nbvae(small_adata, layer="counts", batch_key="batch", max_epochs=3,
                                copy=True, verbose=False)
            out.append(a.obsm["X_nbvae"])
            assert torch.get_num_threads() == n and not torch.are_deterministic_algorithms_enabled()
        np.testing.assert_array_equal(out[0], out[1])
    finally:
        cellvi.settings.deterministic = False
        torch.set_num_threads(threads)
