"""The one training loop.

Read it top to bottom: the data are already on the device (:mod:`cellvi.device`); Adam,
large mini-batches, a KL warm-up counted in optimiser steps, early stopping on a held-out
split (with the best weights restored), a NaN/inf guard, gradient clipping, callbacks, a
tqdm bar and a per-epoch history that keeps reconstruction and KL apart. The objective
(:class:`cellvi.objectives.ELBO`) and the settings (:class:`TrainConfig`) come in as objects.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from . import nn as nn_blocks
from ._settings import seeded
from .checkpoint import Checkpointer
from .device import DeviceData
from .errors import CellviError, InvalidInputError, InvalidTypeError
from .objectives import ELBO, LinearWarmup

logger = logging.getLogger("cellvi")
ADAM_EPS = 0.01  # as scvi-tools; damps steps of rarely-informed parameters

__all__ = ["Callback", "LARGE_DATA_CELLS", "TrainConfig", "TrainingDiverged", "default_max_epochs", "evaluate", "train"]


class TrainingDiverged(CellviError, FloatingPointError):
    """Raised when the loss or the gradients become NaN or infinite."""


#: cells one epoch passes over at most (:attr:`TrainConfig.epoch_cells`): data larger than
#: this train on random subsets, so that budgets stay in steps and cells seen
EPOCH_CELLS = 100_000

#: the NB-VAE's budget in cells seen on data of 1M cells and more (:func:`default_max_epochs`,
#: ``TrainConfig.large_data_cells``): on three real files upsampled to 1M cells, fits of 2M
#: cells seen kept the latent's label scores of the 6,000-step budget (3.1M cells) and mixed
#: the batches slightly less (batch entropy 0.003-0.012 lower;
#: ``benchmarks/results/nbvae_budget_curves.md``), in two thirds of the time
LARGE_DATA_CELLS = 2_000_000


def epoch_size(n_train: int, epoch_cells: int | None = EPOCH_CELLS) -> int:
    """Cells one epoch passes over: the training split, at most ``epoch_cells``."""
    return n_train if epoch_cells is None else min(n_train, int(epoch_cells))


def default_max_epochs(n_obs: int, batch_size: int = 512, target_steps: int = 6000,
                       bounds: tuple[int, int] = (10, 400),
                       epoch_cells: int | None = EPOCH_CELLS,
                       large_data_cells: int | None = None) -> int:
    """Epochs giving about ``target_steps`` optimiser steps, clipped to ``bounds``; an
    epoch passes over the training split (90% of ``n_obs``), at most ``epoch_cells``.

    With ``large_data_cells`` (the NB-VAE's :data:`LARGE_DATA_CELLS`), data whose training
    split is larger than an epoch get a smaller budget in cells seen: from ``target_steps *
    batch_size`` cells at one epoch's worth of training cells it falls log-linearly in the
    training cells to at most ``large_data_cells`` from nine epochs' worth on (1M cells at
    the default 100,000-cell epoch).
    """
    n_train = math.ceil(0.9 * n_obs)
    n_epoch = epoch_size(n_train, epoch_cells)
    steps_per_epoch = max(1, math.ceil(n_epoch / batch_size))
    steps = float(target_steps)
    if large_data_cells is not None and epoch_cells is not None and n_train > n_epoch:
        share = min(1.0, math.log(n_train / n_epoch) / math.log(9.0))
        cells = target_steps * batch_size
        cells = cells ** (1.0 - share) * min(cells, large_data_cells) ** share
        steps = cells / batch_size
    return int(np.clip(round(steps / steps_per_epoch), *bounds))


BACKWARD_PRECISIONS = ("auto", "bfloat16", "float32")


def resolve_backward_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a CPU with hardware bfloat16 products, else ``"float32"``;
    on any other device ``"float32"`` (the bfloat16 products are CPU-only)."""
    if torch.device(device).type != "cpu":
        return "float32"
    if precision == "auto":
        return "bfloat16" if nn_blocks.native_bf16_cpu() else "float32"
    return precision


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run of :func:`train`.

    Args:
        max_epochs: passes over the training split; ``None`` picks about 6,000 steps,
            clipped to 10..400 epochs (:func:`default_max_epochs`).
        batch_size: cells per mini-batch.
        lr, weight_decay: Adam settings.
        kl_warmup_steps: steps over which β rises linearly from 0 to ``kl_weight``;
            ``None`` uses a quarter of all planned steps, at most 2,000; ``0`` disables it.
            Counted in steps, so that the warm-up ends for any dataset size.
        kl_weight: β once the warm-up is over (``1``: the ELBO).
        validation_fraction: share of cells held out for early stopping and the history.
        early_stopping: stop when the validation ELBO has not improved by ``min_delta`` for
            ``patience`` epochs after the warm-up ended, and restore the best weights.
        grad_clip: max gradient norm (``None`` to disable).
        seed: seeds the split, shuffling, sampling and dropout without touching the caller's
            global RNG state.
        verbose: show a progress bar (also off when stderr is not a terminal).
        desc: the progress bar's label.
        nan_retries: when a step's loss is NaN or infinite, roll back to the start of the
            epoch, divide the learning rate by 10 and retry, at most this many times in a run.
        epoch_cells: an epoch passes over at most this many cells, a fresh random subset of
            the training split each time (``None``: always all of it). On large data this
            keeps every budget counted in epochs (floors, patience, the GMVAE's M-step
            cadence) a budget in steps and cells seen, so the cost stops growing with the
            data; validation then uses a fixed random subset of at most ``epoch_cells // 9``
            held-out cells. Data below about ``epoch_cells / 0.9`` cells train as before.
        large_data_cells: see :func:`default_max_epochs` (the NB-VAE sets it).
        backward_precision: the operands of the large matrix products of the backward pass
            (the count decoder's output layer and the sparse input layer's weight gradient):
            ``"bfloat16"`` (float32 accumulation and results; the forward pass, the loss,
            the weights and Adam stay float32), ``"float32"``, or ``"auto"`` (default):
            bfloat16 on a CPU that multiplies it in hardware (:func:`cellvi.nn.native_bf16_cpu`),
            float32 elsewhere (GPUs included). Applies during the optimiser steps only;
            validation and every output are float32. ``docs/design.md`` has the measurements.
    """

    max_epochs: int | None = None
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-6
    kl_warmup_steps: int | None = None
    kl_weight: float = 1.0
    validation_fraction: float = 0.1
    early_stopping: bool = True
    patience: int = 20
    min_delta: float = 0.0
    grad_clip: float | None = 10.0
    seed: int | None = 0
    verbose: bool = True
    desc: str = "training"
    nan_retries: int = 3
    epoch_cells: int | None = EPOCH_CELLS
    large_data_cells: int | None = None
    backward_precision: str = "auto"

    def __post_init__(self):
        if not self.kl_weight > 0:
            raise InvalidInputError(f"kl_weight must be positive, got {self.kl_weight}")
        if self.max_epochs is not None and not (_is_int(self.max_epochs) and self.max_epochs >= 1):
            raise InvalidInputError(f"max_epochs must be a positive integer or None, got {self.max_epochs!r}")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise InvalidInputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.validation_fraction < 1:
            raise InvalidInputError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.epoch_cells is not None and not (_is_int(self.epoch_cells) and self.epoch_cells >= 1):
            raise InvalidInputError(f"epoch_cells must be a positive integer or None, got {self.epoch_cells!r}")
        if self.large_data_cells is not None and not (_is_int(self.large_data_cells)
                                                      and self.large_data_cells >= 1):
            raise InvalidInputError(f"large_data_cells must be a positive integer or None, got "
                                    f"{self.large_data_cells!r}")
        if self.backward_precision not in BACKWARD_PRECISIONS:
            raise InvalidInputError(f"backward_precision must be one of {BACKWARD_PRECISIONS}, got "
                                    f"{self.backward_precision!r}")
        if not (_is_int(self.nan_retries) and self.nan_retries >= 0):
            raise InvalidInputError(f"nan_retries must be a non-negative integer, got {self.nan_retries!r}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class Callback:
    """Hooks into :func:`train`; override the ones you need. ``history`` holds the epochs
    finished so far. A plain function ``f(epoch, history)`` given as a callback is
    :meth:`on_epoch_end`.
    """

    def on_epoch_start(self, epoch: int) -> None:
        """Before the epoch's first optimiser step."""

    def on_epoch_end(self, epoch: int, history: dict) -> None:
        """After the epoch's optimiser steps, before validation (the GMVAE's M-step)."""

    def on_validation_end(self, epoch: int, history: dict) -> None:
        """After validation; ``history`` now includes this epoch."""


class _FunctionCallback(Callback):
    def __init__(self, function: Callable[[int, dict], None]):
        self.function = function

    def on_epoch_end(self, epoch: int, history: dict) -> None:
        self.function(epoch, history)


def _as_callbacks(callbacks) -> list[Callback]:
    out = []
    for cb in callbacks:
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb):
            out.append(_FunctionCallback(cb))
        else:
            raise InvalidTypeError(f"a callback must be a cellvi.train.Callback or a function "
                            f"f(epoch, history), got {type(cb).__name__}")
    return out

HISTORY_KEYS = ("epoch", "train_elbo", "validation_elbo", "beta", "reconstruction", "kl",
                "validation_reconstruction", "validation_kl", "lr")


@torch.no_grad()
def evaluate(module: nn.Module, data: DeviceData, idx: torch.Tensor, batch_size: int = 1024,
             objective: ELBO | None = None) -> dict[str, float]:
    """Mean ELBO (β = 1), ``log p(x|z)`` and KL per cell over the cells ``idx``, in eval mode
    (split over the processes of a data-parallel run, :mod:`cellvi.distributed`)."""
    objective = objective or ELBO()
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=data.x.device)
    for batch in data.iter_batches(distributed.shard(idx), batch_size):
        log_px, kl_z = objective.terms(module, batch)
        sums += torch.stack([(log_px - kl_z).sum(), log_px.sum(), kl_z.sum()]).double()
    module.train(was_training)
    total, recon, kl_sum = (float(v) / max(1, len(idx)) for v in distributed.sum_(sums))
    return dict(elbo=total, reconstruction=recon, kl=kl_sum)


def train(
    module: nn.Module,
    data: DeviceData,
    config: TrainConfig | None = None,
    *,
    objective: ELBO | None = None,
    callbacks: Sequence[Callback | Callable[[int, dict], None]] = (),
    checkpoint: Checkpointer | None = None,
) -> dict[str, list[float]]:
    """Train a :class:`cellvi.vae.VAE` on device-resident ``data``.

    Args:
        module: the VAE, already on ``data``'s device.
        data: device-resident tensors.
        config: the run's settings (:class:`TrainConfig`; default settings when ``None``).
        objective: what to minimise (:class:`cellvi.objectives.ELBO`, the default); its β
            schedule, when given, replaces the linear KL warm-up of ``config``.
        callbacks: :class:`Callback` objects (or functions ``f(epoch, history)``, called
            after each epoch's steps and before validation), in order.
        checkpoint: save the run's state every ``checkpoint.every`` epochs and at the end,
            and with ``checkpoint.resume`` continue from a saved state
            (:class:`cellvi.checkpoint.Checkpointer`); the result is the same as without
            the interruption.

    Returns:
        The history, one entry per epoch: ``epoch``; ``train_elbo`` (mini-batch average of
        the objective optimised, β-weighted during the warm-up), ``reconstruction`` and
        ``kl`` (its parts, per cell, unweighted); ``validation_elbo`` (β = 1),
        ``validation_reconstruction``, ``validation_kl``; ``beta``; ``lr``.

    Raises:
        TrainingDiverged: when the loss stays NaN or infinite after ``nan_retries``
            roll-backs with a lower learning rate.
    """
    cfg = config or TrainConfig()
    objective = objective or ELBO()
    callbacks = _as_callbacks(callbacks)
    device = data.x.device
    rank, n_proc = distributed.world()
    if n_proc > 1 and checkpoint is not None:
        raise InvalidInputError("checkpoints are not supported in a data-parallel run yet; "
                                "leave checkpoint_dir unset, or train in one process")
    val_idx, train_idx = _split(data.n_obs, cfg)
    batch_size = min(cfg.batch_size, len(train_idx))
    if batch_size < 3 * n_proc:
        raise InvalidInputError(f"batch_size={cfg.batch_size} is too small for {n_proc} "
                                f"processes (each needs at least 3 cells of every mini-batch)")
    n_epoch = epoch_size(len(train_idx), cfg.epoch_cells)
    # Drop a last batch smaller than 3 cells (per process): BatchNorm cannot use it.
    steps_per_epoch = max(1, n_epoch // batch_size + (n_epoch % batch_size >= 3 * n_proc))
    max_epochs = cfg.max_epochs or default_max_epochs(data.n_obs, batch_size,
                                                      epoch_cells=cfg.epoch_cells,
                                                      large_data_cells=cfg.large_data_cells)
    schedule = objective.beta
    if schedule is None:  # the linear KL warm-up, by default a quarter of the steps (<= 2,000)
        warmup = cfg.kl_warmup_steps
        if warmup is None:
            warmup = min(2000, max_epochs * steps_per_epoch // 4)
        schedule = LinearWarmup(warmup, end=float(cfg.kl_weight))
    use_val = cfg.early_stopping and len(val_idx) > 0
    val_data, val_idx = data.holdout(val_idx)  # streamed data: the held-out cells in memory
    optimizer = _adam(module, cfg.lr, cfg.weight_decay)
    run = dict(history={key: [] for key in HISTORY_KEYS}, epoch=-1, step=0, best=-math.inf,
               bad_epochs=0, retries=0, finished=False)
    best_state = None

    with seeded(cfg.seed, device):
        if rank and cfg.seed is not None:  # other noise on each process; rank 0's is the single run's
            torch.manual_seed(cfg.seed + 1_000_003 * rank)
        distributed.broadcast_module(module)
        restored = checkpoint.load(module, optimizer) if checkpoint is not None else None
        if restored is not None:
            saved, best_state = restored
            run.update((k, saved[k]) for k in run)
        history = run["history"]
        module.train()
        bar = tqdm(range(run["epoch"] + 1, max_epochs if not run["finished"] else 0),
                   desc=cfg.desc, disable=None if cfg.verbose and not rank else True,
                   leave=False)
        bf16 = resolve_backward_precision(cfg.backward_precision, device) == "bfloat16"
        for epoch in bar:
            with nn_blocks.bf16_backward(bf16):
                train_terms = _epoch_with_rollback(module, data, train_idx, batch_size,
                                                   steps_per_epoch, objective, optimizer,
                                                   schedule, run, epoch, cfg, callbacks)
            distributed.broadcast_module(module, buffers_only=True)
            for callback in callbacks:
                callback.on_epoch_end(epoch, history)
            val = (evaluate(module, val_data, val_idx, objective=objective) if len(val_idx)
                   else dict(elbo=math.nan, reconstruction=math.nan, kl=math.nan))
            for key, value in (("epoch", epoch), ("beta", schedule(run["step"])),
                               ("lr", optimizer.param_groups[0]["lr"]), *train_terms.items(),
                               *((f"validation_{k}", v) for k, v in val.items())):
                history[key].append(value)
            for callback in callbacks:
                callback.on_validation_end(epoch, history)
            bar.set_postfix(train_elbo=f"{train_terms['train_elbo']:.4g}",
                            val_elbo=f"{val['elbo']:.4g}")
            run["epoch"] = epoch
            stop = False
            if use_val and schedule.done(run["step"]):
                if val["elbo"] > run["best"] + cfg.min_delta:
                    run["best"], run["bad_epochs"] = val["elbo"], 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    run["bad_epochs"] += 1
                    stop = run["bad_epochs"] >= cfg.patience
                    if stop:
                        logger.info("early stopping at epoch %d (best validation ELBO %.4g)",
                                    epoch, run["best"])
            if stop:
                break
            if checkpoint is not None and checkpoint.due(epoch):
                checkpoint.save(module, optimizer, run, best_state)
        bar.close()
        if best_state is not None and not run["finished"]:
            module.load_state_dict(best_state)
        if checkpoint is not None and not run["finished"]:
            run["finished"] = True
            checkpoint.save(module, optimizer, run, None)
    module.eval()
    return history


def _epoch_with_rollback(module, data, train_idx, batch_size, steps_per_epoch, objective,
                         optimizer, schedule, run, epoch, cfg, callbacks) -> dict[str, float]:
    """One epoch; a NaN/inf loss rolls the module and optimiser back to the epoch's start
    with a 10x lower learning rate (at most ``cfg.nan_retries`` times per run)."""
    snapshot = None
    if cfg.nan_retries > run["retries"]:
        snapshot = (copy.deepcopy(module.state_dict()), copy.deepcopy(optimizer.state_dict()),
                    run["step"])
    while True:
        for callback in callbacks:
            callback.on_epoch_start(epoch)
        # only the cells this epoch takes (splitting all of 9M cells cost 0.1 s an epoch)
        order = distributed.broadcast_(data.shuffle(train_idx, steps_per_epoch * batch_size))
        batches = torch.split(order, batch_size)
        try:
            terms, run["step"] = _epoch(module, data, batches, objective,
                                        optimizer, schedule, run["step"], epoch, cfg)
            return terms
        except _NonFinite as bad:
            lr = optimizer.param_groups[0]["lr"]
            if snapshot is None:
                _diverged(epoch, bad.step, lr, run["retries"])
            module.load_state_dict(snapshot[0])
            optimizer.load_state_dict(snapshot[1])
            run["step"] = snapshot[2]
            run["retries"] += 1
            for group in optimizer.param_groups:
                group["lr"] = lr / 10
            logger.warning("epoch %d, step %d: the loss is NaN or infinite; rolled back to the "
                           "start of the epoch and lowered the learning rate to %g (retry %d of "
                           "%d)", epoch, bad.step, lr / 10, run["retries"], cfg.nan_retries)
            if cfg.nan_retries <= run["retries"]:
                snapshot = None


def _split(n_obs: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded validation and training indices (on the CPU: the device gets each mini-batch's
    indices asynchronously); no validation split below 20 cells. With ``epoch_cells``, the
    validation indices are a random subset of at most ``epoch_cells // 9`` of the held-out
    cells (the others train no more than before: they stay out)."""
    perm = np.random.default_rng(cfg.seed).permutation(n_obs)
    n_val = int(round(cfg.validation_fraction * n_obs)) if n_obs >= 20 else 0
    n_eval = n_val if cfg.epoch_cells is None else min(n_val, max(1, cfg.epoch_cells // 9))
    return torch.as_tensor(np.sort(perm[:n_eval])), torch.as_tensor(perm[n_val:])


def _epoch(module, data, batches, objective, optimizer, schedule, step, epoch, cfg):
    """One pass of optimiser steps: ``({train_elbo, reconstruction, kl} per cell, step)``."""
    sums = torch.zeros(3, device=data.x.device)  # loss, log p(x|z), KL, summed over cells
    seen = 0
    parallel = distributed.active()
    for idx in batches:
        idx = distributed.shard(idx)  # this process's share of the mini-batch
        loss, log_px, kl_z = objective.loss(module, data.batch(idx), schedule(step), data.n_obs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(module)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            sums += torch.stack([loss * len(idx), log_px.sum(), kl_z.sum()])
        seen += len(idx)
        step += 1
        if data.x.device.type == "cpu" and not parallel and not math.isfinite(float(loss.detach())):
            raise _NonFinite(step)  # (in parallel, the reduced sums below decide for all)
    reduced = distributed.sum_(torch.cat([sums.double(), sums.new_tensor([seen]).double()]))
    total, recon, kl_sum = (float(v) / max(1.0, float(reduced[3])) for v in reduced[:3])
    if not math.isfinite(total):
        raise _NonFinite(step)
    return dict(train_elbo=-total, reconstruction=recon, kl=kl_sum), step


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _param_groups(module: nn.Module) -> list[dict]:
    """The VAE's parameters; a batch classifier that trains alongside
    (``module.batch_adversary``, :class:`cellvi.objectives.BatchAdversary`) gets its own
    group, with Adam's usual ``eps`` and no weight decay (a plain classifier's optimiser)."""
    adversary = getattr(module, "batch_adversary", None)
    if adversary is None:
        return [dict(params=list(module.parameters()))]
    own = {id(p) for p in adversary.parameters()}
    return [dict(params=[p for p in module.parameters() if id(p) not in own]),
            dict(params=list(adversary.parameters()), eps=1e-8, weight_decay=0.0)]


def _adam(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where this torch build supports it."""
    try:
        return torch.optim.Adam(_param_groups(module), lr=lr, weight_decay=weight_decay,
                                eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):  # older torch or an unsupported device
        return torch.optim.Adam(_param_groups(module), lr=lr, weight_decay=weight_decay, eps=ADAM_EPS)


class _NonFinite(Exception):
    def __init__(self, step: int):
        self.step = step


def _diverged(epoch: int, step: int, lr: float, retries: int) -> None:
    tried = f" after {retries} roll-backs to lower learning rates" if retries else ""
    raise TrainingDiverged(
        f"training diverged (loss is NaN or infinite) at epoch {epoch}, step {step}{tried}. "
        f"Likely causes: a learning rate too high (lr={lr:g} now; try lr={lr / 10:g}), extreme "
        "values in the input (check it for outliers or untransformed channels), or a "
        "likelihood that does not fit the data (e.g. likelihood='normal' on raw counts)."
    )
