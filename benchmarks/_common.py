"""Helpers shared by the benchmark scripts (import ``_single_thread`` before this)."""

from __future__ import annotations

import sys
import time


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
