"""Device containers: the arrays of :mod:`cellvi.data` held on one device as tensors, and
their mini-batches.

A CSR matrix stays sparse on the device and each mini-batch is densified there; on the CPU
the batches also carry their non-zeros, so that the count likelihoods spend their
``lgamma`` terms on those entries only (house guide, section 6).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from .data import BackedRows
from .distributions import nonzeros_of

__all__ = ["DeviceMatrix", "StreamedMatrix", "DeviceData"]


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
        cols, vals = self.indices.index_select(0, pos), self.data.index_select(0, pos)
        # a repeated (row, col) of the CSR adds up, as in its non-zeros below and in scipy
        out.view(-1).scatter_add_(0, row_ids * self.shape[1] + cols, vals)
        if with_nonzeros:
            keep = vals != 0  # explicitly stored zeros are not non-zeros
            if not bool(keep.all()):
                row_ids, cols, vals = row_ids[keep], cols[keep], vals[keep]
            return out, (row_ids, cols, vals)
        return out


class StreamedMatrix:
    """The rows of a backed matrix (:class:`cellvi.data.BackedRows`), read a chunk at a time
    and kept in a small cache of recent chunks (each a :class:`DeviceMatrix`), so that memory
    stays constant whatever the number of cells.

    Training reads it in *block-shuffled* order (:meth:`order`): the chunks in a random
    order, and the cells of every ``window`` consecutive chunks of that order shuffled
    together, so that each mini-batch mixes cells of ``window`` random chunks and each
    chunk is read about once per pass. Sequential passes (inference) read each chunk once.
    """

    def __init__(self, source, device: torch.device, *, window: int = 4, cache: int = 8):
        self.source = source
        self.shape = source.shape
        self.device = device
        self.block = source.chunk_rows
        self.window = int(window)
        self._cache: OrderedDict[int, DeviceMatrix] = OrderedDict()
        self._cache_size = max(int(cache), 2 * self.window)

    def _read(self, b: int) -> sp.csr_matrix:
        """Chunk ``b`` from disk."""
        start = int(b) * self.block
        return self.source.chunk(start, min(self.shape[0], start + self.block))

    def _chunk(self, b: int) -> DeviceMatrix:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        block = DeviceMatrix(self._read(b), self.device)
        self._cache[b] = block
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return block

    def order(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` in block-shuffled order (torch's global random state); cells of at most
        ``window`` chunks are simply permuted, as in memory."""
        blocks = idx // self.block
        present = torch.unique(blocks)
        if len(present) <= self.window:
            return idx[torch.randperm(len(idx))]
        rank = torch.zeros(int(present.max()) + 1 if len(present) else 1, dtype=torch.long)
        rank[present[torch.randperm(len(present))]] = torch.arange(len(present))
        key = (rank[blocks] // self.window).double() + torch.rand(len(idx), dtype=torch.float64)
        return idx[torch.argsort(key)]

    def rows(self, idx: torch.Tensor, with_nonzeros: bool = False):
        """As :meth:`DeviceMatrix.rows`, chunk by chunk, rows in the order of ``idx``."""
        idx = idx.cpu()
        blocks = idx // self.block
        sorted_blocks, perm = torch.sort(blocks, stable=True)
        present, counts = torch.unique_consecutive(sorted_blocks, return_counts=True)
        parts, nz_parts, offset = [], [], 0
        for b, c in zip(present.tolist(), counts.tolist(), strict=True):
            local = idx[perm[offset:offset + c]] - b * self.block
            got = self._chunk(b).rows(local, with_nonzeros)
            if with_nonzeros:
                got, (r, cols, vals) = got
                nz_parts.append((r + offset, cols, vals))
            parts.append(got)
            offset += c
        grouped = torch.cat(parts) if parts else torch.zeros(0, self.shape[1], device=self.device)
        position = torch.empty_like(perm)
        position[perm] = torch.arange(len(perm))  # grouped row of each requested row
        out = grouped[position.to(self.device)]
        if not with_nonzeros:
            return out
        where = perm.to(self.device)  # the requested position of each grouped row
        rows = torch.cat([where[r] for r, _, _ in nz_parts]) if nz_parts else position[:0]
        cols = torch.cat([c for _, c, _ in nz_parts]) if nz_parts else position[:0]
        vals = torch.cat([v for _, _, v in nz_parts]) if nz_parts else out.new_zeros(0)
        keep = torch.argsort(rows, stable=True)  # row-major, as SparseRows needs
        return out, (rows[keep], cols[keep], vals[keep])

    def to_csr(self, idx: torch.Tensor) -> sp.csr_matrix:
        """Rows ``idx`` (sorted) as an in-memory CSR matrix, read chunk by chunk."""
        idx = np.asarray(idx.cpu())
        parts = []
        for b in np.unique(idx // self.block):
            local = idx[idx // self.block == b] - b * self.block
            parts.append(self._read(b)[local])
        return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.shape[1]))


def _random_subset(n_total: int, n: int) -> torch.Tensor:
    """``n`` distinct positions of ``range(n_total)``, a uniform random subset in random order
    (torch's global random state); for ``n`` well below ``n_total``."""
    picked = torch.empty(0, dtype=torch.long)
    while len(picked) < n:  # distinct values of draws with replacement: a uniform subset
        more = torch.randint(0, n_total, (n - len(picked) + n // 16 + 16,))
        picked = torch.unique(torch.cat([picked, more]))
    return picked[torch.randperm(len(picked))[:n]]


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

    @property
    def streamed(self) -> bool:
        return isinstance(self.x, StreamedMatrix)

    def shuffle(self, idx: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """A random order of the cells ``idx`` for one epoch (block-shuffled when the matrix
        is streamed from disk, :meth:`StreamedMatrix.order`); with ``n``, its first ``n``.

        In memory, when ``n`` is at most a quarter of ``idx`` (an epoch of 100,000 of 900,000
        or more training cells), the ``n`` cells are a uniform random subset in random order
        drawn in ``O(n log n)``: distinct cells of a draw with replacement, a random ``n`` of
        them, permuted (a full permutation of 9M cells took 0.5 s an epoch)."""
        if self.streamed:
            order = self.x.order(idx)
        elif n is not None and 4 * n <= len(idx):
            order = idx[_random_subset(len(idx), n)]
        else:
            order = idx[torch.randperm(len(idx))]
        return order if n is None else order[:n]

    def holdout(self, idx: torch.Tensor) -> tuple[DeviceData, torch.Tensor]:
        """Data and indices to evaluate the cells ``idx`` on repeatedly: themselves, or, for a
        streamed matrix, those cells read once into memory (random cells would otherwise
        read a chunk each)."""
        if not self.streamed or not len(idx):
            return self, idx
        idx = torch.sort(idx.cpu()).values
        dev = self.x.device
        obs = {k: v[idx.to(v.device)] for k, v in self.obs.items()}
        return DeviceData(DeviceMatrix(self.x.to_csr(idx), dev), obs, self.nonzeros), torch.arange(len(idx))

    @classmethod
    def from_arrays(cls, X, device: torch.device, **obs: np.ndarray | None) -> DeviceData:
        tensors = {}
        for key, value in obs.items():
            if value is None:
                continue
            dtype = torch.long if np.issubdtype(np.asarray(value).dtype, np.integer) else torch.float32
            tensors[key] = torch.as_tensor(np.asarray(value), dtype=dtype, device=device)
        matrix = StreamedMatrix(X, device) if isinstance(X, BackedRows) else DeviceMatrix(X, device)
        return cls(matrix, tensors)

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
