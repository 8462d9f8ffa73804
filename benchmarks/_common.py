"""Helpers shared by the benchmark scripts (import ``_single_thread`` before this)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def purge_cellvi() -> None:
    """Forget the imported cellvi modules, so that the next import reads the files again."""
    for mod in [m for m in sys.modules if m == "cellvi" or m.startswith("cellvi.")]:
        del sys.modules[mod]


def import_cellvi(retries: int = 3, wait: float = 60.0):
    """Import cellvi (with ``metrics``, ``pp`` and ``tl``), retrying when the package fails to
    import because it is being edited while a long benchmark runs."""
    for attempt in range(retries + 1):
        try:
            import cellvi
            import cellvi.metrics  # noqa: F401
            import cellvi.pp  # noqa: F401
            import cellvi.tl  # noqa: F401
            return cellvi
        except Exception as err:  # noqa: BLE001
            if attempt == retries:
                raise
            log(f"cellvi import failed ({type(err).__name__}: {err}); retrying in {wait:.0f} s")
            purge_cellvi()
            time.sleep(wait)
    raise RuntimeError("unreachable")


def git_state() -> dict:
    """Commit of the checkout the benchmark runs from, its uncommitted changes (``git diff
    --stat``; ``cellvi_dirty``: any under ``cellvi/``) and the time."""

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return dict(head=git("rev-parse", "--short", "HEAD"), diff_stat=git("diff", "--stat"),
                cellvi_dirty=bool(git("status", "--porcelain", "--", "cellvi")),
                time=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def data_dir() -> Path:
    """``$CELLVI_DATA_DIR``, set to ``../shared/data`` beside the repository when unset."""
    if "CELLVI_DATA_DIR" not in os.environ:
        os.environ["CELLVI_DATA_DIR"] = str((REPO / ".." / "shared" / "data").resolve())
    return Path(os.environ["CELLVI_DATA_DIR"])


def versions(packages) -> dict:
    """Python's version and each package's installed version (``None`` if not installed)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def jsonable(x):
    """``x`` with numpy values and containers turned into JSON-ready Python ones (anything
    else as its ``str``)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
