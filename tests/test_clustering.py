"""The torch-free clustering heuristics (cellvi.clustering): merging, the bimodality veto,
group moments and medians."""

import logging
import subprocess
import sys

import numpy as np

from cellvi.clustering import bimodality, group_medians, group_moments, merge_components


def test_clustering_module_does_not_import_torch():
    code = ("import sys; import cellvi.clustering; "
            "print('torch' in sys.modules, 'anndata' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


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


def test_bimodality_follows_the_callers_seed():
    rng = np.random.default_rng(3)
    two = np.r_[rng.normal(0, 1, (3000, 3)), rng.normal([4.5, 0, 0], 1, (3000, 3))]
    is_b = np.arange(6000) >= 3000
    same = [bimodality(two, ~is_b, is_b, max_cells=500, seed=s)["separation"] for s in (1, 1, 2)]
    assert same[0] == same[1] and same[0] != same[2]
    # merge_components hands its seed on: the same seed, the same record
    probs = np.c_[np.where(is_b, 0.4, 0.6), np.where(is_b, 0.6, 0.4)]
    rec1, rec2 = [], []
    merge_components(probs, 0.0, features=two, record=rec1, seed=5)
    merge_components(probs, 0.0, features=two, record=rec2, seed=5)
    assert rec1 == rec2


def test_group_moments_are_the_aggregate_posterior_moments():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 2))
    zvar = np.full_like(z, 0.25)
    labels = np.repeat([0, 1, 2], 100)
    w, mu, sd = group_moments(z, labels, 4, zvar)
    np.testing.assert_allclose(w[:3] / w[:3].sum(), 1 / 3)
    assert w[3] < w[0]  # an empty group gets a small weight ...
    np.testing.assert_allclose(mu[1], z[100:200].mean(0))
    np.testing.assert_allclose(sd[1], np.sqrt(z[100:200].var(0) + 0.25) + 1e-3)
    # ... and starts at a random cell, drawn with the caller's generator
    starts = [group_moments(z, labels, 4, zvar, np.random.default_rng(s))[1][3] for s in (0, 0, 1)]
    np.testing.assert_array_equal(starts[0], starts[1])
    assert not np.array_equal(starts[0], starts[2])
    assert any((starts[0] == row).all() for row in z)


def test_group_medians_per_group_with_nan_for_empty_ones():
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    med = group_medians(X, np.array([0, 0, 0, 2, 2, 2]), 3)
    np.testing.assert_array_equal(med[0], [2, 3])
    assert np.isnan(med[1]).all()
    np.testing.assert_array_equal(med[2], [8, 9])
    assert med.dtype == np.float32


def test_batch_balanced_groups_mix_batches_and_keep_a_missing_type_apart():
    from sklearn.cluster import KMeans

    import cellvi
    from cellvi.clustering import batch_balanced_groups
    from cellvi.metrics import LogPCA, ari

    a = cellvi.datasets.synthetic_counts(3000, 300, n_groups=3, n_batches=2, batch_strength=1.0, seed=0)
    types = a.obs["group"].cat.codes.to_numpy()
    batch = a.obs["batch"].cat.codes.to_numpy()
    keep = ~((types == 2) & (batch == 1))  # type 2 missing from batch 1
    X, types, batch = a.X[keep], types[keep], batch[keep]
    # uncorrected, k-means splits by batch; after centring each batch, it finds the types
    assert ari(types, KMeans(3, n_init=3, random_state=0).fit_predict(LogPCA(X).scores)) < 0.5
    groups = batch_balanced_groups(X, batch[:, None], 3)
    assert ari(types, groups) > 0.95
    for k in range(3):
        held = np.bincount(batch[groups == k], minlength=2)
        if np.bincount(types[groups == k], minlength=3).argmax() == 2:
            assert held[1] == 0  # the missing type's group holds none of batch 1
        else:
            assert held.min() > 0.4 * held.sum()  # shared types: both batches
    # fitted on a subsample, the other cells (read in chunks) get the nearest centre
    sub = batch_balanced_groups(X, batch[:, None], 3, n_cells=1000, chunk=700)
    assert sub.shape == groups.shape and ari(groups, sub) > 0.95
