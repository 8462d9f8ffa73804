import hashlib
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest

import cellvi
from cellvi import datasets


def test_registry_entries_are_complete():
    reg = datasets.registry()
    assert {"kang2018_pbmc_ctrl_stim_small", "flowsom_68983_mouse_flow_gated",
            "kang2018_pbmc_ctrl_8donors"} <= set(reg)
    for name, e in reg.items():
        for field in ("file", "sha256", "shape", "license", "citation", "url"):
            assert field in e, f"{name} lacks {field}"
        assert len(e["sha256"]) == 64
    table = datasets.available()
    assert table.loc["kang2018_pbmc_ctrl_stim_small", "bundled"]


@pytest.mark.parametrize("name", ["kang2018_pbmc_ctrl_stim_small", "flowsom_68983_mouse_flow_gated"])
def test_bundled_demo_files_load_without_data_dir(name, monkeypatch, tmp_path):
    monkeypatch.delenv("CELLVI_DATA_DIR", raising=False)
    p = datasets.path(name, cache_dir=tmp_path)
    assert p.parent == datasets.registry_dir()
    adata = datasets.load(name, cache_dir=tmp_path)
    assert list(adata.shape) == datasets.registry()[name]["shape"]


def test_data_dir_resolution(data_dir):
    p = datasets.path("kang2018_pbmc_ctrl_8donors")
    assert p.parent == data_dir
    adata = datasets.load("kang2018_pbmc_ctrl_8donors")
    assert {"donor", "cell_type"} <= set(adata.obs.columns)


def test_checksum_mismatch_is_an_error(tmp_path):
    shutil.copy(datasets.registry_dir() / "kang2018_pbmc_ctrl_stim_small.h5ad", tmp_path / "x")
    (tmp_path / "kang2018_pbmc_ctrl_stim_small.h5ad").write_bytes(b"not the data")
    with pytest.raises(ValueError, match="checksum mismatch"):
        datasets.path("kang2018_pbmc_ctrl_stim_small", data_dir=tmp_path)


def test_missing_dataset_message(monkeypatch, tmp_path):
    monkeypatch.delenv("CELLVI_DATA_DIR", raising=False)
    with pytest.raises(datasets.DataNotFoundError, match="CELLVI_DATA_DIR"):
        datasets.path("kang2018_pbmc_ctrl_8donors", cache_dir=tmp_path)
    with pytest.raises(KeyError, match="unknown dataset"):
        datasets.path("nope")


def test_download_through_pooch_with_checksum(tmp_path):
    """Serve a file on loopback; the registry url is downloaded once, verified and cached."""
    served = tmp_path / "served"
    served.mkdir()
    payload = datasets.registry_dir() / "kang2018_pbmc_ctrl_stim_small.h5ad"
    shutil.copy(payload, served / "remote.h5ad")
    (served / "bad.h5ad").write_bytes(b"corrupted")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        sha = hashlib.sha256(payload.read_bytes()).hexdigest()
        reg = tmp_path / "registry.toml"
        reg.write_text(
            f'[remote]\nfile = "remote.h5ad"\nsha256 = "{sha}"\nshape = [1556, 1267]\n'
            f'license = "x"\ncitation = "x"\nurl = "http://127.0.0.1:{port}/remote.h5ad"\n'
            f'[broken]\nfile = "broken.h5ad"\nsha256 = "{sha}"\nshape = [1, 1]\n'
            f'license = "x"\ncitation = "x"\nurl = "http://127.0.0.1:{port}/bad.h5ad"\n'
        )
        cache = tmp_path / "cache"
        adata = datasets.load("remote", registry_file=reg, cache_dir=cache, data_dir=tmp_path / "none")
        assert adata.shape == (1556, 1267)
        assert (cache / "remote.h5ad").exists()
        with pytest.raises(ValueError, match="(?i)hash"):
            datasets.path("broken", registry_file=reg, cache_dir=cache, data_dir=tmp_path / "none")
    finally:
        server.shutdown()


def test_synthetic_counts():
    a = cellvi.datasets.synthetic_counts(400, 50, n_groups=4, n_batches=3, seed=5)
    b = cellvi.datasets.synthetic_counts(400, 50, n_groups=4, n_batches=3, seed=5)
    assert a.shape == (400, 50)
    assert (a.X != b.X).nnz == 0
    X = a.X.toarray()
    assert np.all(X == np.round(X)) and X.min() >= 0
    assert a.obs["group"].nunique() == 4 and a.obs["batch"].nunique() == 3
    np.testing.assert_allclose(a.obs["library"], X.sum(1))
    assert (a.layers["counts"] != a.X).nnz == 0


def test_protocol_batches_thin_real_counts_with_known_effects():
    import cellvi

    src = cellvi.datasets.synthetic_counts(3000, 200, n_groups=4, n_batches=1, seed=3)
    before = src.copy()
    out = cellvi.datasets.protocol_batches(src, label_key="group", strength="strong", seed=1)
    again = cellvi.datasets.protocol_batches(src, label_key="group", strength="strong", seed=1)
    assert (src.X != before.X).nnz == 0 and src.obs.equals(before.obs)  # input untouched
    assert (out.X != again.X).nnz == 0  # seeded
    sim = out.uns["simulation"]
    orig = src[out.obs_names].X.toarray()
    assert (out.X.toarray() <= orig).all()  # thinning only removes molecules
    lib = np.asarray(out.X.sum(1)).ravel()
    med = [np.median(lib[out.obs["batch"] == b]) for b in ("P0", "P1", "P2")]
    assert med[0] > med[1] > med[2] and 3 < med[0] / med[2] < 8  # depth over a 5x range
    labels, batch = out.obs["group"].astype(str), out.obs["batch"].astype(str)
    assert sim["missing"] and not ((labels == sim["missing"]) & (batch == "P2")).any()
    assert ((labels == sim["missing"]) & (batch == "P0")).sum() > 50
    share = lambda b: ((labels == sim["rare"]) & (batch == b)).sum() / (batch == b).sum()  # noqa: E731
    assert share("P0") < 0.3 * share("P1")
    mild = cellvi.datasets.protocol_batches(src, label_key="group", strength="mild", seed=1)
    lib_m = np.asarray(mild.X.sum(1)).ravel()
    assert np.median(lib_m[mild.obs["batch"] == "P0"]) / np.median(lib_m[mild.obs["batch"] == "P2"]) < 3
    with pytest.raises(ValueError, match="strength"):
        cellvi.datasets.protocol_batches(src, label_key="group", strength="huge")
    with pytest.raises(KeyError, match="label_key"):
        cellvi.datasets.protocol_batches(src, label_key="cell_type")
    logged = src.copy()
    logged.X = logged.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match="raw counts"):
        cellvi.datasets.protocol_batches(logged, label_key="group")


def test_cytometry_batches_are_monotone_per_population_and_keep_the_reference():
    from scipy.stats import spearmanr

    import cellvi

    src = cellvi.datasets.synthetic_cytometry(3000, 6, n_populations=3, n_batches=1, seed=2)
    before = src.X.copy()
    out = cellvi.datasets.cytometry_batches(src, label_key="population", n_batches=3, seed=4)
    np.testing.assert_array_equal(src.X, before)
    b = out.obs["batch"].astype(str).to_numpy()
    ref = b == "B0"
    np.testing.assert_allclose(out.X[ref], src.X[ref], rtol=1e-6)
    moved = ~ref
    assert np.abs(out.X[moved] - src.X[moved]).mean() > 0.1
    pop = out.obs["population"].astype(str).to_numpy()
    for batch in ("B1", "B2"):
        for p in np.unique(pop):
            m = (b == batch) & (pop == p)
            for j in range(out.n_vars):  # the same increasing map of each marker
                assert spearmanr(src.X[m, j], out.X[m, j]).statistic > 0.9999
    g = out.uns["simulation"]
    assert g["gain"].shape == (3, 6) and np.all(g["gain"][0] == 1)
