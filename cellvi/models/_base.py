"""What every cellvi model shares: the AnnData edge, ``fit`` orchestration, latents and safe
persistence.

A model is made from an AnnData (its constructor validates the data and turns it into
arrays once); ``fit`` trains on those arrays and then releases them; ``transform`` and
``get_latent`` read any AnnData with the same features. ``__init__`` and :meth:`Model.load`
both set the model's state through one method, :meth:`Model._setup`, so nothing a
constructor sets can be missing after a load.

Persistence is safe by construction (``_persist.py``): weights go to ``model.safetensors`` and
everything else (settings, feature names, batch categories, version, history) to
``config.json``. Nothing is pickled; loading cannot run code, and validates the folder before
building anything.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import math
import numbers
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

from .. import distributed
from .._settings import deterministic_block, resolve_device, seeded
from ..checkpoint import Checkpointer
from ..data import as_batch_keys, check_var_names, encode_covariates
from ..device import DeviceData
from ..errors import InvalidInputError, InvalidTypeError, MissingKeyError
from ..inference import elbo_per_cell, iwae_per_cell, refine
from ..objectives import ELBO, as_objective
from ..posteriors import POSTERIORS, GaussianEncoder, IAFEncoder
from ..train import TrainConfig
from ..vae import VAE
from ._persist import (
    CONFIG,
    WEIGHTS,
    check_settings,
    check_shapes,
    header_shapes,
    read_config,
    save_folder,
)

__all__ = ["Model", "boolean", "check_seed", "check_trainable", "positive_int", "MIN_CELLS"]
#: the keyword arguments of ``fit`` that go to :class:`cellvi.train.TrainConfig`
TRAIN_KEYS = tuple(f for f in TrainConfig.__dataclass_fields__ if f not in ("seed", "verbose", "desc"))


def check_seed(seed) -> int:
    """``seed`` as a non-negative int, or a clear error."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidTypeError(f"seed must be a non-negative integer (e.g. seed=0), got {seed!r}")
    return int(seed)


#: fewer cells than this cannot train a model (mini-batches and BatchNorm need several)
MIN_CELLS = 10


def check_trainable(n_obs: int) -> None:
    if n_obs < MIN_CELLS:
        raise InvalidInputError(
            f"adata has {n_obs} cells, too few to train a model (cellvi needs at least "
            f"{MIN_CELLS}); a trained model can still transform such small samples")


def positive_int(name: str, value) -> int:
    """``value`` as a positive int, or a clear error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def penalty_groups_setting(value, batch_penalty: float, default: int = 0) -> int:
    """The groups ``fit``'s batch penalty aligns within (``penalty_groups``): ``default`` for
    ``None``, ``0`` (none) without a penalty, else checked as a positive int."""
    value = default if value is None else value
    value = positive_int("penalty_groups", value) if value else 0
    return value if batch_penalty else 0


def boolean(name: str, value) -> bool:
    """``value`` as a bool (numpy booleans too), or a clear error naming the setting."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def deterministic(method):
    """Run a model method inside :func:`cellvi._settings.deterministic_block`."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with deterministic_block():
            return method(*args, **kwargs)
    return wrapper


def _check_posterior(posterior: str, n_flows) -> tuple[str, int]:
    if posterior not in POSTERIORS:
        raise InvalidInputError(f"posterior must be one of {list(POSTERIORS)}, got {posterior!r}")
    return posterior, positive_int("n_flows", n_flows)


def make_encoder(n_in: int, s: dict[str, Any], n_cats: list[int]) -> GaussianEncoder:
    """The encoder of a model's settings ``s`` (``posterior``: diagonal Gaussian or IAF)."""
    if not s.get("encode_batch", True):  # the batch enters the decoder only (as scVI)
        n_cats = []
    kwargs = dict(n_hidden=s["n_hidden"], n_layers=s["n_layers"], n_cats_per_cov=n_cats,
                  dropout=s["dropout"], norm=s["norm"])
    if s.get("posterior", "normal") == "iaf":
        return IAFEncoder(n_in, s["n_latent"], n_flows=s.get("n_flows", 2), **kwargs)
    return GaussianEncoder(n_in, s["n_latent"], **kwargs)


class Model(ABC):
    """The shared base of :class:`cellvi.models.NBVAE` and :class:`cellvi.models.GMVAE`.

    Subclasses define :meth:`_build` (the :class:`cellvi.vae.VAE` module for their settings),
    :meth:`_prepare` (AnnData -> validated arrays, for a trained model's features),
    :meth:`_to_device` (arrays -> :class:`cellvi.device.DeviceData`), ``fit`` and
    ``transform``.
    """

    #: keys of ``config.json`` beyond the common ones, restored as attributes by :meth:`load`
    _extra_state: tuple[str, ...] = ()
    #: defaults of extra state that older versions did not save
    _state_defaults: dict[str, Any] = {}

    def _setup(self, settings: dict[str, Any], var_names: list[str],
               categories: dict[str, list[str]], data=None, **state: Any) -> None:
        """Set every attribute of the model: called by ``__init__`` and by :meth:`load`."""
        self.settings = settings
        self.var_names = list(var_names)
        self.categories = categories
        self.history: dict[str, list] = state.pop("history", {})
        self.train_settings: dict[str, Any] = state.pop("train_settings", {})
        for key in self._extra_state:
            if key in state:
                setattr(self, key, state[key])
            elif key in self._state_defaults:
                setattr(self, key, copy.deepcopy(self._state_defaults[key]))
            else:
                raise InvalidInputError(f"the saved model lacks {key!r}; it was not written by cellvi's save()")
        self.device = torch.device("cpu")
        self._data = data
        self.module = self._build()

    # -- what a model defines -------------------------------------------------------------
    @abstractmethod
    def _build(self, seed: int = 0) -> VAE:
        """The tensor-level module for ``self.settings`` (weights seeded by ``seed``)."""

    @abstractmethod
    def _prepare(self, adata: AnnData):
        """Arrays of ``adata`` for this model's features and batch categories."""

    @abstractmethod
    def _to_device(self, arrays, device: torch.device) -> DeviceData:
        """The arrays of :meth:`_prepare` as device-resident tensors."""

    @abstractmethod
    def transform(self, adata: AnnData):
        """The model's outputs for the cells of ``adata``."""

    def _check_features(self, adata: AnnData) -> None:
        check_var_names(adata, self.var_names)

    # -- state --------------------------------------------------------------------------
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

    def _state(self) -> str:
        return f"trained {len(self.history.get('epoch', []))} epochs" if self.is_trained else "untrained"

    # -- fit orchestration --------------------------------------------------------------
    def _start_fit(self, seed, device) -> tuple[Any, DeviceData, int]:
        """Check the seed, build a fresh module on the device: ``(arrays, device data, seed)``."""
        arrays = self._require_data()
        seed = check_seed(seed)
        dev = distributed.setup(resolve_device(device))  # joins torchrun's group, if any
        self.device = dev
        self.module = self._build(seed).to(dev)
        return arrays, self._to_device(arrays, dev), seed

    def _checkpointer(self, directory, every: int, resume: bool, data: DeviceData, seed: int,
                      config: TrainConfig, **extra: Any) -> Checkpointer | None:
        """A :class:`cellvi.checkpoint.Checkpointer` whose fingerprint ties it to this
        model's settings, features, data size, seed and training settings."""
        if directory is None:
            if resume:
                raise InvalidInputError("resume=True needs checkpoint_dir=<the folder of the "
                                        "checkpoints to continue from>")
            return None
        names = hashlib.sha256("\n".join(self.var_names).encode()).hexdigest()[:16]
        train = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("verbose", "desc")}
        fingerprint = dict(model=type(self).__name__, settings=self.settings, var_names=names,
                           n_obs=data.n_obs, seed=seed, train=train, **extra)
        return Checkpointer(directory, every, bool(resume), fingerprint=fingerprint)

    def _objective(self, objective, batch_penalty) -> ELBO:
        """The training objective (:func:`cellvi.objectives.as_objective`), with the latent
        batch penalty ``batch_penalty`` (checked: a finite number >= 0, and > 0 only for a
        model built with ``batch_key``)."""
        objective = as_objective(objective)
        if isinstance(batch_penalty, bool) or not (isinstance(batch_penalty, numbers.Real)
                                                   and math.isfinite(batch_penalty)
                                                   and batch_penalty >= 0):
            raise InvalidInputError(f"batch_penalty must be a non-negative number, got "
                                    f"{batch_penalty!r}")
        if batch_penalty and not self.settings["batch_keys"]:
            raise InvalidInputError("batch_penalty needs a model built with batch_key=...; "
                                    "without batches there is nothing to penalise")
        if batch_penalty:
            objective = dataclasses.replace(objective, batch_penalty=float(batch_penalty))
        return objective

    def _train_config(self, *, seed: int, verbose: bool, **kwargs: Any) -> TrainConfig:
        unknown = sorted(set(kwargs) - set(TRAIN_KEYS))
        if unknown:
            raise InvalidTypeError(f"unknown training setting(s) {unknown}; the settings are "
                            f"{list(TRAIN_KEYS)}")
        return TrainConfig(seed=seed, verbose=verbose, desc=type(self).__name__, **kwargs)

    def _finish_fit(self, **train_settings: Any) -> None:
        self.train_settings = dict(train_settings, epochs_trained=len(self.history["epoch"]))
        self._data = None  # the arrays are not needed any more

    # -- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, data: DeviceData, idx: torch.Tensor | None = None, *,
                batch_size: int = 4096, mean: bool = True, seed: int = 0,
                with_var: bool = False):
        """Posterior means (or one sample) of ``q(z|x)`` for the cells ``idx`` (default all),
        and with ``with_var`` the posterior variances."""
        self.module.eval()
        idx = torch.arange(data.n_obs) if idx is None else idx
        means, variances = [], []
        with seeded(seed, self.device):
            for batch in data.iter_batches(idx, batch_size):
                qz = self.module.encode(batch)
                means.append((qz.mean if mean else qz.sample()).cpu())
                if with_var:
                    variances.append(qz.variance.cpu())
        z = torch.cat(means).numpy().astype(np.float32)
        return (z, torch.cat(variances).numpy()) if with_var else z

    def _refined(self, batch, refine_steps: int):
        """The posterior of a batch: the encoder's, or refined per cell (``refine_steps``)."""
        if refine_steps:
            return refine(self.module, batch, positive_int("refine_steps", refine_steps))
        with torch.no_grad():
            return self.module.encode(batch)

    def _per_cell(self, adata: AnnData, fn, *, seed: int, batch_size: int) -> np.ndarray:
        """``fn(batch)`` for every mini-batch of the cells of ``adata``, concatenated. In a
        data-parallel run (:mod:`cellvi.distributed`) each process computes its contiguous
        share of the cells and every process gets all of them back."""
        self._require_trained()
        data = self._to_device(self._prepare(adata), self.device)
        self.module.eval()
        idx = torch.arange(data.n_obs)
        split = distributed.active() and data.n_obs >= distributed.world()[1]
        out = []
        with seeded(check_seed(seed), self.device):
            for batch in data.iter_batches(distributed.shard(idx) if split else idx, batch_size):
                out.append(fn(batch).detach().cpu())
        out = torch.cat(out)
        return (distributed.gather_rows(out, data.n_obs) if split else out).numpy()

    @deterministic
    def get_latent(self, adata: AnnData, *, mean: bool = True, seed: int = 0,
                   batch_size: int = 4096, refine_steps: int = 0) -> np.ndarray:
        """Latent representation of the cells of ``adata``.

        Args:
            mean: posterior means (default) or one sample from q(z|x).
            seed: seed of the sample when ``mean=False`` (and of the refinement).
            batch_size: cells per forward pass.
            refine_steps: semi-amortized inference: start from the encoder's q(z|x) and take
                this many gradient steps on each cell's own ELBO (:func:`cellvi.inference.refine`).

        Returns:
            ``float32`` array, cells x ``n_latent``.
        """
        if not refine_steps:
            self._require_trained()
            data = self._to_device(self._prepare(adata), self.device)
            return self._encode(data, batch_size=batch_size, mean=mean, seed=check_seed(seed))

        def fn(batch):
            q = self._refined(batch, refine_steps)
            return q.mean if mean else q.sample()
        return self._per_cell(adata, fn, seed=seed, batch_size=batch_size).astype(np.float32)

    @deterministic
    def latent_and_elbo(self, adata: AnnData, *, n_samples: int = 16, seed: int = 0,
                        batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`get_latent` (posterior means) and :meth:`elbo` of every cell in one pass
        over the data: one preparation of ``adata`` and one encoder pass instead of two (what
        ``tl.nbvae`` writes; 1M cells: about 8 s less with 2 threads). The ELBO equals
        :meth:`elbo` with the same ``n_samples``, ``seed`` and ``batch_size``.

        Returns:
            ``(latent, elbo)``: ``float32``, cells x ``n_latent`` and one value per cell.
        """
        n_samples = positive_int("n_samples", n_samples)

        def fn(batch):
            qz = self._refined(batch, 0)
            return torch.cat([qz.mean, elbo_per_cell(self.module, batch, qz, n_samples)[:, None]], 1)
        out = self._per_cell(adata, fn, seed=seed, batch_size=batch_size)
        return out[:, :-1].astype(np.float32), out[:, -1].astype(np.float32)

    @deterministic
    def elbo(self, adata: AnnData, *, refine_steps: int = 0, n_samples: int = 16, seed: int = 0,
             batch_size: int = 1024) -> np.ndarray:
        """The ELBO of each cell (nats), ``E_q[log p(x|z)] - KL(q(z|x) || p(z))``, Monte Carlo
        over ``n_samples`` samples; with ``refine_steps``, of the per-cell refined posterior.

        Returns:
            ``float32`` array, one value per cell.
        """
        n_samples = positive_int("n_samples", n_samples)
        return self._per_cell(
            adata, lambda b: elbo_per_cell(self.module, b, self._refined(b, refine_steps), n_samples),
            seed=seed, batch_size=batch_size).astype(np.float32)

    @deterministic
    def marginal_log_likelihood(self, adata: AnnData, *, n_samples: int = 1000,
                                refine_steps: int = 0, seed: int = 0,
                                batch_size: int = 256) -> np.ndarray:
        """``log p(x)`` of each cell (nats), estimated by the importance-weighted bound with
        ``n_samples`` samples of q(z|x) (refined first with ``refine_steps``) and the model's
        actual prior (for the GMVAE the mixture, clusters summed out). A lower bound that
        rises with ``n_samples``.

        Returns:
            ``float32`` array, one value per cell.
        """
        n_samples = positive_int("n_samples", n_samples)
        return self._per_cell(
            adata, lambda b: iwae_per_cell(self.module, b, n_samples, self._refined(b, refine_steps)),
            seed=seed, batch_size=batch_size).astype(np.float32)

    # -- generative side ----------------------------------------------------------------
    def _to_input_units(self, x: np.ndarray) -> np.ndarray:
        """Model-space values in the units of the input (the GMVAE standardises markers)."""
        return x

    def _prior_sample(self, n: int, cluster) -> torch.Tensor:
        if cluster is not None:
            raise InvalidInputError("cluster= needs a clustering model (GMVAE)")
        return self.module.prior().sample((n,))

    @deterministic
    def posterior_predictive(self, adata: AnnData, *, n_samples: int = 1, seed: int = 0,
                             batch_size: int = 1024) -> np.ndarray:
        """Replicated data for the cells of ``adata``: ``z ~ q(z|x)``, then ``x_rep ~
        p(x|z, s)`` with each cell's own batch (and library size), in the input's units.

        Returns:
            ``float32`` array, ``n_samples`` x cells x features (dense: subsample large data).
        """
        n_samples = positive_int("n_samples", n_samples)

        def fn(batch):
            with torch.no_grad():
                z = self.module.encode(batch).sample((n_samples,))
                return self.module.decode(z, batch).sample().transpose(0, 1)
        out = self._per_cell(adata, fn, seed=seed, batch_size=batch_size).transpose(1, 0, 2)
        return self._to_input_units(out).astype(np.float32)

    @deterministic
    def sample(self, n: int, *, batch: str | dict[str, str] | None = None, cluster=None,
               library_size: float = 1e4, seed: int = 0) -> np.ndarray:
        """``n`` new cells from the generative model: ``z`` from the prior (for the GMVAE
        from cluster ``cluster``'s component when given), ``x ~ p(x|z, s)`` for batch
        category ``batch`` (of the first batch key, or ``{key: category}``), with
        ``library_size`` total counts for count models.

        Returns:
            ``float32`` array, ``n`` x features, in the input's units.
        """
        self._require_trained()
        n = positive_int("n", n)
        keys = self.settings["batch_keys"]
        if keys and batch is None:
            raise InvalidInputError(f"the model was trained with batch keys {keys}: pass "
                                    f"batch=<a category of {keys[0]!r}> (or a dict per key)")
        if not library_size > 0:
            raise InvalidInputError(f"library_size must be positive, got {library_size!r}")
        self.module.eval()
        with torch.no_grad(), seeded(check_seed(seed), self.device):
            fake = {"x": torch.zeros(n, len(self.var_names), device=self.device),
                    "log_library": torch.full((n, 1), math.log(library_size), device=self.device)}
            if keys:
                codes = self._batch_codes(batch)
                fake["covs"] = torch.tensor([codes] * n, dtype=torch.long, device=self.device)
            z = self._prior_sample(n, cluster)
            x = self.module.decode(z, fake).sample().cpu().numpy()
        return self._to_input_units(x).astype(np.float32)

    def _batch_codes(self, batch) -> list[int]:
        keys = self.settings["batch_keys"]
        wanted = batch if isinstance(batch, dict) else {keys[0]: batch}
        codes = []
        for key in keys:
            if key not in wanted:
                raise MissingKeyError(f"batch= gives no category for batch key {key!r}")
            cats = self.categories[key]
            if str(wanted[key]) not in cats:
                raise InvalidInputError(f"{wanted[key]!r} is not a category of {key!r} ({cats})")
            codes.append(cats.index(str(wanted[key])))
        return codes

    # -- persistence --------------------------------------------------------------------
    #: name -> (check, default) of every setting (``...``: required); see ``_persist.py``
    _schema: dict[str, tuple[Any, Any]] = {}

    def _check_saved(self, config: dict[str, Any], where: str) -> None:
        """Check the extra state of a saved config (subclasses; after the settings)."""
        return None

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save weights (safetensors) and settings/features/categories (JSON) to folder ``path``."""
        self._require_trained()
        config = dict(model=type(self).__name__, settings=self.settings,
                      train_settings=self.train_settings, var_names=self.var_names,
                      categories=self.categories, history=self.history,
                      **{k: getattr(self, k) for k in self._extra_state})
        save_folder(Path(path), self.module.state_dict(), config, overwrite)

    @classmethod
    def load(cls, path: str | Path, adata: AnnData | None = None, *,
             device: str | torch.device = "auto"):
        """Load a model saved with :meth:`save`.

        Everything is checked before the model is built: the folder's files, every field of
        ``config.json`` (required fields, sane bounds) and the shapes in the weights' header
        against the settings; a damaged or tampered folder raises
        :class:`cellvi.errors.ModelFileError` and allocates nothing large.

        Args:
            adata: if given, checked against the model's features and batch categories
                (a clear error says which differ).
            device: where the module goes (``"auto"``: CUDA, then MPS, then CPU).
        """
        from safetensors.torch import load_file

        path = Path(path)
        config = read_config(path, cls.__name__)
        where = str(path / CONFIG)
        settings = check_settings(config, cls._schema, where)
        self = cls.__new__(cls)
        self._check_saved(config, where)
        extra = {k: config[k] for k in (*cls._extra_state, "history", "train_settings") if k in config}
        with torch.device("meta"):  # shapes only: no memory, whatever the settings ask for
            self._setup(settings, config["var_names"], config["categories"], **extra)
        expected = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        check_shapes(expected, header_shapes(path / WEIGHTS), path / WEIGHTS)
        self.module = self._build()
        self.module.load_state_dict(load_file(str(path / WEIGHTS)))
        self.device = resolve_device(device)
        self.module.to(self.device).eval()
        if adata is not None:
            self._check_features(adata)
            encode_covariates(adata, as_batch_keys(self.settings["batch_keys"]), self.categories)
        return self
