"""Clustering heuristics of the GMVAE, as pure functions on arrays (no torch, no AnnData).

- :func:`merge_components`: greedy entropy-based merging of mixture components into clusters,
  with a veto when two groups are two modes in the markers;
- :func:`bimodality`: whether two groups of cells are two modes in feature space;
- :func:`group_moments`: weights, means and spreads of groups of latent posteriors, which
  place the mixture components;
- :func:`group_medians`: per-cluster medians of the input values, to name the populations;
- :func:`batch_balanced_groups`: clusters of raw counts after each batch's mean is removed,
  which the NB-VAE's batch penalty aligns the batches within.

The evidence behind the thresholds is in ``docs/design.md`` (merging and the veto).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger("cellvi")

__all__ = ["merge_components", "bimodality", "group_moments", "group_medians",
           "batch_balanced_groups", "BIMODAL_SEPARATION", "BIMODAL_VALLEY"]


def merge_components(probs: np.ndarray, threshold: float = 0.0,
                     n_groups: int | None = None, record: list | None = None,
                     features: np.ndarray | None = None, seed: int = 0) -> list[list[int]]:
    """Greedy entropy-based merging of mixture components (Baudry et al. 2010, JCGS 19:332).

    Merging components ``i`` and ``j`` lowers the entropy of the responsibilities by
    ``Δ_ij = Σ_n [(γ_ni + γ_nj) log(γ_ni + γ_nj) - γ_ni log γ_ni - γ_nj log γ_nj]``: large when
    many cells are shared between them, as when one population is fitted by several touching
    Gaussians. Pairs are merged, best first, while ``Δ_ij / min(N_i, N_j)`` (nats per cell of
    the smaller one) exceeds ``threshold``.

    With ``n_groups``, merging goes on until exactly that many groups are left: once no pair
    scores above ``threshold``, each further merge folds the **smallest** group into the
    group it shares the most cells with (the entropy score no longer tells populations apart
    there, and this moves the fewest cells; a tiny isolated group would otherwise keep a
    cluster while two real populations were joined).

    With ``features`` (the cells' marker values), a merge by entanglement is **vetoed** when
    the two groups are two modes in marker space (:func:`bimodality`); the next best pair is
    tried instead. Entanglement is measured in the latent, where a small population can sit
    inside a larger one's component; the markers have the last word. The smallest-first
    folds that reach ``n_groups`` are never vetoed. Each merge and veto is logged at DEBUG
    level on the ``"cellvi"`` logger. Evidence: ``docs/design.md`` (merging and the veto).

    Args:
        probs: cells x components responsibilities (columns of switched-off components are 0).
        threshold: smallest score worth a merge by entanglement.
        n_groups: merge down to exactly this many groups.
        record: a list; each merge appends ``{"components_a", "components_b", "cells_a",
            "cells_b", "score", "rule"}`` to it (cells: responsibility mass of each side);
            vetoed pairs append the same with rule ``"vetoed (bimodal)"``.
        features: cells x features (standardised markers, batch shifts removed), rows as in
            ``probs``; enables the bimodality veto.
        seed: seed of :func:`bimodality` (its subsampling and its mixture fits).

    Returns:
        Groups of component indices (each group becomes one cluster), for the columns with
        any mass.
    """
    cols = [c for c in range(probs.shape[1]) if probs[:, c].sum() > 0]
    groups = [[c] for c in cols]
    g = probs[:, cols].astype(np.float64)

    def xlogx(a):
        return np.where(a > 0, a * np.log(np.maximum(a, 1e-300)), 0.0)

    vetoed: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    rng = np.random.default_rng(seed)

    def veto(i: int, j: int, score: float, mass: np.ndarray) -> bool:
        key = (tuple(groups[i]), tuple(groups[j]))
        if key in vetoed:
            return True
        labels = g.argmax(1)
        if not bimodality(features, labels == i, labels == j, rng, seed=seed)["bimodal"]:
            return False
        vetoed.add(key)
        step = dict(components_a=list(groups[i]), components_b=list(groups[j]),
                    cells_a=float(mass[i]), cells_b=float(mass[j]), score=float(score),
                    rule="vetoed (bimodal)")
        logger.debug("keep components %(components_a)s (%(cells_a).0f cells) and "
                     "%(components_b)s (%(cells_b).0f cells) apart: score %(score).3f, "
                     "but two modes in the markers", step)
        if record is not None:
            record.append(step)
        return True

    while len(groups) > (n_groups or 1):
        mass = g.sum(0)
        h = xlogx(g).sum(0)
        scores = np.full((len(groups), len(groups)), -np.inf)
        for i in range(len(groups)):
            merged = xlogx(g[:, i : i + 1] + g[:, i + 1 :]).sum(0) - h[i] - h[i + 1 :]
            scores[i, i + 1 :] = merged / np.minimum(mass[i], mass[i + 1 :]).clip(1e-12)
        # the best entangled pair that is not vetoed (two modes in the markers)
        for flat in np.argsort(-scores, axis=None, kind="stable"):
            i, j = np.unravel_index(flat, scores.shape)
            if scores[i, j] <= threshold or features is None or not veto(i, j, scores[i, j], mass):
                break
        rule = "entangled"
        if scores[i, j] <= threshold:
            if not n_groups:
                break
            # no entangled pair left: fold the smallest group into its most-sharing neighbour
            small = int(np.argmin(mass))
            row = np.maximum(scores[small], scores[:, small])
            row[small] = -np.inf
            i, j = sorted((small, int(np.argmax(row))))
            rule = "smallest folded"
        step = dict(components_a=list(groups[i]), components_b=list(groups[j]),
                    cells_a=float(mass[i]), cells_b=float(mass[j]), score=float(scores[i, j]),
                    rule=rule)
        logger.debug("merge components %(components_a)s (%(cells_a).0f cells) + %(components_b)s "
                     "(%(cells_b).0f cells): score %(score).3f, %(rule)s", step)
        if record is not None:
            record.append(step)
        g[:, i] += g[:, j]
        g = np.delete(g, j, axis=1)
        groups[i] += groups.pop(j)
    return groups


#: Ashman's D above which the two modes count as separated (2 = just resolved) ...
BIMODAL_SEPARATION = 4.0
#: ... and the density between them, relative to the lower peak, below which there is a valley
BIMODAL_VALLEY = 0.55  # both tuned on logged merges: docs/design.md


def bimodality(features: np.ndarray, in_a: np.ndarray, in_b: np.ndarray,
               rng: np.random.Generator | None = None, max_cells: int = 4000,
               seed: int = 0) -> dict[str, Any]:
    """Whether two groups of cells are two modes in feature space.

    The cells of both groups are projected on the Fisher direction that separates them
    (pooled within-group covariance), scaled so that group ``a`` sits at 0 and ``b`` at 1.
    Two statistics of that projection, both computed without the group labels:

    * ``separation``: Ashman's D of a two-component Gaussian mixture fitted to it,
      ``|m_1 - m_2| sqrt(2) / sqrt(s_1² + s_2²)`` (> 2: the modes are resolved);
    * ``valley``: the lowest kernel density between the two group means, relative to the
      lower of the two peaks near them (about 1: no valley).

    The groups are ``bimodal`` when ``separation > BIMODAL_SEPARATION`` and ``valley <
    BIMODAL_VALLEY`` (both: the projection on a direction chosen to separate the groups
    makes even one population split in two look somewhat separated).

    Args:
        features: cells x features.
        in_a, in_b: boolean masks of the two groups' cells.
        rng: subsamples at most ``max_cells`` cells for the fits (default: seeded by ``seed``).
        seed: seed of the two-component mixture fit.
    """
    from scipy.stats import gaussian_kde
    from sklearn.mixture import GaussianMixture

    xa, xb = features[in_a].astype(np.float64), features[in_b].astype(np.float64)
    out = dict(separation=float("nan"), valley=float("nan"), bimodal=False)
    if min(len(xa), len(xb)) < 5:
        return out
    cov = 0.5 * (np.cov(xa.T) + np.cov(xb.T)) + 1e-3 * np.eye(features.shape[1])
    ma, mb = xa.mean(0), xb.mean(0)
    w = np.linalg.solve(cov, mb - ma)
    t = (np.r_[xa @ w, xb @ w] - ma @ w) / max((mb - ma) @ w, 1e-12)
    if len(t) > max_cells:
        t = t[(rng or np.random.default_rng(seed)).choice(len(t), max_cells, replace=False)]
    gm = GaussianMixture(2, n_init=2, random_state=seed).fit(t[:, None])
    m, v = gm.means_.ravel(), gm.covariances_.ravel()
    out["separation"] = float(abs(m[0] - m[1]) * np.sqrt(2) / np.sqrt(v[0] + v[1]))
    grid = np.linspace(-0.25, 1.25, 61)
    dens = gaussian_kde(t, bw_method=0.3)(grid)
    peak = min(dens[grid <= 0.25].max(), dens[grid >= 0.75].max())
    out["valley"] = float(dens[(grid >= 0) & (grid <= 1)].min() / max(peak, 1e-300))
    out["bimodal"] = bool(out["separation"] > BIMODAL_SEPARATION and out["valley"] < BIMODAL_VALLEY)
    return out


def group_moments(z: np.ndarray, labels: np.ndarray, k: int, zvar: np.ndarray | None = None,
                  rng: np.random.Generator | None = None):
    """Weights, means and standard deviations of the groups ``labels`` of the cells' latent
    posteriors: ``μ_c`` = mean of their posterior means, ``σ_c² = Var_c(means) + mean_c(posterior
    variances)`` (the moments of the aggregate posterior of the group, which is what the
    prior sees through the ELBO's samples; from the means alone a component would be far too
    narrow in latent dimensions that carry no information). An empty group starts at a random
    cell (drawn with ``rng``, default seed 0) with the pooled spread and a small weight."""
    if zvar is None:
        zvar = np.zeros_like(z)
    counts = np.bincount(labels, minlength=k).astype(float)
    means = np.zeros((k, z.shape[1]))
    scales = np.tile(np.sqrt(z.var(0) + zvar.mean(0)) + 1e-3, (k, 1))
    rng = rng if rng is not None else np.random.default_rng(0)
    for c in range(k):
        members = labels == c
        if members.sum() >= 2:
            means[c] = z[members].mean(0)
            scales[c] = np.sqrt(z[members].var(0) + zvar[members].mean(0)) + 1e-3
        else:
            means[c] = z[rng.integers(len(z))]
    weights = np.maximum(counts, 0.5) / max(counts.sum(), 1.0)
    return weights / weights.sum(), means, scales


def group_medians(X: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of each column of ``X`` over the rows of each group ``0..n_groups-1`` (NaN for
    an empty group): ``(n_groups, n_features)``."""
    X = np.asarray(X)
    out = np.full((n_groups, X.shape[1]), np.nan, dtype=np.result_type(X.dtype, np.float32))
    for c in range(n_groups):
        members = codes == c
        if members.any():
            out[c] = np.median(X[members], axis=0)
    return out


def batch_balanced_groups(X, covs: np.ndarray, n_groups: int = 8, *, counts: bool = True,
                          n_cells: int = 12000, n_genes: int = 2000, n_pcs: int = 20,
                          seed: int = 0, chunk: int = 50000) -> np.ndarray:
    """Coarse clusters of cells that hold cells of every batch where the batches share a
    cell type: k-means after each batch's mean is subtracted (for every column of ``covs``
    in turn) from the principal components of raw counts (:class:`cellvi.metrics.LogPCA`,
    the per-batch-centred PCA of the integration benchmarks) or, with ``counts=False``,
    from the values themselves (e.g. standardised cytometry markers).

    The centring removes a batch's average shift, so a cell type found in several batches
    mostly lands in one group; a type that one batch lacks lands in a group with few or none
    of that batch's cells. Computed on a seeded random subsample of at most ``n_cells`` cells;
    the other cells are placed in the same components (in chunks of ``chunk`` cells) and
    given the nearest centre.

    Args:
        X: cells x genes raw counts, dense or scipy sparse (row-indexable); with
            ``counts=False``, cells x features values on a common scale.
        covs: cells x keys integer batch codes.
        n_groups: clusters (at most the cells of the subsample).

    Returns:
        One integer group per cell, ``0 .. n_groups - 1``.
    """
    from sklearn.cluster import KMeans

    from .metrics import LogPCA

    covs = np.asarray(covs).reshape(len(covs), -1)
    n = X.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, n_cells), replace=False))
    if counts:
        pcs = LogPCA(X[idx], n_genes=n_genes, n_pcs=n_pcs)
        embed, Z = pcs.transform, pcs.scores.copy()
    else:
        def embed(rows):
            return np.asarray(rows, dtype=np.float64)
        Z = embed(X[idx]).copy()
    shifts = []  # per key, the mean of each batch (sequential centring)
    for j in range(covs.shape[1]):
        codes = covs[idx, j]
        means = np.zeros((int(covs[:, j].max()) + 1, Z.shape[1]))
        for c in np.unique(codes):
            means[c] = Z[codes == c].mean(0)
        Z -= means[codes]
        shifts.append(means)
    km = KMeans(max(1, min(int(n_groups), len(idx))), n_init=3, random_state=seed).fit(Z)
    if len(idx) == n:
        return km.labels_.astype(np.int64)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        Zr = embed(X[rows])
        for j, means in enumerate(shifts):
            Zr -= means[covs[rows, j]]
        out[rows] = km.predict(Zr)
    return out
