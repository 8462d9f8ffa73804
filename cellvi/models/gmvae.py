"""The Gaussian-mixture-prior VAE for cytometry (:class:`GMVAE`) and its training plan.

Training runs as four named phases, each a short function of one :class:`_Run`:

1. :func:`warm_up`: the VAE with a fixed ``N(0, I)`` prior (an objective setting, the
   mixture is left alone) and a small KL weight, so the latent takes shape first;
2. :func:`initialise`: a GMM on the standardised markers (or the warm-up latent) groups the
   cells; each component starts at its group's latent moments;
3. :func:`fit_mixture`: the full model, with an M-step for ``π`` and pruning after each epoch;
4. :func:`merge_and_tune`: components that share their cells become one cluster (unless the
   two are two modes in the markers), followed by a short fine-tune; repeated while merges
   happen.

The budgets of the phases are one frozen :class:`GMVAESchedule`, which ``fit`` accepts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._settings import seeded
from ..clustering import group_moments, merge_components
from ..data import ContinuousData, check_finite, prepare_continuous, select_markers
from ..decoders import ContinuousDecoder
from ..device import DeviceData, DeviceMatrix
from ..objectives import ELBO, Constant
from ..posteriors import GaussianEncoder
from ..priors import MixturePrior, StandardNormal
from ..train import TrainConfig, default_max_epochs, train
from ..vae import MixtureVAE
from ._base import Model, positive_int

logger = logging.getLogger("cellvi")

__all__ = ["GMVAE", "GMVAEOutput", "GMVAESchedule", "DISCOVERY_COMPONENTS"]

#: ``n_components=None`` (population discovery) starts from this many components
DISCOVERY_COMPONENTS = 30


@dataclass(frozen=True)
class GMVAESchedule:
    """Budgets of the GMVAE's training phases (the defaults and their evidence:
    ``docs/design.md``, GMVAE training schedule).

    Args:
        warmup_steps: optimiser steps of the ``N(0, I)`` warm-up ...
        warmup_epochs: ... as epochs, within these bounds.
        mixture_steps: optimiser steps of the mixture phase ...
        mixture_epochs: ... as epochs, within these bounds.
        init_cells: cells (at most) of the GMM that places the components.
        probe_cells: cells (at most) whose responsibilities update ``π`` and decide merges.
        merge_rounds: merge + fine-tune rounds at most (a round only runs when it merges).
        tune_divisor, tune_min_epochs: a fine-tune runs the mixture phase's epochs
            ``// tune_divisor``, at least ``tune_min_epochs``.
    """

    warmup_steps: int = 300
    warmup_epochs: tuple[int, int] = (5, 60)
    mixture_steps: int = 1000
    mixture_epochs: tuple[int, int] = (25, 300)
    init_cells: int = 20000
    probe_cells: int = 20000
    merge_rounds: int = 3
    tune_divisor: int = 3
    tune_min_epochs: int = 5

    def __post_init__(self):
        for name in ("warmup_steps", "mixture_steps", "init_cells", "probe_cells",
                     "tune_divisor", "tune_min_epochs"):
            positive_int(f"GMVAESchedule.{name}", getattr(self, name))
        if not (isinstance(self.merge_rounds, int) and self.merge_rounds >= 0):
            raise ValueError(f"GMVAESchedule.merge_rounds must be >= 0, got {self.merge_rounds!r}")
        for name in ("warmup_epochs", "mixture_epochs"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"GMVAESchedule.{name} must be (low, high) with 1 <= low <= high")

    def replace(self, **changes) -> GMVAESchedule:
        return dataclasses.replace(self, **changes)

    def epochs(self, n_obs: int, batch_size: int, warmup_epochs: int | None,
               max_epochs: int | None) -> tuple[int, int]:
        """Epochs of the warm-up and of the mixture phase, unless given."""
        if warmup_epochs is None:
            warmup_epochs = default_max_epochs(n_obs, batch_size, target_steps=self.warmup_steps,
                                               bounds=self.warmup_epochs)
            if max_epochs is not None:  # a short run asked for: a short warm-up too
                warmup_epochs = min(warmup_epochs, max(1, max_epochs))
        if max_epochs is None:
            max_epochs = default_max_epochs(n_obs, batch_size, target_steps=self.mixture_steps,
                                            bounds=self.mixture_epochs)
        return warmup_epochs, max_epochs


@dataclass
class GMVAEOutput:
    """What :meth:`GMVAE.transform` gives for each cell.

    Attributes:
        latent: ``float32`` cells x ``n_latent`` posterior means.
        labels: categorical of ``"0"``, ``"1"``, ... (clusters ordered by size on the
            training cells).
        probs: ``float32`` cells x clusters, ``q(c | x)``, columns in label order.
    """

    latent: np.ndarray
    labels: pd.Categorical
    probs: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        """The largest cluster probability of each cell."""
        return self.probs.max(1).astype(np.float32)


@dataclass
class _Run:
    """What the phases of one fit share."""

    model: GMVAE
    arrays: ContinuousData
    data: DeviceData
    config: TrainConfig
    schedule: GMVAESchedule
    rng: np.random.Generator
    callbacks: Sequence = ()
    n_active: list[int] = field(default_factory=list)
    probe: torch.Tensor | None = None

    @property
    def mixture(self) -> MixturePrior:
        return self.model.module.prior

    def train(self, objective: ELBO | None = None, with_mixture_step: bool = True, **changes):
        callbacks = [self.mixture_step] if with_mixture_step else []
        return train(self.model.module, self.data, self.config.replace(**changes),
                     objective=objective, callbacks=[*callbacks, *self.callbacks])

    def mixture_step(self, epoch: int, history: dict) -> None:
        """After each epoch: M-step for ``π`` on the probe's responsibilities (Dirichlet MAP),
        then pruning of components that fell below the threshold."""
        s, mixture = self.model.settings, self.mixture
        mass = self.model._responsibilities(self.data, self.probe).sum(0)
        mixture.update_weights(torch.as_tensor(mass), min_weight=0.0 if s["prune"] else 1e-3)
        self.model.module.train()
        if s["prune"]:
            dropped = mixture.prune(s["prune_threshold"])
            if dropped:
                logger.info("epoch %d: pruned components %s, %d left", epoch, dropped,
                            mixture.n_active)
        self.n_active.append(mixture.n_active)


def warm_up(run: _Run, epochs: int, beta: float) -> dict:
    """Phase 1: train with a fixed ``N(0, I)`` prior and KL weight ``beta`` (no early stop)."""
    standard = StandardNormal(run.model.settings["n_latent"]).to(run.model.device)
    return run.train(ELBO(beta=Constant(beta), prior=standard), with_mixture_step=False,
                     max_epochs=epochs, early_stopping=False,
                     desc=f"{run.config.desc} warm-up")


def initialise(run: _Run, init: str, n_init: int) -> np.ndarray:
    """Phase 2: a GMM groups the cells of a random subsample (markers or warm-up latent); each
    component starts at its group's latent moments. Returns the subsample's indices."""
    from sklearn.mixture import GaussianMixture

    n_obs, k = run.data.n_obs, run.model.settings["n_start"]
    sub = np.sort(run.rng.choice(n_obs, size=min(n_obs, run.schedule.init_cells), replace=False))
    z, zvar = run.model._encode(run.data, torch.as_tensor(sub), with_var=True)
    space = run.model._standardize(run.arrays.X[sub]) if init == "markers" else z
    labels = GaussianMixture(k, covariance_type="full", reg_covar=1e-3, random_state=run.config.seed,
                             n_init=n_init, max_iter=200).fit_predict(space)
    run.mixture.init_from(*group_moments(z, labels, k, zvar))
    return sub


def fit_mixture(run: _Run, sub: np.ndarray, epochs: int) -> dict:
    """Phase 3: the full model on a random probe (a subset of ``sub``: the file's first cells
    could be one batch only) for the ``π`` M-step and the merges."""
    size = min(len(sub), run.schedule.probe_cells)
    run.probe = torch.as_tensor(np.sort(run.rng.choice(sub, size=size, replace=False)))
    return run.train(max_epochs=epochs)


def merge_and_tune(run: _Run, epochs: int) -> list[tuple[str, dict]]:
    """Phase 4: merge components that share their cells into clusters (K given: down to
    exactly K), one component per cluster, then fine-tune; again while merges happen."""
    model, s, mixture = run.model, run.model.settings, run.mixture
    may_merge = s["n_start"] > s["n_components"] or (s["discover"] and s["merge_threshold"])
    features = model._marker_features(run.arrays, run.probe.numpy()) if may_merge else None
    model.merges, phases = [], []
    for merge_round in range(run.schedule.merge_rounds if may_merge else 0):
        probs = model._responsibilities(run.data, run.probe)
        record: list[dict[str, Any]] = []
        groups = merge_components(probs, s["merge_threshold"], record=record,
                                  n_groups=None if s["discover"] else s["n_components"],
                                  features=features, seed=run.config.seed)
        if len(groups) >= mixture.n_active:
            break
        model.merges += [dict(round=merge_round, **r) for r in record]
        logger.info("merging %d components into %d clusters", mixture.n_active, len(groups))
        _place_groups(run, probs, groups)
        tune_epochs = max(run.schedule.tune_min_epochs, epochs // run.schedule.tune_divisor)
        phases.append(("merged", run.train(max_epochs=tune_epochs,
                                           seed=run.config.seed + 1 + merge_round,
                                           desc=f"{run.config.desc} merged")))
    return phases


def _place_groups(run: _Run, probs: np.ndarray, groups: list[list[int]]) -> None:
    """One component per group, at the latent moments of the probe cells whose most likely
    component is in the group; the components left over are switched off."""
    mixture = run.mixture
    k, n = probs.shape[1], len(groups)
    z, zvar = run.model._encode(run.data, run.probe, with_var=True)
    lut = np.full(k, -1)
    for gi, members in enumerate(groups):
        lut[members] = gi
    w, mu, sd = group_moments(z, lut[probs.argmax(1)], n, zvar)
    mixture.init_from(np.r_[w, np.zeros(k - n)], np.r_[mu, np.zeros((k - n, mu.shape[1]))],
                      np.r_[sd, np.ones((k - n, mu.shape[1]))])
    mixture.active[n:] = False


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


class GMVAE(Model):
    """Gaussian-mixture-prior VAE for cytometry: population discovery with batch correction.

    The model: ``p(c) = Cat(π)``, ``p(z | c) = N(μ_c, diag σ_c²)``, ``p(x | z, s) =
    N(μ_θ(z, s), diag σ_θ²(z, s))`` (or Student-t), with an amortized ``q(z | x, s)`` and the
    cluster posterior ``q(c | x)`` given by the prior's responsibilities at the encoded ``z``
    (VaDE; ``c`` is summed out exactly in the ELBO). The batch ``s`` enters encoder and
    decoder, so clusters are shared across batches and the latent is batch-corrected.
    Markers are standardised (per-marker centre and scale of the training data, stored with
    the model) before they enter the network. Training runs in four phases (this module's
    docstring); the evidence behind each default is in ``docs/design.md``.

    Args:
        adata: cells x channels with **transformed** marker values (arcsinh / logicle).
        layer: layer to read (``None``: ``adata.X``).
        markers: channels to use (default all); leave out scatter, time and unused channels.
        batch_key: obs key(s) of categorical batch covariates (e.g. sample or batch).
        n_components: ``None`` to discover the number of populations (from
            ``DISCOVERY_COMPONENTS`` components, pruned and merged), or exactly ``K`` clusters.
        n_latent: latent dimension.
        likelihood: ``"normal"`` or ``"studentt"`` (robust to outliers).
        prune: prune small components (default: only when ``n_components=None``).
        sparsity: sparse Dirichlet strength (:class:`cellvi.priors.MixturePrior`); default
            ``0.005`` when pruning (a component needs about 0.5% of the cells to survive).
        prune_threshold: weight below which a component is switched off (default ``0.002``).
        merge_threshold: entropy drop per cell above which two components are merged
            (:func:`cellvi.clustering.merge_components`); ``0`` disables merging in discovery.
            0.125 balances joining neighbouring populations against splitting one.
        overcluster: with ``n_components=K``, train about ``3K`` components (at most 30) and
            merge them down to ``K`` (better optima than starting from ``K``).
        n_hidden, n_layers, dropout, norm: network settings.

    Example:
        >>> model = cellvi.models.GMVAE(adata, layer="logicle", markers=markers)
        >>> model.fit()
        >>> out = model.transform(other_sample)  # latent, labels, probs
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
        n_latent, n_hidden = positive_int("n_latent", n_latent), positive_int("n_hidden", n_hidden)
        n_layers = positive_int("n_layers", n_layers)
        data = prepare_continuous(adata, layer, batch_key, markers=markers)
        k, n_start = _n_components(n_components, data.X.shape[0], overcluster)
        prune = (n_components is None) if prune is None else bool(prune)
        if sparsity is None and prune:
            sparsity = 0.005
        settings: dict[str, Any] = dict(
            layer=layer, batch_keys=data.batch_keys, n_components=k, n_start=n_start,
            discover=n_components is None, n_latent=n_latent, likelihood=likelihood,
            prune=prune, sparsity=sparsity,
            prune_threshold=float(0.002 if prune_threshold is None else prune_threshold),
            merge_threshold=float(merge_threshold),
            n_hidden=n_hidden, n_layers=n_layers, dropout=float(dropout), norm=norm,
        )
        self._setup(settings, data.var_names, data.categories, data,
                    center=data.X.mean(0).astype(float).tolist(),
                    scale=data.X.std(0).astype(float).tolist(), cluster_order=[], merges=[])

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

    def _to_device(self, d: ContinuousData, device: torch.device) -> DeviceData:
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
        schedule: GMVAESchedule | None = None,
        batch_size: int = 512,
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device = "auto",
        verbose: bool = True,
        callbacks: Sequence = (),
        **train_kwargs: Any,
    ) -> GMVAE:
        """Train in four phases: warm-up, initialisation, mixture, merge-and-tune.

        Args:
            max_epochs: epochs of the mixture phase (``None``: from ``schedule``, about
                1,000 steps within 25..300 epochs); early stopping usually ends sooner.
            warmup_epochs: epochs of the warm-up (``None``: from ``schedule``, at most
                ``max_epochs``).
            warmup_beta: KL weight during the warm-up (small: a spread-out latent to cluster).
            init: fit the initial GMM to the standardised ``"markers"`` (default: finds small
                populations better) or to the warm-up ``"latent"``.
            n_init: restarts of that GMM.
            schedule: the phases' budgets (:class:`GMVAESchedule`; default when ``None``).
            batch_size, lr, seed, device, verbose, callbacks: as in :meth:`NBVAE.fit`; the
                callbacks run after each epoch of every phase, after the model's own.
            **train_kwargs: further fields of :class:`cellvi.train.TrainConfig`.
        """
        if init not in ("latent", "markers"):
            raise ValueError(f"init must be 'latent' or 'markers', got {init!r}")
        n_init = positive_int("n_init", n_init)
        schedule = schedule or GMVAESchedule()
        if not isinstance(schedule, GMVAESchedule):
            raise TypeError(f"schedule must be a cellvi.models.GMVAESchedule, got {type(schedule).__name__}")
        arrays, data, seed = self._start_fit(seed, device)
        train_kwargs.setdefault("kl_warmup_steps", 0)  # the warm-up phase did that job
        config = self._train_config(seed=seed, verbose=verbose, batch_size=batch_size, lr=lr,
                                    **train_kwargs)
        warmup_epochs, max_epochs = schedule.epochs(data.n_obs, config.batch_size,
                                                    warmup_epochs, max_epochs)
        run = _Run(self, arrays, data, config.replace(max_epochs=max_epochs), schedule,
                   np.random.default_rng(seed), tuple(callbacks))
        phases = [("warmup", warm_up(run, warmup_epochs, warmup_beta))]
        sub = initialise(run, init, n_init)
        phases.append(("mixture", fit_mixture(run, sub, max_epochs)))
        phases += merge_and_tune(run, max_epochs)
        n_warm = len(phases[0][1]["epoch"])
        self.history = _join_histories(phases, [self.settings["n_start"]] * n_warm + run.n_active)
        self.settings["n_clusters"] = run.mixture.n_active
        self._order_clusters(data)
        self._finish_fit(max_epochs=max_epochs, warmup_epochs=warmup_epochs,
                         warmup_beta=warmup_beta, init=init, n_init=n_init,
                         schedule=dataclasses.asdict(schedule), batch_size=batch_size, lr=lr,
                         seed=seed, device=str(self.device), **train_kwargs)
        return self

    def _order_clusters(self, data: DeviceData) -> None:
        """Labels ``"0"``, ``"1"``, ... by cluster size on the training cells."""
        probs = self._responsibilities(data, torch.arange(data.n_obs))
        sizes = np.bincount(probs.argmax(1), minlength=probs.shape[1])
        active = self.module.prior.active.cpu().numpy()
        self.cluster_order = [int(c) for c in sorted(np.flatnonzero(active), key=lambda c: -sizes[c])]

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

    def transform(self, adata: AnnData, *, batch_size: int = 4096) -> GMVAEOutput:
        """Latent, cluster labels and probabilities for the cells of ``adata`` (the training
        data or another sample measured with the same panel and known batch categories)."""
        self._require_trained()
        data = self._to_device(self._prepare(adata), self.device)
        latent = self._encode(data, batch_size=batch_size)
        probs = self._responsibilities(data, torch.arange(data.n_obs), batch_size)
        probs = probs[:, self.cluster_order].astype(np.float32)
        probs /= probs.sum(1, keepdims=True)
        categories = [str(i) for i in range(len(self.cluster_order))]
        labels = pd.Categorical.from_codes(probs.argmax(1), categories=categories)
        return GMVAEOutput(latent, labels, probs)

    def predict(self, adata: AnnData, *, batch_size: int = 4096) -> tuple[pd.Categorical, np.ndarray]:
        """``(labels, probs)`` of :meth:`transform`."""
        out = self.transform(adata, batch_size=batch_size)
        return out.labels, out.probs

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


def _n_components(n_components: int | None, n_obs: int, overcluster: bool) -> tuple[int, int]:
    """``(K, components to start from)``."""
    if n_components is None:  # discovery: an upper bound, pruned and merged down
        k = min(DISCOVERY_COMPONENTS, max(1, n_obs // 20))
        return k, k
    k = positive_int("n_components", n_components)
    if k > n_obs:
        raise ValueError(
            f"n_components={n_components} is larger than the number of cells ({n_obs}); "
            "use fewer components, or n_components=None to let the model find them"
        )
    if not overcluster:
        return k, k
    return k, max(k, min(max(3 * k, k + 4), DISCOVERY_COMPONENTS, n_obs // 20))
