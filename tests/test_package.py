"""The wheel ships the registry and the two demo files; the metadata follows the brief."""

import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"])
    for name in ("torch>=2.2", "anndata", "scanpy", "pyro-ppl", "numpy", "scipy", "pandas",
                 "scikit-learn", "tqdm", "safetensors", "pynndescent>=0.5,<0.7"):
        assert name in deps
    for heavy in ("scvi-tools", "scib-metrics", "harmonypy", "flowsom"):
        assert heavy not in deps and any(heavy in d for d in meta["optional-dependencies"]["bench"])
    assert meta["license"] == "BSD-3-Clause"


def test_wheel_contains_registry_and_demo_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True)
    wheel = next(tmp_path.glob("cellvi-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("registry.toml", "kang2018_pbmc_ctrl_stim_small.h5ad",
              "flowsom_68983_mouse_flow_gated.h5ad", "PROVENANCE.md"):
        assert f"cellvi/data_registry/{f}" in names
    assert "cellvi/cli.py" in names
