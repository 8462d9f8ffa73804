"""Device containers: the arrays of :mod:`cellvi.data` held on one device as tensors, and
their mini-batches.

A CSR matrix stays sparse on the device and each mini-batch is densified there; on the CPU
the batches also carry their non-zeros, so that the count likelihoods spend their
``lgamma`` terms on those entries only (house guide, section 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from .distributions import nonzeros_of

__all__ = ["DeviceMatrix", "DeviceData"]


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
