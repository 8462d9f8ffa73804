"""Cytometry preprocessing: compensation, arcsinh and logicle transforms.

Each function reads ``adata.X`` or ``layer`` and, by default, writes its result to a new
layer (``key_added``), so the raw data stay as they were. ``key_added=None`` replaces the
input matrix instead (the only way these functions overwrite data); ``copy=True`` returns a
changed copy and leaves ``adata`` alone.

Channels can be named by ``var_names``, by ``var["channel"]`` (the FCS ``$PnN``) or by
``var["marker"]`` (``$PnS``). Without ``channels``, the transforms act on every channel except
scatter (``FSC*``/``SSC*``) and ``Time``; those pass through unchanged.

What was done is recorded in ``adata.uns["cellvi_preprocessing"]``: one entry per step
(``"compensated"``, ``"arcsinh"``, ``"logicle"``; the latest call of each) with the output
(``"layer"``, ``"X"`` for ``adata.X``), the input (``"input"``) and the channels; and
``"compensated_layers"``, the names of the matrices (``"X"`` for ``adata.X``) that hold
compensated data or transforms of it, so that later steps can tell whether a matrix was
compensated (:func:`cellvi.data.compensated_layers`).

The mathematics is `flowutils <https://github.com/whitews/flowutils>`_'s
(``flowutils.compensate.compensate``, ``flowutils.transforms.logicle``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._spillover import _check_spillover, _match_spillover, _spillover_jobs
from .data import PREPROCESSING_KEY, check_finite, check_writable, compensated_layers, get_matrix

logger = logging.getLogger("cellvi")

__all__ = ["compensate", "arcsinh", "logicle"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _name(layer: str | None) -> str:
    return "X" if layer is None else layer


def _channel_labels(adata: AnnData) -> list[str]:
    if "channel" in adata.var.columns:
        return [str(c) for c in adata.var["channel"]]
    return [str(v) for v in adata.var_names]


def _is_scatter_or_time(label: str) -> bool:
    low = label.strip().lower()
    return low.startswith(("fsc", "ssc")) or low == "time"


def _resolve_channels(adata: AnnData, names: Sequence[str] | str) -> list[int]:
    """Column indices of channels named by var name, ``var["channel"]`` or ``var["marker"]``."""
    if isinstance(names, str):
        names = [names]
    var_names = [str(v) for v in adata.var_names]
    by_var = {v: i for i, v in enumerate(var_names)}
    lookups = [by_var]
    for col in ("channel", "marker"):
        if col in adata.var.columns:
            values = [str(v) for v in adata.var[col]]
            lookups.append({v: i for i, v in enumerate(values) if v and values.count(v) == 1})
    out, unknown = [], []
    for name in names:
        idx = next((lk[str(name)] for lk in lookups if str(name) in lk), None)
        if idx is None:
            unknown.append(name)
        else:
            out.append(idx)
    if unknown:
        where = "adata.var_names" + (", var['channel']" if "channel" in adata.var else "") + (
            ", var['marker']" if "marker" in adata.var else "")
        raise KeyError(
            f"unknown channel(s) {unknown}: not in {where}. Available: {var_names}"
        )
    dup = sorted({var_names[i] for i in out if out.count(i) > 1})
    if dup:
        raise ValueError(f"channel(s) {dup} were named more than once in channels=")
    return out


def _default_channels(adata: AnnData) -> list[int]:
    labels = _channel_labels(adata)
    keep = [i for i, c in enumerate(labels) if not _is_scatter_or_time(c)]
    skipped = [labels[i] for i in range(len(labels)) if i not in set(keep)]
    if skipped:
        logger.info("leaving scatter/time channels unchanged: %s", skipped)
    if not keep:
        raise ValueError(
            "every channel looks like scatter or time (FSC*, SSC*, Time); name the channels "
            "to transform with channels=[...]"
        )
    return keep


def _read_dense(adata: AnnData, layer: str | None) -> tuple[np.ndarray, np.dtype]:
    X = get_matrix(adata, layer)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.dtype(np.float32)
    if sp.issparse(X):
        X = X.toarray()
    return np.array(X, dtype=np.float64), dtype


def _check_finite(X: np.ndarray, idx: list[int], adata: AnnData, layer: str | None) -> None:
    bad = ~np.isfinite(X[:, idx]).all(axis=0)
    if bad.any():
        names = [str(adata.var_names[idx[j]]) for j in np.flatnonzero(bad)]
        check_finite(X[:, idx], f"{_where(layer)} (channel(s) {names})")


def _prepare(adata: AnnData, copy: bool) -> AnnData:
    check_writable(adata, copy)
    return adata.copy() if copy else adata


def _store(adata: AnnData, out: np.ndarray, dtype: np.dtype, layer: str | None,
           key_added: str | None) -> str:
    out = out.astype(dtype, copy=False)
    if key_added is None:
        if layer is None:
            adata.X = out
        else:
            adata.layers[layer] = out
        return _name(layer)
    if key_added in adata.layers and key_added != layer:
        logger.info("overwriting adata.layers[%r]", key_added)
    adata.layers[key_added] = out
    return key_added


def _log(adata: AnnData) -> dict[str, Any]:
    log = adata.uns.get(PREPROCESSING_KEY)
    if not isinstance(log, dict):
        log = {}
        adata.uns[PREPROCESSING_KEY] = log
    return log


def _mark(adata: AnnData, name: str, compensated: bool) -> None:
    """Keep ``uns[PREPROCESSING_KEY]["compensated_layers"]`` right after writing ``name``."""
    layers = [n for n in compensated_layers(adata) if n != name]
    if compensated:
        layers.append(name)
    _log(adata)["compensated_layers"] = layers


def _transformed_by(adata: AnnData, name: str) -> str | None:
    log = adata.uns.get(PREPROCESSING_KEY)
    if not isinstance(log, dict):
        return None
    for step in ("arcsinh", "logicle"):
        rec = log.get(step)
        if isinstance(rec, dict) and rec.get("layer") == name:
            return step
    return None


# --------------------------------------------------------------------------------------------
# compensation
# --------------------------------------------------------------------------------------------


def _check_not_compensated(adata: AnnData, layer: str | None, in_name: str) -> None:
    """Refuse input that is already compensated, or transformed (arcsinh/logicle)."""
    if in_name in compensated_layers(adata):
        raise ValueError(
            f"{_where(layer)} is already compensated (see adata.uns[{PREPROCESSING_KEY!r}]); "
            "compensating twice gives wrong values. Compensate the raw data instead."
        )
    step = _transformed_by(adata, in_name)
    if step is not None:
        raise ValueError(
            f"{_where(layer)} holds {step}-transformed values; compensate the raw (linear) "
            "intensities first, then transform"
        )


def compensate(
    adata: AnnData,
    *,
    spillover: pd.DataFrame | np.ndarray | str | Path | Mapping | None = None,
    channels: Sequence[str] | None = None,
    layer: str | None = None,
    key_added: str | None = "compensated",
    copy: bool = False,
) -> AnnData | None:
    """Compensate fluorescence spillover (flow cytometry).

    Solves ``observed = true @ S`` for the true intensities, where ``S`` is the spillover
    matrix (row ``i``: spill of the dye read in channel ``i`` into every channel; diagonal 1),
    with ``flowutils.compensate.compensate``. Channels outside the matrix (scatter, time,
    unused) pass through unchanged. Mass cytometry data need no compensation.

    Args:
        adata: events x channels, raw (untransformed) intensities.
        spillover: the spillover matrix. ``None`` takes it from ``adata.uns`` (see
            :func:`cellvi.io.spillover_from_uns`: ``uns["spillover"]`` written by
            :func:`cellvi.io.read_fcs`, one per sample where the files differ, or the raw
            FCS keyword in ``uns["spillover_text"]``). Otherwise a DataFrame (index and columns
            are channel names), an array together with ``channels``, a path to a CSV file
            (header row of channel names, optionally a first column of the same names), or
            the FCS ``SPILL`` text. Its channel names are matched to ``var["channel"]``
            (``$PnN``) where present, else to ``var_names``.
        channels: with an array ``spillover``: the names of its rows/columns, in order.
            Otherwise: compensate only these channels (the sub-matrix of ``spillover``).
        layer: input layer; ``None`` reads ``adata.X``.
        key_added: output layer. ``None`` overwrites the input (``X`` or ``layer``).
        copy: return a compensated copy instead of changing ``adata``.

    Returns:
        ``None``, or the copy when ``copy=True``. Writes:

        - ``adata.layers[key_added]`` (float, same dtype as the input if floating, else
          float32), or the input matrix itself when ``key_added=None``;
        - ``adata.uns["cellvi_preprocessing"]["compensated"]``: ``{"layer": output name
          ("X" for adata.X), "input": input name, "channels": compensated $PnN names}``;
        - ``adata.uns["cellvi_preprocessing"]["compensated_layers"]``: gains the output name.

    Raises:
        KeyError: no spillover matrix in ``adata.uns`` and none given.
        ValueError: spillover channels not in ``adata``, a singular matrix, NaN/inf in the
            input, or input that was already compensated or transformed.

    Example:
        >>> adata = cellvi.io.read_fcs("flow_sample.fcs")  # doctest: +SKIP
        >>> cellvi.pp.compensate(adata)  # -> adata.layers["compensated"]  # doctest: +SKIP
        >>> cellvi.pp.logicle(adata, layer="compensated")  # doctest: +SKIP
    """
    from flowutils.compensate import compensate as _flowutils_compensate

    adata = _prepare(adata, copy)
    in_name = _name(layer)
    _check_not_compensated(adata, layer, in_name)
    X, dtype = _read_dense(adata, layer)

    done: list[str] = []
    for rows, frame, source in _spillover_jobs(adata, spillover, channels):
        _check_spillover(frame, source)
        idx = _match_spillover(adata, frame)
        _check_finite(X if rows is None else X[rows], idx, adata, layer)
        S = frame.to_numpy(np.float64)
        if rows is None:
            X = _flowutils_compensate(X, S, idx)
        else:
            X[rows] = _flowutils_compensate(X[rows], S, idx)
        done.extend(c for c in frame.index if c not in done)
        logger.info("compensated %d channels with the %s", len(idx), source)

    out_name = _store(adata, X, dtype, layer, key_added)
    _mark(adata, out_name, True)
    _log(adata)["compensated"] = {
        "layer": out_name, "input": in_name, "channels": np.asarray(done, dtype=str),
    }
    return adata if copy else None


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def _check_positive(value: Any, what: str, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} ({value!r}){hint}")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}{hint}")
    return value


def _transform_record(adata: AnnData, in_name: str, out_name: str, idx: list[int],
                      compensated: bool, **params: Any) -> dict[str, Any]:
    return {
        "layer": out_name, "input": in_name,
        "channels": np.asarray([str(adata.var_names[i]) for i in idx], dtype=str),
        "compensated": bool(compensated), **params,
    }


def arcsinh(
    adata: AnnData,
    *,
    cofactor: float | Mapping[str, float] = 5,
    channels: Sequence[str] | None = None,
    layer: str | None = None,
    key_added: str | None = "arcsinh",
    copy: bool = False,
) -> AnnData | None:
    """Arcsinh transform, ``arcsinh(x / cofactor)``, per channel.

    Use cofactor 5 for mass cytometry (CyTOF) and about 150 for flow cytometry (compensate
    flow data first, :func:`compensate`).

    Args:
        adata: events x channels.
        cofactor: one positive number for all channels, or a dict ``channel -> cofactor``.
            With a dict and no ``channels``, the dict's keys are the channels transformed;
            with ``channels``, each of them needs an entry in the dict.
        channels: channels to transform (var names, ``var["channel"]`` or ``var["marker"]``
            names). ``None``: every channel except scatter (``FSC*``, ``SSC*``) and ``Time``.
            The others are copied unchanged.
        layer: input layer; ``None`` reads ``adata.X``.
        key_added: output layer. ``None`` overwrites the input (``X`` or ``layer``).
        copy: return a transformed copy instead of changing ``adata``.

    Returns:
        ``None``, or the copy when ``copy=True``. Writes:

        - ``adata.layers[key_added]`` (same float dtype as the input, else float32), or the
          input matrix itself when ``key_added=None``;
        - ``adata.uns["cellvi_preprocessing"]["arcsinh"]``: ``{"layer", "input", "channels"
          (var names), "cofactor" (one per channel), "compensated" (was the input)}``;
        - ``adata.uns["cellvi_preprocessing"]["compensated_layers"]``: lists the output
          name if and only if the input was compensated.

    Example:
        >>> adata = cellvi.io.read_fcs("cytof_sample.fcs")  # doctest: +SKIP
        >>> cellvi.pp.arcsinh(adata, cofactor=5)  # -> adata.layers["arcsinh"]  # doctest: +SKIP
        >>> cellvi.pp.arcsinh(adata, cofactor={"CD3": 5, "CD4": 10}, key_added="asinh_custom")
        ... # doctest: +SKIP
    """
    hint = "; typical cofactors are 5 (mass cytometry) and 150 (flow cytometry)"
    if isinstance(cofactor, Mapping):
        if not cofactor:
            raise ValueError("cofactor is an empty dict; give at least one channel -> cofactor")
        by_idx = {}
        for name, value in cofactor.items():
            (i,) = _resolve_channels(adata, [name])
            by_idx[i] = _check_positive(value, f"cofactor for channel {name!r}", hint)
        if channels is None:
            idx = list(by_idx)
        else:
            idx = _resolve_channels(adata, channels)
            missing = [str(adata.var_names[i]) for i in idx if i not in by_idx]
            if missing:
                raise ValueError(
                    f"channel(s) {missing} are in channels= but have no entry in the cofactor "
                    "dict; add them or give one number for all channels"
                )
        cof = np.array([by_idx[i] for i in idx], dtype=np.float64)
    else:
        value = _check_positive(cofactor, "cofactor", hint)
        idx = _default_channels(adata) if channels is None else _resolve_channels(adata, channels)
        cof = np.full(len(idx), value, dtype=np.float64)

    adata = _prepare(adata, copy)
    in_name = _name(layer)
    X, dtype = _read_dense(adata, layer)
    _check_finite(X, idx, adata, layer)
    X[:, idx] = np.arcsinh(X[:, idx] / cof)
    compensated = in_name in compensated_layers(adata)
    out_name = _store(adata, X, dtype, layer, key_added)
    _mark(adata, out_name, compensated)
    _log(adata)["arcsinh"] = _transform_record(adata, in_name, out_name, idx, compensated,
                                               cofactor=cof)
    logger.info("arcsinh of %d channels of %s -> %s", len(idx), _where(layer), out_name)
    return adata if copy else None


def logicle(
    adata: AnnData,
    *,
    t: float = 262144,
    w: float = 0.5,
    m: float = 4.5,
    a: float = 0,
    channels: Sequence[str] | None = None,
    layer: str | None = None,
    key_added: str | None = "logicle",
    output_scale: Literal["decades", "unit"] = "decades",
    copy: bool = False,
) -> AnnData | None:
    """Logicle transform (Parks et al. 2006; GatingML 2.0), per channel.

    Computed by ``flowutils.transforms.logicle``. The defaults are flowCore's
    ``logicleTransform()`` defaults, as FlowSOM's examples use them, and
    ``output_scale="decades"`` returns flowCore's scale, so that
    ``compensate`` + ``logicle`` on ``flowsom_68983`` reproduces its shipped
    ``layers["compensated_logicle"]``.

    Args:
        adata: events x channels, compensated (flow) intensities on the linear scale.
        t: top of the data scale (262144 for 18-bit instruments).
        w: linearization width in decades (``0 <= w <= m / 2``).
        m: decades of the full scale.
        a: additional negative decades (``-w <= a <= m - 2w``).
        channels: channels to transform (var names, ``var["channel"]`` or ``var["marker"]``
            names). ``None``: every channel except scatter (``FSC*``, ``SSC*``) and ``Time``.
            The others are copied unchanged.
        layer: input layer; ``None`` reads ``adata.X``.
        key_added: output layer. ``None`` overwrites the input (``X`` or ``layer``).
        output_scale: ``"decades"`` (default): values on ``[0, m]`` for data in ``[0, t]``,
            like flowCore's ``logicleTransform`` and FlowSOM. ``"unit"``: on ``[0, 1]``, the
            GatingML 2.0 / FlowKit convention (``"decades"`` divided by ``m``).
        copy: return a transformed copy instead of changing ``adata``.

    Returns:
        ``None``, or the copy when ``copy=True``. Writes:

        - ``adata.layers[key_added]`` (same float dtype as the input, else float32), or the
          input matrix itself when ``key_added=None``;
        - ``adata.uns["cellvi_preprocessing"]["logicle"]``: ``{"layer", "input", "channels"
          (var names), "t", "w", "m", "a", "output_scale", "compensated" (was the input)}``;
        - ``adata.uns["cellvi_preprocessing"]["compensated_layers"]``: lists the output
          name if and only if the input was compensated.

    Example:
        >>> adata = cellvi.datasets.load("flowsom_68983_mouse_flow_gated")  # doctest: +SKIP
        >>> cellvi.pp.compensate(adata)  # doctest: +SKIP
        >>> cellvi.pp.logicle(adata, layer="compensated")  # doctest: +SKIP
    """
    from flowutils.transforms import logicle as _flowutils_logicle

    t = _check_positive(t, "t (top of scale)")
    m = _check_positive(m, "m (decades)")
    for value, what in ((w, "w"), (a, "a")):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise ValueError(f"{what} must be a finite number, got {value!r}")
    w, a = float(w), float(a)
    if not 0 <= w <= m / 2:
        raise ValueError(f"w must be between 0 and m/2 = {m / 2:g}, got {w:g}")
    if not -w <= a <= m - 2 * w:
        raise ValueError(f"a must be between -w = {-w:g} and m - 2w = {m - 2 * w:g}, got {a:g}")
    if output_scale not in ("decades", "unit"):
        raise ValueError(f"output_scale must be 'decades' or 'unit', got {output_scale!r}")
    idx = _default_channels(adata) if channels is None else _resolve_channels(adata, channels)

    adata = _prepare(adata, copy)
    in_name = _name(layer)
    X, dtype = _read_dense(adata, layer)
    _check_finite(X, idx, adata, layer)
    X = _flowutils_logicle(X, idx, t=t, m=m, w=w, a=a)
    if output_scale == "decades":
        X[:, idx] *= m
    compensated = in_name in compensated_layers(adata)
    out_name = _store(adata, X, dtype, layer, key_added)
    _mark(adata, out_name, compensated)
    _log(adata)["logicle"] = _transform_record(
        adata, in_name, out_name, idx, compensated, t=t, w=w, m=m, a=a, output_scale=output_scale
    )
    logger.info("logicle of %d channels of %s -> %s", len(idx), _where(layer), out_name)
    return adata if copy else None
