"""Outlier scores (issue 23, item 5): do cellvi's ``*_outlier_score`` columns find planted
doublets in scRNA-seq and planted shuffled-marker events in flow cytometry?

Part 1, doublets (``--tasks doublets``). Data: ``kang2018_pbmc_ctrl_8donors`` (12,261 cells x
1,287 genes, raw counts, ``obs["donor"]``, ``obs["cell_type"]``), all genes. For each seed
``s`` (which seeds both the planting and every method):

* planting (``numpy.random.default_rng(s)``): ``round(0.1 * n_cells)`` extra cells. Each
  draws a real cell uniformly (its donor is the doublet's donor, its library size ``t`` the
  doublet's target), then a first parent uniformly from that donor's cells and a second
  parent uniformly from that donor's cells of a different ``cell_type`` (the pair redrawn, at
  most 100 times, while ``L1 + L2 < t``), sums the parents' counts and thins every count
  binomially with ``p = t / (L1 + L2)``. So the doublets' depth follows the real cells'
  depth distribution, donor by donor, and cannot find them (the ``library size`` row is that
  control).
* on the same AnnData (real + planted cells, ``obs["donor"]`` the batch):

  - ``cellvi.tl.nbvae(adata, batch_key="donor", seed=s, verbose=False,
    return_model=True)`` with its defaults; score ``obs["nbvae_outlier_score"]`` (the
    negative per-cell ELBO, 8 samples, as a robust z-score within donor:
    ``cellvi.diagnostics.outlier_scores``); the whole call is timed;
  - ``cellvi.diagnostics.doublet_scores(model, adata, seed=s)`` on the returned model, with
    its defaults (when the installed cellvi has it; added in 2910f3b): Scrublet's idea in the
    NB-VAE latent. Its simulated doublets are built the way these planted ones are (sums of
    two cells of a batch thinned to a random real library of that batch; it does not require
    different cell types), so this benchmark is a favourable case for it; timed;
  - raw variants from the returned model (public API): the negative ELBO
    (``model.elbo(adata, n_samples=8, seed=s)``) without the per-donor z-score, and the
    negative IWAE bound ``-model.marginal_log_likelihood(adata, n_samples=K, seed=s)``
    (``--iwae-samples``, default 100; 0 skips it); post-hoc variants of the negative ELBO (not
    cellvi API): divided by the library size, and the residual of a per-donor linear fit on
    log library size;
  - ``scanpy.pp.scrublet(adata, batch_key="donor", random_state=s, verbose=False)`` with its
    other defaults, score ``obs["doublet_score"]``; timed (after one untimed warm-up call on
    3,000 cells that compiles pynndescent's numba code). Scrublet is part of scanpy >= 1.10, but its
    automatic threshold needs ``scikit-image`` (without it the call raises), so the run
    needs ``scikit-image`` installed;
  - control: the library size itself as a score.

  Each score is evaluated for doublet (1) vs real cell (0) on all cells with
  ``sklearn.metrics.roc_auc_score`` and ``average_precision_score`` (the AP of a random score
  is the doublet fraction, 0.091). The AUROC per pair of parent cell types (pairs with >= 20
  doublets, against all real cells) is in the json and, for the most common pairs, in the
  markdown.

Part 2, shuffled-marker events (``--tasks flow``). Inputs (``--flow-inputs``):

* ``flowsom_raw``: ``flowsom_68983_mouse_flow_gated`` from raw ``X``, compensated and
  logicle-transformed with ``cellvi.pp`` and restricted to its 10 fluorescence channels
  exactly as ``benchmarks/cytometry.py`` does (its ``load_input("flowsom_raw")`` is imported);
  no batch.
* ``spectre``: ``spectre_mouse_bm_flow_2batches_synthetic_shift``, ``X / 1023``, 15 markers,
  batch ``obs["batch"]`` (as ``cytometry.load_input("spectre")``; the GMVAE gets
  ``batch_key="batch"`` as in ``cytometry.py``). Its real ``Doublets`` population (a gated label
  of the source) is also scored as a side result.

For each seed ``s``: ``round(0.02 * n_events)`` extra events, each with every marker value
taken from an independently drawn random real event (``rng.integers`` per event and marker,
``numpy.random.default_rng(s)``; the batch of a shuffled event is that of a random real event).
Then ``cellvi.tl.gmvae(adata, batch_key=..., seed=s, verbose=False, return_model=True)`` with
its defaults (discovery, ``n_components=None``), score ``obs["gmvae_outlier_score"]``, plus the
raw negative ELBO and negative IWAE-K of the returned model. Baselines on the same markers
(standardised per marker for the two distance-based ones): sklearn
``GaussianMixture(n_components=10, covariance_type="full", random_state=s)`` negative
log-likelihood (``score_samples``), ``IsolationForest(random_state=s)`` (negative
``score_samples``) and the distance to the 15th nearest other event (``NearestNeighbors``).

Why shuffled events score low: a shuffled event is a draw from the product of the markers'
marginals, and some of those draws land inside real populations. For each seed the json and
markdown give the fraction of shuffled events whose distance to their 15th nearest *real*
event is below the median of the real events' own 15th-neighbour distance ("look-alikes"),
the GMVAE AUROC on the shuffled events that are not look-alikes, how the GMVAE score
and the look-alike flag relate among the low-scoring shuffled events, which real labels score
above the shuffled events' median, and the AUROC deficit ``1 - AUROC`` (the share of wrongly
ranked shuffled-real pairs) split by the real event's label and by look-alike status.

Every score is oriented so that large = outlier. Single-threaded (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``). Tables give the mean and the range [min - max] over seeds.

Usage::

    python benchmarks/outliers.py [--seeds 0 1 2] [--tasks doublets flow]
        [--flow-inputs flowsom_raw spectre] [--iwae-samples 100] [--out benchmarks/results]
    python benchmarks/outliers.py --quick   # smoke: seed 0, 2,000 cells / 3,000 events,
                                            # NB-VAE 3 epochs; writes outliers_quick.md/json

Writes ``<out>/outliers.md`` and ``<out>/outliers.json`` after every seed.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import data_dir, git_state, import_cellvi, log, versions

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATASET = "kang2018_pbmc_ctrl_8donors"
BATCH_KEY, LABEL_KEY = "donor", "cell_type"
FLOW_INPUTS = ["flowsom_raw", "spectre"]
ALL_TASKS = ["doublets", "flow"]
N_NEIGHBORS = 15
GMM_COMPONENTS = 10
PAIR_MIN = 20  # per-pair AUROC for parent-type pairs with at least this many doublets

DOUBLET_SCORES = {  # key -> label in the tables
    "nbvae_outlier_score": "cellvi `obs[\"nbvae_outlier_score\"]` (tl.nbvae)",
    "doublet_scores": "cellvi `diagnostics.doublet_scores` (same model)",
    "neg_elbo": "cellvi raw -ELBO (8 samples, no z-score)",
    "neg_iwae": "cellvi raw -IWAE-K (`marginal_log_likelihood`)",
    "neg_elbo_per_count": "-ELBO / library size (post hoc)",
    "neg_elbo_resid": "-ELBO residual on log library, per donor (post hoc)",
    "scrublet": "scanpy `sc.pp.scrublet` `doublet_score`",
    "library": "library size (control)",
}
FLOW_SCORES = {
    "gmvae_outlier_score": "cellvi `obs[\"gmvae_outlier_score\"]` (tl.gmvae)",
    "neg_elbo": "cellvi raw -ELBO (8 samples, no z-score)",
    "neg_iwae": "cellvi raw -IWAE-K (`marginal_log_likelihood`)",
    "gmm": f"GaussianMixture({GMM_COMPONENTS}, full) -log-likelihood",
    "iforest": "IsolationForest",
    "knn": f"distance to {N_NEIGHBORS}th neighbour (standardised)",
}


def _timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def _metrics(y: np.ndarray, s: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.asarray(s, dtype=np.float64)
    ok = np.isfinite(s)
    return dict(auroc=float(roc_auc_score(y[ok], s[ok])),
                ap=float(average_precision_score(y[ok], s[ok])), n_nonfinite=int((~ok).sum()))


# --------------------------------------------------------------------------------------------
# part 1: doublets


def load_kang(quick: bool):
    import scipy.sparse as sp

    data_dir()
    cellvi = import_cellvi()
    a = cellvi.datasets.load(DATASET)
    a.obs[BATCH_KEY] = a.obs[BATCH_KEY].astype(str)
    a.obs[LABEL_KEY] = a.obs[LABEL_KEY].astype(str)
    if quick:
        rng = np.random.default_rng(0)
        a = a[np.sort(rng.choice(a.n_obs, 2000, replace=False))].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


def plant_doublets(real, frac: float, seed: int):
    """Real cells + ``round(frac * n)`` depth-matched heterotypic same-donor doublets."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = real.X.tocsr()
    lib = np.asarray(X.sum(1)).ravel()
    donor = real.obs[BATCH_KEY].to_numpy()
    ctype = real.obs[LABEL_KEY].to_numpy()
    by_donor = {d: np.flatnonzero(donor == d) for d in np.unique(donor)}
    n_d = int(round(frac * real.n_obs))
    rows, info, redraws, capped = [], [], 0, 0
    for _ in range(n_d):
        k = int(rng.integers(real.n_obs))  # the real cell whose library is the target
        pool = by_donor[donor[k]]
        target = lib[k]
        tries = 0
        while True:  # parents whose summed library reaches the target (at most 101 pairs)
            i = int(pool[rng.integers(len(pool))])
            other = pool[ctype[pool] != ctype[i]]
            j = int(other[rng.integers(len(other))])
            if lib[i] + lib[j] >= target or tries == 100:
                break
            tries += 1
        redraws += int(tries > 0)
        x = (X[i] + X[j]).toarray().ravel().astype(np.int64)
        tot = int(x.sum())
        if target > tot:  # no pair reached it in 101 draws: keep the sum
            capped += 1
            target = tot
        y = rng.binomial(x, min(1.0, target / tot)).astype(np.float32)
        rows.append(sp.csr_matrix(y))
        info.append((donor[i], " + ".join(sorted((ctype[i], ctype[j]))), float(target)))
    obs_d = pd.DataFrame(info, columns=[BATCH_KEY, "pair", "target_library"],
                         index=[f"doublet_{k}" for k in range(n_d)])
    obs_d[LABEL_KEY] = "doublet"
    obs_d["is_doublet"] = True
    obs_r = real.obs[[BATCH_KEY, LABEL_KEY]].copy()
    obs_r["pair"] = ""
    obs_r["target_library"] = np.nan
    obs_r["is_doublet"] = False
    obs = pd.concat([obs_r, obs_d])
    obs[BATCH_KEY] = pd.Categorical(obs[BATCH_KEY].astype(str))
    obs[LABEL_KEY] = pd.Categorical(obs[LABEL_KEY].astype(str))
    a = ad.AnnData(X=sp.vstack([X] + rows).tocsr().astype(np.float32), obs=obs,
                   var=real.var[[]].copy())
    plant = dict(n_real=int(real.n_obs), n_doublets=n_d, pair_redrawn=redraws,
                 target_capped=capped)
    return a, plant


def warm_up_scrublet(real) -> None:
    """One untimed Scrublet call on 3,000 cells: compiles pynndescent's numba code before
    timing (scanpy's euclidean neighbours use pynndescent from 8,192 observed + simulated
    cells, so 3,000 cells with twice as many simulated doublets take that path)."""
    import scanpy as sc

    n = min(3000, real.n_obs)
    b = real[np.random.default_rng(0).choice(real.n_obs, n, replace=False)].copy()
    t0 = time.perf_counter()
    sc.pp.scrublet(b, random_state=0, verbose=False)
    log(f"scrublet warm-up ({n} cells, untimed in the tables): {time.perf_counter() - t0:.1f} s")


def depth_residual(neg_elbo: np.ndarray, lib: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The residual of -ELBO after a per-group least-squares line on log library size."""
    out = np.empty_like(neg_elbo, dtype=np.float64)
    ll = np.log(lib)
    for g in np.unique(groups):
        m = groups == g
        A = np.stack([np.ones(m.sum()), ll[m]], 1)
        coef, *_ = np.linalg.lstsq(A, neg_elbo[m], rcond=None)
        out[m] = neg_elbo[m] - A @ coef
    return out


def run_doublets(cellvi, real, seed: int, args) -> dict:
    import scanpy as sc

    adata, plant = plant_doublets(real, args.doublet_frac, seed)
    y = adata.obs["is_doublet"].to_numpy().astype(int)
    lib = np.asarray(adata.X.sum(1)).ravel()
    groups = adata.obs[BATCH_KEY].astype(str).to_numpy()
    log(f"doublets seed {seed}: {plant['n_real']} real + {plant['n_doublets']} planted "
        f"(parents redrawn for {plant['pair_redrawn']}, capped {plant['target_capped']})")
    scores, seconds, extra = {}, {}, {}

    torch.set_num_threads(1)
    fit_kw = dict(max_epochs=args.max_epochs) if args.max_epochs else {}
    model, secs = _timed(cellvi.tl.nbvae, adata, batch_key=BATCH_KEY, seed=seed, verbose=False,
                         return_model=True, **fit_kw)
    seconds["nbvae_outlier_score"] = secs
    scores["nbvae_outlier_score"] = adata.obs["nbvae_outlier_score"].to_numpy()
    extra["n_epochs"] = len(model.history.get("epoch", []))
    log(f"   tl.nbvae: {extra['n_epochs']} epochs, {secs:.1f} s")
    if hasattr(cellvi.diagnostics, "doublet_scores"):  # added to cellvi in 2910f3b
        ds, secs = _timed(cellvi.diagnostics.doublet_scores, model, adata, seed=seed)
        scores["doublet_scores"], seconds["doublet_scores"] = ds, secs
        log(f"   diagnostics.doublet_scores: {secs:.1f} s")
    neg, secs = _timed(model.elbo, adata, n_samples=8, seed=seed)
    neg = -neg.astype(np.float64)
    scores["neg_elbo"], seconds["neg_elbo"] = neg, secs
    if args.iwae_samples:
        m, secs = _timed(model.marginal_log_likelihood, adata, n_samples=args.iwae_samples,
                         seed=seed)
        scores["neg_iwae"], seconds["neg_iwae"] = -m.astype(np.float64), secs
        log(f"   IWAE-{args.iwae_samples}: {secs:.1f} s")
    scores["neg_elbo_per_count"] = neg / lib
    scores["neg_elbo_resid"] = depth_residual(neg, lib, groups)
    scores["library"] = lib

    b = adata.copy()
    _, secs = _timed(sc.pp.scrublet, b, batch_key=BATCH_KEY, random_state=seed, verbose=False)
    scores["scrublet"], seconds["scrublet"] = b.obs["doublet_score"].to_numpy(), secs
    extra["scrublet_predicted_doublets"] = int(b.obs["predicted_doublet"].sum())
    log(f"   scrublet: {secs:.1f} s")

    res = dict(seed=seed, plant=plant, seconds=seconds, **extra, metrics={}, per_pair={})
    pairs = adata.obs["pair"].to_numpy()
    for k, s in scores.items():
        res["metrics"][k] = _metrics(y, s)
        log(f"   {k:22s} AUROC {res['metrics'][k]['auroc']:.3f} AP {res['metrics'][k]['ap']:.3f}")
    real_m = y == 0
    for p in sorted(set(pairs[y == 1])):
        m = pairs == p
        if m.sum() < PAIR_MIN:
            continue
        sel = real_m | m
        res["per_pair"][p] = dict(
            n=int(m.sum()),
            **{k: _metrics(y[sel], scores[k][sel])["auroc"]
               for k in ("nbvae_outlier_score", "doublet_scores", "neg_elbo_resid", "scrublet")
               if k in scores})
    # the scores of real cells by type: which real cells does cellvi flag?
    ct = adata.obs[LABEL_KEY].astype(str).to_numpy()
    res["nbvae_score_median_by_type"] = {
        t: float(np.median(scores["nbvae_outlier_score"][ct == t])) for t in np.unique(ct)}
    return res


# --------------------------------------------------------------------------------------------
# part 2: shuffled-marker events


def load_flow(name: str, quick: bool) -> dict:
    import cytometry  # benchmarks/cytometry.py: compensation + logicle as benchmarked there

    d = cytometry.load_input(name)
    if quick:
        d = cytometry.subsample(d, 3000)
    return d


def plant_shuffled(d: dict, frac: float, seed: int):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = np.asarray(d["X"], dtype=np.float32)
    n, p = X.shape
    n_o = int(round(frac * n))
    src = rng.integers(n, size=(n_o, p))
    Xo = X[src, np.arange(p)[None, :]]
    obs = pd.DataFrame(index=[str(i) for i in range(n)] + [f"shuffled_{i}" for i in range(n_o)])
    obs["truth"] = pd.Categorical(list(np.asarray(d["truth"]).astype(str)) + ["shuffled"] * n_o)
    obs["is_outlier"] = np.r_[np.zeros(n, bool), np.ones(n_o, bool)]
    if d.get("batch") is not None:
        b = np.asarray(d["batch"]).astype(str)
        obs["batch"] = pd.Categorical(np.r_[b, b[rng.integers(n, size=n_o)]])
    a = ad.AnnData(X=np.vstack([X, Xo]).astype(np.float32), obs=obs,
                   var=pd.DataFrame(index=list(d["markers"])))
    return a


def kth_distance(Z: np.ndarray, ref: np.ndarray, k: int, same: bool) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + int(same)).fit(ref)
    dist, _ = nn.kneighbors(Z)
    return dist[:, -1]


def run_flow(cellvi, d: dict, name: str, seed: int, args) -> dict:
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture

    adata = plant_shuffled(d, args.outlier_frac, seed)
    y = adata.obs["is_outlier"].to_numpy().astype(int)
    X = np.asarray(adata.X, dtype=np.float64)
    batch = "batch" if "batch" in adata.obs else None
    scores, seconds = {}, {}
    torch.set_num_threads(1)
    model, secs = _timed(cellvi.tl.gmvae, adata, batch_key=batch, seed=seed, verbose=False,
                         return_model=True)
    scores["gmvae_outlier_score"] = adata.obs["gmvae_outlier_score"].to_numpy()
    seconds["gmvae_outlier_score"] = secs
    n_clusters = int(adata.obs["gmvae"].nunique())
    log(f"   {name} seed {seed}: tl.gmvae {n_clusters} clusters, {secs:.1f} s")
    neg, secs = _timed(model.elbo, adata, n_samples=8, seed=seed)
    scores["neg_elbo"], seconds["neg_elbo"] = -neg.astype(np.float64), secs
    if args.iwae_samples:
        m, secs = _timed(model.marginal_log_likelihood, adata, n_samples=args.iwae_samples,
                         seed=seed)
        scores["neg_iwae"], seconds["neg_iwae"] = -m.astype(np.float64), secs
    gm = GaussianMixture(n_components=GMM_COMPONENTS, covariance_type="full", random_state=seed)
    t0 = time.perf_counter()
    gm.fit(X)
    scores["gmm"], seconds["gmm"] = -gm.score_samples(X), time.perf_counter() - t0
    t0 = time.perf_counter()
    iso = IsolationForest(random_state=seed).fit(X)
    scores["iforest"], seconds["iforest"] = -iso.score_samples(X), time.perf_counter() - t0
    Z = (X - X.mean(0)) / X.std(0)
    t0 = time.perf_counter()
    scores["knn"] = kth_distance(Z, Z, N_NEIGHBORS, same=True)
    seconds["knn"] = time.perf_counter() - t0

    res = dict(input=name, seed=seed, n_real=int((y == 0).sum()), n_shuffled=int(y.sum()),
               n_clusters=n_clusters, seconds=seconds, metrics={})
    for k, s in scores.items():
        res["metrics"][k] = _metrics(y, s)
        log(f"   {k:20s} AUROC {res['metrics'][k]['auroc']:.3f} AP {res['metrics'][k]['ap']:.3f}"
            f" ({seconds[k]:.1f} s)")

    # why do shuffled events score low? look-alikes = shuffled events as close to the real
    # events as a typical real event is to its neighbours
    real, sh = Z[y == 0], Z[y == 1]
    d_real = kth_distance(real, real, N_NEIGHBORS, same=True)
    d_sh = kth_distance(sh, real, N_NEIGHBORS, same=False)
    look = d_sh < np.median(d_real)
    g = scores["gmvae_outlier_score"]
    g_real, g_sh = g[y == 0], g[y == 1]
    q95 = float(np.quantile(g_real, 0.95))
    low = g_sh < np.median(g_real)
    why = dict(
        frac_lookalike=float(look.mean()),
        gmvae_auroc_non_lookalike=_metrics(np.r_[np.zeros(len(g_real)), np.ones((~look).sum())],
                                           np.r_[g_real, g_sh[~look]])["auroc"],
        gmvae_auroc_lookalike=(_metrics(np.r_[np.zeros(len(g_real)), np.ones(look.sum())],
                                        np.r_[g_real, g_sh[look]])["auroc"]
                               if look.any() else None),
        frac_shuffled_above_real_q95=float((g_sh > q95).mean()),
        frac_shuffled_below_real_median=float(low.mean()),
        frac_lookalike_among_below_median=float(look[low].mean()) if low.any() else None,
        spearman_gmvae_vs_knn_shuffled=float(_spearman(g_sh, d_sh)),
        median_real_knn_distance=float(np.median(d_real)),
        median_shuffled_knn_distance=float(np.median(d_sh)),
    )
    # which real populations do the low-scoring shuffled events sit in? (their GMVAE cluster)
    cl = adata.obs["gmvae"].astype(str).to_numpy()
    truth = adata.obs["truth"].astype(str).to_numpy()
    cl_sh = cl[y == 1]
    top = {}
    for c in np.unique(cl_sh[low]) if low.any() else []:
        in_c = (cl == c) & (y == 0)
        names, counts = np.unique(truth[in_c], return_counts=True)
        top[c] = dict(n_low_shuffled=int((cl_sh[low] == c).sum()),
                      majority_real_label=str(names[counts.argmax()]) if len(names) else None)
    why["low_shuffled_by_cluster"] = dict(sorted(top.items(), key=lambda kv:
                                                 -kv[1]["n_low_shuffled"])[:5])
    # false positives: which real events score like shuffled ones?
    real_truth = truth[y == 0]
    excl = np.isin(real_truth, d.get("exclude") or [])
    if excl.any():
        why["gmvae_auroc_vs_labelled_real"] = _metrics(
            np.r_[np.zeros((~excl).sum()), np.ones(len(g_sh))],
            np.r_[g_real[~excl], g_sh])["auroc"]
        why["excluded_labels"] = list(d["exclude"])
    # where the AUROC deficit 1 - AUROC comes from: each (shuffled, real) pair ranked the
    # wrong way (ties count half), summed by the real event's label and by the shuffled
    # event's look-alike flag
    srt_sh, srt_real = np.sort(g_sh), np.sort(g_real)
    wrong_real = (np.searchsorted(srt_sh, g_real, "left")
                  + np.searchsorted(srt_sh, g_real, "right")) / 2  # shuffled below each real
    wrong_sh = len(g_real) - (np.searchsorted(srt_real, g_sh, "left")
                              + np.searchsorted(srt_real, g_sh, "right")) / 2
    n_pairs = len(g_real) * len(g_sh)
    why["deficit"] = float(wrong_real.sum() / n_pairs)
    why["deficit_by_real_label"] = {t: float(wrong_real[real_truth == t].sum() / n_pairs)
                                    for t in np.unique(real_truth)}
    why["deficit_from_lookalikes"] = float(wrong_sh[look].sum() / n_pairs)
    med_sh = float(np.median(g_sh))
    why["real_frac_above_shuffled_median_by_label"] = {
        t: float((g_real[real_truth == t] > med_sh).mean()) for t in np.unique(real_truth)}
    why["real_n_by_label"] = {t: int((real_truth == t).sum()) for t in np.unique(real_truth)}
    res["why"] = why
    log(f"   look-alikes {why['frac_lookalike']:.1%}; GMVAE AUROC on non-look-alikes "
        f"{why['gmvae_auroc_non_lookalike']:.3f}")
    if "Doublets" in set(truth):
        m = y == 0
        yd = (truth[m] == "Doublets").astype(int)
        res["real_doublets"] = dict(
            n=int(yd.sum()),
            **{k: _metrics(yd, scores[k][m])["auroc"] for k in scores})
    return res


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return spearmanr(a, b).statistic


# --------------------------------------------------------------------------------------------
# output


def _agg(vals) -> dict:
    v = np.asarray([x for x in vals if x is not None], dtype=np.float64)
    if not len(v):
        return dict(mean=None, min=None, max=None, values=[])
    return dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()), values=v.tolist())


def _mr(s: dict, nd: int = 3) -> str:
    if s.get("mean") is None:
        return "–"
    if abs(s["max"] - s["min"]) < 10 ** (-nd) / 2:
        return f"{s['mean']:.{nd}f}"
    return f"{s['mean']:.{nd}f} [{s['min']:.{nd}f} – {s['max']:.{nd}f}]"


def summarize(runs: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        rs = [r for r in runs if k in r["metrics"]]
        if not rs:
            continue
        out[k] = dict(seeds=[r["seed"] for r in rs],
                      auroc=_agg([r["metrics"][k]["auroc"] for r in rs]),
                      ap=_agg([r["metrics"][k]["ap"] for r in rs]),
                      seconds=_agg([r["seconds"].get(k) for r in rs]))
    return out


def write_outputs(res: dict, out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    a = res["args"]
    K = a["iwae_samples"]
    L = ["# Outlier scores: planted doublets (NB-VAE, Scrublet) and shuffled-marker events "
         "(GMVAE)\n"]
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}  ")
    L.append(f"Machine: {res['machine']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ")
    g = res["git"]
    L.append(f"cellvi code: git {g['head']}"
             + (" with uncommitted changes under cellvi/" if g["cellvi_dirty"] else "")
             + f", imported at {g['time']}\n")
    L.append("Protocol: see the module docstring of `benchmarks/outliers.py`. Every score is "
             "oriented so that large = outlier; AUROC (`sklearn.metrics.roc_auc_score`) and "
             "average precision (AP) of planted (1) vs real (0) over all cells/events of the "
             "run. Cells: mean [min – max] over seeds; seeds change the planting and every "
             "method's seed. Seconds: wall-clock of that score's own call, single-threaded on a "
             "2-core machine shared with another job (the `tl.nbvae`/`tl.gmvae` row: the whole "
             "call, training included; the raw cellvi variants reuse that model, their seconds "
             "are the extra `elbo`/`marginal_log_likelihood` call; post-hoc variants: –).\n")
    if a.get("quick"):
        L.append("**Smoke run (`--quick`)**: seed 0 only, subsampled data, short NB-VAE "
                 "training; the figures are not results.\n")

    dr = res.get("doublets", [])
    if dr:
        n0, n1 = dr[0]["plant"]["n_real"], dr[0]["plant"]["n_doublets"]
        L.append("## 1. Planted doublets, `kang2018_pbmc_ctrl_8donors`\n")
        L.append(f"{n0:,} real cells + {n1:,} planted doublets ({n1 / (n0 + n1):.1%} of all "
                 f"cells: heterotypic, same donor, thinned to a random real library of that "
                 f"donor); batch `donor`; all {res['doublet_data']['n_vars']:,} genes. Seeds "
                 + ", ".join(str(r["seed"]) for r in dr) + f". AP of a random score: "
                 f"{n1 / (n0 + n1):.3f}.\n")
        L.append("| score | seeds | AUROC | AP | seconds |")
        L.append("|---|---|---|---|---|")
        for k, s in summarize(dr, DOUBLET_SCORES).items():
            lab = DOUBLET_SCORES[k].replace("IWAE-K", f"IWAE-{K}")
            secs = _mr(s["seconds"], 1) if k in ("nbvae_outlier_score", "doublet_scores",
                                                  "neg_elbo", "neg_iwae", "scrublet") else "–"
            L.append(f"| {lab} | {len(s['seeds'])} | {_mr(s['auroc'])} | {_mr(s['ap'])} | "
                     f"{secs} |")
        L.append("")
        ep = ", ".join(str(r["n_epochs"]) for r in dr)
        pred = ", ".join(str(r["scrublet_predicted_doublets"]) for r in dr)
        red = ", ".join(str(r["plant"]["pair_redrawn"]) for r in dr)
        cap = ", ".join(str(r["plant"]["target_capped"]) for r in dr)
        L.append(f"NB-VAE epochs trained: {ep}. Scrublet's own call (`predicted_doublet`, "
                 f"automatic threshold): {pred} cells. Parent pair redrawn because its "
                 f"summed library was below the target: {red} doublets; capped at the sum "
                 f"(no pair in 101 draws): {cap}.\n")
        # per pair (mean over seeds)
        pairs: dict[str, list] = {}
        for r in dr:
            for p, v in r["per_pair"].items():
                pairs.setdefault(p, []).append(v)
        if pairs:
            L.append(f"AUROC by parent cell-type pair (each pair's doublets vs all real cells; "
                     f"pairs with >= {PAIR_MIN} doublets in a seed, the 10 most common; mean "
                     f"over the seeds that have it):\n")
            L.append("| pair | doublets per seed | cellvi outlier score | cellvi "
                     "doublet_scores | -ELBO residual on log library | Scrublet |")
            L.append("|---|---|---|---|---|---|")
            top = sorted(pairs.items(), key=lambda kv: -np.mean([v["n"] for v in kv[1]]))[:10]
            for p, vs in top:
                cells = [f"{np.mean([v[k] for v in vs]):.3f}" if k in vs[0] else "–"
                         for k in ("nbvae_outlier_score", "doublet_scores", "neg_elbo_resid",
                                   "scrublet")]
                L.append(f"| {p} | {np.mean([v['n'] for v in vs]):.0f} | "
                         + " | ".join(cells) + " |")
            L.append("")
        med = dr[0]["nbvae_score_median_by_type"]
        L.append("Median `nbvae_outlier_score` by cell type (seed "
                 f"{dr[0]['seed']}): " + ", ".join(f"{t} {v:.2f}" for t, v in
                                                   sorted(med.items(), key=lambda kv: -kv[1]))
                 + ".\n")

    fr = res.get("flow", [])
    for part, name in zip("abcdef", dict.fromkeys(r["input"] for r in fr), strict=False):
        rs = [r for r in fr if r["input"] == name]
        info = res["flow_data"][name]
        L.append(f"## 2{part}. Shuffled-marker events, `{name}`\n")
        L.append(f"{rs[0]['n_real']:,} real events + {rs[0]['n_shuffled']:,} shuffled "
                 f"({rs[0]['n_shuffled'] / (rs[0]['n_real'] + rs[0]['n_shuffled']):.1%}); "
                 f"{info['n_markers']} markers ({', '.join(info['marker_names'])}); matrix: "
                 f"{info['matrix']}. Seeds " + ", ".join(str(r["seed"]) for r in rs)
                 + ". GMVAE clusters found: " + ", ".join(str(r["n_clusters"]) for r in rs)
                 + ". Target of the issue: AUROC >= 0.95.\n")
        L.append("| score | seeds | AUROC | AP | seconds |")
        L.append("|---|---|---|---|---|")
        for k, s in summarize(rs, FLOW_SCORES).items():
            lab = FLOW_SCORES[k].replace("IWAE-K", f"IWAE-{K}")
            L.append(f"| {lab} | {len(s['seeds'])} | {_mr(s['auroc'])} | {_mr(s['ap'])} | "
                     f"{_mr(s['seconds'], 1)} |")
        L.append("")
        w = {k: _agg([r["why"][k] for r in rs]) for k in
             ("frac_lookalike", "gmvae_auroc_non_lookalike", "gmvae_auroc_lookalike",
              "frac_shuffled_above_real_q95", "frac_shuffled_below_real_median",
              "frac_lookalike_among_below_median", "spearman_gmvae_vs_knn_shuffled")}
        L.append(f"Why shuffled events score low (mean [min – max] over seeds): "
                 f"{_mr(w['frac_lookalike'])} of the shuffled events are *look-alikes* "
                 f"(their distance to the {N_NEIGHBORS}th nearest real event, standardised "
                 f"markers, is below the median real event's own {N_NEIGHBORS}th-neighbour "
                 f"distance). GMVAE outlier-score AUROC on the other shuffled events: "
                 f"{_mr(w['gmvae_auroc_non_lookalike'])}; on the look-alikes: "
                 f"{_mr(w['gmvae_auroc_lookalike'])}. Shuffled events above the real "
                 f"events' 95th percentile of the score: {_mr(w['frac_shuffled_above_real_q95'])};"
                 f" below the real median: {_mr(w['frac_shuffled_below_real_median'])}, of which "
                 f"look-alikes {_mr(w['frac_lookalike_among_below_median'])}. Spearman "
                 f"correlation, over shuffled events, of the GMVAE score with their "
                 f"{N_NEIGHBORS}th-real-neighbour distance: "
                 f"{_mr(w['spearman_gmvae_vs_knn_shuffled'])}.\n")
        if "gmvae_auroc_vs_labelled_real" in rs[0]["why"]:
            L.append("GMVAE outlier-score AUROC with the real events of "
                     + ", ".join(f"`{x}`" for x in rs[0]["why"]["excluded_labels"])
                     + " left out of the negatives (the labels `cytometry.py` does not score): "
                     + _mr(_agg([r["why"]["gmvae_auroc_vs_labelled_real"] for r in rs]))
                     + ".\n")
        fr_l = {t: _agg([r["why"]["real_frac_above_shuffled_median_by_label"][t] for r in rs])
                for t in rs[0]["why"]["real_n_by_label"]}
        L.append("False positives: fraction of each real label's events whose GMVAE score is "
                 "above the shuffled events' median score (label, events, mean over seeds): "
                 + "; ".join(f"{t} ({rs[0]['why']['real_n_by_label'][t]:,}) "
                             f"{v['mean']:.3f}" for t, v in
                             sorted(fr_l.items(), key=lambda kv: -kv[1]["mean"])) + ".\n")
        dl = {t: _agg([r["why"]["deficit_by_real_label"][t] for r in rs])
              for t in rs[0]["why"]["real_n_by_label"]}
        L.append(f"Where the AUROC deficit (1 - AUROC = "
                 f"{_mr(_agg([r['why']['deficit'] for r in rs]))}) comes from: the share of "
                 "wrongly ranked (shuffled, real) pairs, summed by the real event's label: "
                 + "; ".join(f"{t} {v['mean']:.4f}" for t, v in
                             sorted(dl.items(), key=lambda kv: -kv[1]["mean"]))
                 + "; the same deficit summed over the shuffled events instead: look-alikes "
                 + _mr(_agg([r["why"]["deficit_from_lookalikes"] for r in rs]), 4)
                 + ", the rest from shuffled events that are not look-alikes.\n")
        low = rs[0]["why"]["low_shuffled_by_cluster"]
        if low:
            L.append(f"Seed {rs[0]['seed']}: GMVAE clusters holding the most below-median "
                     "shuffled events (cluster: count, majority real label): "
                     + "; ".join(f"{c}: {v['n_low_shuffled']}, {v['majority_real_label']}"
                                 for c, v in low.items()) + ".\n")
        rd = [r["real_doublets"] for r in rs if "real_doublets" in r]
        if rd:
            L.append(f"Side result: the source's own gated `Doublets` population "
                     f"({rd[0]['n']:,} real events) vs the other real events, AUROC: "
                     + "; ".join(f"{FLOW_SCORES[k].replace('IWAE-K', f'IWAE-{K}')} "
                                 f"{_mr(_agg([x[k] for x in rd]))}"
                                 for k in FLOW_SCORES if k in rd[0]) + ".\n")
    if res.get("notes"):
        L.append("## Notes on this run\n")
    for n in res.get("notes", []):
        L.append(f"- {n}")
    L.append(f"\nRun time: {res['total_s'] / 60:.1f} min.\n")
    (out / f"{stem}.md").write_text("\n".join(L))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=ALL_TASKS, choices=ALL_TASKS)
    p.add_argument("--flow-inputs", nargs="+", default=FLOW_INPUTS, choices=FLOW_INPUTS)
    p.add_argument("--doublet-frac", type=float, default=0.1)
    p.add_argument("--outlier-frac", type=float, default=0.02)
    p.add_argument("--iwae-samples", type=int, default=100, help="0 skips the IWAE variant")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="NB-VAE epochs (default: cellvi's own; --quick: 3)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: seed 0, 2,000 cells / 3,000 events, NB-VAE 3 epochs")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("cellvi", "scanpy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.max_epochs = args.max_epochs or 3
    stem = "outliers_quick" if args.quick else "outliers"
    t_start = time.perf_counter()
    cmd = sys.argv[1:] if argv is None else list(argv)
    res = dict(command=" ".join(["python benchmarks/outliers.py", *(shlex.quote(x) for x in cmd)]),
               date=time.strftime("%Y-%m-%d %H:%M %Z"), git=git_state(),
               machine=f"{platform.platform()}, {os.cpu_count()} CPUs, single-threaded runs",
               versions=versions(("cellvi", "torch", "scanpy", "scikit-learn", "anndata",
                                  "numpy")),
               threads=dict(OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
                            torch_num_threads=torch.get_num_threads()),
               args={k: v for k, v in vars(args).items() if k != "out"},
               doublets=[], flow=[], flow_data={}, notes=[], total_s=0.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cellvi = import_cellvi()

    def save():
        res["total_s"] = time.perf_counter() - t_start
        write_outputs(res, out, stem)

    if "doublets" in args.tasks:
        real = load_kang(args.quick)
        warm_up_scrublet(real)
        res["doublet_data"] = dict(dataset=DATASET, n_obs=int(real.n_obs),
                                   n_vars=int(real.n_vars))
        for seed in args.seeds:
            res["doublets"].append(run_doublets(cellvi, real, seed, args))
            save()
    if "flow" in args.tasks:
        for name in args.flow_inputs:
            d = load_flow(name, args.quick)
            res["flow_data"][name] = dict(n_obs=int(len(d["X"])), n_markers=int(d["X"].shape[1]),
                                          marker_names=list(d["marker_names"]),
                                          matrix=d["matrix"])
            for seed in args.seeds:
                res["flow"].append(run_flow(cellvi, d, name, seed, args))
                save()
    save()
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min -> {out / stem}.md")


if __name__ == "__main__":
    main()
