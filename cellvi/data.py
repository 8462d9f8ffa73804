"""AnnData -> arrays, with validation. The only place (besides ``cellvi.tl``) that reads AnnData.

Every check here raises an error that says what is wrong and what to do about it. Nothing
here writes to the AnnData it is given.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .errors import InvalidInputError, InvalidTypeError, MissingKeyError

logger = logging.getLogger("cellvi")

__all__ = ["CountData", "ContinuousData", "BackedRows", "prepare_continuous", "get_matrix",
           "check_finite", "check_counts", "encode_covariates", "prepare_counts", "check_writable",
           "check_unique_names", "as_batch_keys"]

#: rows read at a time from a backed AnnData
CHUNK_ROWS = 16_384


class BackedRows:
    """The matrix of a backed AnnData (``anndata.read_h5ad(path, backed="r")``), read in
    contiguous row chunks through anndata's own readers; never held in memory whole.

    ``chunk(start, stop)`` is a ``float32`` CSR block (dense on-disk matrices too), and
    ``chunks()`` walks the rows in order.
    """

    def __init__(self, matrix, chunk_rows: int | None = None):
        self.matrix = matrix
        self.shape = tuple(int(n) for n in matrix.shape)
        self.chunk_rows = int(chunk_rows or CHUNK_ROWS)
        self.dtype = np.dtype(np.float32)

    def chunk(self, start: int, stop: int) -> sp.csr_matrix:
        block = self.matrix[start:stop]
        if sp.issparse(block):
            return sp.csr_matrix(block, dtype=np.float32)
        return sp.csr_matrix(np.asarray(block, dtype=np.float32))

    def chunks(self):
        """``(start, csr block)`` for every chunk of rows, in order."""
        for start in range(0, self.shape[0], self.chunk_rows):
            yield start, self.chunk(start, min(self.shape[0], start + self.chunk_rows))


@dataclass
class CountData:
    """Arrays a count model needs (no AnnData inside).

    Attributes:
        X: counts, ``float32`` CSR or dense, cells x genes.
        covs: ``int64`` codes, cells x keys, or ``None``.
        batch_keys: the obs keys behind ``covs``.
        categories: the categories of each key, in code order.
        log_library: ``log`` of the total counts per cell, shape ``(n_obs, 1)``.
        var_names: gene names.
    """

    X: np.ndarray | sp.csr_matrix
    covs: np.ndarray | None
    batch_keys: list[str]
    categories: dict[str, list[str]]
    log_library: np.ndarray
    var_names: list[str]


def as_batch_keys(batch_key: str | Sequence[str] | None) -> list[str]:
    if batch_key is None:
        return []
    if isinstance(batch_key, str):
        return [batch_key]
    return list(batch_key)


def is_streamed(adata: AnnData) -> bool:
    """Whether ``adata.X`` stays on disk: a backed ``.h5ad`` (``backed="r"``) or a zarr store
    opened by :func:`cellvi.io.open_zarr` (anndata's on-disk sparse dataset or a zarr array)."""
    if adata.isbacked:
        return True
    X = adata.X
    if X is None or isinstance(X, np.ndarray) or sp.issparse(X):
        return False
    from anndata.abc import CSCDataset, CSRDataset

    if isinstance(X, CSRDataset | CSCDataset):
        return True
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr comes with anndata
        return False
    return isinstance(X, zarr.Array)


#: how to get an on-disk X into memory
TO_MEMORY = ("adata = adata.to_memory() for a backed .h5ad, adata = anndata.read_zarr(path) "
             "for a zarr store")


def get_matrix(adata: AnnData, layer: str | None = None, *, backed: bool = False):
    """The matrix in ``layer`` (or ``X``), after checking it can be read. With ``backed``,
    the ``X`` of a backed AnnData comes as :class:`BackedRows` (layers of a backed AnnData
    are in memory); without, a backed ``X`` is refused with what to do."""
    if not isinstance(adata, AnnData):
        raise InvalidTypeError(f"expected an AnnData object, got {type(adata).__name__}")
    if layer is None and is_streamed(adata):
        if backed and adata.n_obs and adata.n_vars:
            return BackedRows(adata.X)
        if not backed:
            raise InvalidInputError(
                "this AnnData's X is on disk (a backed .h5ad or cellvi.io.open_zarr) and this "
                f"function needs it in memory; load it first: {TO_MEMORY}"
            )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidInputError(f"AnnData is empty ({adata.n_obs} cells x {adata.n_vars} features)")
    if layer is None:
        if adata.X is None:
            raise InvalidInputError(
                "adata.X is None. Pass layer='<name>' with the raw counts "
                f"(layers here: {list(adata.layers.keys()) or 'none'})"
            )
        return adata.X
    if layer not in adata.layers:
        raise MissingKeyError(
            f"layer {layer!r} is not in adata.layers (available: "
            f"{list(adata.layers.keys()) or 'none'}); use layer=None to read adata.X"
        )
    return adata.layers[layer]


def _values(X) -> np.ndarray:
    """The stored values (non-zeros of a sparse matrix, all entries of a dense one)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


#: values checked at a time by :func:`check_finite` and :func:`check_count_values`: whole-array
#: temporaries of a 1M-cell matrix (221M non-zeros) cost more in first-touch page faults than
#: the checks themselves (3.4 s against 0.5 s in 1M-value chunks)
CHECK_CHUNK = 1 << 20


def _chunks(vals: np.ndarray):
    for start in range(0, vals.size, CHECK_CHUNK):
        yield vals[start:start + CHECK_CHUNK]


def check_finite(X, where: str) -> None:
    vals = _values(X)
    if not np.issubdtype(vals.dtype, np.number):
        raise InvalidTypeError(f"{where} holds non-numeric values ({vals.dtype})")
    if not all(np.isfinite(c).all() for c in _chunks(vals)):
        raise InvalidInputError(
            f"{where} contains {int((~np.isfinite(vals)).sum())} NaN or infinite values; "
            "remove or impute them before fitting"
        )


def check_counts(X, where: str) -> None:
    """Non-negative integers, no empty cells (error); empty genes (warning)."""
    check_count_values(X, where)
    check_count_totals(np.asarray(X.sum(axis=1)).ravel(), np.asarray(X.sum(axis=0)).ravel(), where)


def check_count_values(X, where: str) -> None:
    """Non-negative integers (error otherwise, saying what to pass instead)."""
    vals = _values(X)
    if any((c < 0).any() for c in _chunks(vals)):
        raise InvalidInputError(
            f"{where} has negative values ({int((vals < 0).sum())}), but a count likelihood "
            "needs raw counts. If the raw counts are in a layer, pass layer='counts' (or its "
            "name); otherwise use likelihood='normal' models for continuous data."
        )
    if not all(np.array_equal(c, np.round(c)) for c in _chunks(vals)):
        frac = vals != np.round(vals)
        hint = " the data look log-normalized (sc.pp.log1p)" if vals.max() < 20 else ""
        raise InvalidInputError(
            f"{where} has {int(frac.sum())} non-integer values:{hint or ' not raw counts'}. "
            "A count likelihood needs raw integer counts: pass layer='counts' (keep raw counts "
            "with adata.layers['counts'] = adata.X.copy() before normalizing)."
        )


def check_count_totals(totals: np.ndarray, gene_totals: np.ndarray, where: str) -> None:
    """No empty cells (error); empty genes (warning)."""
    empty = int((totals == 0).sum())
    if empty:
        raise InvalidInputError(
            f"{empty} cells have zero total counts in {where}; remove them first, e.g. "
            "sc.pp.filter_cells(adata, min_counts=1)"
        )
    n_empty_genes = int((gene_totals == 0).sum())
    if n_empty_genes:
        warnings.warn(
            f"{n_empty_genes} genes have zero counts in every cell; they carry no information "
            "(sc.pp.filter_genes(adata, min_cells=1) removes them)",
            UserWarning,
            stacklevel=4,
        )


def encode_covariates(
    adata: AnnData,
    batch_keys: list[str],
    categories: dict[str, list[str]] | None = None,
    *,
    min_cells: int = 2,
) -> tuple[np.ndarray | None, dict[str, list[str]]]:
    """Integer codes of categorical obs columns.

    With ``categories`` given (a trained model's), cells must fall into known categories.
    """
    if not batch_keys:
        return None, {}
    codes, cats_out = [], {}
    for key in batch_keys:
        if key not in adata.obs.columns:
            raise MissingKeyError(
                f"batch key {key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)[:20]})"
            )
        col = adata.obs[key]
        if col.isna().any():
            raise InvalidInputError(f"adata.obs[{key!r}] has {int(col.isna().sum())} missing values; fill or drop them")
        values = col.astype(str).to_numpy()
        if categories is None:
            counts = pd.Series(values).value_counts()
            cats = sorted(counts.index.tolist(), key=_natural_key)
            small = counts[counts < min_cells]
            if len(small):
                raise InvalidInputError(
                    f"batch category {', '.join(map(repr, small.index[:5]))} of adata.obs[{key!r}] "
                    f"has fewer than {min_cells} cells; merge it with another category or drop "
                    "those cells"
                )
        else:
            cats = list(categories[key])
            unknown = sorted(set(values) - set(cats))
            if unknown:
                raise InvalidInputError(
                    f"adata.obs[{key!r}] has categories the model was not trained on: "
                    f"{unknown[:10]} (trained on {cats})"
                )
        lookup = {c: i for i, c in enumerate(cats)}
        codes.append(np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values)))
        cats_out[key] = cats
    return np.stack(codes, axis=1), cats_out


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def prepare_counts(
    adata: AnnData,
    layer: str | None = None,
    batch_key: str | Sequence[str] | None = None,
    *,
    categories: dict[str, list[str]] | None = None,
    check: bool = True,
) -> CountData:
    """Validate ``adata`` and extract the arrays a count model needs.

    Args:
        layer: layer with raw counts, or ``None`` for ``X``.
        batch_key: one or more categorical obs keys.
        categories: known categories (when applying a trained model).
        check: validate the values (a trained model's callers have checked the features).
    """
    X = get_matrix(adata, layer, backed=True)
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    check_unique_names(adata)
    if isinstance(X, BackedRows):
        totals = _scan_backed_counts(X, where, check).reshape(-1, 1)
    else:
        X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
        if check:
            check_finite(X, where)
            check_counts(X, where)
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1, 1)
    keys = as_batch_keys(batch_key)
    covs, cats = encode_covariates(adata, keys, categories)
    log_library = np.log(np.maximum(totals, 1.0)).astype(np.float32)
    return CountData(X, covs, keys, cats, log_library, list(map(str, adata.var_names)))


def _scan_backed_counts(X: BackedRows, where: str, check: bool) -> np.ndarray:
    """One pass over a backed matrix: the library sizes, with every check of
    :func:`check_counts` made chunk by chunk (same messages)."""
    totals = np.empty(X.shape[0], dtype=np.float64)
    gene_totals = np.zeros(X.shape[1], dtype=np.float64)
    for start, block in X.chunks():
        if check:
            check_finite(block, where)
            check_count_values(block, where)
        totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        gene_totals += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
    if check:
        check_count_totals(totals, gene_totals, where)
    return totals


def check_unique_names(adata: AnnData) -> None:
    """Feature names must be unique: a model stores and matches its features by name."""
    names = pd.Index(map(str, adata.var_names))
    if not names.is_unique:
        dup = names[names.duplicated()].unique().tolist()
        raise InvalidInputError(
            f"adata.var_names has {len(dup)} duplicated names (e.g. {dup[:5]}); make them "
            "unique first with adata.var_names_make_unique()"
        )


def check_var_names(adata: AnnData, var_names: Sequence[str]) -> None:
    have = list(map(str, adata.var_names))
    want = list(var_names)
    if have == want:
        return
    missing = [g for g in want if g not in set(have)]
    extra = [g for g in have if g not in set(want)]
    if not missing and not extra:
        raise InvalidInputError(
            "adata has the model's genes in a different order; reorder with "
            "adata = adata[:, model.var_names].copy()"
        )
    raise InvalidInputError(
        f"adata's genes do not match the model's: {len(missing)} of the model's "
        f"{len(want)} genes are missing (e.g. {missing[:5]}) and {len(extra)} are extra "
        f"(e.g. {extra[:5]}). Subset to the model's genes: adata[:, model.var_names]"
    )


def check_writable(adata: AnnData, copy: bool) -> None:
    """Refuse to write results into a view (it would silently turn into a copy)."""
    if copy and is_streamed(adata):
        raise InvalidInputError(
            "copy=True on an AnnData whose X is on disk would load the whole matrix into "
            "memory; write the results into it (copy=False; they stay in memory until you "
            f"write the file), or load it first: {TO_MEMORY}"
        )
    if adata.is_view and not copy:
        raise InvalidInputError(
            "adata is a view of another AnnData; writing results would silently make it a "
            "copy. Pass copy=True, or make it an actual object first: adata = adata.copy()"
        )


@dataclass
class ContinuousData:
    """Arrays a continuous-marker (cytometry) model needs.

    Attributes:
        X: ``float32`` dense, cells x markers, in the input's units.
        covs, batch_keys, categories: as in :class:`CountData`.
        var_names: the markers used.
    """

    X: np.ndarray
    covs: np.ndarray | None
    batch_keys: list[str]
    categories: dict[str, list[str]]
    var_names: list[str]


#: a 99.9th percentile above this marks a channel as untransformed (raw intensities)
UNTRANSFORMED_LIMIT = 1500.0


def select_markers(adata: AnnData, markers: Sequence[str] | None) -> np.ndarray | slice:
    """Column indexer for ``markers`` (all columns when ``None``), with a clear error."""
    if markers is None:
        return slice(None)
    if isinstance(markers, str):
        markers = [markers]
    names = pd.Index(map(str, adata.var_names))
    missing = [m for m in markers if m not in names]
    if missing:
        raise MissingKeyError(
            f"markers {missing[:10]} are not in adata.var_names (available: {list(names)[:30]})"
        )
    if len(set(markers)) != len(markers):
        raise InvalidInputError("markers has duplicates")
    return names.get_indexer(list(markers))


def prepare_continuous(
    adata: AnnData,
    layer: str | None = None,
    batch_key: str | Sequence[str] | None = None,
    *,
    markers: Sequence[str] | None = None,
    categories: dict[str, list[str]] | None = None,
    check: bool = True,
) -> ContinuousData:
    """Validate ``adata`` and extract the transformed marker matrix of a cytometry model.

    Errors: missing layer or markers, NaN/inf, constant channels. Warnings: channels that
    look untransformed (raw intensities: suggest :func:`cellvi.pp.arcsinh`), and
    fluorescence channels whose spillover matrix is in ``adata.uns`` but which were never
    compensated (suggest :func:`cellvi.pp.compensate`).
    """
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    check_unique_names(adata)
    cols = select_markers(adata, markers)
    X = marker_matrix(adata, layer, cols)
    var_names = list(map(str, adata.var_names[cols]))
    if check:
        check_finite(X, where)
        _check_channels(X, var_names, where)
        _check_compensated(adata, layer, var_names, where)
    keys = as_batch_keys(batch_key)
    covs, cats = encode_covariates(adata, keys, categories)
    return ContinuousData(X, covs, keys, cats, var_names)


def marker_matrix(adata: AnnData, layer: str | None, cols) -> np.ndarray:
    """The columns ``cols`` of ``layer`` (or ``X``) as a dense ``float32`` array; a backed
    ``X`` is read in row chunks (a few markers fit in memory even for millions of events)."""
    X = get_matrix(adata, layer, backed=True)
    if isinstance(X, BackedRows):
        return np.concatenate([block[:, cols].toarray() for _, block in X.chunks()])
    X = X[:, cols]
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


def _check_channels(X: np.ndarray, var_names: list[str], where: str) -> None:
    std = X.std(axis=0)
    constant = [v for v, s in zip(var_names, std, strict=True) if not s > 0]
    if constant:
        raise InvalidInputError(
            f"channels {constant} of {where} are constant (every cell has the same value) and "
            "carry no information; leave them out with markers=[...] or "
            "adata = adata[:, [m for m in adata.var_names if m not in (...)]].copy()"
        )
    q = np.quantile(np.abs(X), 0.999, axis=0)
    raw = [v for v, qq in zip(var_names, q, strict=True) if qq > UNTRANSFORMED_LIMIT]
    if raw:
        warnings.warn(
            f"channels {raw[:10]} of {where} look untransformed (99.9th percentile up to "
            f"{q.max():.3g}): cytometry models expect arcsinh- or logicle-transformed values. "
            "Use cellvi.pp.arcsinh(adata, cofactor=5) for mass cytometry, cofactor=150 for "
            "flow, or cellvi.pp.logicle(adata), and pass the result's layer",
            UserWarning,
            stacklevel=3,
        )


def spillover_channels(adata: AnnData) -> list[str]:
    """Channel names covered by a spillover matrix stored in ``adata.uns`` (may be empty)."""
    spill = adata.uns.get("spillover")
    if isinstance(spill, pd.DataFrame):
        return list(map(str, spill.columns))
    if isinstance(spill, dict):
        if "channels" in spill:
            return list(map(str, spill["channels"]))
        names = []  # one per sample
        for value in spill.values():
            if isinstance(value, dict) and "channels" in value:
                names += [str(c) for c in value["channels"] if str(c) not in names]
        return names
    text = adata.uns.get("spillover_text")
    if isinstance(text, str) and text.strip():
        parts = [p.strip() for p in text.split(",")]
        try:
            n = int(float(parts[0]))
        except ValueError:
            return []
        return parts[1 : 1 + n]
    return []


#: ``adata.uns`` key where :mod:`cellvi.pp` records what it did
PREPROCESSING_KEY = "cellvi_preprocessing"


def compensated_layers(adata: AnnData) -> list[str]:
    """Names of the matrices (``"X"`` or a layer) that :func:`cellvi.pp.compensate` produced
    or that were derived from one, as recorded in ``adata.uns["cellvi_preprocessing"]``."""
    log = adata.uns.get(PREPROCESSING_KEY)
    if not isinstance(log, dict):
        return []
    entries = log.get("compensated_layers")
    if entries is None:
        return []
    return [str(e) for e in np.atleast_1d(np.asarray(entries, dtype=object)).ravel()]


def _check_compensated(adata: AnnData, layer: str | None, var_names: list[str], where: str) -> None:
    channels = set(spillover_channels(adata))
    if not channels:
        return
    names = set(var_names)
    if "channel" in adata.var:
        names |= {str(adata.var["channel"].get(v, v)) for v in var_names}
    used = sorted(channels & names)
    if not used:
        return
    if (layer or "X") in compensated_layers(adata) or (layer is not None and "comp" in layer.lower()):
        return
    warnings.warn(
        f"{where} has fluorescence channels {used[:10]} whose spillover matrix is in "
        "adata.uns, but they were never compensated: uncompensated fluorescence gives wrong "
        "populations. Run cellvi.pp.compensate(adata) (then a transform) and pass the "
        "resulting layer",
        UserWarning,
        stacklevel=3,
    )
