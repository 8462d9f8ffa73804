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
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .data import as_batch_keys, get_matrix
from .inference import elbo_per_cell, iwae_per_cell, refine

__all__ = ["amortization_gap", "outlier_scores", "predictive_check"]


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


def outlier_scores(model, adata: AnnData, *, n_samples: int = 8, seed: int = 0,
                   batch_size: int = 1024) -> np.ndarray:
    """How badly the model explains each cell: the negative per-cell ELBO, standardised
    within each batch category (of the model's first batch key) by its median and MAD
    (robust z-scores; large = unusual: doublets, debris, events with impossible marker
    combinations).

    Returns:
        ``float32`` array, one score per cell.

    Example:
        >>> adata.obs["outlier"] = cellvi.diagnostics.outlier_scores(model, adata)
    """
    neg = -model.elbo(adata, n_samples=n_samples, seed=seed, batch_size=batch_size).astype(np.float64)
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
