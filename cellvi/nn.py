"""Network building blocks: MLPs with categorical covariates injected.

A categorical covariate enters a layer as a learned embedding added to that layer's
pre-activation. This is exactly a one-hot encoding concatenated to the layer input, without
materialising the one-hot matrix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

__all__ = ["CovariateEmbedding", "MLP", "SparseRows", "bf16_backward", "dense_heads", "dense_linear", "native_bf16_cpu"]

#: inside :func:`bf16_backward`: the large matrix products of the backward pass (the count
#: decoder's output layer, the sparse input layer's weight gradient) take bfloat16 operands
#: with float32 accumulation and float32 results; every forward value stays float32
_BF16_BACKWARD = contextvars.ContextVar("cellvi_bf16_backward", default=False)


@contextlib.contextmanager
def bf16_backward(enabled: bool = True) -> Iterator[None]:
    """Layers called in this block (in their later backward passes) compute the gradients of
    their large matrix products from bfloat16 operands, on the CPU only (``TrainConfig.
    backward_precision``). Forward outputs, the loss and the optimiser state stay float32:
    the weight and input gradients carry a relative rounding error of about 0.3%."""
    token = _BF16_BACKWARD.set(bool(enabled))
    try:
        yield
    finally:
        _BF16_BACKWARD.reset(token)


def _bf16_wanted(x: torch.Tensor) -> bool:
    return (_BF16_BACKWARD.get() and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.is_grad_enabled())


@functools.lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 ``avx512_bf16`` or
    ``amx_bf16``, read from ``/proc/cpuinfo`` on Linux): there a bfloat16 product of a 512 x 128
    by 128 x 2,000 block took 1.4 ms against 3.1 ms in float32 (one thread, casts included);
    without it oneDNN emulates bfloat16 and gains nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` from bfloat16 operands, float32 accumulation and result."""
    return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()


class _AddmmBf16Backward(torch.autograd.Function):
    """``bias + x @ weight`` in float32; the backward's two products in bfloat16."""

    @staticmethod
    def forward(ctx, bias, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias, x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.needs_input_grad[0] else None
        grad_x = _bf16_mm(grad, weight.t()) if ctx.needs_input_grad[1] else None
        grad_weight = _bf16_mm(x.t(), grad) if ctx.needs_input_grad[2] else None
        return grad_bias, grad_x, grad_weight


def addmm(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(bias, x, weight)`` (1-D ``bias``); inside :func:`bf16_backward` its
    gradients come from bfloat16 products."""
    if _bf16_wanted(x):
        return _AddmmBf16Backward.apply(bias, x, weight)
    return torch.addmm(bias, x, weight)


def dense_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` (any leading dimensions); inside :func:`bf16_backward` its gradients come
    from bfloat16 products (:func:`addmm`), the forward value is the same float32."""
    if layer.bias is None or not _bf16_wanted(x):
        return layer(x)
    out = _AddmmBf16Backward.apply(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t())
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dense_heads(x: torch.Tensor, layers: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` from one product with the layers' weights stacked
    (two 128 -> 10 heads of 8,192 rows: 0.64 ms against 2 x 0.54 ms, one thread); bfloat16
    gradients inside :func:`bf16_backward` as :func:`dense_linear`."""
    if any(layer.bias is None for layer in layers):
        return [layer(x) for layer in layers]
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    flat = x.reshape(-1, x.shape[-1])
    out = (_AddmmBf16Backward.apply(bias, flat, weight.t()) if _bf16_wanted(x)
           else F.linear(flat, weight, bias))
    sizes = [layer.out_features for layer in layers]
    # contiguous copies: elementwise ops on the strided column blocks ran ~8x slower
    return [o.contiguous().reshape(*x.shape[:-1], o.shape[-1]) for o in out.split(sizes, dim=-1)]


class SparseRows(NamedTuple):
    """A ``(n_rows, n_cols)`` matrix given by its non-zeros, row-major sorted.

    An :class:`MLP` whose input is a ``SparseRows`` computes its first layer with
    ``embedding_bag`` over the non-zeros: the cost follows the non-zeros, not the width.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    n_rows: int

    def offsets(self) -> torch.Tensor:
        return torch.searchsorted(self.rows, torch.arange(self.n_rows, device=self.rows.device))


#: above this share of non-zeros the weight gradient of :func:`sparse_linear` is one dense
#: matrix product (a 512 x 2,000 block at 11% non-zeros: 3.8 ms against 7.1 ms sparse, one
#: thread); below it a sparse product, whose cost follows the non-zeros (1.5-1.9 ms against
#: 5.1 ms at 3%)
DENSE_GRADIENT_SHARE = 0.05


class _SparseLinear(torch.autograd.Function):
    """``dense(x) @ weight.T`` from the non-zeros of ``x``: forward with ``embedding_bag``;
    backward with one matrix product for the weight instead of ``embedding_bag``'s own
    backward, which sorts the non-zeros and scatters them one by one (forward + backward of a
    512 x 2,000 block at 11% non-zeros: 6.8 ms against 10.3 ms, one thread)."""

    @staticmethod
    def forward(ctx, rows, cols, values, offsets, n_rows, weight, bf16=False):
        ctx.n_rows = n_rows
        ctx.bf16 = bf16
        ctx.save_for_backward(rows, cols, values, weight)
        return F.embedding_bag(cols, weight.t().contiguous(), offsets, mode="sum",
                               per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad):
        rows, cols, values, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_values = (grad.index_select(0, rows) * weight.t().index_select(0, cols)).sum(-1)
        if ctx.needs_input_grad[5]:
            n_in = weight.shape[1]
            if values.numel() > DENSE_GRADIENT_SHARE * ctx.n_rows * n_in:
                # scatter_add_: a repeated (row, col) adds up, as in the forward's embedding_bag
                dense = grad.new_zeros(ctx.n_rows * n_in).scatter_add_(0, rows * n_in + cols, values)
                dense = dense.view(ctx.n_rows, n_in)
                grad_weight = _bf16_mm(grad.t(), dense) if ctx.bf16 else grad.t() @ dense
            else:
                coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (ctx.n_rows, n_in),
                                              check_invariants=False)
                grad_weight = (coo.t() @ grad).t()
        return None, None, grad_values, None, None, grad_weight, None


def sparse_linear(x: SparseRows, linear: nn.Linear) -> torch.Tensor:
    """``linear(dense(x))`` computed from the non-zeros of ``x``."""
    out = _SparseLinear.apply(x.rows, x.cols, x.values, x.offsets(), x.n_rows, linear.weight,
                              _bf16_wanted(linear.weight))
    return out + linear.bias if linear.bias is not None else out


class CovariateEmbedding(nn.Module):
    """Sum of one embedding per categorical covariate (equivalent to one-hot @ W).

    Args:
        n_cats_per_cov: number of categories of each covariate.
        n_out: output width.
    """

    def __init__(self, n_cats_per_cov: Sequence[int], n_out: int):
        super().__init__()
        self.n_cats_per_cov = tuple(int(n) for n in n_cats_per_cov)
        self.embeddings = nn.ModuleList(nn.Embedding(n, n_out) for n in self.n_cats_per_cov)
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, covs: torch.Tensor | None) -> torch.Tensor | int:
        if not self.embeddings:
            return 0
        if covs is None:
            raise InvalidInputError("this network was built with covariates; pass their codes")
        out = self.embeddings[0](covs[..., 0])
        for i in range(1, len(self.embeddings)):
            out = out + self.embeddings[i](covs[..., i])
        return out


class MLP(nn.Module):
    """Fully connected layers (Linear -> norm -> ReLU -> dropout) with covariates.

    Args:
        n_in: input width.
        n_hidden: width of each hidden layer.
        n_layers: number of hidden layers (>= 1).
        n_cats_per_cov: categories per categorical covariate; they enter every hidden layer.
        dropout: dropout rate after each hidden layer.
        norm: ``"batch"``, ``"layer"`` or ``None``.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cats_per_cov: Sequence[int] = (),
        dropout: float = 0.1,
        norm: str | None = "batch",
    ):
        super().__init__()
        if n_layers < 1:
            raise InvalidInputError(f"n_layers must be >= 1, got {n_layers}")
        self.n_out = n_hidden
        self.linears = nn.ModuleList()
        self.covariates = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(n_layers):
            self.linears.append(nn.Linear(n_in if i == 0 else n_hidden, n_hidden))
            self.covariates.append(CovariateEmbedding(n_cats_per_cov, n_hidden))
            if norm == "batch":
                self.norms.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3))
            elif norm == "layer":
                self.norms.append(nn.LayerNorm(n_hidden, elementwise_affine=False))
            elif norm is None:
                self.norms.append(nn.Identity())
            else:
                raise InvalidInputError(f"norm must be 'batch', 'layer' or None, got {norm!r}")
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor | SparseRows, covs: torch.Tensor | None = None) -> torch.Tensor:
        for linear, cov, norm in zip(self.linears, self.covariates, self.norms, strict=True):
            h = sparse_linear(x, linear) if isinstance(x, SparseRows) else dense_linear(x, linear)
            shift = cov(covs)
            if isinstance(shift, torch.Tensor):  # (no covariates: 0, nothing to add)
                h = h + shift
            if isinstance(norm, nn.BatchNorm1d) and h.dim() > 2:
                h = norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
            else:
                h = norm(h)
            x = self.dropout(self.activation(h))
        return x
