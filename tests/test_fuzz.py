"""Fuzzing the AnnData edge with hypothesis: whatever the input (dtypes, sparse formats,
views, empty matrices, NaN/inf, negative, fractional or huge values, odd batch columns,
duplicated names, one-cell batches), ``cellvi.tl`` either writes exactly its documented
keys or raises a :class:`cellvi.errors.CellviError` that names the problem, and never
changes the user's AnnData otherwise."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellvi
from cellvi.errors import CellviError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
COUNT_FAULTS = [None] * 8 + ["nan", "inf", "negative", "fraction", "huge", "zero_cell",
                "zero_gene", "empty_rows", "empty_cols"]
BATCHES = [None, None, "str", "str", "int", "bool", "float", "unused_categories", "missing",
           "one_cell", "absent"]
EXAMPLES = {"nbvae": 0, "gmvae": 0}


def _matrix(values: np.ndarray, fmt: str):
    if fmt == "dense":
        return values
    return {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "coo": sp.coo_matrix}[fmt](values)


def _batch_column(kind: str, n: int, rng) -> pd.Series | None:
    if kind in (None, "absent"):
        return None
    codes = rng.integers(0, 2, n)
    if kind == "one_cell" and n:
        codes = np.zeros(n, int)
        codes[0] = 1
    col = {"str": np.array(["a", "b"])[codes], "int": codes, "bool": codes.astype(bool),
           "float": codes * 0.5, "one_cell": np.array(["a", "b"])[codes]}.get(kind)
    if kind == "unused_categories":
        col = pd.Categorical(np.array(["a", "b"])[codes], categories=["a", "b", "never"])
    if kind == "missing":
        col = pd.Series(np.array(["a", "b"], dtype=object)[codes])
        if n:
            col.iloc[0] = None
        col = col.to_numpy()
    return pd.Series(col)


@st.composite
def adatas(draw, continuous: bool):
    # mostly usable sizes, with the edges (no cells, no features, one cell) now and then
    # (hypothesis favours the first entries of a sampled_from: the usual cases go first)
    n_obs = draw(st.sampled_from([40, 30, 60, 80, 25, 0, 1, 2, 5]))
    n_vars = draw(st.sampled_from([5, 3, 7, 2, 0, 1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from([np.int32, np.int64, np.float16, np.float32, np.float64]))
    if continuous:
        values = rng.normal(2.0, 1.0, (n_obs, n_vars))
        fault = draw(st.sampled_from([None] * 7 + ["nan", "inf", "huge", "constant",
                                                    "untransformed", "empty_rows", "empty_cols"]))
    else:
        values = rng.poisson(3.0, (n_obs, n_vars)).astype(float)
        fault = draw(st.sampled_from(COUNT_FAULTS))
    if n_obs and n_vars and fault is not None:
        i, j = rng.integers(n_obs), rng.integers(n_vars)
        if fault == "nan":
            values[i, j] = np.nan
        elif fault == "inf":
            values[i, j] = np.inf
        elif fault == "negative":
            values[i, j] = -1
        elif fault == "fraction":
            values[i, j] = 0.5
        elif fault == "huge":
            values[i, j] = 1e30
        elif fault == "zero_cell":
            values[i] = 0
        elif fault == "zero_gene":
            values[:, j] = 0
        elif fault == "constant":
            values[:, j] = 1.0
        elif fault == "untransformed":
            values = np.exp(values * 3)
    if fault == "empty_rows":
        values = values[:0]
    if fault == "empty_cols":
        values = values[:, :0]
    if np.issubdtype(dtype, np.integer) and not np.isfinite(values).all():
        dtype = np.float32  # integers cannot hold NaN/inf: the float input is the test
    with np.errstate(over="ignore", invalid="ignore"):
        values = values.astype(dtype)
    fmt = draw(st.sampled_from(["dense", "dense", "csr", "csr", "csc", "coo"]))
    if fmt != "dense" and dtype == np.float16:
        dtype = np.float32  # scipy.sparse has no float16
        values = values.astype(dtype)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(values.shape[0])])
    names = [f"g{j}" for j in range(values.shape[1])]
    if draw(st.sampled_from([False, False, False, True])) and len(names) > 1:
        names[1] = names[0]  # duplicated feature names
    kind = draw(st.sampled_from(BATCHES))
    col = _batch_column(kind, values.shape[0], rng)
    if col is not None:
        obs["batch"] = col.to_numpy()
    where = "X" if fmt == "coo" else draw(st.sampled_from(["X", "layer"]))  # layers: CSR/CSC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            matrix = _matrix(values, fmt)
            adata = ad.AnnData(X=matrix if where == "X" else None, obs=obs,
                               var=pd.DataFrame(index=names))
            if where == "layer":
                adata.layers["raw"] = matrix
        except Exception:  # an input AnnData itself refuses is not the user's to pass
            return None
    view = draw(st.sampled_from([False, False, True])) and adata.n_obs > 2
    if view:
        adata = adata[1:]
    return adata, dict(layer="raw" if where == "layer" else None,
                       batch_key=None if kind is None else "batch"), view


def _snapshot(a: ad.AnnData):
    def arr(m):
        if m is None:
            return None
        if sp.issparse(m):
            m = m.tocoo() if m.format == "coo" else m
            parts = (m.row, m.col, m.data) if m.format == "coo" else (m.indptr, m.indices, m.data)
            return (m.format, m.shape, m.dtype.str, *[np.asarray(p).tobytes() for p in parts])
        m = np.asarray(m)
        return ("dense", m.shape, m.dtype.str, m.tobytes())

    return dict(X=arr(a.X), layers={k: arr(v) for k, v in a.layers.items()},
                obs=a.obs.copy(deep=True), var=a.var.copy(deep=True),
                obsm=set(a.obsm.keys()), uns=set(a.uns.keys()), is_view=a.is_view)


def _assert_unchanged(a, snap, new_obsm=(), new_uns=(), new_obs=()):
    now = _snapshot(a)
    assert now["X"] == snap["X"] and now["layers"] == snap["layers"]
    pd.testing.assert_frame_equal(now["obs"].drop(columns=list(new_obs)), snap["obs"],
                                  check_exact=True)
    pd.testing.assert_frame_equal(now["var"], snap["var"], check_exact=True)
    assert now["obsm"] == snap["obsm"] | set(new_obsm)
    assert now["uns"] == snap["uns"] | set(new_uns)


def _call(func, example, **fast):
    if example is None:
        return
    adata, kwargs, view = example
    snap = _snapshot(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = func(adata, copy=view, verbose=False, max_epochs=1, n_latent=2, n_hidden=4,
                       **kwargs, **fast)
        except CellviError as err:
            assert isinstance(err, (ValueError, TypeError, KeyError, ArithmeticError))
            assert len(str(err)) > 20  # a sentence that names the problem
            _assert_unchanged(adata, snap)
            return "error"
    name = func.__name__
    if view:
        _assert_unchanged(adata, snap)
        written = out
    else:
        assert out is None
        written = adata
        extra_obs = ((name, name + "_confidence") if name == "gmvae" else ()) + (
            name + "_outlier_score",)
        extra_obsm = ("X_" + name, name + "_probs") if name == "gmvae" else ("X_" + name,)
        _assert_unchanged(adata, snap, extra_obsm, (name,), extra_obs)
    z = written.obsm["X_" + name]
    assert z.shape == (written.n_obs, 2) and z.dtype == np.float32 and np.isfinite(z).all()
    return "ok"


@FUZZ
@given(adatas(continuous=False))
def test_fuzz_nbvae_edge(example):
    EXAMPLES["nbvae"] += 1
    _call(cellvi.tl.nbvae, example)


@FUZZ
@given(adatas(continuous=True))
def test_fuzz_gmvae_edge(example):
    EXAMPLES["gmvae"] += 1
    _call(cellvi.tl.gmvae, example, n_components=2, warmup_epochs=1, n_init=1)


def test_fuzz_ran_its_examples():
    """The two fuzz tests above generated their inputs (hypothesis runs them first)."""
    if not all(EXAMPLES.values()):
        pytest.skip("run together with the fuzz tests")
    assert EXAMPLES["nbvae"] >= 100 and EXAMPLES["gmvae"] >= 100
