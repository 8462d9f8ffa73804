"""cellvi.io.read_fcs on real CyTOF files and on small FCS files written with FlowIO."""

from __future__ import annotations

import logging

import anndata as ad
import flowio
import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.io import parse_spillover, read_fcs, spillover_from_uns

CYTOF = "Gates_PTLG021_Unstim_Control_1.fcs"


@pytest.fixture(scope="module")
def fcs_dir(data_dir):
    folder = data_dir / "fcs"
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing; the real-data FCS tests need it")
    return folder


@pytest.fixture(scope="module")
def cytof(fcs_dir):
    return read_fcs(fcs_dir / CYTOF)


@pytest.fixture(scope="module")
def cytof_all(fcs_dir):
    return read_fcs(sorted(fcs_dir.glob("*.fcs")))


def write_fcs(path, data, pnn, pns=None, **keywords):
    """Write a small float FCS 3.1 file with FlowIO (keywords: extra TEXT, e.g. spill=...)."""
    data = np.asarray(data, dtype=np.float32)
    with open(path, "wb") as fh:
        flowio.create_fcs(fh, data.ravel().tolist(), list(pnn), opt_channel_names=pns,
                          metadata_dict=keywords or None)
    return path


def spill_text(channels, matrix):
    values = ",".join(repr(float(v)) for v in np.asarray(matrix).ravel())
    return f"{len(channels)},{','.join(channels)},{values}"


# -- real CyTOF files -------------------------------------------------------------------------


def test_single_file(cytof, fcs_dir):
    assert cytof.shape == (1000, 55)
    assert cytof.X.dtype == np.float32
    # var names: $PnS markers where present, else the $PnN channel
    for marker, metal in [("CD45", "In115Di"), ("CD3", "Er170Di"), ("CD4", "Nd145Di"),
                          ("CD19", "Nd142Di"), ("HLADR", "Yb174Di"), ("DNA1", "Ir191Di")]:
        assert cytof.var.loc[marker, "channel"] == metal
        assert cytof.var.loc[marker, "marker"] == marker
    for no_marker in ("Time", "Event_length", "Y89Di", "Pt195Di"):
        assert no_marker in cytof.var_names
        assert cytof.var.loc[no_marker, "marker"] == ""
    assert cytof.var_names.is_unique
    assert cytof.var["channel"].str.endswith("Di").sum() == 52  # the metal channels
    assert (cytof.var["range"] > 0).all()
    # the same numbers FlowIO gives, in the same order
    ref = flowio.FlowData(str(fcs_dir / CYTOF)).as_array()
    np.testing.assert_array_equal(cytof.X, ref.astype(np.float32))
    # keywords: lower case, no '$', values kept as strings
    assert cytof.uns["fcs"]["cyt"] == "DVSSCIENCES-CYTOF"
    assert cytof.uns["fcs"]["p11s"] == "CD45"
    assert all(isinstance(v, str) for v in cytof.uns["fcs"].values())
    assert "spillover" not in cytof.uns  # mass cytometry: no spillover matrix
    assert cytof.obs["sample"].unique().tolist() == [CYTOF[:-4]]
    assert cytof.obs_names[0] == f"{CYTOF[:-4]}_0" and cytof.obs_names.is_unique


def test_several_files_and_metadata_join(cytof_all, fcs_dir):
    a = cytof_all
    assert a.shape == (6000, 55)
    assert isinstance(a.obs["sample"].dtype, pd.CategoricalDtype)
    assert len(a.obs["sample"].cat.categories) == 6
    assert (a.obs["sample"].value_counts() == 1000).all()
    assert a.obs_names.is_unique
    assert set(a.uns["fcs"]) == set(a.obs["sample"].cat.categories)
    # a folder reads the same files
    b = read_fcs(fcs_dir)
    assert b.shape == a.shape and list(b.obs["sample"].cat.categories) == \
        list(a.obs["sample"].cat.categories)
    # join with the per-file metadata
    meta = pd.read_csv(fcs_dir / "metadata.csv")
    meta["sample"] = meta["file_name"].str.removesuffix(".fcs")
    obs = a.obs.reset_index().merge(meta, on="sample", how="left").set_index("index")
    assert obs["batch"].notna().all()
    assert obs["batch"].value_counts().to_dict() == {1: 2000, 2: 2000, 3: 2000}
    assert (obs.loc[obs["sample"].str.contains("PTLG028"), "batch"] == 2).all()


def test_write_h5ad_round_trip(cytof_all, tmp_path):
    path = tmp_path / "cytof.h5ad"
    cytof_all.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.X, cytof_all.X)
    pd.testing.assert_frame_equal(back.var, cytof_all.var)
    assert back.obs["sample"].equals(cytof_all.obs["sample"])
    assert back.uns["fcs"][CYTOF[:-4]]["p11s"] == "CD45"


# -- bad files ----------------------------------------------------------------------------------


def test_truncated_file(fcs_dir, tmp_path):
    raw = (fcs_dir / CYTOF).read_bytes()
    cut = tmp_path / "cut.fcs"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.fcs.*damaged or truncated"):
        read_fcs(cut)


def test_not_an_fcs_file(tmp_path):
    fake = tmp_path / "notes.fcs"
    fake.write_text("sample,CD3,CD4\n1,2,3\n")
    with pytest.raises(ValueError, match=r"notes\.fcs is not an FCS file \(header does not "
                                         r"start with 'FCS'\)"):
        read_fcs(fake)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.fcs"):
        read_fcs(tmp_path / "nothere.fcs")
    with pytest.raises(FileNotFoundError, match="no .fcs files"):
        read_fcs(tmp_path)
    with pytest.raises(ValueError, match="empty list"):
        read_fcs([])


# -- synthetic FCS files (FlowIO writes them) ---------------------------------------------------

PNN = ["FSC-A", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "Time"]
FLUO = ["FL1-A", "FL2-A", "FL3-A"]
S1 = np.array([[1.0, 0.2, 0.05], [0.1, 1.0, 0.3], [0.0, 0.02, 1.0]])


def test_spillover_keyword_and_markers(tmp_path):
    data = np.arange(4 * 6, dtype=float).reshape(4, 6)
    path = write_fcs(tmp_path / "flow.fcs", data, PNN, ["", "", "CD3", "CD4", "CD3", ""],
                     spill=spill_text(FLUO, S1))
    a = read_fcs(path)
    assert list(a.var_names) == ["FSC-A", "SSC-A", "CD3", "CD4", "CD3-1", "Time"]
    assert list(a.var["channel"]) == PNN
    np.testing.assert_array_equal(a.X, data.astype(np.float32))
    assert list(a.uns["spillover"]["channels"]) == FLUO
    np.testing.assert_allclose(a.uns["spillover"]["matrix"], S1)
    frame = spillover_from_uns(a)
    assert list(frame.index) == FLUO and list(frame.columns) == FLUO
    np.testing.assert_allclose(frame.to_numpy(), S1)
    # survives write_h5ad
    a.write_h5ad(tmp_path / "flow.h5ad")
    np.testing.assert_allclose(spillover_from_uns(ad.read_h5ad(tmp_path / "flow.h5ad")), S1)


def test_several_files_spillover_same_or_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    d = [rng.uniform(0, 100, (5, 6)) for _ in range(3)]
    S2 = S1.copy()
    S2[0, 1] = 0.4
    p1 = write_fcs(tmp_path / "a.fcs", d[0], PNN, spill=spill_text(FLUO, S1))
    p2 = write_fcs(tmp_path / "b.fcs", d[1], PNN, spill=spill_text(FLUO, S1))
    p3 = write_fcs(tmp_path / "c.fcs", d[2], PNN, spill=spill_text(FLUO, S2))
    same = read_fcs([p1, p2])
    np.testing.assert_allclose(same.uns["spillover"]["matrix"], S1)
    differ = read_fcs([p1, p3], sample_key="file")
    assert differ.uns["spillover"]["sample_key"] == "file"
    assert set(differ.uns["spillover"]) == {"a", "c", "sample_key"}
    np.testing.assert_allclose(spillover_from_uns(differ, sample="c").to_numpy(), S2)
    with pytest.raises(ValueError, match="one matrix per sample"):
        spillover_from_uns(differ)
    differ.write_h5ad(tmp_path / "d.h5ad")
    back = ad.read_h5ad(tmp_path / "d.h5ad")
    np.testing.assert_allclose(spillover_from_uns(back, sample="a").to_numpy(), S1)
    assert set(back.uns["fcs"]) == {"a", "c"}


def test_channel_mismatch_and_reorder(tmp_path, caplog):
    d = np.ones((3, 6))
    p1 = write_fcs(tmp_path / "one.fcs", d, PNN)
    p2 = write_fcs(tmp_path / "two.fcs", d[:, :5], PNN[:5])
    with pytest.raises(ValueError, match=r"different channels: one\.fcs and two\.fcs.*"
                                         r"only in one\.fcs: \['Time'\]"):
        read_fcs([p1, p2])
    data3 = np.tile(np.arange(6.0), (2, 1))
    p3 = write_fcs(tmp_path / "three.fcs", data3[:, ::-1], PNN[::-1])
    with caplog.at_level(logging.INFO, logger="cellvi"):
        a = read_fcs([p1, p3])
    assert "another order" in caplog.text
    assert list(a.var["channel"]) == PNN
    np.testing.assert_array_equal(a[a.obs["sample"] == "three"].X, data3.astype(np.float32))


def test_parse_spillover_errors():
    with pytest.raises(ValueError, match="malformed"):
        parse_spillover("3,A,B,C,1,0,0")
    with pytest.raises(ValueError, match="number of channels"):
        parse_spillover("A,B,1,0,0,1")
    with pytest.raises(ValueError, match="not numbers"):
        parse_spillover("2,A,B,1,x,0,1")


def test_lazy_namespace():
    assert cellvi.io.read_fcs is read_fcs
