"""Scanpy-style entry points: ``adata`` first, keyword-only settings, ``key_added``, ``copy``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from . import __version__
from .data import check_writable
from .models import NBVAE
from .train import train as _train

__all__ = ["nbvae"]

_MODEL_KWARGS = ("dispersion", "n_hidden", "n_layers", "dropout", "norm")
_FIT_KWARGS = ("batch_size", "lr") + tuple(
    p for p in inspect.signature(_train).parameters
    if p not in {"module", "data", "max_epochs", "batch_size", "lr", "seed", "verbose", "desc"}
)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(kwargs) - set(_MODEL_KWARGS) - set(_FIT_KWARGS)
    if unknown:
        raise TypeError(
            f"unknown argument(s) {sorted(unknown)}; model settings are {list(_MODEL_KWARGS)}, "
            f"training settings are {list(_FIT_KWARGS)}"
        )
    model = {k: v for k, v in kwargs.items() if k in _MODEL_KWARGS}
    fit = {k: v for k, v in kwargs.items() if k in _FIT_KWARGS}
    return model, fit


def _uns_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` values (h5ad cannot store them) and make lists/tuples arrays."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = _uns_safe(v)
        elif isinstance(v, (list, tuple)):
            out[k] = np.asarray(v) if len(v) else np.asarray([], dtype=str)
        else:
            out[k] = v
    return out


def nbvae(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | Sequence[str] | None = None,
    n_latent: int = 10,
    likelihood: str = "nb",
    max_epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    key_added: str = "X_nbvae",
    copy: bool = False,
    return_model: bool = False,
    verbose: bool = True,
    **model_kwargs: Any,
) -> AnnData | NBVAE | tuple[AnnData, NBVAE] | None:
    """Batch-corrected latent space of scRNA-seq counts with a negative-binomial VAE.

    Args:
        adata: cells x genes with **raw counts** in ``X`` or ``layer`` (select HVGs first,
            e.g. ``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000,
            subset=True)`` on counts).
        layer: layer with raw counts; ``None`` reads ``adata.X``.
        batch_key: obs key (or list of keys) of categorical batch covariates to correct for.
        n_latent: latent dimension.
        likelihood: ``"nb"`` (default), ``"zinb"`` or ``"poisson"``.
        max_epochs: ``None`` picks a number from the dataset size (about 6,000 steps);
            early stopping on a 10% validation split usually ends sooner.
        seed: the result is reproducible for a given seed (on the CPU); the caller's global
            random state is not changed.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ...
        key_added: obsm key of the latent; the uns key is ``key_added`` without ``"X_"``.
        copy: return a new AnnData instead of writing into ``adata``.
        return_model: also return the trained :class:`cellvi.models.NBVAE`.
        verbose: progress bar.
        **model_kwargs: network settings (``dispersion``, ``n_hidden``, ``n_layers``,
            ``dropout``, ``norm``) and training settings (``batch_size``, ``lr``,
            ``kl_warmup_steps``, ``patience``, ``validation_fraction``, ...).

    Returns:
        ``None`` (or the model, if ``return_model``) when ``copy=False``; otherwise the new
        AnnData (and the model). Writes:

        - ``adata.obsm[key_added]``: ``float32`` cells x ``n_latent``, posterior means;
        - ``adata.uns[key_added without "X_"]`` (``"nbvae"`` by default): ``settings``,
          ``train_settings``, ``history`` (per-epoch ``train_elbo``, ``validation_elbo``,
          ``beta``), ``cellvi_version``, ``seed``, ``obsm_key``.

        ``X``, layers and obs are never modified.

    Example:
        >>> cellvi.tl.nbvae(adata, layer="counts", batch_key="donor")
        >>> sc.pp.neighbors(adata, use_rep="X_nbvae")
        >>> sc.tl.umap(adata)
    """
    check_writable(adata, copy)
    model_settings, fit_settings = _split_kwargs(model_kwargs)
    model = NBVAE(adata, layer=layer, batch_key=batch_key, n_latent=n_latent,
                  likelihood=likelihood, **model_settings)
    model.fit(max_epochs=max_epochs, seed=seed, device=device, verbose=verbose, **fit_settings)
    latent = model.get_latent(adata)
    if copy:
        adata = adata.copy()
    adata.obsm[key_added] = latent
    uns_key = key_added[2:] if key_added.startswith("X_") else key_added
    adata.uns[uns_key] = _uns_safe(dict(
        settings=model.settings, train_settings=model.train_settings, history=model.history,
        cellvi_version=__version__, seed=seed, obsm_key=key_added,
    ))
    if copy:
        return (adata, model) if return_model else adata
    return model if return_model else None
