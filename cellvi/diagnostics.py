"""Model checking at the AnnData edge: how good is the amortized posterior?

:func:`amortization_gap` splits each cell's distance between its ELBO and ``log p(x)`` in
two (Cremer et al. 2018, *Inference suboptimality in variational autoencoders*):

- the **approximation gap**, ``log p(x) - ELBO(q*)``: what the posterior family (a diagonal
  Gaussian) cannot express, with ``q*`` the best member for that cell;
- the **amortization gap**, ``ELBO(q*) - ELBO(q_encoder)``: what the encoder loses by
  predicting ``q`` from ``x`` instead of optimising it per cell.

``q*`` comes from per-cell optimisation started at the encoder (:func:`cellvi.inference.refine`);
``log p(x)`` is the importance-weighted bound with ``n_samples`` samples (the larger of the
bounds with the encoder's and with the refined proposal). Works for any cellvi model
through its declared prior, posterior and likelihood.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .inference import elbo_per_cell, iwae_per_cell, refine

__all__ = ["amortization_gap"]


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
