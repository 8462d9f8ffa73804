"""Spillover matrices for :func:`cellvi.pp.compensate`.

Builds the channels x channels spillover DataFrame(s) to compensate with: from the
``spillover=`` argument (a DataFrame, an array with channel names, a CSV file, the FCS
``SPILL`` text or a ``{"channels", "matrix"}`` dict) or, without one, from the FCS keywords
that :func:`cellvi.io.read_fcs` stored in ``adata.uns["spillover"]`` (one matrix, or one per
sample); checks each (invertible; diagonal 1, i.e. a spillover and not a compensation
matrix); and matches its channel names to the AnnData's channels (``var["channel"]``, then
``var_names``), taking the sub-matrix of the channels asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger("cellvi")


def _looks_like_spill_text(value: str) -> bool:
    head = value.split(",", 1)[0].strip()
    return "," in value and head.isdigit() and "\n" not in value.strip()


def _read_spillover_csv(path: Path) -> pd.DataFrame:
    from .io import _spillover_frame

    if not path.exists():
        raise FileNotFoundError(f"spillover file not found: {path}")
    try:
        df = pd.read_csv(path, sep=None, engine="python")
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"could not read the spillover matrix from {path}: {err}") from None
    first = df.columns[0]
    if df[first].dtype == object or str(first).startswith("Unnamed") or str(first) == "":
        df = df.set_index(first)
        df.index.name = None
    if df.shape[0] == df.shape[1] and isinstance(df.index, pd.RangeIndex):
        df.index = df.columns
    try:
        values = df.to_numpy(dtype=np.float64)
    except ValueError:
        raise ValueError(
            f"{path} is not a numeric channels x channels matrix; expected a header row of "
            "channel names ($PnN), optionally a first column of the same names"
        ) from None
    if list(map(str, df.index)) != list(map(str, df.columns)):
        if set(map(str, df.index)) != set(map(str, df.columns)):
            raise ValueError(
                f"the rows and columns of the spillover matrix in {path} name different "
                f"channels (rows: {list(df.index)}, columns: {list(df.columns)})"
            )
        df = df.loc[:, df.index]
        values = df.to_numpy(dtype=np.float64)
    return _spillover_frame(values, list(map(str, df.index)), f"spillover matrix in {path}")


def _spillover_argument(spillover: Any, channels: Sequence[str] | None) -> pd.DataFrame:
    from .io import _spillover_frame, _spillover_from_entry, parse_spillover

    if isinstance(spillover, pd.DataFrame):
        rows, cols = list(map(str, spillover.index)), list(map(str, spillover.columns))
        if rows != cols:
            if set(rows) != set(cols):
                raise ValueError(
                    "the spillover DataFrame's index and columns must name the same channels "
                    f"(index: {rows}, columns: {cols})"
                )
            spillover = spillover.loc[:, spillover.index]
        return _spillover_frame(spillover.to_numpy(dtype=np.float64), rows,
                                "spillover DataFrame")
    if isinstance(spillover, np.ndarray):
        if channels is None:
            raise ValueError(
                "a spillover matrix given as an array needs its channel names: pass "
                "channels=[...] (in the order of its rows and columns), or pass a DataFrame"
            )
        return _spillover_frame(spillover, list(channels), "spillover array")
    if isinstance(spillover, str) and _looks_like_spill_text(spillover) \
            and not Path(spillover).exists():
        return parse_spillover(spillover, source="spillover text")
    if isinstance(spillover, (str, Path)):
        return _read_spillover_csv(Path(spillover).expanduser())
    if isinstance(spillover, Mapping):
        return _spillover_from_entry(dict(spillover), "spillover dict")
    raise TypeError(
        "spillover must be a DataFrame (channels x channels), an array with channels=, a "
        f"path to a CSV file or the FCS SPILL text; got {type(spillover).__name__}"
    )


def _match_spillover(adata: AnnData, frame: pd.DataFrame) -> list[int]:
    """Column of each spillover channel, matched to ``var["channel"]``, then ``var_names``."""
    from .pp import _channel_labels

    var_names = [str(v) for v in adata.var_names]
    lookups = []
    if "channel" in adata.var.columns:
        lookups.append({str(c): i for i, c in enumerate(adata.var["channel"])})
    lookups.append({v: i for i, v in enumerate(var_names)})
    idx, unmatched = [], []
    for name in frame.index:
        i = next((lk[name] for lk in lookups if name in lk), None)
        (unmatched if i is None else idx).append(name if i is None else i)
    if unmatched:
        against = "var['channel'] and var_names" if "channel" in adata.var else "var_names"
        raise ValueError(
            f"spillover channel(s) {unmatched} are not channels of adata (matched against "
            f"{against}; channels here: {_channel_labels(adata)}). Pass the matrix that "
            "belongs to these data, or rename its rows/columns to these channel names."
        )
    return idx


def _check_spillover(frame: pd.DataFrame, source: str) -> None:
    values = frame.to_numpy()
    if np.linalg.cond(values) > 1e12:
        raise ValueError(
            f"the {source} is singular (not invertible), so it cannot be used to compensate; "
            "check that it is the right matrix"
        )
    if not np.allclose(np.diag(values), 1.0, atol=1e-3):
        logger.warning(
            "the diagonal of the %s is not 1 (%s); cellvi expects a spillover matrix "
            "(spill of each dye into each detector), not its inverse (a compensation matrix)",
            source, np.round(np.diag(values), 4).tolist(),
        )


def _subset_spillover(adata: AnnData, frame: pd.DataFrame, channels: Sequence[str]) -> pd.DataFrame:
    """The sub-matrix of the channels named in ``channels`` (any naming adata knows)."""
    from .pp import _resolve_channels

    wanted = set(_resolve_channels(adata, channels))
    cols = _match_spillover(adata, frame)
    keep = [name for name, i in zip(frame.index, cols, strict=True) if i in wanted]
    missing = [str(adata.var_names[i]) for i in wanted if i not in set(cols)]
    if missing:
        raise ValueError(
            f"channel(s) {missing} are not in the spillover matrix (it has {list(frame.index)})"
        )
    return frame.loc[keep, keep]


def _per_sample_jobs(
    adata: AnnData, key: str, samples: Mapping[str, Any],
) -> list[tuple[np.ndarray | None, pd.DataFrame, str]]:
    """One job per sample of ``obs[key]`` that has events, with that sample's matrix."""
    from .io import spillover_from_uns

    if not key:
        raise KeyError(
            "adata.uns['spillover'] holds one matrix per sample, but the files were "
            "read with sample_key=None, so events cannot be matched to them; read them "
            "again with a sample_key, or pass spillover= explicitly"
        )
    if key not in adata.obs.columns:
        raise KeyError(
            "adata.uns['spillover'] holds one matrix per sample, keyed by "
            f"obs[{key!r}], but adata.obs has no such column. Add it, or pass "
            "spillover= explicitly."
        )
    col = adata.obs[key].astype(str).to_numpy()
    without = sorted(set(col) - set(samples))
    if without:
        raise ValueError(
            f"sample(s) {without} (obs[{key!r}]) have no spillover matrix in "
            "adata.uns['spillover']; pass spillover= explicitly or leave them out"
        )
    jobs: list[tuple[np.ndarray | None, pd.DataFrame, str]] = []
    for s in samples:
        rows = col == s
        if rows.any():
            frame = spillover_from_uns(adata, sample=s)
            jobs.append((rows, frame, f"spillover matrix of sample {s!r}"))
    return jobs


def _spillover_jobs(
    adata: AnnData, spillover: Any, channels: Sequence[str] | None,
) -> list[tuple[np.ndarray | None, pd.DataFrame, str]]:
    """``(row selector or None, spillover frame, where it came from)`` for each matrix to apply.

    ``spillover`` is :func:`cellvi.pp.compensate`'s argument; ``None`` takes the matrix, or
    one per sample, from ``adata.uns``.
    """
    from .io import per_sample_spillover, spillover_from_uns

    if spillover is not None:
        frame = _spillover_argument(spillover, channels)
        if channels is not None and not isinstance(spillover, np.ndarray):
            frame = _subset_spillover(adata, frame, channels)
        return [(None, frame, "spillover matrix given")]
    per_sample = per_sample_spillover(adata.uns.get("spillover"))
    if per_sample is not None:
        jobs = _per_sample_jobs(adata, *per_sample)
    else:
        jobs = [(None, spillover_from_uns(adata), "spillover matrix in adata.uns")]
    if channels is not None:
        jobs = [(r, _subset_spillover(adata, f, channels), w) for r, f, w in jobs]
    return jobs
