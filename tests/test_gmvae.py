"""The cytometry model: decoder, merging, GMVAE / tl.gmvae outputs, recovery, validation."""

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Normal, StudentT

import cellvi
from cellvi.decoders import ContinuousDecoder
from cellvi.metrics import ari
from cellvi.models import GMVAE, bimodality, merge_components

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


def test_merge_components_joins_split_population_only():
    rng = np.random.default_rng(0)
    # components 0 and 1 share their cells (one population split in two); 2 is apart
    shared = rng.uniform(0.3, 0.7, 500)
    probs = np.zeros((800, 3))
    probs[:500, 0], probs[:500, 1] = shared, 1 - shared
    probs[500:, 2] = 1.0
    assert sorted(map(sorted, merge_components(probs, 0.1))) == [[0, 1], [2]]
    crisp = np.eye(3)[rng.integers(0, 3, 600)]
    assert len(merge_components(crisp, 0.1)) == 3
    assert len(merge_components(crisp, n_groups=2)) == 2


def test_bimodality_tells_two_populations_from_one_split_in_two():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(600, 8))
    half = one[:, 0] > 0.3  # one Gaussian cut by a hyperplane, unequal halves
    stats = bimodality(one, half, ~half)
    assert not stats["bimodal"] and stats["valley"] > 0.8
    # two Gaussians 5.2 standard deviations apart (2 at 3.5 are not called bimodal)
    shift = np.r_[3.0, 3.0, 3.0, np.zeros(5)]
    two = np.r_[rng.normal(size=(400, 8)), rng.normal(size=(200, 8)) + shift]
    is_b = np.arange(600) >= 400
    stats = bimodality(two, ~is_b, is_b)
    assert stats["bimodal"] and stats["separation"] > 4.4 and stats["valley"] < 0.45
    two[is_b] -= shift / 1.5
    assert not bimodality(two, ~is_b, is_b)["bimodal"]
    # too few cells on a side: no verdict
    assert not bimodality(two, ~is_b, np.arange(600) == 0)["bimodal"]


def test_merge_components_vetoes_entangled_pairs_that_are_two_modes_in_the_markers():
    rng = np.random.default_rng(0)
    # components 0 and 1 share their cells in the latent; component 2 is apart
    shared = rng.uniform(0.3, 0.7, 500)
    probs = np.full((800, 3), 1e-6)
    probs[:500, 0], probs[:500, 1] = shared, 1 - shared
    probs[500:, 2] = 1.0
    probs /= probs.sum(1, keepdims=True)
    first = (probs[:, 0] > probs[:, 1]) & (np.arange(800) < 500)
    # in the markers, the cells of 0 and of 1 are one population: merged
    markers = rng.normal(size=(800, 6))
    markers[500:] += 10.0
    assert sorted(map(sorted, merge_components(probs, 0.1, features=markers))) == [[0, 1], [2]]
    # in the markers they are two populations: kept apart, and the veto is recorded
    markers[first] += np.r_[4.0, 4.0, np.zeros(4)]
    record = []
    groups = merge_components(probs, 0.1, features=markers, record=record)
    assert sorted(map(sorted, groups)) == [[0], [1], [2]]
    assert [r["rule"] for r in record] == ["vetoed (bimodal)"]
    assert record[0]["score"] > 0.1
    # without features (or with n_groups, whose folds are never vetoed) they are merged
    assert len(merge_components(probs, 0.1)) == 2
    assert len(merge_components(probs, 0.1, n_groups=1, features=markers)) == 1


def test_merge_to_k_folds_a_tiny_isolated_group_before_joining_populations():
    """K given: once the groups are distinct, the smallest one is absorbed (by the group it
    shares most cells with), not two real populations joined (flowsom_68983 with K = 6: a
    speck of 184 Unlabeled cells kept a cluster while NK and NK T cells were joined)."""
    rng = np.random.default_rng(1)
    # rows: a big population split over components 0 and 1, two distinct populations
    # (components 2 and 3) and a speck of 40 cells (component 4)
    probs = np.full((2640, 5), 1e-6)
    shared = rng.uniform(0.3, 0.7, 2000)
    probs[:2000, 0], probs[:2000, 1] = shared, 1 - shared
    probs[2000:2300, 2] = probs[2300:2600, 3] = probs[2600:, 4] = 1.0
    probs[2300:2600, 2] = 0.02  # population 3 touches population 2 a little
    probs[2600:, 3] = 0.005  # the speck touches population 3, barely
    probs /= probs.sum(1, keepdims=True)
    groups = sorted(map(sorted, merge_components(probs, 0.125, n_groups=3)))
    assert groups == [[0, 1], [2], [3, 4]]
    # the former rule (always the most entangled pair) joined populations 2 and 3 instead
    legacy = sorted(map(sorted, merge_components(probs, 0.0, n_groups=3)))
    assert legacy == [[0, 1], [2, 3], [4]]


def test_merge_components_logs_each_merge_with_its_score_and_rule(caplog):
    rng = np.random.default_rng(0)
    shared = rng.uniform(0.3, 0.7, 500)
    probs = np.full((840, 4), 1e-6)
    probs[:500, 0], probs[:500, 1] = shared, 1 - shared
    probs[500:800, 2] = probs[800:, 3] = 1.0
    probs /= probs.sum(1, keepdims=True)
    with caplog.at_level(logging.DEBUG, logger="cellvi"):
        merge_components(probs, 0.125, n_groups=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merge components")]
    assert len(lines) == 2
    assert lines[0].startswith("merge components [0] (") and lines[0].endswith(", entangled")
    # then the 40-cell group is folded into the group it touches most (below the threshold)
    assert "(40 cells)" in lines[1] and lines[1].endswith(", smallest folded")


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
