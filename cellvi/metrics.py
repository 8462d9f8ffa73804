"""Metrics as pure functions on arrays: clustering agreement and batch mixing."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2

__all__ = ["ari", "nmi", "hungarian_f1", "ilisi", "kbet_acceptance", "batch_separation"]


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (sklearn)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def nmi(labels_true, labels_pred) -> float:
    """Normalized mutual information (sklearn, arithmetic mean)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(labels_true), np.asarray(labels_pred)))


def hungarian_f1(labels_true, labels_pred, *, exclude=()) -> tuple[float, dict]:
    """Mean F1 over true populations after one-to-one Hungarian matching of clusters.

    Cells whose true label is in ``exclude`` are left out of the scoring. A true population
    left without a cluster (fewer clusters than populations) scores F1 = 0.

    Returns:
        ``(mean_f1, {true_label: (matched_cluster or None, f1)})``.
    """
    t = np.asarray(labels_true).astype(str)
    p = np.asarray(labels_pred).astype(str)
    keep = ~np.isin(t, np.asarray(list(exclude), dtype=str))
    t, p = t[keep], p[keep]
    tl, ti = np.unique(t, return_inverse=True)
    pl, pi = np.unique(p, return_inverse=True)
    cont = np.zeros((len(tl), len(pl)))
    np.add.at(cont, (ti, pi), 1)
    f1 = 2 * cont / (cont.sum(1, keepdims=True) + cont.sum(0, keepdims=True))
    rows, cols = linear_sum_assignment(-f1)
    per = {label: (None, 0.0) for label in tl}
    for r, c in zip(rows, cols, strict=True):
        per[tl[r]] = (pl[c], float(f1[r, c]))
    return float(np.mean([v[1] for v in per.values()])), per


def _knn_batches(X, batch, n_neighbors: int):
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X)
    codes = np.unique(np.asarray(batch).astype(str), return_inverse=True)[1]
    k = min(n_neighbors, len(X) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    idx = nn.kneighbors(X, return_distance=False)[:, 1:]
    return codes, codes[idx], codes.max() + 1


def ilisi(X, batch, *, n_neighbors: int = 30, scale: bool = True) -> float:
    """Mean inverse Simpson index of batch labels among each cell's k nearest neighbours.

    A simplified, unweighted iLISI: 1 means each neighbourhood holds one batch, ``B`` means
    perfect mixing of ``B`` equally sized batches. With ``scale`` the result is mapped to
    [0, 1] by ``(ilisi - 1) / (B - 1)``.
    """
    codes, nb, n_batches = _knn_batches(X, batch, n_neighbors)
    counts = np.stack([(nb == b).sum(1) for b in range(n_batches)], axis=1)
    p = counts / counts.sum(1, keepdims=True)
    value = float(np.mean(1.0 / (p**2).sum(1)))
    if scale:
        return (value - 1.0) / max(1, n_batches - 1)
    return value


def kbet_acceptance(X, batch, *, n_neighbors: int = 50, alpha: float = 0.05) -> float:
    """kBET-style acceptance rate: share of cells whose neighbourhood batch composition is
    not rejected by a chi-square test against the global batch frequencies (level ``alpha``).

    Higher is better mixed (1 = no neighbourhood differs from the global mix).
    """
    codes, nb, n_batches = _knn_batches(X, batch, n_neighbors)
    freq = np.bincount(codes, minlength=n_batches) / len(codes)
    k = nb.shape[1]
    observed = np.stack([(nb == b).sum(1) for b in range(n_batches)], axis=1)
    expected = freq * k
    stat = ((observed - expected) ** 2 / expected).sum(1)
    pvals = chi2.sf(stat, df=n_batches - 1)
    return float(np.mean(pvals >= alpha))


def batch_separation(counts, batch, *, n_cells: int = 5000, n_genes: int = 2000,
                     n_pcs: int = 20, n_neighbors: int = 15, seed: int = 0) -> float:
    """How far apart the batches of raw counts lie before any correction, from 0 (each
    cell's neighbours are drawn from the batches in proportion to their sizes) to 1 (every
    neighbour is from the cell's own batch).

    On a random subsample of at most ``n_cells`` cells: counts per 10,000, ``log1p``, the
    ``n_genes`` most variable genes, ``n_pcs`` principal components, ``n_neighbors``
    nearest neighbours; per cell ``(f - e) / (1 - e)`` with ``f`` the share of its
    neighbours in its own batch and ``e`` that batch's share of the other cells; the mean
    over cells. Batches that hold different cell types raise it too.

    Args:
        counts: cells x genes, dense or scipy sparse.
        batch: one label per cell.

    Returns:
        The separation (``nan`` with a single batch or no varying gene).
    """
    from sklearn.neighbors import NearestNeighbors

    batch = np.asarray(batch).astype(str)
    if len(np.unique(batch)) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    idx = np.sort(rng.choice(n, min(n, n_cells), replace=False))
    pcs = LogPCA(counts[idx], n_genes=n_genes, n_pcs=n_pcs)
    if pcs.genes.size == 0:  # every gene constant: no expression to separate the batches by
        return float("nan")
    Z = pcs.scores
    k = min(n_neighbors, len(idx) - 1)
    nb = NearestNeighbors(n_neighbors=k + 1).fit(Z).kneighbors(Z, return_distance=False)[:, 1:]
    b = batch[idx]
    same = (b[nb] == b[:, None]).mean(1)
    _, inv, cnt = np.unique(b, return_inverse=True, return_counts=True)
    expected = (cnt[inv] - 1) / max(len(b) - 1, 1)
    keep = expected < 1
    return float(np.mean((same[keep] - expected[keep]) / (1 - expected[keep])))


class LogPCA:
    """Principal components of raw counts the way scanpy's standard recipe makes them: counts
    per 10,000, ``log1p``, the ``n_genes`` most variable genes, ``n_pcs`` components
    (sklearn). ``scores`` holds the fitted cells' components; :meth:`transform` places other
    cells (raw counts of the same genes) in the same components.
    """

    def __init__(self, counts, *, n_genes: int = 2000, n_pcs: int = 20):
        from sklearn.decomposition import PCA

        Y = self._log_normalized(counts)
        mean = np.asarray(Y.mean(0)).ravel()
        var = np.asarray(Y.multiply(Y).mean(0)).ravel() - mean ** 2
        self.genes = np.argsort(-var)[:min(n_genes, int((var > 1e-12).sum()))]
        Y = Y[:, self.genes].toarray()
        n_comp = max(1, min(n_pcs, Y.shape[1], Y.shape[0] - 1))
        self.pca = PCA(n_comp, random_state=0).fit(Y) if Y.shape[1] > 1 else None
        self.scores = self.pca.transform(Y) if self.pca is not None else Y

    @staticmethod
    def _log_normalized(counts, dtype=np.float64):
        import scipy.sparse as sp

        X = sp.csr_matrix(counts, dtype=dtype, copy=True)
        lib = np.asarray(X.sum(1), dtype=np.float64).ravel()
        X.data *= np.repeat(1e4 / np.maximum(lib, 1.0), np.diff(X.indptr)).astype(dtype)
        np.log1p(X.data, out=X.data)
        return X

    def transform(self, counts) -> np.ndarray:
        """Components of other cells (``PCA.transform`` written out, in ``float32`` and
        without densifying their counts: the data times the components, with zero rows for
        the genes not used, minus the mean's projection)."""
        if self.pca is None:
            return self._log_normalized(counts)[:, self.genes].toarray()
        W = np.zeros((counts.shape[1], self.pca.n_components_), dtype=np.float32)
        W[self.genes] = self.pca.components_.T
        Y = self._log_normalized(counts, np.float32)
        return np.asarray(Y @ W, dtype=np.float64) - self.pca.mean_ @ self.pca.components_.T
