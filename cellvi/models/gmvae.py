"""The Gaussian-mixture-prior VAE for cytometry (:class:`GMVAE`).

Its training runs as four named phases (warm-up, initialisation, mixture, merge-and-tune),
short functions in ``_gmvae_phases.py`` whose budgets are one frozen :class:`GMVAESchedule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._settings import seeded
from ..clustering import batch_balanced_groups
from ..data import ContinuousData, check_finite, prepare_continuous, select_markers
from ..decoders import ContinuousDecoder
from ..device import DeviceData, DeviceMatrix
from ..errors import InvalidInputError, InvalidTypeError, ModelFileError
from ..inference import elbo_per_cell
from ..objectives import ELBO
from ..posteriors import POSTERIORS
from ..priors import MixturePrior
from ..vae import MixtureVAE
from ._base import (
    Model,
    _check_posterior,
    check_trainable,
    deterministic,
    make_encoder,
    penalty_groups_setting,
    positive_int,
)
from ._gmvae_phases import (
    GMVAESchedule,
    _join_histories,
    _Run,
    fit_mixture,
    initialise,
    merge_and_tune,
    warm_up,
)
from ._persist import choice, flag, integer, number, text, texts

__all__ = ["GMVAE", "GMVAEOutput", "GMVAESchedule", "DISCOVERY_COMPONENTS", "BATCH_PENALTY"]

#: the latent batch penalty of ``fit`` when the model has a ``batch_key``: over seeds 0-2 it
#: raised the scib Total on every labelled set of the cytometry panel, every seed above the
#: default without it (``benchmarks/results/integration_panel_cytometry.md``;
#: ``docs/design.md``, GMVAE batch penalty)
BATCH_PENALTY = 100.0

#: ``n_components=None`` (population discovery) starts from this many components
DISCOVERY_COMPONENTS = 30
#: posterior draws averaged into each cell's cluster probabilities (``transform(n_samples=)``)
PROB_SAMPLES = 16


@dataclass
class GMVAEOutput:
    """What :meth:`GMVAE.transform` gives for each cell.

    Attributes:
        latent: ``float32`` cells x ``n_latent`` posterior means.
        labels: categorical of ``"0"``, ``"1"``, ... (clusters ordered by size on the
            training cells).
        probs: ``float32`` cells x clusters, ``q(c | x)`` (posterior-averaged
            responsibilities), columns in label order.
    """

    latent: np.ndarray
    labels: pd.Categorical
    probs: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        """The largest cluster probability of each cell."""
        return self.probs.max(1).astype(np.float32)


#: the settings of a saved GMVAE and their sane bounds (checked by ``load`` before building)
_SCHEMA = dict(
    layer=(text(optional=True), ...), batch_keys=(texts(max_len=64), ...),
    n_components=(integer(1, 100_000), ...), n_start=(integer(1, 100_000), ...),
    discover=(flag, ...), n_latent=(integer(1, 4096), ...),
    likelihood=(choice("normal", "studentt"), ...), prune=(flag, ...),
    sparsity=(number(0.0, 1.0, optional=True), ...), prune_threshold=(number(0.0, 1.0), ...),
    merge_threshold=(number(0.0, 1e6), ...), n_hidden=(integer(1, 16384), ...),
    n_layers=(integer(1, 64), ...), dropout=(number(0.0, 1.0), ...),
    norm=(choice("batch", "layer", None), ...), n_clusters=(integer(1, 100_000, optional=True), None),
    posterior=(choice(*POSTERIORS), "normal"), n_flows=(integer(1, 32), 2),
)


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
        posterior: ``"normal"`` (diagonal Gaussian, default) or ``"iaf"``: the Gaussian
            followed by ``n_flows`` inverse autoregressive steps conditioned on the encoder
            (:class:`cellvi.posteriors.IAFEncoder`), for skewed or correlated posteriors.

    Example:
        >>> model = cellvi.models.GMVAE(adata, layer="logicle", markers=markers)
        >>> model.fit()
        >>> out = model.transform(other_sample)  # latent, labels, probs
    """

    _extra_state = ("center", "scale", "cluster_order", "merges")
    _state_defaults = {"merges": []}  # saved by cellvi 0.1.0 before merges were recorded
    _schema = _SCHEMA
    #: posterior samples of :func:`cellvi.diagnostics.outlier_scores` by default (the
    #: score of 10 markers is noisier per draw than that of 1,000 genes: 8 draws for a
    #: Spearman of 0.993 with 64; ``benchmarks/results/outlier_samples.md``)
    outlier_samples = 8

    def _check_saved(self, config: dict[str, Any], where: str) -> None:
        n, n_start = len(config["var_names"]), config["settings"]["n_start"]
        for key in ("center", "scale"):
            values = config.get(key)
            if not isinstance(values, list) or len(values) != n or any(
                    number(-1e30, 1e30)(v) for v in values):
                raise ModelFileError(f"{where}: '{key}' must be {n} finite numbers, one per marker")
        if any(v <= 0 for v in config["scale"]):
            raise ModelFileError(f"{where}: 'scale' must be positive")
        order = config.get("cluster_order")
        if (not isinstance(order, list) or not order or len(set(order)) != len(order)
                or any(integer(0, n_start - 1)(c) for c in order)):
            raise ModelFileError(f"{where}: 'cluster_order' must list distinct components "
                                 f"0..{n_start - 1}")
        if not isinstance(config.get("merges", []), list):
            raise ModelFileError(f"{where}: 'merges' must be a list")

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
        posterior: str = "normal",
        n_flows: int = 2,
    ):
        if likelihood not in ("normal", "studentt"):
            raise InvalidInputError(f"likelihood must be 'normal' or 'studentt', got {likelihood!r}")
        n_latent, n_hidden = positive_int("n_latent", n_latent), positive_int("n_hidden", n_hidden)
        n_layers = positive_int("n_layers", n_layers)
        posterior, n_flows = _check_posterior(posterior, n_flows)
        data = prepare_continuous(adata, layer, batch_key, markers=markers)
        check_trainable(data.X.shape[0])
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
            posterior=posterior, n_flows=n_flows,
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
            encoder = make_encoder(n_features, s, n_cats)
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

    def _to_input_units(self, x: np.ndarray) -> np.ndarray:
        return x * np.asarray(self.scale, dtype=np.float32) + np.asarray(self.center, dtype=np.float32)

    def _prior_sample(self, n: int, cluster) -> torch.Tensor:
        prior = self.module.prior
        if cluster is None:
            return prior().sample((n,))
        labels = [str(i) for i in range(len(self.cluster_order))]
        if str(cluster) not in labels:
            raise InvalidInputError(f"cluster={cluster!r} is not one of the labels {labels}")
        c = self.cluster_order[int(cluster)]
        return prior.loc[c] + prior.scale[c] * torch.randn(n, prior.n_latent, device=prior.loc.device)

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
    @deterministic
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
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        objective: str | ELBO = "elbo",
        batch_penalty: float | None = None,
        penalty_groups: int | None = None,
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
            checkpoint_dir, checkpoint_every, resume: as in :meth:`NBVAE.fit`; each phase
                has its checkpoint, and a resumed fit replays the finished phases from theirs.
            objective: as in :meth:`NBVAE.fit`, for the mixture and fine-tune phases (the
                warm-up keeps its own).
            batch_penalty: weight (nats per cell) of the latent batch penalty of
                :meth:`NBVAE.fit` (:func:`cellvi.objectives.batch_mmd` between each batch's
                latent means and all of them), in the mixture and fine-tune phases; needs
                ``batch_key``. ``None`` (default): :data:`BATCH_PENALTY` (100) for a model
                with ``batch_key``, none without; ``0`` turns it off (the default before
                cellvi 0.2; ``docs/design.md``, GMVAE batch penalty, has the measured effect).
            penalty_groups: with a batch penalty, align the batches within this many
                clusters of the standardised markers after each batch's mean is removed
                (:func:`cellvi.clustering.batch_balanced_groups`), as in :meth:`NBVAE.fit`:
                a population one batch lacks is not pulled towards that batch's cells.
                ``None`` or ``0``: each batch is compared with all cells alike.
            **train_kwargs: further fields of :class:`cellvi.train.TrainConfig`.
        """
        if init not in ("latent", "markers"):
            raise InvalidInputError(f"init must be 'latent' or 'markers', got {init!r}")
        n_init = positive_int("n_init", n_init)
        schedule = schedule or GMVAESchedule()
        if not isinstance(schedule, GMVAESchedule):
            raise InvalidTypeError(f"schedule must be a cellvi.models.GMVAESchedule, got {type(schedule).__name__}")
        s = self.settings
        if not s["discover"] and s["n_start"] > s["n_components"] and schedule.merge_rounds < 1:
            raise InvalidInputError(
                f"schedule.merge_rounds=0 cannot merge the {s['n_start']} starting components "
                f"down to n_components={s['n_components']}; use merge_rounds >= 1, or "
                "overcluster=False to train exactly n_components components")
        if batch_penalty is None:
            batch_penalty = BATCH_PENALTY if self.settings["batch_keys"] else 0.0
        objective = self._objective(objective, batch_penalty)
        penalty_groups = penalty_groups_setting(penalty_groups, objective.batch_penalty)
        arrays, data, seed = self._start_fit(seed, device)
        if penalty_groups:
            data.obs["mmd_groups"] = torch.as_tensor(batch_balanced_groups(
                _Standardized(arrays.X, self._standardize), arrays.covs, penalty_groups,
                counts=False, seed=seed), device=data.x.device)
        train_kwargs.setdefault("kl_warmup_steps", 0)  # the warm-up phase did that job
        # float32 gradients unless asked: the GMVAE's products are small (bfloat16 ones made a
        # step at batch 512 only ~6% faster) and its merges follow the training trajectory
        # closely enough that the cytometry panel would have to be re-run to allow them
        train_kwargs.setdefault("backward_precision", "float32")
        config = self._train_config(seed=seed, verbose=verbose, batch_size=batch_size, lr=lr,
                                    **train_kwargs)
        warmup_epochs, max_epochs = schedule.epochs(data.n_obs, config.batch_size,
                                                    warmup_epochs, max_epochs,
                                                    epoch_cells=config.epoch_cells)
        config = config.replace(max_epochs=max_epochs)
        checkpoint = self._checkpointer(checkpoint_dir, checkpoint_every, resume, data, seed,
                                        config, warmup_epochs=warmup_epochs,
                                        warmup_beta=warmup_beta, init=init, n_init=n_init,
                                        schedule=dataclasses.asdict(schedule),
                                        objective=repr(objective), penalty_groups=penalty_groups)
        run = _Run(self, arrays, data, config, schedule, np.random.default_rng(seed),
                   tuple(callbacks), checkpoint, objective)
        phases = [("warmup", warm_up(run, warmup_epochs, warmup_beta))]
        sub = initialise(run, init, n_init)
        phases.append(("mixture", fit_mixture(run, sub, max_epochs)))
        phases += merge_and_tune(run, max_epochs)
        self.history = _join_histories(phases, self.settings["n_start"])
        self.settings["n_clusters"] = run.mixture.n_active
        self._order_clusters(data)
        self._finish_fit(max_epochs=max_epochs, warmup_epochs=warmup_epochs,
                         warmup_beta=warmup_beta, init=init, n_init=n_init,
                         schedule=dataclasses.asdict(schedule), objective=repr(run.objective),
                         batch_penalty=float(objective.batch_penalty),
                         penalty_groups=penalty_groups, batch_size=batch_size, lr=lr,
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

    @deterministic
    def transform(self, adata: AnnData, *, batch_size: int = 4096, refine_steps: int = 0,
                  n_samples: int = PROB_SAMPLES, seed: int = 0) -> GMVAEOutput:
        """Latent, cluster labels and probabilities for the cells of ``adata`` (the training
        data or another sample measured with the same panel and known batch categories).

        The probabilities are ``q(c | x) = E_{q(z|x)}[p(c | z)]`` over ``n_samples`` seeded
        draws of each cell's posterior (``0``: ``p(c | z)`` at the posterior mean, the v0.1
        behaviour, more over-confident: ``docs/design.md``); labels are their argmax. With
        ``refine_steps``, each cell's posterior is first refined on its own ELBO
        (:func:`cellvi.inference.refine`)."""
        self._require_trained()
        n_samples = _prob_samples(n_samples)

        def fn(batch):
            q = self._refined(batch, refine_steps)
            return torch.cat([q.mean, self.module.cluster_posterior(q, n_samples, seed=seed)], 1)
        return self._output(self._per_cell(adata, fn, seed=seed, batch_size=batch_size))

    @deterministic
    def transform_and_elbo(self, adata: AnnData, *, n_samples: int = PROB_SAMPLES,
                           elbo_samples: int | None = None, seed: int = 0,
                           batch_size: int = 1024) -> tuple[GMVAEOutput, np.ndarray]:
        """:meth:`transform` and :meth:`elbo` of every cell in one pass over the data (one
        preparation of ``adata``, one encoder pass: what ``tl.gmvae`` writes). The output
        equals ``transform(adata, n_samples=n_samples, seed=seed)``, the ELBO equals
        ``elbo(adata, n_samples=elbo_samples, seed=seed, batch_size=batch_size)``
        (``elbo_samples``: default the model's ``outlier_samples``).

        Returns:
            ``(output, elbo)``: a :class:`GMVAEOutput` and one ``float32`` value per cell.
        """
        self._require_trained()
        n_samples = _prob_samples(n_samples)
        elbo_samples = positive_int("elbo_samples", self.outlier_samples if elbo_samples is None
                                    else elbo_samples)

        def fn(batch):
            q = self._refined(batch, 0)
            probs = self.module.cluster_posterior(q, n_samples, seed=seed)
            # after the probabilities: their noise has its own generator, so the ELBO's draws
            # take torch's random state exactly as in ``elbo``
            return torch.cat([q.mean, probs, elbo_per_cell(self.module, batch, q, elbo_samples)[:, None]], 1)
        out = self._per_cell(adata, fn, seed=seed, batch_size=batch_size)
        return self._output(out[:, :-1]), out[:, -1].astype(np.float32)

    def _output(self, both: np.ndarray) -> GMVAEOutput:
        """Latent means and raw cluster probabilities (columns: latent, then components)."""
        latent = both[:, : self.settings["n_latent"]].astype(np.float32)
        probs = both[:, self.settings["n_latent"]:][:, self.cluster_order].astype(np.float32)
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


def _prob_samples(n_samples) -> int:
    """The posterior draws of the cluster probabilities: 0 (at the mean) or more."""
    n_samples = int(n_samples)
    if n_samples < 0:
        raise InvalidInputError(f"n_samples must be 0 or more, got {n_samples}")
    return n_samples


def _n_components(n_components: int | None, n_obs: int, overcluster: bool) -> tuple[int, int]:
    """``(K, components to start from)``."""
    if n_components is None:  # discovery: an upper bound, pruned and merged down
        k = min(DISCOVERY_COMPONENTS, max(1, n_obs // 20))
        return k, k
    k = positive_int("n_components", n_components)
    if k > n_obs:
        raise InvalidInputError(
            f"n_components={n_components} is larger than the number of cells ({n_obs}); "
            "use fewer components, or n_components=None to let the model find them"
        )
    if not overcluster:
        return k, k
    return k, max(k, min(max(3 * k, k + 4), DISCOVERY_COMPONENTS, n_obs // 20))


class _Standardized:
    """Rows of a marker matrix standardised on access (``view[idx]``), without a copy of all."""

    def __init__(self, X: np.ndarray, standardize):
        self.X, self.standardize, self.shape = X, standardize, X.shape

    def __getitem__(self, idx) -> np.ndarray:
        return self.standardize(self.X[idx])
