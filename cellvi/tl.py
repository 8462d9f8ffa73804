"""Scanpy-style entry points: ``adata`` first, keyword-only settings, ``key_added``, ``copy``.

One ``key_added`` convention for every function: it is the **name** of the result, and the
outputs are ``obsm["X_" + name]`` (the latent), ``uns[name]`` (settings and history) and, for
clusterings, ``obs[name]``, ``obs[name + "_confidence"]`` and ``obsm[name + "_probs"]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch  # noqa: F401  (the device annotation)
from anndata import AnnData

from . import __version__
from .clustering import group_medians
from .data import check_writable, marker_matrix, select_markers
from .diagnostics import outlier_scores, robust_scores
from .errors import InvalidTypeError
from .models import GMVAE, NBVAE
from .models._base import TRAIN_KEYS

__all__ = ["nbvae", "gmvae"]

_MODEL_KWARGS = ("dispersion", "n_hidden", "n_layers", "dropout", "norm", "input_scale",
                 "posterior", "n_flows", "encode_batch")
_FIT_KWARGS = tuple(k for k in TRAIN_KEYS if k != "max_epochs") + (
    "callbacks", "objective", "checkpoint_dir", "checkpoint_every", "resume")
_NBVAE_FIT_KWARGS = _FIT_KWARGS + ("batch_penalty", "penalty_groups", "penalty")

_GMVAE_MODEL_KWARGS = ("markers", "prune", "sparsity", "prune_threshold", "merge_threshold",
                       "overcluster", "n_hidden", "n_layers", "dropout", "norm", "posterior",
                       "n_flows")
_GMVAE_FIT_KWARGS = _FIT_KWARGS + ("warmup_epochs", "warmup_beta", "init", "n_init", "schedule",
                                   "batch_penalty", "penalty_groups")


def _result_name(key_added: str, function: str) -> str:
    """The result's name; an obsm-style ``"X_name"`` (nbvae's old convention) still works."""
    if not isinstance(key_added, str) or not key_added:
        raise InvalidTypeError(f"key_added must be a non-empty string, got {key_added!r}")
    if key_added.startswith("X_"):
        name = key_added[2:]
        warnings.warn(
            f"{function}(key_added={key_added!r}): key_added is now the result's name and the "
            f"latent goes to obsm['X_' + key_added]; pass key_added={name!r} (same keys)",
            FutureWarning, stacklevel=3)
        return name
    return key_added


def _split_kwargs(kwargs: dict[str, Any], model_keys=_MODEL_KWARGS,
                  fit_keys=_FIT_KWARGS) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(kwargs) - set(model_keys) - set(fit_keys)
    if unknown:
        raise InvalidTypeError(
            f"unknown argument(s) {sorted(unknown)}; model settings are {list(model_keys)}, "
            f"training settings are {list(fit_keys)}"
        )
    model = {k: v for k, v in kwargs.items() if k in model_keys}
    fit = {k: v for k, v in kwargs.items() if k in fit_keys}
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


def _merge_table(merges: list[dict[str, Any]]):
    """The merges of a GMVAE fit as a DataFrame (components as ``"3+7"``: indices within
    each round)."""
    import pandas as pd

    cols = ["round", "components_a", "components_b", "cells_a", "cells_b", "score", "rule"]
    rows = [{**m, "components_a": "+".join(map(str, m["components_a"])),
             "components_b": "+".join(map(str, m["components_b"]))} for m in merges]
    table = pd.DataFrame(rows, columns=cols)
    table.index = table.index.astype(str)
    return table


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
    key_added: str = "nbvae",
    refine_steps: int = 0,
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
        key_added: name of the result: the latent goes to ``obsm["X_" + key_added]``, the
            settings to ``uns[key_added]`` (``"X_name"``, the old form, still works).
        refine_steps: semi-amortized inference for the written outputs: each cell's posterior
            is refined by this many gradient steps on its own ELBO, starting from the
            encoder's (:func:`cellvi.inference.refine`); ``0`` uses the encoder's.
        copy: return a new AnnData instead of writing into ``adata``.
        return_model: also return the trained :class:`cellvi.models.NBVAE`.
        verbose: progress bar.
        **model_kwargs: network settings (``dispersion``, ``n_hidden``, ``n_layers``,
            ``dropout``, ``norm``, ``input_scale``, ``encode_batch``: :class:`cellvi.models.NBVAE`),
            ``batch_penalty``, ``penalty_groups``, ``penalty`` (:meth:`cellvi.models.NBVAE.fit`) and training
            settings (``batch_size``, ``lr``,
            ``kl_warmup_steps``, ``kl_weight``, ``patience``, ``validation_fraction``,
            ``callbacks``, ...: the fields of :class:`cellvi.train.TrainConfig`).

    Returns:
        ``None`` (or the model, if ``return_model``) when ``copy=False``; otherwise the new
        AnnData (and the model). Writes:

        - ``adata.obsm["X_" + key_added]`` (``"X_nbvae"``): ``float32`` cells x ``n_latent``,
          posterior means;
        - ``adata.obs[key_added + "_outlier_score"]``: negative ELBO per cell as a robust
          z-score within batch (:func:`cellvi.diagnostics.outlier_scores`; large = unusual);
        - ``adata.uns[key_added]`` (``"nbvae"``): ``settings``, ``train_settings``,
          ``history`` (per epoch: ``train_elbo``, ``reconstruction``, ``kl``,
          ``validation_elbo``, ``validation_reconstruction``, ``validation_kl``, ``beta``),
          ``cellvi_version``, ``seed``, ``obsm_key``.

        ``X``, layers and existing obs columns are never modified.

    Example:
        >>> cellvi.tl.nbvae(adata, layer="counts", batch_key="donor")
        >>> sc.pp.neighbors(adata, use_rep="X_nbvae")
        >>> sc.tl.umap(adata)
    """
    name = _result_name(key_added, "nbvae")
    check_writable(adata, copy)
    model_settings, fit_settings = _split_kwargs(model_kwargs, fit_keys=_NBVAE_FIT_KWARGS)
    model = NBVAE(adata, layer=layer, batch_key=batch_key, n_latent=n_latent,
                  likelihood=likelihood, **model_settings)
    model.fit(max_epochs=max_epochs, seed=seed, device=device, verbose=verbose, **fit_settings)
    if refine_steps:
        latent = model.transform(adata, refine_steps=refine_steps).latent
        outlier = outlier_scores(model, adata, seed=seed)
    else:  # one pass for both (the same values as transform and outlier_scores)
        latent, elbo = model.latent_and_elbo(adata, n_samples=model.outlier_samples, seed=seed)
        outlier = robust_scores(model, adata, elbo)
    if copy:
        adata = adata.copy()
    adata.obsm["X_" + name] = latent
    adata.obs[name + "_outlier_score"] = outlier
    adata.uns[name] = _uns_safe(dict(
        settings=model.settings, train_settings=model.train_settings, history=model.history,
        cellvi_version=__version__, seed=seed, obsm_key="X_" + name, refine_steps=refine_steps,
    ))
    if copy:
        return (adata, model) if return_model else adata
    return model if return_model else None


def gmvae(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | Sequence[str] | None = None,
    n_components: int | None = None,
    n_latent: int = 10,
    likelihood: str = "normal",
    max_epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    key_added: str = "gmvae",
    refine_steps: int = 0,
    copy: bool = False,
    return_model: bool = False,
    verbose: bool = True,
    **model_kwargs: Any,
) -> AnnData | GMVAE | tuple[AnnData, GMVAE] | None:
    """Cell populations of cytometry data with a Gaussian-mixture-prior VAE.

    Args:
        adata: events x channels with **compensated (flow) and transformed** marker values
            (:func:`cellvi.pp.compensate`, then :func:`cellvi.pp.arcsinh` or
            :func:`cellvi.pp.logicle`).
        layer: layer to read; ``None`` reads ``adata.X``.
        batch_key: obs key (or keys) of batches/samples to correct for; the clusters are
            shared across them.
        n_components: ``None`` discovers the number of populations (starting from 30
            components, pruned by a sparse prior and merged where they share cells); an
            integer gives exactly that many clusters.
        n_latent: latent dimension.
        likelihood: ``"normal"`` or ``"studentt"`` (robust to outlier events).
        max_epochs: epochs of the main phase (``None``: about 1,000 steps, at least 25
            epochs).
        seed: reproducible on the CPU for a given seed; the global random state is untouched.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ...
        key_added: name of the result (see Returns).
        refine_steps: semi-amortized inference for the written outputs: each cell's posterior
            is refined by this many gradient steps on its own ELBO, starting from the
            encoder's (:func:`cellvi.inference.refine`); ``0`` uses the encoder's.
        copy: return a new AnnData instead of writing into ``adata``.
        return_model: also return the trained :class:`cellvi.models.GMVAE`.
        verbose: progress bar.
        **model_kwargs: model settings (``markers`` -- the channels to use, default all;
            ``prune``, ``sparsity``, ``prune_threshold``, ``merge_threshold``, ``overcluster``,
            ``n_hidden``, ``n_layers``, ``dropout``, ``norm``) and training settings
            (``batch_size``, ``lr``, ``warmup_epochs``, ``schedule`` -- a
            :class:`cellvi.models.GMVAESchedule` of the phases' budgets, ``batch_penalty``
            -- the latent batch penalty of :meth:`cellvi.models.GMVAE.fit`, 100 by default
            with a ``batch_key``, ``0`` turns it off; ``penalty_groups`` -- align the batches
            within groups of the batch-centred markers, off by default; ``callbacks``,
            ``patience``, ...).

    Returns:
        ``None`` (or the model, if ``return_model``) when ``copy=False``; otherwise the new
        AnnData (and the model). Writes:

        - ``adata.obs[key_added]``: categorical cluster labels ``"0"``, ``"1"``, ...
          (ordered by size);
        - ``adata.obs[key_added + "_confidence"]``: the largest responsibility per cell;
        - ``adata.obs[key_added + "_outlier_score"]``: negative ELBO per cell as a robust
          z-score within batch (:func:`cellvi.diagnostics.outlier_scores`; large = unusual);
        - ``adata.obsm["X_" + key_added]``: ``float32`` latent posterior means;
        - ``adata.obsm[key_added + "_probs"]``: responsibilities, cells x clusters;
        - ``adata.uns[key_added]``: ``settings``, ``train_settings``, ``history``,
          ``cluster_weights``, ``cluster_sizes``, ``cluster_means`` (latent), ``markers``,
          ``marker_medians`` (a clusters x markers DataFrame of the input values, to name
          the populations), ``merges`` (a table of the merges of components into clusters:
          round, the components on each side (indices within that round: round 0 merges the
          trained mixture's components, a later round the clusters of the round before, in
          their order there), their cells in the probe of up to 20,000 cells, the score and
          the rule; scores just above ``merge_threshold`` are the close calls),
          ``cellvi_version``, ``seed``.

        ``X``, layers and other obs columns are never modified.

    Example:
        >>> cellvi.pp.compensate(adata)
        >>> cellvi.pp.logicle(adata, layer="compensated", key_added="logicle")
        >>> cellvi.tl.gmvae(adata, layer="logicle", markers=fluorescence_channels)
        >>> sc.pp.neighbors(adata, use_rep="X_gmvae"); sc.tl.umap(adata)
        >>> sc.pl.umap(adata, color="gmvae")
    """
    import pandas as pd

    name = _result_name(key_added, "gmvae")
    check_writable(adata, copy)
    model_settings, fit_settings = _split_kwargs(model_kwargs, _GMVAE_MODEL_KWARGS, _GMVAE_FIT_KWARGS)
    model = GMVAE(adata, layer=layer, batch_key=batch_key, n_components=n_components,
                  n_latent=n_latent, likelihood=likelihood, **model_settings)
    model.fit(max_epochs=max_epochs, seed=seed, device=device, verbose=verbose, **fit_settings)
    if refine_steps:
        out = model.transform(adata, refine_steps=refine_steps)
        outlier = outlier_scores(model, adata, seed=seed)
    else:  # one pass for both (the same values as transform and outlier_scores)
        out, elbo = model.transform_and_elbo(adata, seed=seed)
        outlier = robust_scores(model, adata, elbo)
    labels = out.labels
    X = marker_matrix(adata, layer, select_markers(adata, model.var_names))
    medians = pd.DataFrame(group_medians(X, labels.codes, len(labels.categories)),
                           index=list(labels.categories), columns=model.var_names)
    if copy:
        adata = adata.copy()
    adata.obs[name] = pd.Categorical(labels, categories=labels.categories)
    adata.obs[name + "_outlier_score"] = outlier
    adata.obs[name + "_confidence"] = out.confidence
    adata.obsm["X_" + name] = out.latent
    adata.obsm[name + "_probs"] = out.probs
    params = model.cluster_parameters()
    adata.uns[name] = _uns_safe(dict(
        settings=model.settings, train_settings=model.train_settings, history=model.history,
        cluster_weights=params["weights"], cluster_means=params["means"],
        cluster_sizes=np.bincount(labels.codes, minlength=len(labels.categories)),
        markers=list(model.var_names), marker_medians=medians, merges=_merge_table(model.merges),
        cellvi_version=__version__, seed=seed, refine_steps=refine_steps,
    ))
    if copy:
        return (adata, model) if return_model else adata
    return model if return_model else None
