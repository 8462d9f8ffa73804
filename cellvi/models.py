"""User-facing model classes: they read AnnData through :mod:`cellvi.data`, build a
:class:`cellvi.vae.VAE` and train it with :func:`cellvi.train.train`.

Persistence is safe by construction: weights go to ``model.safetensors`` and everything else
(settings, gene names, batch categories, version, history) to ``config.json``. Nothing is
pickled; loading cannot run code.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from . import __version__
from ._settings import resolve_device, seeded
from .data import (
    ContinuousData,
    CountData,
    as_batch_keys,
    check_finite,
    check_var_names,
    encode_covariates,
    prepare_continuous,
    prepare_counts,
    select_markers,
)
from .decoders import ContinuousDecoder, CountDecoder
from .objectives import Constant
from .posteriors import GaussianEncoder
from .priors import MixturePrior, StandardNormal
from .train import DeviceData, DeviceMatrix, default_max_epochs, train
from .vae import VAE, MixtureVAE

logger = logging.getLogger("cellvi")

__all__ = ["NBVAE", "GMVAE"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def batch_log_ratios(data: CountData, pseudo: float = 1e-6) -> list[np.ndarray]:
    """Per batch category, ``log`` of its mean expression proportions over the pooled ones.

    Returns one ``(n_categories, n_genes)`` array per batch key (divided by the number of keys),
    used to start the decoder's batch offsets where the data put them.
    """
    import scipy.sparse as sp

    X = data.X
    lib = np.exp(data.log_library[:, 0].astype(np.float64))
    props = sp.diags(1.0 / lib) @ X if sp.issparse(X) else X / lib[:, None]
    pooled = np.log(np.asarray(props.mean(0)).ravel() + pseudo)
    out = []
    for j, key in enumerate(data.batch_keys):
        n_cat = len(data.categories[key])
        onehot = sp.csr_matrix((np.ones(len(lib)), (data.covs[:, j], np.arange(len(lib)))),
                               shape=(n_cat, len(lib)))
        means = np.asarray((onehot @ props).todense() if sp.issparse(props) else onehot @ props)
        means /= np.asarray(onehot.sum(1))
        out.append(((np.log(means + pseudo) - pooled) / len(data.batch_keys)).astype(np.float32))
    return out


class _Model:
    """What every cellvi model shares: fit on the AnnData given at construction, latent
    means for any AnnData with the same features, safe save/load, a readable repr.

    Subclasses set ``settings``, ``var_names``, ``categories`` and ``_data`` in ``__init__``
    and define ``_build(seed)`` (the :class:`cellvi.vae.VAE` module), ``_device_data(arrays,
    device)`` and ``_prepare(adata)``.
    """

    #: keys of ``config.json`` beyond the common ones, restored as attributes by :meth:`load`
    _extra_state: tuple[str, ...] = ()
    _state_defaults: dict[str, Any] = {}

    @property
    def is_trained(self) -> bool:
        return bool(self.history)

    def _require_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.fit() first")

    def _require_data(self):
        if self._data is None:
            raise RuntimeError(
                "this model holds no training data (it was loaded from disk, or fit() already "
                "ran and released it); create a new model from an AnnData to train again"
            )
        return self._data

    def _batches(self, adata: AnnData, batch_size: int):
        data = self._device_data(self._prepare(adata), self.device)
        return data.iter_batches(torch.arange(data.n_obs), batch_size)

    def _train(self, data: DeviceData, *, max_epochs, batch_size, lr, seed, verbose,
               desc: str | None = None, **train_kwargs):
        return train(self.module, data, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                     seed=seed, verbose=verbose, desc=desc or type(self).__name__, **train_kwargs)

    @torch.no_grad()
    def get_latent(self, adata: AnnData, *, mean: bool = True, seed: int = 0,
                   batch_size: int = 4096) -> np.ndarray:
        """Latent representation of the cells of ``adata``.

        Args:
            mean: posterior means (default) or one sample from q(z|x).
            seed: seed of the sample when ``mean=False``.

        Returns:
            ``float32`` array, cells x ``n_latent``.
        """
        self._require_trained()
        self.module.eval()
        out = []
        with seeded(seed, self.device):
            for batch in self._batches(adata, batch_size):
                qz = self.module.encode(batch)
                out.append((qz.mean if mean else qz.sample()).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights (safetensors) and settings/features/categories (JSON) to folder ``path``."""
        from safetensors.torch import save_file

        self._require_trained()
        path = Path(path)
        if (path / _WEIGHTS).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(path / _WEIGHTS))
        config = dict(model=type(self).__name__, cellvi_version=__version__, settings=self.settings,
                      train_settings=self.train_settings, var_names=self.var_names,
                      categories=self.categories, history=self.history,
                      **{k: getattr(self, k) for k in self._extra_state})
        (path / _CONFIG).write_text(json.dumps(config, indent=1, default=_json_default))

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | None = None, *,
             device: str | torch.device = "auto"):
        """Load a model saved with :meth:`save`.

        Args:
            adata: if given, checked against the model's features and batch categories
                (a clear error says which differ).
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / _CONFIG).exists() or not (path / _WEIGHTS).exists():
            raise FileNotFoundError(f"{path} does not hold a saved cellvi model ({_CONFIG}, {_WEIGHTS})")
        config = json.loads((path / _CONFIG).read_text())
        if config.get("model") != cls.__name__:
            raise ValueError(f"{path} holds a {config.get('model')} model, not {cls.__name__}")
        self = cls.__new__(cls)
        self.settings = config["settings"]
        self.train_settings = config.get("train_settings", {})
        self.var_names = config["var_names"]
        self.categories = config["categories"]
        self.history = config["history"]
        for key in self._extra_state:  # state added in later versions has a default
            setattr(self, key, config[key] if key in config else copy.deepcopy(self._state_defaults[key]))
        self._data = None
        self.device = resolve_device(device)
        self.module = self._build()
        self.module.load_state_dict(load_file(str(path / _WEIGHTS)))
        self.module.to(self.device).eval()
        if adata is not None:
            self._check_features(adata)
            keys = as_batch_keys(self.settings["batch_keys"])
            encode_covariates(adata, keys, self.categories)
        return self

    def _check_features(self, adata: AnnData) -> None:
        check_var_names(adata, self.var_names)

    def _state(self) -> str:
        return f"trained {len(self.history.get('epoch', []))} epochs" if self.is_trained else "untrained"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class NBVAE(_Model):
    """Negative-binomial VAE for scRNA-seq counts, with batch correction.

    ``q(z | x, s)`` is a diagonal Gaussian from an MLP on ``log1p(x)`` and the batch ``s``;
    ``p(z) = N(0, I)``; ``p(x | z, s)`` is NB (or ZINB / Poisson) with mean
    ``library * softmax(f(z, s))``. The latent ``z`` is the batch-corrected representation.

    Args:
        adata: AnnData with raw counts in ``X`` or ``layer``.
        layer: layer with the raw counts (``None``: ``adata.X``).
        batch_key: obs key (or list of keys) of categorical batch covariates.
        n_latent: latent dimension.
        likelihood: ``"nb"``, ``"zinb"`` or ``"poisson"``.
        dispersion: ``"gene"`` or ``"gene-batch"`` inverse dispersion.
        n_hidden, n_layers, dropout, norm: network settings.
        input_scale: what the encoder sees. ``None`` (default): ``log1p`` of the counts as
            they are. A number: each cell scaled to that total first,
            ``log1p(x / library * input_scale)``, as ``normalize_total`` + ``log1p`` does;
            ``"median"``: to the median library size of the training cells (stored as a
            number). The decoder always gets the observed library size.

    Example:
        >>> model = cellvi.models.NBVAE(adata, layer="counts", batch_key="donor")
        >>> model.fit()
        >>> adata.obsm["X_nbvae"] = model.get_latent(adata)
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | Sequence[str] | None = None,
        n_latent: int = 10,
        likelihood: str = "nb",
        dispersion: str = "gene",
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        norm: str | None = "batch",
        input_scale: float | str | None = None,
    ):
        data = prepare_counts(adata, layer, batch_key)
        if isinstance(input_scale, str) and input_scale == "median":
            input_scale = float(np.median(np.exp(data.log_library.astype(np.float64))))
        if input_scale is not None and (isinstance(input_scale, str) or not input_scale > 0):
            raise ValueError(f"input_scale must be a positive number, 'median' or None, "
                             f"got {input_scale!r}")
        self.settings: dict[str, Any] = dict(
            layer=layer, batch_keys=data.batch_keys, n_latent=int(n_latent), likelihood=likelihood,
            dispersion=dispersion, n_hidden=int(n_hidden), n_layers=int(n_layers),
            dropout=float(dropout), norm=norm,
            input_scale=None if input_scale is None else float(input_scale),
        )
        self.var_names = data.var_names
        self.categories = data.categories
        self.history: dict[str, list[float]] = {}
        self.train_settings: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self._data: CountData | None = data
        self.module = self._build()

    # -- construction -------------------------------------------------------------------
    def _build(self, seed: int = 0) -> VAE:
        s = self.settings
        n_cats = [len(self.categories[k]) for k in s["batch_keys"]]
        with seeded(seed):
            encoder = GaussianEncoder(len(self.var_names), s["n_latent"], n_hidden=s["n_hidden"],
                                      n_layers=s["n_layers"], n_cats_per_cov=n_cats,
                                      dropout=s["dropout"], norm=s["norm"])
            decoder = CountDecoder(s["n_latent"], len(self.var_names), likelihood=s["likelihood"],
                                   dispersion=s["dispersion"], n_hidden=s["n_hidden"],
                                   n_layers=s["n_layers"], n_cats_per_cov=n_cats, norm=s["norm"])
            if self._data is not None and n_cats:
                decoder.init_batch_offsets(batch_log_ratios(self._data))
            return VAE(encoder, decoder, StandardNormal(s["n_latent"]), log1p_input=True,
                       input_scale=s.get("input_scale"))

    # -- training -----------------------------------------------------------------------
    def fit(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 512,
        lr: float = 1e-3,
        kl_weight: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "auto",
        verbose: bool = True,
        **train_kwargs: Any,
    ) -> NBVAE:
        """Train on the AnnData given at construction.

        Args:
            max_epochs: ``None`` picks about 6,000 steps (10..400 epochs); early stopping on a
                10% validation split usually ends sooner.
            batch_size: cells per mini-batch.
            lr: Adam learning rate.
            kl_weight: weight β of the KL term after the KL warm-up (1, the default, gives
                the ELBO). 0.5 on Kang 8 donors, 4 seeds: k-means cell-type ARI 0.551 vs
                0.537 at 1, Leiden (best resolution) 0.686 vs 0.778
                (``benchmarks/results/celltypes_nbvae_kl05.md``).
            seed: makes the weights, split and training reproducible on the CPU.
            device: ``"auto"`` (CUDA, then MPS, then CPU), or a torch device.
            verbose: progress bar.
            **train_kwargs: further arguments of :func:`cellvi.train.train`
                (``kl_warmup_steps``, ``patience``, ``validation_fraction``, ...).
        """
        d = self._require_data()
        dev = resolve_device(device)
        self.module = self._build(seed).to(dev)
        self.device = dev
        self.history = self._train(self._device_data(d, dev), max_epochs=max_epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, verbose=verbose,
                                   kl_weight=kl_weight, **train_kwargs)
        self.train_settings = dict(max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                                   kl_weight=kl_weight, seed=seed,
                                   device=str(dev), epochs_trained=len(self.history["epoch"]),
                                   **train_kwargs)
        self._data = None  # the arrays are not needed any more
        return self

    # -- inference ----------------------------------------------------------------------
    @staticmethod
    def _device_data(d: CountData, device: torch.device) -> DeviceData:
        return DeviceData.from_arrays(d.X, device, covs=d.covs, log_library=d.log_library)

    def _prepare(self, adata: AnnData) -> CountData:
        check_var_names(adata, self.var_names)
        return prepare_counts(adata, self.settings["layer"], self.settings["batch_keys"] or None,
                              categories=self.categories, check=False)

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData,
        *,
        library_size: float = 1e4,
        transform_batch: str | dict[str, str] | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Denoised expression: decoder means at the posterior mean, scaled to ``library_size``.

        Args:
            library_size: counts per cell of the output (``1e4`` is CP10k).
            transform_batch: decode every cell as if it came from this batch category
                (of the first batch key, or ``{key: category}``) -- batch-corrected
                expression. ``None`` keeps each cell's own batch.

        Returns:
            ``float32`` array, cells x genes.
        """
        self._require_trained()
        self.module.eval()
        target = self._transform_codes(transform_batch)
        out = []
        for batch in self._batches(adata, batch_size):
            z = self.module.encode(batch).mean
            covs = batch.get("covs")
            if target is not None:
                covs = covs.clone()
                for j, code in target.items():
                    covs[:, j] = code
            out.append((self.module.decoder.proportions(z, covs) * library_size).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def _transform_codes(self, transform_batch) -> dict[int, int] | None:
        if transform_batch is None:
            return None
        keys = self.settings["batch_keys"]
        if not keys:
            raise ValueError("transform_batch needs a model trained with batch_key")
        if not isinstance(transform_batch, dict):
            transform_batch = {keys[0]: transform_batch}
        codes = {}
        for key, cat in transform_batch.items():
            if key not in keys:
                raise KeyError(f"{key!r} is not one of the model's batch keys {keys}")
            cats = self.categories[key]
            if str(cat) not in cats:
                raise ValueError(f"transform_batch: {cat!r} is not a category of {key!r} ({cats})")
            codes[keys.index(key)] = cats.index(str(cat))
        return codes

    def __repr__(self) -> str:
        s = self.settings
        return (f"NBVAE({len(self.var_names)} genes, n_latent={s['n_latent']}, "
                f"likelihood={s['likelihood']!r}, batch_keys={s['batch_keys']}, {self._state()})")


#: ``n_components=None`` (population discovery) starts from this many components
DISCOVERY_COMPONENTS = 30
WARMUP_STEPS = 300  # optimiser steps of the N(0, I) warm-up (default)
WARMUP_EPOCHS = (5, 60)  # bounds on the warm-up's epochs (default)
MIXTURE_STEPS = 1000  # optimiser steps of the mixture phase (default)
MIXTURE_EPOCHS = (25, 300)  # bounds on the mixture phase's epochs (default)
INIT_CELLS = 20000  # cells (at most) of the GMM that places the components
# cells (at most) whose responsibilities update π and decide merges; 20,000 (the whole GMM
# subsample) vs 10,000, 5 seeds: Spectre default F1 0.758 vs 0.737, about 1 s more per fit
PROBE_CELLS = 20000
MERGE_ROUNDS = 3  # merge + fine-tune rounds at most (a round only runs when it merges)
TUNE_DIVISOR, TUNE_MIN_EPOCHS = 3, 5  # a fine-tune's epochs: main phase's // 3, at least 5


class GMVAE(_Model):
    """Gaussian-mixture-prior VAE for cytometry: population discovery with batch correction.

    The model: ``p(c) = Cat(π)``, ``p(z | c) = N(μ_c, diag σ_c²)``, ``p(x | z, s) =
    N(μ_θ(z, s), diag σ_θ²(z, s))`` (or Student-t), with an amortized ``q(z | x, s)`` and the
    cluster posterior ``q(c | x)`` given by the prior's responsibilities at the encoded ``z``
    (VaDE; ``c`` is summed out exactly in the ELBO). The batch ``s`` enters encoder and
    decoder, so clusters are shared across batches and the latent is batch-corrected.

    Markers are standardised (per-marker centre and scale of the training data, stored
    with the model) before they enter the network.

    Training: (1) a short warm-up with a standard normal prior and a small KL weight;
    (2) the mixture is initialised from the moments, in the warm-up latent, of the groups of a
    GMM fitted to the standardised markers (so no component starts empty); (3) the full
    model, with an M-step for ``π`` after each epoch (the sparse Dirichlet MAP) and pruning;
    (4) components are grouped into clusters and the model is fine-tuned with one component
    per cluster, again while the fine-tuned clusters still share cells (``MERGE_ROUNDS``, at
    most 3 rounds: on the simulator a second round joined fragments of populations that the
    first left apart, 5 found for 5 where one round found 7 on two of four data seeds).
    With ``n_components=None`` it starts from ``DISCOVERY_COMPONENTS`` components, empty ones
    are pruned and components that share their cells are merged (:func:`merge_components`),
    unless the two are two modes in the markers (:func:`bimodality`, a veto): the number of
    populations is found, not given. With ``n_components=K`` it starts from
    about ``3K`` components and groups them into exactly ``K`` (entropy merging: the pair that
    shares the most cells first, with the same veto; once the groups are distinct, the
    smallest group joins the one it shares most cells with).

    Args:
        adata: cells x channels with **transformed** marker values (arcsinh / logicle).
        layer: layer to read (``None``: ``adata.X``).
        markers: channels to use (default all); leave out scatter, time and unused channels.
        batch_key: obs key(s) of categorical batch covariates (e.g. sample or batch).
        n_components: ``None`` for discovery, or the exact number of clusters ``K``.
        n_latent: latent dimension.
        likelihood: ``"normal"`` or ``"studentt"`` (robust to outliers).
        prune: prune small components (default: only when ``n_components=None``).
        sparsity: sparse Dirichlet strength (see :class:`cellvi.priors.MixturePrior`);
            default ``0.005`` when pruning (a component needs about 0.5% of the
            cells to survive), else none.
        prune_threshold: weight below which a component is switched off (default ``0.002``).
        merge_threshold: components whose responsibilities overlap by more than this
            (entropy drop per cell, see :func:`merge_components`) are merged into one cluster
            after training, followed by a short fine-tune; ``0`` disables in discovery. With
            ``n_components=K`` it is where merging by entanglement ends and the smallest
            groups are folded into their neighbours until ``K`` are left. The
            default 0.125 is a measured trade-off (tuning runs): 0.1 merged adjacent real
            populations (NK with NK T cells on flowsom_68983) in 3 of 4 seeds; 0.15 split
            simulated Gaussian populations (7 found for 5) in 2 of 4 data seeds with one
            merge round, and in 1 of 8 with the merge rounds.
        overcluster: with ``n_components=K``, train first with about ``3K`` components (at
            most 30), merge them down to exactly ``K`` the same way, then fine-tune; this finds
            better optima than starting from ``K``. ``False`` trains ``K`` components throughout.
        n_hidden, n_layers, dropout, norm: network settings.

    Example:
        >>> model = cellvi.models.GMVAE(adata, layer="logicle", markers=markers)
        >>> model.fit()
        >>> labels, probs = model.predict(other_sample)
    """

    _extra_state = ("center", "scale", "cluster_order", "merges")
    _state_defaults = {"merges": []}  # saved by cellvi 0.1.0 before merges were recorded

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        markers: Sequence[str] | None = None,
        batch_key: str | Sequence[str] | None = None,
        n_components: int | None = None,
        n_latent: int = 10,
        likelihood: str = "normal",
        prune: bool | None = None,
        sparsity: float | None = None,
        prune_threshold: float | None = None,
        merge_threshold: float = 0.125,
        overcluster: bool = True,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout: float = 0.0,
        norm: str | None = "batch",
    ):
        if likelihood not in ("normal", "studentt"):
            raise ValueError(f"likelihood must be 'normal' or 'studentt', got {likelihood!r}")
        data = prepare_continuous(adata, layer, batch_key, markers=markers)
        n_obs = data.X.shape[0]
        if n_components is not None:
            if int(n_components) < 1:
                raise ValueError(f"n_components must be a positive integer or None, got {n_components}")
            if int(n_components) > n_obs:
                raise ValueError(
                    f"n_components={n_components} is larger than the number of cells ({n_obs}); "
                    "use fewer components, or n_components=None to let the model find them"
                )
        if n_components is None:  # discovery: an upper bound, pruned and merged down
            k = n_start = min(DISCOVERY_COMPONENTS, max(1, n_obs // 20))
        else:  # K given: over-cluster, then merge down to exactly K before a fine-tune
            k = int(n_components)
            n_start = max(k, min(max(3 * k, k + 4), DISCOVERY_COMPONENTS, n_obs // 20))
            if not overcluster:
                n_start = k
        prune = (n_components is None) if prune is None else bool(prune)
        if sparsity is None and prune:
            sparsity = 0.005
        if prune_threshold is None:
            prune_threshold = 0.002
        self.settings: dict[str, Any] = dict(
            layer=layer, batch_keys=data.batch_keys, n_components=k, n_start=n_start,
            discover=n_components is None, n_latent=int(n_latent), likelihood=likelihood,
            prune=prune, sparsity=sparsity, prune_threshold=float(prune_threshold),
            merge_threshold=float(merge_threshold),
            n_hidden=int(n_hidden), n_layers=int(n_layers), dropout=float(dropout), norm=norm,
        )
        self.var_names = data.var_names
        self.categories = data.categories
        self.center = data.X.mean(0).astype(float).tolist()
        self.scale = data.X.std(0).astype(float).tolist()
        self.cluster_order: list[int] = []
        self.merges: list[dict[str, Any]] = []  # every merge of the last fit (see fit)
        self.history: dict[str, list[float]] = {}
        self.train_settings: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self._data: ContinuousData | None = data
        self.module = self._build()

    # -- construction -------------------------------------------------------------------
    def _build(self, seed: int = 0) -> MixtureVAE:
        s = self.settings
        n_cats = [len(self.categories[k]) for k in s["batch_keys"]]
        n_features = len(self.var_names)
        with seeded(seed):
            encoder = GaussianEncoder(n_features, s["n_latent"], n_hidden=s["n_hidden"],
                                      n_layers=s["n_layers"], n_cats_per_cov=n_cats,
                                      dropout=s["dropout"], norm=s["norm"])
            decoder = ContinuousDecoder(s["n_latent"], n_features, likelihood=s["likelihood"],
                                        n_hidden=s["n_hidden"], n_layers=s["n_layers"],
                                        n_cats_per_cov=n_cats, norm=s["norm"])
            if self._data is not None and n_cats:
                decoder.init_batch_offsets(self._batch_shifts(self._data))
            prior = MixturePrior(s["n_latent"], s["n_start"], sparsity=s["sparsity"])
            return MixtureVAE(encoder, decoder, prior, log1p_input=False)

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        return ((X - np.asarray(self.center, dtype=np.float32))
                / np.asarray(self.scale, dtype=np.float32)).astype(np.float32)

    def _batch_shifts(self, d: ContinuousData) -> list[np.ndarray]:
        """Per batch category, its mean standardised marker values (the pooled mean is 0)."""
        Xs = self._standardize(d.X)
        out = []
        for j, key in enumerate(d.batch_keys):
            n_cat = len(d.categories[key])
            sums = np.zeros((n_cat, Xs.shape[1]))
            np.add.at(sums, d.covs[:, j], Xs)
            counts = np.bincount(d.covs[:, j], minlength=n_cat)[:, None]
            out.append((sums / np.maximum(counts, 1) / len(d.batch_keys)).astype(np.float32))
        return out

    def _marker_features(self, d: ContinuousData, idx: np.ndarray) -> np.ndarray:
        """Standardised markers of the cells ``idx`` with each batch's mean shift removed."""
        Xs = self._standardize(d.X[idx])
        if d.covs is not None:
            for j, shifts in enumerate(self._batch_shifts(d)):
                Xs -= shifts[d.covs[idx, j]]
        return Xs

    def _device_data(self, d: ContinuousData, device: torch.device) -> DeviceData:
        obs = {} if d.covs is None else {"covs": torch.as_tensor(d.covs, device=device)}
        return DeviceData(DeviceMatrix(self._standardize(d.X), device), obs, nonzeros=False)

    def _prepare(self, adata: AnnData) -> ContinuousData:
        d = prepare_continuous(adata, self.settings["layer"], self.settings["batch_keys"] or None,
                               markers=self.var_names, categories=self.categories, check=False)
        check_finite(d.X, "the input")
        return d

    def _check_features(self, adata: AnnData) -> None:
        select_markers(adata, self.var_names)

    # -- training -----------------------------------------------------------------------
    def fit(
        self,
        *,
        max_epochs: int | None = None,
        warmup_epochs: int | None = None,
        warmup_beta: float = 0.01,
        init: str = "markers",
        n_init: int = 3,
        batch_size: int = 512,
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device = "auto",
        verbose: bool = True,
        **train_kwargs: Any,
    ) -> GMVAE:
        """Train: a warm-up with a standard normal prior, GMM initialisation of the mixture
        (groups found on the markers, placed at their moments in the warm-up latent), then
        the full model (with pruning when enabled).

        Args:
            max_epochs: epochs of the main phase; ``None`` picks about 1,000 steps but at
                least 25 epochs (large data need passes, small data need steps; at most 300
                epochs); early stopping on a 10% validation split usually ends sooner.
            warmup_epochs: epochs of the warm-up (``None``: about 300 steps, 5..60 epochs,
                at most ``max_epochs``).
            warmup_beta: KL weight during the warm-up (small: a spread-out latent to cluster).
            init: the GMM that places the components is fitted to the standardised
                ``"markers"`` (default) or to the warm-up ``"latent"``; either way each
                component starts at the latent moments of its cells. Markers found the small
                populations of the Spectre file better (benchmarks/cytometry.py, 5 seeds,
                default-setting F1 0.762 vs 0.723 with ``"latent"``; flowsom_68983 with K
                given 0.778 vs 0.739); the latent did better on the simulator's curved
                populations.
            n_init: restarts of that GMM.
            batch_size, lr, seed, device, verbose: as in :meth:`NBVAE.fit`.
            **train_kwargs: further arguments of :func:`cellvi.train.train`.
        """
        from sklearn.mixture import GaussianMixture

        if init not in ("latent", "markers"):
            raise ValueError(f"init must be 'latent' or 'markers', got {init!r}")
        d = self._require_data()
        s = self.settings
        dev = resolve_device(device)
        self.device = dev
        module = self.module = self._build(seed).to(dev)
        data = self._device_data(d, dev)
        n_obs = data.n_obs
        if warmup_epochs is None:
            warmup_epochs = default_max_epochs(n_obs, batch_size, target_steps=WARMUP_STEPS,
                                               bounds=WARMUP_EPOCHS)
            if max_epochs is not None:  # a short run asked for: a short warm-up too
                warmup_epochs = min(warmup_epochs, max(1, max_epochs))
        if max_epochs is None:
            max_epochs = default_max_epochs(n_obs, batch_size, target_steps=MIXTURE_STEPS,
                                            bounds=MIXTURE_EPOCHS)

        # 1. warm-up with N(0, I): the latent takes shape before the mixture is placed on it
        mixture = module.prior
        module.prior = StandardNormal(s["n_latent"]).to(dev)
        warm = self._train(data, max_epochs=warmup_epochs, batch_size=batch_size, lr=lr,
                           seed=seed, verbose=verbose, early_stopping=False,
                           beta_schedule=Constant(warmup_beta), desc="GMVAE warm-up",
                           **{k: v for k, v in train_kwargs.items() if k == "grad_clip"})
        module.prior = mixture

        # 2. initialise the components on the warm-up latent, from a GMM fitted either to
        #    that latent or to the markers; each component starts at its cells' latent moments
        rng = np.random.default_rng(seed)
        sub = np.sort(rng.choice(n_obs, size=min(n_obs, INIT_CELLS), replace=False))
        z, zvar = self._encode_means(data, torch.as_tensor(sub), with_var=True)
        k = s["n_start"]
        space = self._standardize(d.X[sub]) if init == "markers" else z
        labels = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=seed,
                                 n_init=n_init, max_iter=200).fit_predict(space)
        mixture.init_from(*_moments(z, labels, k, zvar))

        # 3. the full model; pruning after each epoch
        module.n_obs = n_obs
        n_active: list[int] = []

        # a random probe of cells for the π M-step and the merge (a random subset of `sub`: its
        # first cells would come from the start of the file, e.g. one batch only)
        probe = torch.as_tensor(np.sort(rng.choice(sub, size=min(len(sub), PROBE_CELLS), replace=False)))

        def on_epoch_end(epoch: int) -> None:
            # M-step for π on the responsibilities of a fixed probe of cells (Dirichlet MAP)
            mixture.update_weights(torch.as_tensor(self._responsibilities(data, probe).sum(0)),
                                   min_weight=0.0 if s["prune"] else 1e-3)
            module.train()
            if s["prune"]:
                dropped = mixture.prune(s["prune_threshold"])
                if dropped:
                    logger.info("epoch %d: pruned components %s, %d left", epoch, dropped,
                                mixture.n_active)
            n_active.append(mixture.n_active)

        main = self._train(data, max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed,
                           verbose=verbose, on_epoch_end=on_epoch_end,
                           **{"kl_warmup_steps": 0, **train_kwargs})
        phases = [("warmup", warm), ("mixture", main)]

        # 4. merge components that share their cells (one population fitted by several
        #    Gaussians), give each merged group one component, and fine-tune; again while the
        #    fine-tuned clusters still share cells (at most MERGE_ROUNDS rounds)
        may_merge = s["n_start"] > s["n_components"] or (s["discover"] and s["merge_threshold"])
        features = self._marker_features(d, probe.numpy()) if may_merge else None
        self.merges = []
        for merge_round in range(MERGE_ROUNDS if may_merge else 0):
            probs = self._responsibilities(data, probe)
            record: list[dict[str, Any]] = []
            # K given: merge down to exactly K (entangled pairs, then smallest first); an
            # entangled pair that is two modes in the markers is vetoed (merge_components)
            groups = merge_components(probs, s["merge_threshold"], record=record,
                                      n_groups=None if s["discover"] else s["n_components"],
                                      features=features, seed=seed)
            if len(groups) >= mixture.n_active:
                break
            self.merges += [dict(round=merge_round, **r) for r in record]
            logger.info("merging %d components into %d clusters", mixture.n_active, len(groups))
            self._place_groups(data, probe, probs, groups)
            tune = self._train(data, max_epochs=max(TUNE_MIN_EPOCHS, max_epochs // TUNE_DIVISOR),
                               batch_size=batch_size,
                               lr=lr, seed=seed + 1 + merge_round, verbose=verbose,
                               on_epoch_end=on_epoch_end, desc="GMVAE merged",
                               **{"kl_warmup_steps": 0, **train_kwargs})
            phases.append(("merged", tune))
        self.history = _join_histories(phases, [k] * len(warm["epoch"]) + n_active)
        self.settings["n_clusters"] = mixture.n_active
        self.train_settings = dict(max_epochs=max_epochs, warmup_epochs=warmup_epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, device=str(dev),
                                   epochs_trained=len(self.history["epoch"]), **train_kwargs)
        # 5. labels "0", "1", ... by size on the training cells
        probs = self._responsibilities(data, torch.arange(n_obs))
        sizes = np.bincount(probs.argmax(1), minlength=k)
        active = mixture.active.cpu().numpy()
        self.cluster_order = [int(c) for c in sorted(np.flatnonzero(active), key=lambda c: -sizes[c])]
        self._data = None
        return self

    def _place_groups(self, data: DeviceData, idx: torch.Tensor, probs: np.ndarray,
                      groups: list[list[int]]) -> None:
        """One component per group of components, at the latent moments of the cells ``idx``
        (responsibilities ``probs``) whose most likely component is in the group; the
        components left over are switched off."""
        mixture = self.module.prior
        k, n = probs.shape[1], len(groups)
        z, zvar = self._encode_means(data, idx, with_var=True)
        lut = np.full(k, -1)
        for gi, members in enumerate(groups):
            lut[members] = gi
        w, mu, sd = _moments(z, lut[probs.argmax(1)], n, zvar)
        mixture.init_from(np.r_[w, np.zeros(k - n)], np.r_[mu, np.zeros((k - n, mu.shape[1]))],
                          np.r_[sd, np.ones((k - n, mu.shape[1]))])
        mixture.active[n:] = False

    @torch.no_grad()
    def _encode_means(self, data: DeviceData, idx: torch.Tensor, batch_size: int = 4096,
                      with_var: bool = False):
        """Posterior means of q(z|x) (and, with ``with_var``, the posterior variances)."""
        self.module.eval()
        means, variances = [], []
        for b in data.iter_batches(idx, batch_size):
            qz = self.module.encode(b)
            means.append(qz.mean.cpu())
            variances.append(qz.variance.cpu())
        z = torch.cat(means).numpy()
        return (z, torch.cat(variances).numpy()) if with_var else z

    @torch.no_grad()
    def _responsibilities(self, data: DeviceData, idx: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
        self.module.eval()
        out = [self.module.responsibilities(b).cpu() for b in data.iter_batches(idx, batch_size)]
        return torch.cat(out).numpy()

    # -- inference ----------------------------------------------------------------------
    @property
    def n_clusters(self) -> int:
        """Number of clusters (active components) of the trained model."""
        self._require_trained()
        return len(self.cluster_order)

    def predict(self, adata: AnnData, *, batch_size: int = 4096) -> tuple[pd.Categorical, np.ndarray]:
        """Cluster labels and probabilities for the cells of ``adata`` (e.g. another sample
        measured with the same panel; its batch categories must be known to the model).

        Returns:
            ``(labels, probs)``: a categorical of ``"0"``, ``"1"``, ... (clusters ordered by
            size on the training data) and the ``float32`` cells x clusters responsibilities
            ``q(c | x)``, columns in label order.
        """
        self._require_trained()
        return self._labels(self._device_data(self._prepare(adata), self.device), batch_size)

    def _labels(self, data: DeviceData, batch_size: int = 4096) -> tuple[pd.Categorical, np.ndarray]:
        probs = self._responsibilities(data, torch.arange(data.n_obs), batch_size)
        probs = probs[:, self.cluster_order].astype(np.float32)
        probs /= probs.sum(1, keepdims=True)
        categories = [str(i) for i in range(len(self.cluster_order))]
        labels = pd.Categorical.from_codes(probs.argmax(1), categories=categories)
        return labels, probs

    def cluster_parameters(self) -> dict[str, np.ndarray]:
        """Mixture weights, latent means and scales of the clusters, in label order."""
        self._require_trained()
        prior = self.module.prior
        order = torch.as_tensor(self.cluster_order, dtype=torch.long, device=prior.logits.device)
        w = prior.weights[order]
        return dict(weights=(w / w.sum()).detach().cpu().numpy(),
                    means=prior.loc[order].detach().cpu().numpy(),
                    scales=prior.scale[order].detach().cpu().numpy())

    def __repr__(self) -> str:
        s = self.settings
        k = f"{self.n_clusters} clusters" if self.is_trained else f"n_components={s['n_components']}"
        return (f"GMVAE({len(self.var_names)} markers, {k}, n_latent={s['n_latent']}, "
                f"likelihood={s['likelihood']!r}, batch_keys={s['batch_keys']}, {self._state()})")


def merge_components(probs: np.ndarray, threshold: float = 0.0,
                     n_groups: int | None = None, record: list | None = None,
                     features: np.ndarray | None = None, seed: int = 0) -> list[list[int]]:
    """Greedy entropy-based merging of mixture components (Baudry et al. 2010, JCGS 19:332).

    Merging components ``i`` and ``j`` lowers the entropy of the responsibilities by
    ``Δ_ij = Σ_n [(γ_ni + γ_nj) log(γ_ni + γ_nj) - γ_ni log γ_ni - γ_nj log γ_nj]``: large when
    many cells are shared between them, as when one population is fitted by several touching
    Gaussians. Pairs are merged, best first, while ``Δ_ij / min(N_i, N_j)`` (nats per cell of
    the smaller one) exceeds ``threshold``.

    With ``n_groups``, merging goes on until exactly that many groups are left. Once no pair
    scores above ``threshold`` (the groups left are distinct populations), each further
    merge folds the **smallest** group into the group it shares the most cells with: the
    entropy score no longer tells populations apart there, and this choice moves the fewest
    cells. Without it a tiny isolated group (which shares no cells, so never scores) would
    keep a cluster while two real populations were joined (flowsom_68983 with K = 6,
    5 seeds: mean F1 0.843 vs 0.775; benchmarks/cytometry.py).

    With ``features`` (the cells' marker values), a merge by entanglement is **vetoed** when
    the two groups are two modes in marker space (:func:`bimodality`: along the direction that
    best separates them, a valley between two well separated peaks); the next best pair is
    tried instead. Entanglement is measured in the latent, where a small population can sit
    inside a larger one's component; the markers have the last word. On Spectre, seeds 3, 6,
    8 and 17, the merges that joined CD4 with CD8a T cells and NK cells, and non-classical with
    mature monocytes, were vetoed; the merges of fragments of one population on the
    simulator and on flowsom_68983 were not (tuning runs, see :data:`BIMODAL_SEPARATION`).
    With ``n_groups`` a vetoed pair stays apart while entangled merges are left; the
    smallest-first folds that then reach ``n_groups`` are never vetoed (Spectre with K = 12,
    seeds 0-4: ARI 0.964 vs 0.953 without the veto).

    Each merge is logged at DEBUG level on the ``"cellvi"`` logger (components, cells on
    each side, score and rule), so that a user can see why two clusters became one.

    Args:
        probs: cells x components responsibilities (columns of switched-off components are 0).
        threshold: smallest score worth a merge by entanglement.
        n_groups: merge down to exactly this many groups.
        record: a list; each merge appends ``{"components_a", "components_b", "cells_a",
            "cells_b", "score", "rule"}`` to it (cells: responsibility mass of each side);
            vetoed pairs append the same with rule ``"vetoed (bimodal)"``.
        features: cells x features (standardised markers, batch shifts removed), rows as in
            ``probs``; enables the bimodality veto.
        seed: seed of the subsampling in :func:`bimodality`.

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
        if not bimodality(features, labels == i, labels == j, rng)["bimodal"]:
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


BIMODAL_SEPARATION = 4.0  # Ashman's D of the two modes (2 = just resolved) ...
BIMODAL_VALLEY = 0.55  # ... and the density between them relative to the lower peak
# tuning (merges logged with both statistics, simulator data seed 5, flowsom_68983 seed 0,
# Spectre seeds 3, 6, 8, 17): fragments of one population had D <= 4.15 and, where D > 4,
# valleys >= 0.61; the wrong merges (CD4/CD8a T/NK, NK/NK T, NK/CD8a T, non-classical/mature
# monocytes, Progenitors/Other) had D 4.04-5.10 with valleys 0.38-0.53. D 4.4 (git 3c8fe6e)
# vetoed the clearest of them only.


def bimodality(features: np.ndarray, in_a: np.ndarray, in_b: np.ndarray,
               rng: np.random.Generator | None = None, max_cells: int = 4000) -> dict[str, Any]:
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
        rng: subsamples at most ``max_cells`` cells for the fits.
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
        t = t[(rng or np.random.default_rng(0)).choice(len(t), max_cells, replace=False)]
    gm = GaussianMixture(2, n_init=2, random_state=0).fit(t[:, None])
    m, v = gm.means_.ravel(), gm.covariances_.ravel()
    out["separation"] = float(abs(m[0] - m[1]) * np.sqrt(2) / np.sqrt(v[0] + v[1]))
    grid = np.linspace(-0.25, 1.25, 61)
    dens = gaussian_kde(t, bw_method=0.3)(grid)
    peak = min(dens[grid <= 0.25].max(), dens[grid >= 0.75].max())
    out["valley"] = float(dens[(grid >= 0) & (grid <= 1)].min() / max(peak, 1e-300))
    out["bimodal"] = bool(out["separation"] > BIMODAL_SEPARATION and out["valley"] < BIMODAL_VALLEY)
    return out


def _moments(z: np.ndarray, labels: np.ndarray, k: int, zvar: np.ndarray | None = None):
    """Weights, means and standard deviations of the groups ``labels`` of the cells' latent
    posteriors: ``μ_c`` = mean of their posterior means, ``σ_c² = Var_c(means) + mean_c(posterior
    variances)`` (the moments of the aggregate posterior of the group, which is what the
    prior sees through the ELBO's samples; from the means alone a component would be far too
    narrow in latent dimensions that carry no information). An empty group starts at a random
    cell with the pooled spread and a small weight."""
    if zvar is None:
        zvar = np.zeros_like(z)
    counts = np.bincount(labels, minlength=k).astype(float)
    means = np.zeros((k, z.shape[1]))
    scales = np.tile(np.sqrt(z.var(0) + zvar.mean(0)) + 1e-3, (k, 1))
    rng = np.random.default_rng(0)
    for c in range(k):
        members = labels == c
        if members.sum() >= 2:
            means[c] = z[members].mean(0)
            scales[c] = np.sqrt(z[members].var(0) + zvar[members].mean(0)) + 1e-3
        else:
            means[c] = z[rng.integers(len(z))]
    weights = np.maximum(counts, 0.5) / max(counts.sum(), 1.0)
    return weights / weights.sum(), means, scales


def _join_histories(phases: list[tuple[str, dict]], n_components: list[int]) -> dict[str, list]:
    out: dict[str, list] = {key: [] for key in phases[0][1]}
    out["phase"] = []
    for name, hist in phases:
        for key in hist:
            out[key] += list(hist[key])
        out["phase"] += [name] * len(hist["epoch"])
    out["epoch"] = list(range(len(out["epoch"])))
    out["n_components"] = list(n_components)
    return out
