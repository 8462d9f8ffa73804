"""The GMVAE's training plan: four named phases on one :class:`_Run`, budgets in a frozen
:class:`GMVAESchedule`.

1. :func:`warm_up`: the VAE with a fixed ``N(0, I)`` prior (a setting of the objective; the
   mixture is left alone) and a small KL weight, so the latent takes shape first;
2. :func:`initialise`: a GMM on the standardised markers (or the warm-up latent) groups the
   cells; each component starts at its group's latent moments;
3. :func:`fit_mixture`: the full model, with an M-step for ``π`` and pruning after each epoch;
4. :func:`merge_and_tune`: components that share their cells become one cluster (unless the
   two are two modes in the markers), then a short fine-tune; repeated while merges happen.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import distributed
from ..checkpoint import Checkpointer
from ..clustering import group_moments, merge_components
from ..data import ContinuousData
from ..device import DeviceData
from ..errors import InvalidInputError
from ..objectives import ELBO, Constant
from ..priors import MixturePrior, StandardNormal
from ..train import EPOCH_CELLS, TrainConfig, default_max_epochs, train
from ._base import positive_int

if TYPE_CHECKING:
    from .gmvae import GMVAE

logger = logging.getLogger("cellvi")

__all__ = ["GMVAESchedule", "warm_up", "initialise", "fit_mixture", "merge_and_tune"]


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
            raise InvalidInputError(f"GMVAESchedule.merge_rounds must be >= 0, got {self.merge_rounds!r}")
        for name in ("warmup_epochs", "mixture_epochs"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise InvalidInputError(f"GMVAESchedule.{name} must be (low, high) with 1 <= low <= high")

    def replace(self, **changes) -> GMVAESchedule:
        return dataclasses.replace(self, **changes)

    def epochs(self, n_obs: int, batch_size: int, warmup_epochs: int | None,
               max_epochs: int | None, epoch_cells: int | None = EPOCH_CELLS) -> tuple[int, int]:
        """Epochs of the warm-up and of the mixture phase, unless given (an epoch: at most
        ``epoch_cells`` cells, :class:`cellvi.train.TrainConfig`)."""
        if warmup_epochs is None:
            warmup_epochs = default_max_epochs(n_obs, batch_size, target_steps=self.warmup_steps,
                                               bounds=self.warmup_epochs, epoch_cells=epoch_cells)
            if max_epochs is not None:  # a short run asked for: a short warm-up too
                warmup_epochs = min(warmup_epochs, max(1, max_epochs))
        if max_epochs is None:
            max_epochs = default_max_epochs(n_obs, batch_size, target_steps=self.mixture_steps,
                                            bounds=self.mixture_epochs, epoch_cells=epoch_cells)
        return warmup_epochs, max_epochs


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
    checkpoint: Checkpointer | None = None
    objective: ELBO | None = None
    probe: torch.Tensor | None = None

    def moments_rng(self) -> np.random.Generator:
        """Where an empty group's component starts: a generator of the fit's seed."""
        return np.random.default_rng(self.config.seed)

    @property
    def mixture(self) -> MixturePrior:
        return self.model.module.prior

    def train(self, name: str, objective: ELBO | None = None, with_mixture_step: bool = True,
              **changes):
        """One training run of a phase (checkpointed as ``name``)."""
        callbacks = [self.mixture_step] if with_mixture_step else []
        checkpoint = self.checkpoint.child(name) if self.checkpoint is not None else None
        return train(self.model.module, self.data, self.config.replace(**changes),
                     objective=objective or self.objective,
                     callbacks=[*callbacks, *self.callbacks],
                     checkpoint=checkpoint)

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
        # data-parallel: every process ran the same step on the same cells and weights (the
        # BatchNorm statistics were shared after the epoch); rank 0's result is kept by all
        distributed.broadcast_module(mixture)
        history.setdefault("n_components", []).append(mixture.n_active)


def warm_up(run: _Run, epochs: int, beta: float) -> dict:
    """Phase 1: train with a fixed ``N(0, I)`` prior and KL weight ``beta`` (no early stop)."""
    standard = StandardNormal(run.model.settings["n_latent"]).to(run.model.device)
    return run.train("warmup", ELBO(beta=Constant(beta), prior=standard), with_mixture_step=False,
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
    run.mixture.init_from(*group_moments(z, labels, k, zvar, run.moments_rng()))
    return sub


def fit_mixture(run: _Run, sub: np.ndarray, epochs: int) -> dict:
    """Phase 3: the full model on a random probe (a subset of ``sub``: the file's first cells
    could be one batch only) for the ``π`` M-step and the merges."""
    size = min(len(sub), run.schedule.probe_cells)
    run.probe = torch.as_tensor(np.sort(run.rng.choice(sub, size=size, replace=False)))
    return run.train("mixture", max_epochs=epochs)


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
        phases.append(("merged", run.train(f"merged-{merge_round}", max_epochs=tune_epochs,
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
    w, mu, sd = group_moments(z, lut[probs.argmax(1)], n, zvar, run.moments_rng())
    mixture.init_from(np.r_[w, np.zeros(k - n)], np.r_[mu, np.zeros((k - n, mu.shape[1]))],
                      np.r_[sd, np.ones((k - n, mu.shape[1]))])
    mixture.active[n:] = False


def _join_histories(phases: list[tuple[str, dict]], n_start: int) -> dict[str, list]:
    """One history over the phases: ``phase`` names each epoch's phase, ``n_components``
    the active components after it (``n_start`` throughout the warm-up)."""
    out: dict[str, list] = {key: [] for key in phases[0][1] if key != "n_components"}
    out["phase"], out["n_components"] = [], []
    for name, hist in phases:
        for key in out:
            if key not in ("phase", "n_components"):
                out[key] += list(hist[key])
        out["phase"] += [name] * len(hist["epoch"])
        out["n_components"] += list(hist.get("n_components", [n_start] * len(hist["epoch"])))
    out["epoch"] = list(range(len(out["epoch"])))
    return out
