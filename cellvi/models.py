"""User-facing model classes: they read AnnData through :mod:`cellvi.data`, build a
:class:`cellvi.vae.VAE` and train it with :func:`cellvi.train.train`.

Persistence is safe by construction: weights go to ``model.safetensors`` and everything else
(settings, gene names, batch categories, version, history) to ``config.json``. Nothing is
pickled; loading cannot run code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from . import __version__
from ._settings import resolve_device, seeded
from .data import CountData, as_batch_keys, check_var_names, encode_covariates, prepare_counts
from .decoders import CountDecoder
from .posteriors import GaussianEncoder
from .priors import StandardNormal
from .train import DeviceData, train
from .vae import VAE

logger = logging.getLogger("cellvi")

__all__ = ["NBVAE"]

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


class NBVAE:
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
    ):
        data = prepare_counts(adata, layer, batch_key)
        self.settings: dict[str, Any] = dict(
            layer=layer, batch_keys=data.batch_keys, n_latent=int(n_latent), likelihood=likelihood,
            dispersion=dispersion, n_hidden=int(n_hidden), n_layers=int(n_layers),
            dropout=float(dropout), norm=norm,
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
            return VAE(encoder, decoder, StandardNormal(s["n_latent"]), log1p_input=True)

    @property
    def is_trained(self) -> bool:
        return bool(self.history)

    # -- training -----------------------------------------------------------------------
    def fit(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 512,
        lr: float = 1e-3,
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
            seed: makes the weights, split and training reproducible on the CPU.
            device: ``"auto"`` (CUDA, then MPS, then CPU), or a torch device.
            verbose: progress bar.
            **train_kwargs: further arguments of :func:`cellvi.train.train`
                (``kl_warmup_steps``, ``patience``, ``validation_fraction``, ...).
        """
        if self._data is None:
            raise RuntimeError(
                "this model holds no training data (it was loaded from disk, or fit() already "
                "ran and released it); create a new model from an AnnData to train again"
            )
        dev = resolve_device(device)
        self.module = self._build(seed).to(dev)
        self.device = dev
        d = self._data
        data = DeviceData.from_arrays(d.X, dev, covs=d.covs, log_library=d.log_library)
        self.history = train(self.module, data, max_epochs=max_epochs, batch_size=batch_size,
                             lr=lr, seed=seed, verbose=verbose, desc=type(self).__name__,
                             **train_kwargs)
        self.train_settings = dict(max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed,
                                   device=str(dev), epochs_trained=len(self.history["epoch"]),
                                   **train_kwargs)
        self._data = None  # the arrays are not needed any more
        return self

    # -- inference ----------------------------------------------------------------------
    def _require_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet; call model.fit() first")

    def _prepare(self, adata: AnnData) -> CountData:
        check_var_names(adata, self.var_names)
        return prepare_counts(adata, self.settings["layer"], self.settings["batch_keys"] or None,
                              categories=self.categories, check=False)

    def _batches(self, adata: AnnData, batch_size: int):
        d = self._prepare(adata)
        data = DeviceData.from_arrays(d.X, self.device, covs=d.covs, log_library=d.log_library)
        idx = torch.arange(data.n_obs)
        return data.iter_batches(idx, batch_size)

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

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights (safetensors) and settings/genes/categories (JSON) to folder ``path``."""
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
                      categories=self.categories, history=self.history)
        (path / _CONFIG).write_text(json.dumps(config, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | None = None, *,
             device: str | torch.device = "auto") -> NBVAE:
        """Load a model saved with :meth:`save`.

        Args:
            adata: if given, checked against the model's genes and batch categories
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
        self._data = None
        self.device = resolve_device(device)
        self.module = self._build()
        self.module.load_state_dict(load_file(str(path / _WEIGHTS)))
        self.module.to(self.device).eval()
        if adata is not None:
            check_var_names(adata, self.var_names)
            keys = as_batch_keys(self.settings["batch_keys"])
            encode_covariates(adata, keys, self.categories)
        return self

    def __repr__(self) -> str:
        s = self.settings
        state = f"trained {len(self.history.get('epoch', []))} epochs" if self.is_trained else "untrained"
        return (f"NBVAE({len(self.var_names)} genes, n_latent={s['n_latent']}, "
                f"likelihood={s['likelihood']!r}, batch_keys={s['batch_keys']}, {state})")
