"""cellvi.pp: compensation and transforms, against independent references and real data."""

from __future__ import annotations

import inspect

import anndata as ad
import flowio
import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi import pp

PNN = ["FSC-A", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "Time"]
NAMES = ["FSC-A", "SSC-A", "CD3", "CD4", "CD8", "Time"]  # read_fcs style: markers where known
FLUO = ["FL1-A", "FL2-A", "FL3-A"]
S = np.array([[1.0, 0.2, 0.05], [0.1, 1.0, 0.3], [0.0, 0.02, 1.0]])


@pytest.fixture
def flow():
    """Small flow-like AnnData: scatter, three fluorescence channels, time; spillover S."""
    rng = np.random.default_rng(0)
    X = rng.uniform(-50, 5000, size=(40, 6)).astype(np.float32)
    var = pd.DataFrame({"channel": PNN, "marker": ["", "", "CD3", "CD4", "CD8", ""]},
                       index=NAMES)
    a = ad.AnnData(X=X, var=var)
    a.uns["spillover"] = {"channels": np.array(FLUO), "matrix": S.copy()}
    return a


def spill_text(channels, matrix):
    values = ",".join(repr(float(v)) for v in np.asarray(matrix).ravel())
    return f"{len(channels)},{','.join(channels)},{values}"


# -- the real-data check ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flowsom(data_dir):
    return ad.read_h5ad(data_dir / "flowsom_68983_mouse_flow_gated.h5ad")


def test_compensate_logicle_reproduces_shipped_layer(flowsom):
    """``compensate`` + ``logicle`` on raw ``X`` gives the shipped ``compensated_logicle``.

    The spillover matrix is the file's ``SPILL`` keyword (``uns["spillover_text"]``); the
    logicle parameters are flowCore's ``logicleTransform()`` defaults (T=262144, W=0.5,
    M=4.5, A=0) on flowCore's ``[0, M]`` output scale (``output_scale="decades"``). No
    per-channel (estimated) W is needed: on each of the 11 fluorescence channels the
    difference is float32 rounding only, max 2.4e-7 and mean about 1e-8 (values up to 4.3).
    The tolerance, 1e-6, is a few float32 ulps at these values. Without compensation the
    same logicle is far off (> 0.1 on several channels), so the check is not vacuous.
    Scatter and time channels are identical to ``X``, as in the shipped layer.
    """
    a = flowsom.copy()
    raw = a.X.copy()
    pp.compensate(a)
    pp.logicle(a, layer="compensated")
    np.testing.assert_array_equal(a.X, raw)  # raw data untouched
    fluo = list(cellvi.io.spillover_from_uns(a).index)
    assert len(fluo) == 11
    j = [list(a.var["channel"]).index(c) for c in fluo]
    shipped = a.layers["compensated_logicle"].astype(np.float64)
    ours = a.layers["logicle"].astype(np.float64)
    err = np.abs(ours[:, j] - shipped[:, j])
    assert err.max() < 1e-6, dict(zip(fluo, err.max(axis=0), strict=True))
    assert err.mean() < 1e-7
    other = [i for i in range(a.n_vars) if i not in j]
    assert [a.var["channel"].iloc[i] for i in other] == \
        ["Time", "FSC-A", "FSC-H", "FSC-W", "SSC-A", "SSC-H", "SSC-W"]
    np.testing.assert_array_equal(shipped[:, other], raw[:, other])
    np.testing.assert_array_equal(ours[:, other], raw[:, other])
    rec = a.uns["cellvi_preprocessing"]
    assert rec["compensated"]["layer"] == "compensated" and rec["compensated"]["input"] == "X"
    assert rec["logicle"]["compensated"] is True
    assert set(cellvi.data.compensated_layers(a)) == {"compensated", "logicle"}
    # uncompensated data are clearly different: compensation matters here
    b = flowsom.copy()
    pp.logicle(b)
    assert np.abs(b.layers["logicle"][:, j] - shipped[:, j]).max(axis=0).max() > 0.1


# -- compensate ---------------------------------------------------------------------------------


def test_compensate_matches_inverse(flow):
    X = flow.X.astype(np.float64)
    pp.compensate(flow)
    out = flow.layers["compensated"]
    fl = [2, 3, 4]
    expected = X[:, fl] @ np.linalg.inv(S)  # observed = true @ S
    np.testing.assert_allclose(out[:, fl], expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(out[:, [0, 1, 5]], flow.X[:, [0, 1, 5]])  # pass through
    np.testing.assert_array_equal(flow.X, X.astype(np.float32))  # input untouched
    assert out.dtype == np.float32
    assert list(flow.uns["cellvi_preprocessing"]["compensated"]["channels"]) == FLUO


def test_compensate_identity_is_noop(flow):
    X = flow.X.copy()
    pp.compensate(flow, spillover=pd.DataFrame(np.eye(3), index=FLUO, columns=FLUO))
    np.testing.assert_array_equal(flow.layers["compensated"], X)


@pytest.mark.parametrize("kind", ["frame", "array", "csv", "csv_noindex", "text", "uns_text"])
def test_compensate_spillover_sources(flow, tmp_path, kind):
    ref = pp.compensate(flow, copy=True).layers["compensated"]
    frame = pd.DataFrame(S, index=FLUO, columns=FLUO)
    kwargs = {}
    if kind == "frame":  # columns in another order are fine
        kwargs["spillover"] = frame.loc[FLUO[::-1], FLUO]
    elif kind == "array":
        kwargs = {"spillover": S, "channels": FLUO}
    elif kind == "csv":
        frame.to_csv(tmp_path / "s.csv")
        kwargs["spillover"] = tmp_path / "s.csv"
    elif kind == "csv_noindex":
        frame.to_csv(tmp_path / "s.csv", index=False)
        kwargs["spillover"] = str(tmp_path / "s.csv")
    elif kind == "text":
        kwargs["spillover"] = spill_text(FLUO, S)
    else:
        del flow.uns["spillover"]
        flow.uns["spillover_text"] = spill_text(FLUO, S)
    pp.compensate(flow, **kwargs)
    np.testing.assert_allclose(flow.layers["compensated"], ref, rtol=1e-6)


def test_compensate_per_sample_from_read_fcs(tmp_path):
    """Files with different SPILL keywords: each sample is compensated with its own matrix."""
    rng = np.random.default_rng(1)
    S2 = S.copy()
    S2[0, 1] = 0.5
    data = {}
    for name, matrix in (("s1", S), ("s2", S2)):
        data[name] = rng.uniform(0, 1000, (7, 6)).astype(np.float32)
        with open(tmp_path / f"{name}.fcs", "wb") as fh:
            flowio.create_fcs(fh, data[name].ravel().tolist(), PNN,
                              metadata_dict={"spill": spill_text(FLUO, matrix)})
    a = cellvi.io.read_fcs([tmp_path / "s1.fcs", tmp_path / "s2.fcs"])
    pp.compensate(a)
    for name, matrix in (("s1", S), ("s2", S2)):
        got = a[a.obs["sample"] == name].layers["compensated"][:, 2:5]
        want = data[name][:, 2:5].astype(np.float64) @ np.linalg.inv(matrix)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    a.obs = a.obs.drop(columns="sample")
    with pytest.raises(KeyError, match="one matrix per sample"):
        pp.compensate(a, key_added="again")


def test_compensate_subset_and_errors(flow):
    sub = pp.compensate(flow, channels=["CD3", "FL2-A"], copy=True).layers["compensated"]
    X = flow.X.astype(np.float64)
    np.testing.assert_allclose(sub[:, 2:4], X[:, 2:4] @ np.linalg.inv(S[:2, :2]), rtol=1e-5)
    np.testing.assert_array_equal(sub[:, 4], flow.X[:, 4])
    bad = pd.DataFrame(S, index=["FL1-A", "FL2-A", "BV421-A"],
                       columns=["FL1-A", "FL2-A", "BV421-A"])
    with pytest.raises(ValueError, match=r"spillover channel\(s\) \['BV421-A'\] are not "
                                         r"channels of adata.*FL3-A"):
        pp.compensate(flow, spillover=bad)
    with pytest.raises(ValueError, match="needs its channel names"):
        pp.compensate(flow, spillover=S)
    with pytest.raises(ValueError, match="singular"):
        pp.compensate(flow, spillover=np.ones((3, 3)), channels=FLUO)
    with pytest.raises(FileNotFoundError, match="spillover file not found"):
        pp.compensate(flow, spillover="no/such/matrix.csv")
    del flow.uns["spillover"]
    with pytest.raises(KeyError, match="no spillover matrix in adata.uns"):
        pp.compensate(flow)


def test_compensate_twice_or_after_transform_refused(flow):
    pp.compensate(flow)
    with pytest.raises(ValueError, match="already compensated"):
        pp.compensate(flow, layer="compensated", key_added="twice")
    pp.arcsinh(flow, cofactor=150, layer="compensated")
    with pytest.raises(ValueError, match="already compensated"):
        pp.compensate(flow, layer="arcsinh", key_added="twice")
    pp.arcsinh(flow, key_added="raw_asinh")
    with pytest.raises(ValueError, match="arcsinh-transformed.*compensate the raw"):
        pp.compensate(flow, layer="raw_asinh", key_added="twice")
    # overwriting a compensated layer with uncompensated data unmarks it
    pp.arcsinh(flow, key_added="compensated")
    assert set(flow.uns["cellvi_preprocessing"]["compensated_layers"]) == {"arcsinh"}
    # replacing X in place marks X
    pp.compensate(flow, key_added=None)
    assert "X" in flow.uns["cellvi_preprocessing"]["compensated_layers"]


# -- arcsinh ------------------------------------------------------------------------------------


def test_arcsinh_dict_cofactors(flow):
    X = flow.X.copy()
    pp.arcsinh(flow, cofactor={"CD3": 5, "FL2-A": 150, "CD8": 20.0})  # var name, $PnN, var name
    out = flow.layers["arcsinh"]
    for j, c in ((2, 5), (3, 150), (4, 20)):
        np.testing.assert_allclose(out[:, j], np.arcsinh(X[:, j].astype(np.float64) / c),
                                   rtol=1e-6)
    np.testing.assert_array_equal(out[:, [0, 1, 5]], X[:, [0, 1, 5]])  # not in the dict
    np.testing.assert_array_equal(flow.X, X)  # input untouched
    rec = flow.uns["cellvi_preprocessing"]["arcsinh"]
    assert list(rec["channels"]) == ["CD3", "CD4", "CD8"]
    np.testing.assert_array_equal(rec["cofactor"], [5, 150, 20])
    assert rec["compensated"] is False


def test_arcsinh_default_channels_and_layers(flow):
    flow.layers["raw"] = flow.X * 2
    raw = flow.layers["raw"].copy()
    X = flow.X.copy()
    pp.arcsinh(flow, layer="raw", key_added="t")
    np.testing.assert_allclose(flow.layers["t"][:, 2:5], np.arcsinh(raw[:, 2:5] / 5), rtol=1e-6)
    np.testing.assert_array_equal(flow.layers["t"][:, [0, 1, 5]], raw[:, [0, 1, 5]])  # scatter/time
    np.testing.assert_array_equal(flow.layers["raw"], raw)
    # key_added=None replaces the input: here the layer, and X stays as it was
    pp.arcsinh(flow, layer="raw", key_added=None, channels=["CD4"])
    np.testing.assert_allclose(flow.layers["raw"][:, 3], np.arcsinh(raw[:, 3] / 5), rtol=1e-6)
    np.testing.assert_array_equal(flow.layers["raw"][:, [2, 4]], raw[:, [2, 4]])
    np.testing.assert_array_equal(flow.X, X)
    assert flow.uns["cellvi_preprocessing"]["arcsinh"]["layer"] == "raw"
    # ... or X itself
    pp.arcsinh(flow, key_added=None, cofactor=150)
    np.testing.assert_allclose(flow.X[:, 2:5], np.arcsinh(X[:, 2:5] / 150), rtol=1e-6)
    assert "arcsinh" not in flow.layers


def test_copy_leaves_original(flow):
    X = flow.X.copy()
    for func in (pp.arcsinh, pp.logicle, pp.compensate):
        res = func(flow, key_added=None, copy=True)
        assert isinstance(res, ad.AnnData) and not np.array_equal(res.X, X)
        np.testing.assert_array_equal(flow.X, X)
        assert "cellvi_preprocessing" not in flow.uns and not flow.layers
    assert pp.arcsinh(flow) is None


def test_arcsinh_errors(flow):
    with pytest.raises(KeyError, match=r"unknown channel\(s\) \['CD19'\].*Available"):
        pp.arcsinh(flow, channels=["CD3", "CD19"])
    with pytest.raises(KeyError, match="unknown channel"):
        pp.arcsinh(flow, cofactor={"BV421-A": 5})
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="positive number.*150 \\(flow"):
            pp.arcsinh(flow, cofactor=bad)
    with pytest.raises(ValueError, match="positive"):
        pp.arcsinh(flow, cofactor={"CD3": 5, "CD4": 0})
    with pytest.raises(TypeError, match="must be a number"):
        pp.arcsinh(flow, cofactor="5")
    with pytest.raises(ValueError, match=r"\['CD8'\] are in channels= but have no entry"):
        pp.arcsinh(flow, cofactor={"CD3": 5, "CD4": 5}, channels=["CD3", "CD8"])
    flow.X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"CD3.*NaN or infinite"):
        pp.arcsinh(flow)
    pp.arcsinh(flow, channels=["CD4"])  # NaN elsewhere is not this call's business
    with pytest.raises(KeyError, match="layer 'nope' is not in adata.layers"):
        pp.arcsinh(flow, layer="nope")
    with pytest.raises(ValueError, match="view"):
        pp.arcsinh(flow[:10])


# -- logicle ------------------------------------------------------------------------------------


def test_logicle_scales_and_errors(flow):
    from flowutils.transforms import logicle as ref_logicle

    X = flow.X.astype(np.float64)
    pp.logicle(flow, channels=["CD3", "FL2-A"], output_scale="unit", key_added="unit")
    pp.logicle(flow, channels=["CD3", "FL2-A"], w=1.0, m=4.0, t=10000, a=0.5)
    ref = ref_logicle(X, [2, 3], t=10000, m=4.0, w=1.0, a=0.5)
    np.testing.assert_allclose(flow.layers["logicle"][:, 2:4], 4.0 * ref[:, 2:4], rtol=1e-6)
    unit = ref_logicle(X, [2, 3])
    np.testing.assert_allclose(flow.layers["unit"][:, 2:4], unit[:, 2:4], rtol=1e-6)
    np.testing.assert_array_equal(flow.layers["logicle"][:, [0, 1, 4, 5]], flow.X[:, [0, 1, 4, 5]])
    rec = flow.uns["cellvi_preprocessing"]["logicle"]
    assert rec["w"] == 1.0 and rec["output_scale"] == "decades"
    with pytest.raises(ValueError, match="w must be between 0 and m/2"):
        pp.logicle(flow, w=3)
    with pytest.raises(ValueError, match="a must be between"):
        pp.logicle(flow, a=-1)
    with pytest.raises(ValueError, match="positive"):
        pp.logicle(flow, t=0)
    with pytest.raises(KeyError, match="unknown channel"):
        pp.logicle(flow, channels=["PE-A"])


def test_h5ad_round_trip_of_records(flow, tmp_path):
    pp.compensate(flow)
    pp.arcsinh(flow, layer="compensated", cofactor=150)
    pp.logicle(flow, layer="compensated")
    flow.write_h5ad(tmp_path / "pp.h5ad")
    back = ad.read_h5ad(tmp_path / "pp.h5ad")
    assert set(back.layers) == {"compensated", "arcsinh", "logicle"}
    assert back.uns["cellvi_preprocessing"]["logicle"]["compensated"]
    assert set(back.uns["cellvi_preprocessing"]["compensated_layers"]) == \
        {"compensated", "arcsinh", "logicle"}
    with pytest.raises(ValueError, match="already compensated"):
        pp.compensate(back, layer="compensated", key_added="x")


@pytest.mark.parametrize("func", [pp.compensate, pp.arcsinh, pp.logicle],
                         ids=lambda f: f.__name__)
def test_signature_contract(func):
    params = inspect.signature(func).parameters
    assert list(params)[0] == "adata"
    assert all(p.kind == p.KEYWORD_ONLY for name, p in params.items() if name != "adata")
    assert params["copy"].default is False and params["layer"].default is None
    assert isinstance(params["key_added"].default, str)
    doc = inspect.getdoc(func)
    assert "Returns:" in doc and "Example" in doc and "key_added" in doc.split("Returns:")[1]
