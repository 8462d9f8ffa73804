import json
import subprocess
import sys

import cellvi


def test_import_is_light():
    code = (
        "import sys, time, json; t = time.perf_counter(); import cellvi; "
        "t = time.perf_counter() - t; "
        "print(json.dumps({m: m in sys.modules for m in ['scanpy', 'pyro', 'umap', 'torch', 'anndata']}"
        " | {'seconds': t}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not loaded["scanpy"] and not loaded["pyro"] and not loaded["umap"], loaded
    assert not loaded["torch"], "import cellvi should not even import torch eagerly"


def test_lazy_namespaces():
    assert cellvi.tl.nbvae is not None
    assert cellvi.models.NBVAE is not None
    assert "tl" in dir(cellvi)
    try:
        cellvi.does_not_exist  # noqa: B018
    except AttributeError as e:
        assert "does_not_exist" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_version():
    assert isinstance(cellvi.__version__, str) and cellvi.__version__.count(".") >= 2
