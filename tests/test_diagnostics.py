"""Model checking: posterior predictive checks that fail a wrong likelihood, generative
samples, outlier scores that find planted impossible events."""

import numpy as np
import pytest

import cellvi


@pytest.fixture(scope="module")
def overdispersed():
    # NB counts with a small inverse dispersion: far more spread than a Poisson can give
    return cellvi.datasets.synthetic_counts(400, 40, n_groups=3, n_batches=2, dispersion=2.0,
                                            seed=7)


@pytest.fixture(scope="module")
def fits(overdispersed):
    out = {}
    for lik in ("nb", "poisson"):
        out[lik] = cellvi.models.NBVAE(overdispersed, batch_key="batch", n_latent=4,
                                       likelihood=lik).fit(max_epochs=30, batch_size=64,
                                                           verbose=False)
    return out


def test_predictive_check_passes_nb_and_fails_poisson_on_overdispersed_counts(overdispersed, fits):
    nb = cellvi.diagnostics.predictive_check(fits["nb"], overdispersed, n_samples=20)
    po = cellvi.diagnostics.predictive_check(fits["poisson"], overdispersed, n_samples=20)
    assert list(nb.index) == list(overdispersed.var_names)
    # the NB's noise matches the data's; the Poisson's is several times too small
    assert 0.6 < nb.attrs["median_pearson_ratio"] < 1.5
    assert po.attrs["median_pearson_ratio"] > 4 * nb.attrs["median_pearson_ratio"]
    # and the replicated variances: the Poisson model falls short of the observed spread
    assert po.attrs["median_var_ratio"] > nb.attrs["median_var_ratio"]
    # (not asserted: the share of genes whose observed variance falls inside the replicates'
    # range; on these 40 genes it is 4-6 genes for the NB and 2-5 for the Poisson depending on
    # the thread count and the backward products' precision, too few to order the two)
    for ppc in (nb, po):
        assert 0 <= ppc.attrs["fraction_in_range"] <= 1


def test_posterior_predictive_and_samples_have_the_data_shape(overdispersed, fits):
    model = fits["nb"]
    rep = model.posterior_predictive(overdispersed[:30].copy(), n_samples=3)
    assert rep.shape == (3, 30, 40) and rep.dtype == np.float32
    assert (rep >= 0).all() and (rep == np.round(rep)).all()
    x = model.sample(50, batch="b1", library_size=2000, seed=1)
    assert x.shape == (50, 40) and abs(x.sum(1).mean() - 2000) < 300
    np.testing.assert_array_equal(x, model.sample(50, batch="b1", library_size=2000, seed=1))
    with pytest.raises(ValueError, match="pass batch="):
        model.sample(5)
    with pytest.raises(ValueError, match="not a category"):
        model.sample(5, batch="nope")


def test_outlier_scores_default_to_the_models_sample_count(overdispersed, fits):
    model = fits["nb"]
    assert model.outlier_samples == 1 and cellvi.models.GMVAE.outlier_samples == 8
    default = cellvi.diagnostics.outlier_scores(model, overdispersed, seed=3)
    np.testing.assert_array_equal(
        default, cellvi.diagnostics.outlier_scores(model, overdispersed, n_samples=1, seed=3))
    eight = cellvi.diagnostics.outlier_scores(model, overdispersed, n_samples=8, seed=3)
    assert not np.array_equal(default, eight)
    # one draw ranks the cells nearly as eight do
    assert np.corrcoef(np.argsort(np.argsort(default)), np.argsort(np.argsort(eight)))[0, 1] > 0.9


def test_gmvae_samples_a_cluster_and_outliers_are_found():
    from sklearn.metrics import roc_auc_score

    cyto = cellvi.datasets.synthetic_cytometry(2000, 8, n_populations=4, seed=3)
    # plant 5% events with shuffled markers: each marker from another random event
    rng = np.random.default_rng(0)
    bad = rng.random(cyto.n_obs) < 0.05
    X = np.asarray(cyto.X, dtype=np.float32).copy()
    for j in range(X.shape[1]):
        X[bad, j] = X[rng.permutation(cyto.n_obs)[: bad.sum()], j]
    cyto.X = X
    out, model = cellvi.tl.gmvae(cyto, batch_key="batch", n_components=4, copy=True,
                                 return_model=True, verbose=False, max_epochs=30)
    score = out.obs["gmvae_outlier_score"].to_numpy()
    assert score.dtype == np.float32 and np.isfinite(score).all()
    assert roc_auc_score(bad, score) >= 0.9
    members = out.obsm["X_gmvae"][out.obs["gmvae"] == "0"]
    x0 = model.sample(200, cluster="0", batch=cyto.obs["batch"].cat.categories[0])
    assert x0.shape == (200, 8)
    with pytest.raises(ValueError, match="not one of the labels"):
        model.sample(3, cluster="99", batch=cyto.obs["batch"].cat.categories[0])
    assert len(members) > 0


def test_doublet_scores_find_thinned_heterotypic_doublets():
    import anndata as ad
    import scipy.sparse as sp
    from sklearn.metrics import roc_auc_score

    real = cellvi.datasets.synthetic_counts(600, 100, n_groups=3, n_batches=2, seed=1)
    X = real.X.toarray()
    group = real.obs["group"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    first = rng.integers(0, 600, 60)
    second = np.array([rng.choice(np.flatnonzero(group != group[i])) for i in first])
    doublets = rng.binomial((X[first] + X[second]).astype(int), 0.5).astype(np.float32)  # ~ real depth
    adata = ad.AnnData(sp.csr_matrix(np.vstack([X, doublets])))
    adata.var_names = real.var_names
    adata.obs["batch"] = list(real.obs["batch"]) + list(real.obs["batch"].iloc[first])
    before = adata.copy()
    model = cellvi.models.NBVAE(adata, batch_key="batch", n_latent=5).fit(max_epochs=20,
                                                                           verbose=False)
    scores = cellvi.diagnostics.doublet_scores(model, adata)
    truth = np.r_[np.zeros(600), np.ones(60)]
    assert scores.shape == (660,) and scores.dtype == np.float32
    assert 0 <= scores.min() and scores.max() <= 1
    assert roc_auc_score(truth, scores) > 0.85
    np.testing.assert_array_equal(scores, cellvi.diagnostics.doublet_scores(model, adata))  # seeded
    assert (adata.X != before.X).nnz == 0 and adata.obs.equals(before.obs)  # input untouched
    cyto = cellvi.datasets.synthetic_cytometry(200, 5, n_populations=2, seed=0)
    gm = cellvi.models.GMVAE(cyto, n_components=2).fit(max_epochs=2, warmup_epochs=1, verbose=False)
    with pytest.raises(TypeError, match="count model"):
        cellvi.diagnostics.doublet_scores(gm, cyto)
