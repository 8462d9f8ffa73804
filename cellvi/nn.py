"""Network building blocks: MLPs with categorical covariates injected.

A categorical covariate enters a layer as a learned embedding added to that layer's
pre-activation. This is exactly a one-hot encoding concatenated to the layer input, without
materialising the one-hot matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

__all__ = ["CovariateEmbedding", "MLP", "SparseRows"]


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


def sparse_linear(x: SparseRows, linear: nn.Linear) -> torch.Tensor:
    """``linear(dense(x))`` computed from the non-zeros of ``x``."""
    out = F.embedding_bag(x.cols, linear.weight.t().contiguous(), x.offsets(), mode="sum",
                          per_sample_weights=x.values)
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
            h = (sparse_linear(x, linear) if isinstance(x, SparseRows) else linear(x)) + cov(covs)
            if isinstance(norm, nn.BatchNorm1d) and h.dim() > 2:
                h = norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
            else:
                h = norm(h)
            x = self.dropout(self.activation(h))
        return x
