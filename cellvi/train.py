"""The one training loop.

Read it top to bottom: data go to the device once (a CSR matrix stays sparse there and each
mini-batch is densified on the device), Adam, large mini-batches, a KL warm-up counted in
optimiser steps, early stopping on a held-out split (with the best weights restored), a
NaN/inf guard, gradient clipping, a tqdm bar and a per-epoch history.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm

from ._settings import seeded
from .distributions import nonzeros_of
from .objectives import LinearWarmup

logger = logging.getLogger("cellvi")
ADAM_EPS = 0.01  # as scvi-tools; damps steps of rarely-informed parameters

__all__ = ["DeviceMatrix", "DeviceData", "TrainingDiverged", "default_max_epochs", "train"]


class TrainingDiverged(FloatingPointError):
    """Raised when the loss or the gradients become NaN or infinite."""


class DeviceMatrix:
    """A cells x features matrix held on the device, dense or as CSR parts.

    ``rows(idx)`` returns the dense ``(len(idx), n_features)`` block, built on the device.
    """

    def __init__(self, X: np.ndarray | sp.spmatrix | sp.sparray, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.shape = X.shape
        self.device = device
        if sp.issparse(X):
            X = sp.csr_matrix(X)
            X.sort_indices()
            self.sparse = True
            self.indptr = torch.as_tensor(X.indptr.astype(np.int64), device=device)
            self.indices = torch.as_tensor(X.indices.astype(np.int64), device=device)
            self.data = torch.as_tensor(np.asarray(X.data), dtype=dtype, device=device)
            self._row_nnz = torch.as_tensor(np.diff(X.indptr).astype(np.int64))  # on the CPU
        else:
            self.sparse = False
            self.dense = torch.as_tensor(np.ascontiguousarray(X), dtype=dtype, device=device)

    def rows(self, idx: torch.Tensor, with_nonzeros: bool = False):
        """Dense rows ``idx`` (and, with ``with_nonzeros``, the ``(rows, cols, values)`` of
        their non-zeros, known for free from the CSR parts). ``idx`` may live on the CPU: then
        the block's non-zero count is known without a device synchronisation (matters on CUDA).
        """
        if not self.sparse:
            out = self.dense[idx.to(self.device, non_blocking=True)]
            return (out, nonzeros_of(out)) if with_nonzeros else out
        if idx.device.type == "cpu":
            total = int(self._row_nnz[idx].sum())
            idx = idx.to(self.device, non_blocking=True)
        else:
            total = None
        starts = self.indptr[idx]
        lengths = self.indptr[idx + 1] - starts
        out = torch.zeros(len(idx), self.shape[1], dtype=self.data.dtype, device=self.device)
        if total is None:
            total = int(lengths.sum())
        row_ids = torch.repeat_interleave(torch.arange(len(idx), device=self.device), lengths,
                                          output_size=total)
        offsets = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(total, device=self.device) - torch.repeat_interleave(
            offsets - starts, lengths, output_size=total)
        cols, vals = self.indices[pos], self.data[pos]
        out[row_ids, cols] = vals
        if with_nonzeros:
            keep = vals != 0  # explicitly stored zeros are not non-zeros
            if not bool(keep.all()):
                row_ids, cols, vals = row_ids[keep], cols[keep], vals[keep]
            return out, (row_ids, cols, vals)
        return out


@dataclass
class DeviceData:
    """All tensors a model needs, resident on one device.

    Args:
        x: the data matrix.
        obs: per-cell tensors (e.g. ``covs``, ``log_library``), first dimension = cells.
    """

    x: DeviceMatrix
    obs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: also hand out the non-zeros of each mini-batch (``"x_nonzero"``); on the CPU only, where
    #: it saves the count likelihoods most of their work
    nonzeros: bool | None = None

    def __post_init__(self):
        if self.nonzeros is None:
            self.nonzeros = self.x.device.type == "cpu"

    @classmethod
    def from_arrays(cls, X, device: torch.device, **obs: np.ndarray | None) -> DeviceData:
        tensors = {}
        for key, value in obs.items():
            if value is None:
                continue
            dtype = torch.long if np.issubdtype(np.asarray(value).dtype, np.integer) else torch.float32
            tensors[key] = torch.as_tensor(np.asarray(value), dtype=dtype, device=device)
        return cls(DeviceMatrix(X, device), tensors)

    @property
    def n_obs(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.nonzeros:
            x, nz = self.x.rows(idx, with_nonzeros=True)
            out = {"x": x, "x_nonzero": nz}
        else:
            out = {"x": self.x.rows(idx)}
        idx = idx.to(self.x.device, non_blocking=True)
        for key, value in self.obs.items():
            out[key] = value[idx]
        return out

    def iter_batches(self, idx: torch.Tensor, batch_size: int):
        for start in range(0, len(idx), batch_size):
            yield self.batch(idx[start : start + batch_size])


def default_max_epochs(n_obs: int, batch_size: int = 512, target_steps: int = 6000,
                       bounds: tuple[int, int] = (10, 400)) -> int:
    """Epochs giving about ``target_steps`` optimiser steps, clipped to ``bounds``."""
    steps_per_epoch = max(1, math.ceil(0.9 * n_obs / batch_size))
    return int(np.clip(round(target_steps / steps_per_epoch), *bounds))


@torch.no_grad()
def evaluate(module: nn.Module, data: DeviceData, idx: torch.Tensor, batch_size: int = 1024) -> float:
    """Mean ELBO (β = 1) per cell over the cells ``idx``, in eval mode."""
    was_training = module.training
    module.eval()
    total = 0.0
    for batch in data.iter_batches(idx, batch_size):
        total += float(module.elbo(batch, 1.0).sum())
    module.train(was_training)
    return total / max(1, len(idx))


def train(
    module: nn.Module,
    data: DeviceData,
    *,
    max_epochs: int | None = None,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    kl_warmup_steps: int | None = None,
    kl_weight: float = 1.0,
    validation_fraction: float = 0.1,
    early_stopping: bool = True,
    patience: int = 20,
    min_delta: float = 0.0,
    grad_clip: float | None = 10.0,
    seed: int | None = 0,
    verbose: bool = True,
    desc: str = "training",
    on_epoch_end: Callable[[int], None] | None = None,
    beta_schedule: Callable[[int], float] | None = None,
) -> dict[str, list[float]]:
    """Train ``module`` (which has ``loss(batch, beta)`` and ``elbo(batch, beta)``) on ``data``.

    Args:
        module: a VAE-like module already on ``data``'s device.
        data: device-resident tensors.
        max_epochs: passes over the training split; ``None`` picks about 6,000 steps,
            clipped to 10..400 epochs (:func:`default_max_epochs`).
        batch_size: cells per mini-batch.
        lr, weight_decay: Adam settings.
        kl_warmup_steps: steps over which β rises linearly from 0 to ``kl_weight``;
            ``None`` uses a quarter of all planned steps, at most 2,000. ``0`` disables the
            warm-up.
        kl_weight: β once the warm-up is over (``1``: the ELBO; below 1 the latent keeps
            more of what the decoder needs, at the price of a less regular posterior).
        validation_fraction: share of cells held out for early stopping and the history.
        early_stopping: stop when the validation ELBO has not improved by ``min_delta`` for
            ``patience`` epochs after the warm-up ended, and restore the best weights.
        grad_clip: max gradient norm (``None`` to disable).
        seed: seeds the split, shuffling, initial sampling and dropout without touching the
            caller's global RNG state.
        verbose: show a progress bar (also off when stderr is not a terminal).
        beta_schedule: a β schedule object (``schedule(step) -> β`` and ``schedule.done(step)``,
            e.g. :class:`cellvi.objectives.Constant`) used instead of the linear warm-up.
        on_epoch_end: called with the epoch number after each epoch's optimiser steps,
            before validation (e.g. to prune mixture components).

    Returns:
        The history: ``{"epoch", "train_elbo", "validation_elbo", "beta"}`` lists. The
        training ELBO is the mini-batch average of the objective actually optimised (β-weighted
        during the warm-up); the validation ELBO always uses β = 1.

    Raises:
        TrainingDiverged: when the loss becomes NaN or infinite.
    """
    device = data.x.device
    n_obs = data.n_obs
    generator = np.random.default_rng(seed)
    perm = generator.permutation(n_obs)
    n_val = int(round(validation_fraction * n_obs)) if n_obs >= 20 else 0
    # Indices stay on the CPU (the device gets each mini-batch's indices, asynchronously).
    val_idx = torch.as_tensor(np.sort(perm[:n_val]))
    train_idx = torch.as_tensor(perm[n_val:])
    n_train = len(train_idx)
    batch_size = min(batch_size, n_train)
    # Drop a last batch smaller than 3 cells: BatchNorm cannot use it.
    steps_per_epoch = max(1, n_train // batch_size + (1 if n_train % batch_size >= 3 else 0))
    if max_epochs is None:
        max_epochs = default_max_epochs(n_obs, batch_size)
    total_steps = max_epochs * steps_per_epoch
    if kl_warmup_steps is None:
        kl_warmup_steps = min(2000, total_steps // 4)
    if not kl_weight > 0:
        raise ValueError(f"kl_weight must be positive, got {kl_weight}")
    schedule = (beta_schedule if beta_schedule is not None
                else LinearWarmup(kl_warmup_steps, end=float(kl_weight)))
    use_val = early_stopping and n_val > 0

    optimizer = _adam(module, lr, weight_decay)
    history: dict[str, list[float]] = {"epoch": [], "train_elbo": [], "validation_elbo": [], "beta": []}
    best, best_state, bad_epochs, step = -math.inf, None, 0, 0

    with seeded(seed, device):
        module.train()
        bar = tqdm(range(max_epochs), desc=desc, disable=None if verbose else True, leave=False)
        for epoch in bar:
            order = train_idx[torch.randperm(n_train)]
            running = torch.zeros((), device=device)
            seen = 0
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                batch = data.batch(idx)
                beta = schedule(step)
                loss = module.loss(batch, beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
                optimizer.step()
                running += loss.detach() * len(idx)
                seen += len(idx)
                step += 1
                if device.type == "cpu" and not math.isfinite(float(loss.detach())):
                    _diverged(epoch, step, lr)
            train_elbo = -float(running) / max(1, seen)
            if not math.isfinite(train_elbo):
                _diverged(epoch, step, lr)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            val_elbo = evaluate(module, data, val_idx) if n_val > 0 else math.nan
            history["epoch"].append(epoch)
            history["train_elbo"].append(train_elbo)
            history["validation_elbo"].append(val_elbo)
            history["beta"].append(schedule(step))
            bar.set_postfix(train_elbo=f"{train_elbo:.4g}", val_elbo=f"{val_elbo:.4g}")
            if use_val and schedule.done(step):
                if val_elbo > best + min_delta:
                    best, bad_epochs = val_elbo, 0
                    best_state = copy.deepcopy(module.state_dict())
                else:
                    bad_epochs += 1
                    if bad_epochs >= patience:
                        logger.info("early stopping at epoch %d (best validation ELBO %.4g)", epoch, best)
                        break
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history


def _adam(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where this torch build supports it."""
    try:
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay,
                                eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):  # older torch or an unsupported device
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay, eps=ADAM_EPS)


def _diverged(epoch: int, step: int, lr: float) -> None:
    raise TrainingDiverged(
        f"training diverged (loss is NaN or infinite) at epoch {epoch}, step {step}. "
        f"Try a smaller learning rate (lr={lr:g} now, e.g. lr={lr / 10:g}), check the input "
        "for extreme values, or use a more robust likelihood."
    )
