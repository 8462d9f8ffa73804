"""Multi-process data-parallel training on :mod:`torch.distributed`.

Launch the same script once per process with ``torchrun``; ``fit`` (and so ``cellvi.tl.nbvae``
and ``cellvi.tl.gmvae``) then joins the process group itself (gloo on the CPU, NCCL on CUDA)
and trains one model:

.. code-block:: bash

    torchrun --standalone --nproc_per_node=2 my_script.py

How it works (:func:`cellvi.train.train`): every process reads the same data and draws the
same validation split; rank 0 draws each epoch's order and broadcasts it, so every
mini-batch of ``batch_size`` cells is the one a single process would take, and each process
computes the gradient of its own contiguous share of it. The gradients are averaged with one
``all_reduce`` per step, so the weights stay identical on every process and a run with the
same seed is the single-process run up to floating-point order, BatchNorm statistics taken
per share, and independent noise draws per process. Validation is split over the processes
and its sums reduced, so early stopping decides the same everywhere; BatchNorm running
statistics are taken from rank 0 after each epoch. ``batch_size`` is the *global* mini-batch:
raise it with the number of processes to keep each one busy.

After ``fit`` every process holds the trained model. The per-cell passes after it (``elbo``,
``latent_and_elbo``, ``GMVAE.transform`` and ``transform_and_elbo``: what the ``tl`` functions
write) are split the same way, each process computing a contiguous share of the cells that
:func:`gather_rows` puts back together, so every process returns every cell; their Monte
Carlo draws then differ from a single process's (each share starts from the same seed).
Write results from one process only (:func:`is_main_process`).
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import InvalidInputError

logger = logging.getLogger("cellvi")

__all__ = ["world", "is_main_process", "setup", "launched", "TIMEOUT"]

#: how long a collective waits for the other processes before failing
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) among several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """``True`` on rank 0 (and without a process group): the process that should write files."""
    return world()[0] == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes (when launched so and not joined yet)
    and return this process's device: ``cuda:LOCAL_RANK`` for a CUDA device, else ``device``.
    """
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise InvalidInputError("this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        # the group cellvi opened, cellvi closes: a gloo group left to the interpreter's
        # teardown can abort the process at exit ("terminate called without an active
        # exception"), most often right after a collective such as gather_rows
        atexit.register(_close)
        logger.info("joined a process group of %d (%s), rank %d", dist.get_world_size(),
                    backend, dist.get_rank())
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device


def _close() -> None:
    """Leave the process group at exit (registered by :func:`setup` when it joined one): wait
    for every process, then close, so that no process tears its connections down while
    another still uses them. (Under torchrun a process that fails takes the others down by
    signal, which skips this.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- what the training loop calls (no-ops without a group of several processes) --------------
def active() -> bool:
    return world()[1] > 1


def broadcast_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (and buffers) to every process."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for t in tensors:
        dist.broadcast(t.data, src=0)


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the backend can reduce it (NCCL: the process's GPU)."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def broadcast_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor``, in place, on every process."""
    if active():
        moved = _on_backend(tensor)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of ``idx`` (all of it without a group)."""
    rank, size = world()
    return idx if size == 1 else torch.tensor_split(idx, size)[rank]


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Every process's rows, in rank order: the inverse of :func:`shard` applied to
    ``arange(n_total)`` (``local`` is this process's share; without a group it is returned)."""
    if not active():
        return local
    rank, size = world()
    sizes = [len(s) for s in torch.tensor_split(torch.arange(n_total), size)]
    if len(local) != sizes[rank]:
        raise ValueError(f"process {rank} holds {len(local)} rows, its share is {sizes[rank]}")
    buf = local.new_zeros((max(sizes), *local.shape[1:]))
    buf[: len(local)] = local
    moved = _on_backend(buf)
    parts = [torch.empty_like(moved) for _ in range(size)]
    dist.all_gather(parts, moved)
    return torch.cat([part[:k].to(local.device) for part, k in zip(parts, sizes, strict=True)])


def average_gradients(module: nn.Module) -> None:
    """Average the gradients over the processes: one flat ``all_reduce`` per step."""
    if not active():
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()[1]
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes, in place."""
    if active():
        moved = _on_backend(tensor)
        dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor
