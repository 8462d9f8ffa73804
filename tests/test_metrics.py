import numpy as np
import pytest
from sklearn.metrics import f1_score

from cellvi.metrics import ari, hungarian_f1, ilisi, kbet_acceptance, nmi


def test_hungarian_f1_perfect_under_relabelling():
    t = np.repeat(["a", "b", "c"], 10)
    p = np.repeat(["7", "3", "5"], 10)
    f1, per = hungarian_f1(t, p)
    assert f1 == 1.0 and per["a"] == ("7", 1.0)
    assert ari(t, p) == 1.0 and nmi(t, p) == pytest.approx(1.0)


def test_hungarian_f1_matches_sklearn_after_matching():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, 300)
    p = np.where(rng.random(300) < 0.8, t, rng.integers(0, 3, 300))
    f1, per = hungarian_f1(t, p)
    assert f1 == pytest.approx(f1_score(t, p, average="macro"))


def test_hungarian_f1_excludes_and_penalises_missing_clusters():
    t = np.array(["a"] * 5 + ["b"] * 5 + ["Unlabeled"] * 5)
    p = np.array(["0"] * 15)
    f1, per = hungarian_f1(t, p, exclude=["Unlabeled"])
    assert set(per) == {"a", "b"}
    assert f1 == pytest.approx((2 * 5 / (5 + 10) + 0.0) / 2)


def test_mixing_metrics_separate_mixed_from_split():
    rng = np.random.default_rng(0)
    batch = np.repeat(["x", "y"], 200)
    mixed = rng.normal(size=(400, 3))
    split = mixed + np.where(batch == "x", 0, 20)[:, None]
    assert ilisi(mixed, batch) > 0.85 and ilisi(split, batch) == 0.0
    assert ilisi(split, batch, scale=False) == pytest.approx(1.0)
    assert kbet_acceptance(mixed, batch) > 0.8 and kbet_acceptance(split, batch) == 0.0


def test_log_pca_places_new_cells_as_sklearn_pca_transform_does():
    import cellvi
    from cellvi.metrics import LogPCA

    ad = cellvi.datasets.synthetic_counts(600, 120, seed=0)
    pcs = LogPCA(ad.X[:400], n_genes=80, n_pcs=5)
    assert pcs.scores.shape == (400, 5) and len(pcs.genes) == 80
    dense = pcs._log_normalized(ad.X[400:])[:, pcs.genes].toarray()
    np.testing.assert_allclose(pcs.transform(ad.X[400:]), pcs.pca.transform(dense), atol=1e-4)
    np.testing.assert_allclose(pcs.transform(ad.X[:400]), pcs.scores, atol=1e-4)
