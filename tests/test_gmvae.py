"""The cytometry model: decoder, merging, GMVAE / tl.gmvae outputs, recovery, validation."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Normal, StudentT

import cellvi
from cellvi.decoders import ContinuousDecoder
from cellvi.metrics import ari
from cellvi.models import GMVAE, GMVAESchedule

FAST = dict(max_epochs=8, warmup_epochs=3)


@pytest.fixture(scope="session")
def cyto():
    """5 populations (known), 10 markers, 2 batches with a marker shift; never modified.
    Data seed 1: one merge round left two fragments of populations apart here (7 found for 5);
    the second round, after the fine-tune, joins them."""
    return cellvi.datasets.synthetic_cytometry(3000, 10, n_populations=5, seed=1)


@pytest.fixture(scope="session")
def discovered(cyto):
    return cellvi.tl.gmvae(cyto, batch_key="batch", copy=True, return_model=True, verbose=False)


@pytest.fixture
def tiny():
    return cellvi.datasets.synthetic_cytometry(400, 6, n_populations=3, seed=2)


# -- building blocks ----------------------------------------------------------------------
@pytest.mark.parametrize("likelihood, cls", [("normal", Normal), ("studentt", StudentT)])
def test_continuous_decoder_returns_distribution(likelihood, cls):
    dec = ContinuousDecoder(4, 7, likelihood=likelihood, n_cats_per_cov=[3])
    z, covs = torch.randn(10, 4), torch.randint(0, 3, (10, 1))
    px = dec(z, covs)
    assert isinstance(px.base_dist, cls) and px.event_shape == (7,) and px.batch_shape == (10,)
    assert torch.isfinite(px.log_prob(torch.randn(10, 7))).all()
    # the per-batch offset adds to the mean: raising batch 1's offsets by 1 raises its mean by 1
    dec.eval()
    covs3 = torch.tensor([[0], [1], [2]])
    same_z = z[:1].expand(3, 4)
    before = dec.mean(same_z, covs3)
    dec.init_batch_offsets([dec.batch_offset.embeddings[0].weight.detach().numpy()
                            + np.array([[0.0], [1.0], [0.0]], dtype=np.float32)])
    torch.testing.assert_close(dec.mean(same_z, covs3) - before,
                               torch.tensor([[0.0], [1.0], [0.0]]).expand(3, 7), atol=1e-5, rtol=0)


def test_discovery_recovers_populations(cyto, discovered):
    """n_components=None on the simulator: number of populations within ±1, ARI >= 0.9."""
    out, model = discovered
    truth = cyto.uns["simulation"]["n_populations"]
    assert abs(model.n_clusters - truth) <= 1, model.history["n_components"]
    assert ari(cyto.obs["population"], out.obs["gmvae"]) >= 0.9
    assert model.history["n_components"][0] == 30  # started from the upper bound


def test_population_of_the_last_batch_in_the_file_is_found():
    """Cells sorted by batch, one population only in the last batch: the cells that update
    π and decide merges must be drawn from the whole file, not from its start."""
    import anndata as ad

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0, 0, 0], [4, 4, 0, 0], [0, 4, 4, 4]])
    pops = np.r_[rng.integers(0, 2, 10000), rng.choice(3, 10000, p=[0.4, 0.4, 0.2])]
    X = (centres[pops] + rng.normal(0, 0.5, (20000, 4))).astype(np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(np.repeat(["A", "B"], 10000))},
                       index=[f"c{i}" for i in range(20000)])
    adata = ad.AnnData(X, obs=obs)
    model = GMVAE(adata, batch_key="batch", n_hidden=32, n_layers=1).fit(n_init=1, verbose=False, **FAST)
    labels, _ = model.predict(adata)
    assert ari(pops, labels) >= 0.9, pd.crosstab(pops, np.asarray(labels))


def test_gmvae_writes_documented_keys(cyto, discovered):
    out, model = discovered
    k = model.n_clusters
    labels = out.obs["gmvae"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == [str(i) for i in range(k)]
    sizes = labels.value_counts().reindex(labels.cat.categories).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # "0" is the largest
    probs = out.obsm["gmvae_probs"]
    assert probs.shape == (cyto.n_obs, k) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), labels.cat.codes.to_numpy())
    np.testing.assert_allclose(out.obs["gmvae_confidence"], probs.max(1), atol=1e-6)
    assert out.obsm["X_gmvae"].shape == (cyto.n_obs, 10)
    uns = out.uns["gmvae"]
    med = uns["marker_medians"]
    assert list(med.index) == list(labels.cat.categories) and list(med.columns) == list(cyto.var_names)
    c0 = labels.to_numpy() == "0"
    np.testing.assert_allclose(med.loc["0"].to_numpy(), np.median(cyto.X[c0], axis=0), rtol=1e-5)
    np.testing.assert_allclose(uns["cluster_weights"].sum(), 1.0, atol=1e-5)
    assert uns["cluster_means"].shape == (k, 10)
    assert list(uns["cluster_sizes"]) == list(sizes)
    assert set(uns["history"]) >= {"train_elbo", "validation_elbo", "phase", "n_components"}
    # the merges that made the clusters: from the surviving components down to k clusters
    merges = uns["merges"]
    assert list(merges.columns) == ["round", "components_a", "components_b", "cells_a",
                                    "cells_b", "score", "rule"]
    assert len(merges) == len(model.merges) > 0
    # discovery merges by entanglement only (and records the pairs it kept apart)
    assert set(merges["rule"]) <= {"entangled", "vetoed (bimodal)"}
    assert (merges["rule"] == "entangled").any()
    assert (merges["score"] > model.settings["merge_threshold"]).all()
    # the input was not touched
    assert "gmvae" not in cyto.obs and "X_gmvae" not in cyto.obsm and "gmvae" not in cyto.uns


def test_gmvae_result_writes_to_h5ad(discovered, tmp_path):
    import anndata as ad

    out, _ = discovered
    out.write_h5ad(tmp_path / "x.h5ad")
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    assert back.obs["gmvae"].equals(out.obs["gmvae"])
    pd.testing.assert_frame_equal(back.uns["gmvae"]["marker_medians"], out.uns["gmvae"]["marker_medians"])
    pd.testing.assert_frame_equal(back.uns["gmvae"]["merges"], out.uns["gmvae"]["merges"])


def test_predict_new_sample_and_save_load(cyto, discovered, tmp_path):
    out, model = discovered
    # tl.gmvae's outputs are the model's: latent means and labels of the same cells
    np.testing.assert_allclose(model.get_latent(cyto), out.obsm["X_gmvae"], atol=1e-6)
    other = cyto[cyto.obs["batch"] == "b1"].copy()
    labels, probs = model.predict(other)
    np.testing.assert_array_equal(labels.codes, out.obs["gmvae"][cyto.obs["batch"] == "b1"].cat.codes)
    other.obs["batch"] = "b9"
    with pytest.raises(ValueError, match="not trained on"):
        model.predict(other)
    model.save(tmp_path / "m")
    back = GMVAE.load(tmp_path / "m", cyto)
    l2, p2 = back.predict(cyto)
    np.testing.assert_array_equal(l2.codes, out.obs["gmvae"].cat.codes)
    np.testing.assert_allclose(p2, out.obsm["gmvae_probs"], atol=1e-6)
    assert "clusters" in repr(back)
    assert back.merges == model.merges
    with pytest.raises(KeyError, match="not in adata.var_names"):
        back.predict(cyto[:, :5].copy())


def test_fixed_k_gives_exactly_k_clusters_and_is_reproducible(tiny):
    a = cellvi.tl.gmvae(tiny, n_components=3, copy=True, verbose=False, **FAST)
    b = cellvi.tl.gmvae(tiny, n_components=3, copy=True, verbose=False, **FAST)
    assert list(a.obs["gmvae"].cat.categories) == ["0", "1", "2"]
    np.testing.assert_array_equal(a.obsm["X_gmvae"], b.obsm["X_gmvae"])
    assert a.uns["gmvae"]["settings"]["n_clusters"] == 3
    assert a.uns["gmvae"]["settings"]["n_start"] > 3  # over-clustered, then merged down to K
    merges = a.uns["gmvae"]["merges"]
    # each merge of a round removes one group: the first round goes from n_start down to 3
    done = merges[merges["rule"] != "vetoed (bimodal)"]
    assert (done["round"] == 0).sum() == a.uns["gmvae"]["settings"]["n_start"] - 3
    assert set(merges["rule"]) <= {"entangled", "smallest folded", "vetoed (bimodal)"}


def test_studentt_and_markers_and_layer(tiny):
    tiny.layers["t"] = tiny.X.copy()
    tiny.X[:] = 0.0  # must not be read
    out = cellvi.tl.gmvae(tiny, layer="t", markers=list(tiny.var_names[:4]), n_components=2,
                          likelihood="studentt", key_added="pops", copy=True, verbose=False, **FAST)
    assert "pops" in out.obs and out.obsm["X_pops"].shape[0] == tiny.n_obs
    assert list(out.uns["pops"]["markers"]) == list(tiny.var_names[:4])


# -- validation ----------------------------------------------------------------------------
def test_errors_name_the_problem(tiny):
    with pytest.raises(KeyError, match="layer 'nope'"):
        GMVAE(tiny, layer="nope")
    with pytest.raises(KeyError, match="not in adata.var_names"):
        GMVAE(tiny, markers=["CD3"])
    with pytest.raises(ValueError, match="larger than the number of cells"):
        GMVAE(tiny, n_components=tiny.n_obs + 1)
    bad = tiny.copy()
    bad.X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        GMVAE(bad)
    const = tiny.copy()
    const.X[:, 2] = 1.0
    with pytest.raises(ValueError, match=r"constant.*marker0|marker2"):
        GMVAE(const)
    with pytest.raises(ValueError, match="view"):
        cellvi.tl.gmvae(tiny[:100], n_components=2)
    with pytest.raises(ValueError, match="likelihood"):
        GMVAE(tiny, likelihood="poisson")


def test_warns_on_untransformed_and_uncompensated(tiny):
    raw = tiny.copy()
    raw.X = np.exp(raw.X * 2.0)  # raw intensities with a huge range
    with pytest.warns(UserWarning, match="untransformed"):
        GMVAE(raw, n_components=2)
    spill = tiny.copy()
    spill.uns["spillover_text"] = "2,marker0,marker1,1,0.1,0.05,1"
    with pytest.warns(UserWarning, match="never compensated"):
        GMVAE(spill, n_components=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GMVAE(spill, n_components=2, markers=["marker2", "marker3"])  # no spillover channel used


def test_no_warning_after_cellvi_compensation(data_dir):
    import anndata as ad

    adata = ad.read_h5ad(data_dir / "flowsom_68983_mouse_flow_gated.h5ad")
    markers = list(adata.var_names[adata.var["has_marker"].astype(bool)])
    with pytest.warns(UserWarning, match="never compensated"):
        GMVAE(adata, markers=markers, n_components=6)
    cellvi.pp.compensate(adata)
    cellvi.pp.logicle(adata, layer="compensated", key_added="logicle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GMVAE(adata, layer="logicle", markers=markers, n_components=6)


# -- the redesign: phases, schedule, callbacks, declared components ------------------------
def test_phases_keep_the_mixture_prior_and_run_user_callbacks_after_the_m_step(tiny):
    """The warm-up's N(0, I) is a setting of the objective: module.prior stays the mixture in
    every epoch of every phase; a user callback runs in each phase after the model's own
    π update (it sees the epoch's n_components already recorded)."""
    from cellvi.priors import MixturePrior

    seen = []
    model = GMVAE(tiny, n_components=3)

    def spy(epoch, history):
        seen.append((isinstance(model.module.prior, MixturePrior), model.module.prior.n_active))

    model.fit(callbacks=[spy], verbose=False, **FAST)
    assert len(seen) == len(model.history["epoch"]) and all(ok for ok, _ in seen)
    phases = model.history["phase"]
    assert phases[0] == "warmup" and "mixture" in phases
    n_warm = phases.count("warmup")
    assert [k for _, k in seen[n_warm:]] == model.history["n_components"][n_warm:]
    ts = model.train_settings
    assert ts["warmup_beta"] == 0.01 and ts["init"] == "markers" and ts["n_init"] == 3
    assert ts["schedule"]["merge_rounds"] == 3 and ts["epochs_trained"] == len(phases)
    for key in ("reconstruction", "kl", "validation_reconstruction", "validation_kl"):
        assert len(model.history[key]) == len(phases)


def test_schedule_sets_the_phase_budgets(tiny):
    sched = GMVAESchedule(warmup_steps=1, warmup_epochs=(2, 2), mixture_steps=1,
                          mixture_epochs=(3, 3), merge_rounds=0)
    model = GMVAE(tiny, n_components=3, overcluster=False).fit(schedule=sched, verbose=False)
    assert model.history["phase"] == ["warmup"] * 2 + ["mixture"] * 3
    assert model.merges == [] and model.n_clusters == 3
    with pytest.raises(ValueError, match="merge_rounds=0 cannot merge"):
        GMVAE(tiny, n_components=3).fit(schedule=sched, verbose=False)
    with pytest.raises(ValueError, match="GMVAESchedule.probe_cells"):
        GMVAESchedule(probe_cells=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        GMVAESchedule(warmup_epochs=(5, 2))
    with pytest.raises(TypeError, match="GMVAESchedule"):
        GMVAE(tiny).fit(schedule={"warmup_steps": 10}, verbose=False)
    # through tl too, recorded in uns
    out = cellvi.tl.gmvae(tiny, n_components=3, overcluster=False, schedule=sched, copy=True,
                          verbose=False)
    assert out.uns["gmvae"]["train_settings"]["schedule"]["mixture_steps"] == 1


def test_transform_gives_latent_labels_and_probs_of_any_sample(tiny):
    model = GMVAE(tiny, n_components=3).fit(verbose=False, **FAST)
    out = model.transform(tiny)
    assert out.latent.shape == (tiny.n_obs, 10) and out.latent.dtype == np.float32
    assert out.probs.shape == (tiny.n_obs, model.n_clusters)
    np.testing.assert_allclose(out.probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(out.labels.codes, out.probs.argmax(1))
    np.testing.assert_array_equal(out.confidence, out.probs.max(1))
    np.testing.assert_array_equal(out.latent, model.get_latent(tiny))
    labels, probs = model.predict(tiny)
    np.testing.assert_array_equal(probs, out.probs)
    # one pass for both (what tl.gmvae writes): the same values as transform and elbo
    both, elbo = model.transform_and_elbo(tiny, n_samples=5, elbo_samples=3, seed=2)
    ref = model.transform(tiny, n_samples=5, seed=2)
    np.testing.assert_allclose(both.probs, ref.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both.latent, ref.latent)
    np.testing.assert_allclose(elbo, model.elbo(tiny, n_samples=3, seed=2), rtol=1e-6)
    assert not np.allclose(elbo, model.elbo(tiny, n_samples=3, seed=3), rtol=1e-3)
    with pytest.raises(ValueError, match="elbo_samples must be a positive integer"):
        model.transform_and_elbo(tiny, elbo_samples=0)


def test_tl_gmvae_writes_what_transform_and_outlier_scores_give(cyto, discovered):
    out, model = discovered
    ref = model.transform(cyto)
    np.testing.assert_allclose(out.obsm["gmvae_probs"], ref.probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.obsm["X_gmvae"], ref.latent, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.obs["gmvae_outlier_score"].to_numpy(),
                               cellvi.diagnostics.outlier_scores(model, cyto, seed=0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_latent=0), "n_latent must be a positive integer"),
    (dict(n_hidden=2.5), "n_hidden must be a positive integer"),
    (dict(n_components=0), "n_components must be a positive integer"),
])
def test_bad_sizes_are_refused_before_training(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GMVAE(tiny, **kwargs)


@pytest.mark.parametrize("seed", ["x", -1, 1.5, True, None])
def test_bad_seed_is_a_clear_error(tiny, seed):
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        GMVAE(tiny, n_components=3).fit(seed=seed, verbose=False, **FAST)
    with pytest.raises(TypeError, match="seed must be a non-negative integer"):
        cellvi.tl.gmvae(tiny, n_components=3, seed=seed, copy=True, verbose=False, **FAST)


def test_a_user_on_epoch_end_keyword_is_refused_with_the_callbacks_hint(tiny):
    with pytest.raises(TypeError, match="unknown training setting"):
        GMVAE(tiny, n_components=3).fit(on_epoch_end=lambda e: None, verbose=False, **FAST)


def test_duplicated_marker_names_are_refused(tiny):
    dup = tiny.copy()
    dup.var_names = [dup.var_names[0]] * 2 + list(dup.var_names[2:])
    with pytest.raises(ValueError, match="var_names_make_unique"):
        GMVAE(dup)


def test_batch_penalty_lowers_the_latents_batch_dependence_and_is_recorded():
    from cellvi.objectives import batch_mmd

    base = cellvi.datasets.synthetic_cytometry(3000, 10, n_populations=5, seed=1)
    ad = cellvi.datasets.cytometry_batches(base, label_key="population", n_batches=2, seed=0,
                                           shift_sd=1.0, population_shift_sd=1.0)
    codes = torch.as_tensor(ad.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
    mmd = {}
    for weight in (0.0, 1000.0):
        out = cellvi.tl.gmvae(ad, batch_key="batch", n_components=5, overcluster=False,
                              batch_penalty=weight, copy=True, verbose=False, seed=0,
                              max_epochs=15, warmup_epochs=3)
        mmd[weight] = float(batch_mmd(torch.as_tensor(out.obsm["X_gmvae"]), codes))
        settings = out.uns["gmvae"]["train_settings"]
        assert settings["batch_penalty"] == weight
        assert ("batch_penalty=1000.0" in settings["objective"]) == bool(weight)
    assert mmd[1000.0] < 0.5 * mmd[0.0], mmd
    with pytest.raises(ValueError, match="batch_key"):
        GMVAE(ad).fit(batch_penalty=1.0, verbose=False, **FAST)
    # the default: BATCH_PENALTY with a batch key, none without
    from cellvi.models.gmvae import BATCH_PENALTY

    tiny = ad[:600].copy()
    with_batch = GMVAE(tiny, batch_key="batch", n_components=3, overcluster=False).fit(
        verbose=False, max_epochs=2, warmup_epochs=1)
    assert with_batch.train_settings["batch_penalty"] == BATCH_PENALTY == 100.0
    assert "batch_penalty=100.0" in with_batch.train_settings["objective"]
    without = GMVAE(tiny, n_components=3, overcluster=False).fit(verbose=False, max_epochs=2,
                                                                 warmup_epochs=1)
    assert without.train_settings["batch_penalty"] == 0.0
    for bad in (-1.0, float("nan"), "10", True):
        with pytest.raises(ValueError, match="non-negative"):
            GMVAE(ad, batch_key="batch").fit(batch_penalty=bad, verbose=False, **FAST)
    # aligned within groups of the batch-centred markers: the groups reach the penalty
    seen = []
    import cellvi.objectives as objectives

    real = objectives.batch_mmd

    def spy(z, covs, block=objectives.MMD_BLOCK, groups=None):
        seen.append(None if groups is None else int(groups.max()) + 1)
        return real(z, covs, block, groups)

    objectives.batch_mmd = spy
    try:
        grouped = GMVAE(tiny, batch_key="batch", n_components=3, overcluster=False).fit(
            verbose=False, max_epochs=2, warmup_epochs=1, penalty_groups=4)
    finally:
        objectives.batch_mmd = real
    assert grouped.train_settings["penalty_groups"] == 4
    assert seen and all(k is not None and k <= 4 for k in seen)
    with pytest.raises(ValueError, match="penalty_groups"):
        GMVAE(tiny, batch_key="batch").fit(penalty_groups=2.5, verbose=False, **FAST)


def test_cluster_probabilities_of_a_cell_do_not_depend_on_the_other_cells(cyto, discovered):
    """The Monte Carlo draws of q(c | x) are made from noise shared by all cells, so a
    cell's probabilities are the same in any subset, order or chunking of the call."""
    _, model = discovered
    full = model.transform(cyto).probs
    chunked = model.transform(cyto, batch_size=97).probs
    np.testing.assert_allclose(chunked, full, atol=1e-6)
    rows = np.random.default_rng(0).permutation(cyto.n_obs)[:300]
    np.testing.assert_allclose(model.transform(cyto[rows].copy()).probs, full[rows], atol=1e-6)


@pytest.mark.parametrize("posterior", ["normal", "iaf"])
def test_shared_noise_draws_follow_each_cells_posterior(posterior):
    from cellvi.posteriors import GaussianEncoder, IAFEncoder, shared_noise_draws

    torch.manual_seed(0)
    enc = (IAFEncoder(5, 3, n_hidden=16, n_flows=2) if posterior == "iaf"
           else GaussianEncoder(5, 3, n_hidden=16)).eval()
    with torch.no_grad():
        qz = enc(torch.randn(4, 5))
        draws = shared_noise_draws(qz, 40000)
        ref = qz.sample((40000,))
        # the cells' draws are log-probable under their own posterior as qz's own samples are
        gap = float(qz.log_prob(draws).mean() - qz.log_prob(ref).mean())
    assert draws.shape == ref.shape == (40000, 4, 3)
    torch.testing.assert_close(draws.mean(0), ref.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(draws.std(0), ref.std(0), atol=0.03, rtol=0.03)
    assert abs(gap) < 0.05
