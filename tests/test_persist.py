"""Saved model folders: fixtures of earlier versions load; damaged or tampered folders are
refused before anything is built, quickly and without a large allocation."""

import json
import pickle
import resource
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from cellvi.errors import CellviError, ModelFileError
from cellvi.models import GMVAE, NBVAE

FIXTURES = sorted((Path(__file__).parent / "data").glob("models_v*"))


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda p: p.name)
def test_models_saved_by_earlier_versions_load_and_give_the_same_outputs(folder):
    expected = np.load(folder / "expected.npz")
    counts = ad.read_h5ad(folder / "counts.h5ad")
    nb = NBVAE.load(folder / "nbvae", counts, device="cpu")
    np.testing.assert_allclose(nb.transform(counts).latent, expected["nbvae_latent"], atol=1e-5)
    cyto = ad.read_h5ad(folder / "cyto.h5ad")
    gm = GMVAE.load(folder / "gmvae", cyto, device="cpu")
    out = gm.transform(cyto, n_samples=0)  # v0.1's probabilities: p(c|z) at the posterior mean
    np.testing.assert_allclose(out.latent, expected["gmvae_latent"], atol=1e-5)
    np.testing.assert_allclose(out.probs, expected["gmvae_probs"], atol=1e-5)
    np.testing.assert_array_equal(out.labels.codes, expected["gmvae_labels"])


def test_there_is_a_fixture_of_this_format():
    assert FIXTURES, "tests/data/models_v*/ (tests/data/make_fixtures.py) is missing"


@pytest.fixture()
def saved(tmp_path):
    import shutil

    src = FIXTURES[0] / "nbvae"
    dst = tmp_path / "nbvae"
    shutil.copytree(src, dst)
    return dst


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _write(folder, config):
    (folder / "config.json").write_text(json.dumps(config))


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


def _tamper_pickle(folder):
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Payload()))


def _tamper_truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _tamper_huge(folder):
    c = _config(folder)
    c["settings"]["n_hidden"] = 10**8
    _write(folder, c)


def _tamper_huge_in_bounds(folder):
    c = _config(folder)
    c["settings"]["n_hidden"] = 16384  # allowed by the bounds, not by the weights' shapes
    _write(folder, c)


def _tamper_no_settings(folder):
    c = _config(folder)
    del c["settings"]
    _write(folder, c)


def _tamper_shapes(folder):
    c = _config(folder)
    c["settings"]["n_latent"] = 4
    _write(folder, c)


def _tamper_not_json(folder):
    (folder / "config.json").write_text("{'settings': oops")


def _tamper_link(folder):
    outside = folder.parent / "elsewhere.json"
    outside.write_text((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)


def _tamper_missing_setting(folder):
    c = _config(folder)
    del c["settings"]["likelihood"]
    _write(folder, c)


def _tamper_bad_value(folder):
    c = _config(folder)
    c["settings"]["likelihood"] = "gaussian"
    _write(folder, c)


def _tamper_categories(folder):
    c = _config(folder)
    c["categories"] = {}
    _write(folder, c)


TAMPERS = [
    (_tamper_pickle, "not a readable safetensors"),
    (_tamper_truncate, "not a readable safetensors"),
    (_tamper_huge, "n_hidden=100000000 must be an integer in"),
    (_tamper_huge_in_bounds, "other shapes"),
    (_tamper_no_settings, "lacks \\['settings'\\]"),
    (_tamper_shapes, "other shapes"),
    (_tamper_not_json, "not valid JSON"),
    (_tamper_link, "not a plain file inside"),
    (_tamper_missing_setting, "settings lack \\['likelihood'\\]"),
    (_tamper_bad_value, "likelihood='gaussian' must be one of"),
    (_tamper_categories, "categories"),
]


@pytest.mark.parametrize("tamper, match", TAMPERS, ids=[t.__name__[8:] for t, _ in TAMPERS])
def test_tampered_folders_are_refused_quickly_before_building(saved, tamper, match, monkeypatch):
    monkeypatch.chdir(saved.parent)
    tamper(saved)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ModelFileError, match=match) as err:
        NBVAE.load(saved, device="cpu")
    # nothing large was allocated (the 1e8-unit config would ask for hundreds of GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024
    assert isinstance(err.value, ValueError) and isinstance(err.value, CellviError)
    assert not (saved.parent / "PWNED").exists()  # the pickle payload never ran


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not hold a saved cellvi model"):
        NBVAE.load(tmp_path)
