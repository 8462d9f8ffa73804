"""Model checking at the AnnData edge: how good is the amortized posterior?

:func:`amortization_gap` splits each cell's distance between its ELBO and ``log p(x)`` in
two (Cremer et al. 2018, *Inference suboptimality in variational autoencoders*):

- the **approximation gap**, ``log p(x) - ELBO(q*)``: what the posterior family (a diagonal
  Gaussian) cannot express, with ``q*`` the best member for that cell;
- the **amortization gap**, ``ELBO(q*) - ELBO(q_encoder)``: what the encoder loses by
  predicting ``q`` from ``x`` instead of optimising it per cell.

``q*`` comes from per-cell optimisation started at the encoder (:func:`cellvi.inference.refine`);
``log p(x)`` is the importance-weighted bound with ``n_samples`` samples (the larger of the
bounds with the encoder's and with the refined proposal).

:func:`outlier_scores` ranks cells by how badly the model explains them (negative ELBO,
standardised within batch); :func:`predictive_check` compares per-feature means and
variances of the data with those of data replicated from the posterior predictive, which
flags a likelihood that cannot produce the data's spread (e.g. Poisson on over-dispersed
counts). Everything works for any cellvi model through its declared prior, posterior and
likelihood.

:func:`calibration_report` checks the posteriors against simulators whose exact posterior is
known (:func:`cellvi.datasets.linear_gaussian`, :func:`cellvi.datasets.gaussian_mixture`):
coverage of credible intervals, simulation-based calibration ranks, and the calibration of
cluster probabilities (expected calibration error, distance to the exact ``p(c | x)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .data import TO_MEMORY, as_batch_keys, get_matrix, is_streamed
from .errors import InvalidInputError, InvalidTypeError, MissingKeyError
from .inference import elbo_per_cell, iwae_per_cell, refine

__all__ = ["amortization_gap", "outlier_scores", "predictive_check", "calibration_report",
           "CalibrationReport", "expected_calibration_error", "match_clusters",
           "doublet_scores", "robust_scores"]


def amortization_gap(model, adata: AnnData, *, n_samples: int = 1000, refine_steps: int = 200,
                     elbo_samples: int = 64, seed: int = 0,
                     batch_size: int = 256) -> pd.DataFrame:
    """Per-cell approximation and amortization gaps of a trained model (nats).

    Args:
        model: a trained :class:`cellvi.models.NBVAE` or :class:`cellvi.models.GMVAE`.
        adata: cells with the model's features (e.g. held-out cells).
        n_samples: importance samples of the ``log p(x)`` estimate.
        refine_steps: gradient steps of the per-cell optimisation.
        elbo_samples: Monte Carlo samples of each ELBO.
        seed: seeds the samples and the refinement.

    Returns:
        A DataFrame indexed like ``adata.obs`` with ``elbo`` (amortized), ``elbo_refined``,
        ``log_px``, ``approximation_gap`` and ``amortization_gap``.

    Example:
        >>> gaps = cellvi.diagnostics.amortization_gap(model, held_out)
        >>> gaps[["approximation_gap", "amortization_gap"]].mean()
    """
    module = model.module

    def fn(batch):
        with torch.no_grad():
            qz = module.encode(batch)
        q_best = refine(module, batch, refine_steps, qz=qz)
        log_px = torch.maximum(iwae_per_cell(module, batch, n_samples, qz),
                               iwae_per_cell(module, batch, n_samples, q_best))
        return torch.stack([elbo_per_cell(module, batch, qz, elbo_samples),
                            elbo_per_cell(module, batch, q_best, elbo_samples), log_px], 1)

    values = model._per_cell(adata, fn, seed=seed, batch_size=batch_size).astype(np.float64)
    out = pd.DataFrame(values, index=adata.obs_names.copy(),
                       columns=["elbo", "elbo_refined", "log_px"])
    out["approximation_gap"] = out["log_px"] - out["elbo_refined"]
    out["amortization_gap"] = out["elbo_refined"] - out["elbo"]
    return out


def outlier_scores(model, adata: AnnData, *, n_samples: int | None = None, seed: int = 0,
                   batch_size: int = 1024) -> np.ndarray:
    """How badly the model explains each cell: the negative per-cell ELBO, standardised
    within each batch category (of the model's first batch key) by its median and MAD
    (robust z-scores; large = unusual: debris, events with impossible marker combinations,
    cell types the model explains less well). It does not find doublets thinned to a real
    depth (AUROC 0.54 on Kang 8 donors, ``benchmarks/results/outliers.md``): the model
    explains them as mixtures; use :func:`doublet_scores` for those.

    Args:
        n_samples: draws of ``q(z | x)`` in each cell's ELBO; ``None`` takes the model's
            ``outlier_samples`` (1 for :class:`cellvi.models.NBVAE`, 8 for
            :class:`cellvi.models.GMVAE`: ``benchmarks/results/outlier_samples.md``).

    Returns:
        ``float32`` array, one score per cell.

    Example:
        >>> adata.obs["outlier"] = cellvi.diagnostics.outlier_scores(model, adata)
    """
    if n_samples is None:
        n_samples = getattr(model, "outlier_samples", 8)
    return robust_scores(model, adata, model.elbo(adata, n_samples=n_samples, seed=seed,
                                                  batch_size=batch_size))


def robust_scores(model, adata: AnnData, elbo: np.ndarray) -> np.ndarray:
    """:func:`outlier_scores` from per-cell ELBOs already computed (e.g. by
    ``model.latent_and_elbo``): ``-elbo`` as robust z-scores within each batch category."""
    neg = -np.asarray(elbo, dtype=np.float64)
    keys = as_batch_keys(model.settings["batch_keys"])
    groups = (adata.obs[keys[0]].astype(str).to_numpy() if keys
              else np.zeros(adata.n_obs, dtype=object))
    out = np.empty_like(neg)
    for g in pd.unique(groups):
        m = groups == g
        med = np.median(neg[m])
        mad = 1.4826 * np.median(np.abs(neg[m] - med))
        out[m] = (neg[m] - med) / (mad if mad > 0 else (neg[m].std() or 1.0))
    return out.astype(np.float32)


def doublet_scores(model, adata: AnnData, *, n_simulated: int | None = None,
                   n_neighbors: int | None = None, seed: int = 0,
                   batch_size: int = 4096) -> np.ndarray:
    """How much each cell looks like a doublet, in a trained count model's latent space.

    Doublets are simulated from the data (Scrublet's idea, Wolock et al. 2019, in the
    model's latent instead of PCA): ``n_simulated`` (default: as many as cells) sums of two
    random cells of the same batch category (first batch key), binomially thinned to the
    library size of a random real cell of that batch, so that the score rests on expression
    and not on depth. Real and simulated cells are encoded (posterior means) with the model's
    encoder; a cell's score is the fraction of simulated doublets among its
    ``n_neighbors`` nearest neighbours (default ``max(10, round(0.5 √n))``), excluding
    itself. The negative ELBO (:func:`outlier_scores`) finds cells the model cannot explain;
    a thinned doublet it explains well as a mixture, which this score finds instead.

    Returns:
        ``float32`` array in ``[0, 1]``, one score per cell (large = doublet-like).

    Example:
        >>> adata.obs["doublet_score"] = cellvi.diagnostics.doublet_scores(model, adata)
    """
    from sklearn.neighbors import NearestNeighbors

    from .data import CountData
    from .models.nbvae import NBVAE

    if not isinstance(model, NBVAE):
        raise InvalidTypeError(f"doublet_scores needs a count model (cellvi.models.NBVAE), got "
                               f"{type(model).__name__}: sums of transformed cytometry values "
                               "are not doublets")
    model._require_trained()
    if is_streamed(adata):
        raise InvalidInputError("doublet_scores needs the counts in memory (it sums pairs of "
                                f"cells); load them first: {TO_MEMORY}")
    d = model._prepare(adata)
    X = sp.csr_matrix(d.X, dtype=np.float32)
    n = X.shape[0]
    m = n if n_simulated is None else int(n_simulated)
    k = max(10, round(0.5 * np.sqrt(n))) if n_neighbors is None else int(n_neighbors)
    rng = np.random.default_rng(seed)
    groups = d.covs[:, 0] if d.covs is not None else np.zeros(n, dtype=np.int64)
    first = rng.integers(0, n, m)
    members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    second = np.array([rng.choice(members[g]) for g in groups[first]])
    target = np.exp(d.log_library[[rng.choice(members[g]) for g in groups[first]], 0])
    summed = (X[first] + X[second]).tocsr()
    lib = np.asarray(summed.sum(1)).ravel()
    keep = np.minimum(1.0, target / np.maximum(lib, 1.0))
    summed.data = rng.binomial(summed.data.astype(np.int64),
                               np.repeat(keep, np.diff(summed.indptr))).astype(np.float32)
    summed.eliminate_zeros()
    sim_lib = np.maximum(np.asarray(summed.sum(1)).ravel(), 1.0)
    sim = CountData(summed, None if d.covs is None else d.covs[first], d.batch_keys, d.categories,
                    np.log(sim_lib)[:, None].astype(np.float32), d.var_names)
    z = np.concatenate([model._encode(model._to_device(part, model.device), batch_size=batch_size)
                        for part in (d, sim)])
    _, nbr = NearestNeighbors(n_neighbors=min(k + 1, len(z))).fit(z).kneighbors(z[:n])
    return (nbr[:, 1:] >= n).mean(1).astype(np.float32)


def predictive_check(model, adata: AnnData, *, n_samples: int = 20, max_cells: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Posterior predictive check of each feature's mean and variance.

    For (at most ``max_cells``, a seeded subsample of) the cells of ``adata``, draws
    ``n_samples`` replicated data sets from the posterior predictive
    (:meth:`cellvi.models.Model.posterior_predictive`, each cell with its own batch and
    library) and compares, per feature, the observed mean and variance with the replicates'.

    Returns:
        A DataFrame indexed by feature: ``mean``, ``mean_rep``, ``var``, ``var_rep``
        (replicates' average), ``var_ratio`` (observed / replicated variance; about 1 for a
        likelihood that fits, well above 1 when the model cannot produce the spread), and
        ``var_in_range`` (the observed variance inside the replicates' 2.5-97.5% range) and
        ``pearson_ratio`` (the mean squared Pearson residual at the posterior mean: about 1
        when the likelihood's noise fits). ``.attrs`` holds ``fraction_in_range``,
        ``median_var_ratio`` and ``median_pearson_ratio``.

    Example:
        >>> ppc = cellvi.diagnostics.predictive_check(model, adata)
        >>> ppc.attrs["fraction_in_range"], ppc.attrs["median_var_ratio"]
    """
    rng = np.random.default_rng(seed)
    if adata.n_obs > max_cells:
        adata = adata[np.sort(rng.choice(adata.n_obs, max_cells, replace=False))]
    rep = model.posterior_predictive(adata, n_samples=n_samples, seed=seed).astype(np.float64)
    X = get_matrix(adata, model.settings["layer"])
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = np.asarray(X[:, [list(map(str, adata.var_names)).index(v) for v in model.var_names]],
                   dtype=np.float64)
    var_rep = rep.var(axis=1)  # per replicate, per feature
    lo, hi = np.quantile(var_rep, [0.025, 0.975], axis=0)
    obs_var = X.var(axis=0)
    out = pd.DataFrame(dict(mean=X.mean(0), mean_rep=rep.mean(axis=(0, 1)), var=obs_var,
                            var_rep=var_rep.mean(0)), index=list(model.var_names))
    out["var_ratio"] = out["var"] / out["var_rep"].clip(lower=1e-12)
    out["var_in_range"] = (obs_var >= lo) & (obs_var <= hi)
    out["pearson_ratio"] = _pearson_ratio(model, adata, seed)
    out.attrs["fraction_in_range"] = float(out["var_in_range"].mean())
    out.attrs["median_var_ratio"] = float(out["var_ratio"].median())
    out.attrs["median_pearson_ratio"] = float(out["pearson_ratio"].median())
    return out


def _pearson_ratio(model, adata: AnnData, seed: int) -> np.ndarray:
    """Per feature, the mean over cells of ``(x - E[x|z])² / Var[x|z]`` at each cell's
    posterior mean: about 1 when the likelihood's noise matches the data's, above 1 when
    the data are more dispersed than the likelihood allows (a latent of a few dimensions
    cannot absorb independent per-feature noise, so this separates likelihoods that the
    marginal variances alone may not)."""
    def fn(batch):
        with torch.no_grad():
            px = model.module.decode(model.module.encode(batch).mean, batch)
            return (batch["x"] - px.mean) ** 2 / px.variance.clamp_min(1e-8)
    return model._per_cell(adata, fn, seed=seed, batch_size=1024).mean(0)


# -- calibration against oracles -----------------------------------------------------------
@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibration_report` measured.

    ``summary``: one row per posterior (``"model"``, and ``"exact"`` as the reference that
    shows what sampling error alone gives): the coverage of each credible level, the SBC
    uniformity p-value and, for clustering models, ``ece``, ``tv`` (mean total variation to
    the exact ``p(c | x)``) and ``accuracy``. ``sbc_ranks``: rank histograms, bins x features,
    per posterior. ``reliability``: per confidence bin, the model's mean confidence,
    accuracy and cell count (``None`` without clusters).
    """

    summary: pd.DataFrame
    sbc_ranks: dict[str, np.ndarray]
    reliability: pd.DataFrame | None


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the cell-weighted mean, over ``n_bins`` equal-width confidence bins, of
    ``|mean confidence - accuracy|`` (Guo et al. 2017). ``labels`` index the columns."""
    return float(_reliability(probs, labels, n_bins).eval("n * abs(confidence - accuracy)").sum()
                 / len(labels))


def _reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> pd.DataFrame:
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    rows = [dict(bin=f"{i / n_bins:.2f}-{(i + 1) / n_bins:.2f}", n=int(m.sum()),
                 confidence=float(conf[m].mean()), accuracy=float(correct[m].mean()))
            for i in range(n_bins) if (m := which == i).any()]
    return pd.DataFrame(rows, columns=["bin", "n", "confidence", "accuracy"])


def match_clusters(probs: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Cluster probabilities re-expressed over the true labels: clusters are matched one to
    one to labels by the Hungarian method on their soft cross-tabulation (each cluster's
    probability mass per label); a cluster left unmatched adds its probability to the label
    it overlaps most. Returns cells x labels."""
    from scipy.optimize import linear_sum_assignment

    table = probs.T @ np.eye(n_labels)[labels]
    rows, cols = linear_sum_assignment(-table)
    target = table.argmax(1)
    target[rows] = cols
    out = np.zeros((len(labels), n_labels))
    for k in range(probs.shape[1]):
        out[:, target[k]] += probs[:, k]
    return out


def _signal_draws(model, adata: AnnData, n_samples: int, seed: int, batch_size: int) -> np.ndarray:
    """``E[x | z]`` for ``z ~ q(z|x)`` in the input's units: samples x cells x features."""
    def fn(batch):
        with torch.no_grad():
            z = model.module.encode(batch).sample((n_samples,))
            return model.module.decode(z, batch).mean.transpose(0, 1)
    draws = model._per_cell(adata, fn, seed=seed, batch_size=batch_size)
    return model._to_input_units(np.swapaxes(draws, 0, 1))


def _coverage_and_ranks(draws: np.ndarray, truth: np.ndarray, levels, n_bins: int):
    """Coverage of each central credible level and the rank histograms (bins x features).

    The rank of the truth among ``S`` draws takes ``S + 1`` values, equally likely under a
    calibrated posterior; the central interval of level ``l`` is the middle
    ``round(l (S + 1))`` ranks, so its coverage is unbiased for any ``S`` (sample quantiles
    of a few hundred draws would cover about a point less than nominal)."""
    n_ranks = draws.shape[0] + 1
    ranks = (draws < truth[None]).sum(0)  # 0..S per cell and feature
    cover = {}
    for level in levels:
        keep = int(round(level * n_ranks))
        lo = (n_ranks - keep) // 2
        inside = (ranks >= lo) & (ranks < lo + keep)
        cover[f"coverage_{int(round(level * 100))}"] = float(inside.mean())
    which = np.minimum(ranks * n_bins // n_ranks, n_bins - 1)
    hist = np.stack([np.bincount(which[:, j], minlength=n_bins) for j in range(truth.shape[1])], 1)
    return cover, hist


def _uniformity_pvalue(hist: np.ndarray) -> float:
    """Chi-square test of uniform rank histograms, one per feature, Bonferroni-combined."""
    from scipy.stats import chisquare

    p = np.array([chisquare(hist[:, j]).pvalue for j in range(hist.shape[1])])
    return float(min(1.0, p.min() * len(p)))


def calibration_report(model, adata: AnnData, *, n_samples: int = 199,
                       levels: tuple[float, ...] = (0.5, 0.9), n_bins: int = 15,
                       rank_bins: int = 10, seed: int = 0, batch_size: int = 1024) -> CalibrationReport:
    """Calibration of a trained model's posteriors on an oracle whose exact posterior is known.

    ``adata`` comes from :func:`cellvi.datasets.linear_gaussian` or
    :func:`cellvi.datasets.gaussian_mixture` (``uns["oracle"]``, ``layers["signal"]``). The
    checks are on quantities that do not depend on how the model parametrises its latent
    space:

    - **coverage**: for each level (e.g. 50%, 90%), the fraction of cells and features whose
      true noise-free signal ``W z + b`` lies in the central credible interval of the model's
      posterior of it (``E[x | z]``, ``z ~ q(z|x)``, ``n_samples`` draws); nominal when the
      posterior is calibrated;
    - **simulation-based calibration** (Talts et al. 2018): the rank of the true signal among
      the draws is uniform for a calibrated posterior; a chi-square test per feature over the
      cells, Bonferroni-combined (rejected at 1% when ``sbc_pvalue < 0.01``);
    - **clusters** (a GMVAE on :func:`cellvi.datasets.gaussian_mixture`): clusters matched to
      the true populations (:func:`match_clusters`), then the expected calibration error of
      the cluster probabilities against the true labels, their mean total variation to the
      exact ``p(c | x)`` and the accuracy.

    The ``"exact"`` row applies the same estimators to draws from the exact posterior: the
    figures a perfect posterior reaches with this many draws and cells.

    Example:
        >>> oracle = cellvi.datasets.gaussian_mixture(seed=0)
        >>> model = cellvi.models.GMVAE(oracle, n_components=5).fit()
        >>> cellvi.diagnostics.calibration_report(model, oracle).summary
    """
    from .datasets import exact_posterior
    from .models.gmvae import GMVAE

    if "oracle" not in adata.uns or "signal" not in adata.layers:
        raise MissingKeyError("calibration_report needs an oracle's data (uns['oracle'] and "
                              "layers['signal']): make it with cellvi.datasets.linear_gaussian "
                              "or cellvi.datasets.gaussian_mixture")
    exact = exact_posterior(adata)
    truth = np.asarray(adata.layers["signal"], dtype=np.float64)
    draws = {"model": _signal_draws(model, adata, n_samples, seed, batch_size).astype(np.float64),
             "exact": exact.sample_signal(n_samples, np.random.default_rng(seed))}
    rows, hists = {}, {}
    for name, d in draws.items():
        cover, hists[name] = _coverage_and_ranks(d, truth, levels, rank_bins)
        rows[name] = dict(cover, sbc_pvalue=_uniformity_pvalue(hists[name]))
    reliability = None
    key = adata.uns["oracle"].get("label_key") or None
    if key and isinstance(model, GMVAE):
        labels = adata.obs[key].cat.codes.to_numpy()
        n_labels = len(adata.obs[key].cat.categories)
        probs = {"model": match_clusters(model.transform(adata).probs.astype(np.float64), labels,
                                         n_labels), "exact": exact.probs}
        for name, pr in probs.items():
            rows[name].update(ece=expected_calibration_error(pr, labels, n_bins),
                              tv=float(0.5 * np.abs(pr - exact.probs).sum(1).mean()),
                              accuracy=float((pr.argmax(1) == labels).mean()))
        reliability = _reliability(probs["model"], labels, n_bins)
    summary = pd.DataFrame.from_dict(rows, orient="index")
    summary.attrs["levels"] = tuple(levels)
    return CalibrationReport(summary, hists, reliability)
