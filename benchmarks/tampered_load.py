"""How fast, and with what message, ``NBVAE.load`` refuses each tampered model folder of
``tests/test_persist.py`` (a measurement, not a test). Writes
``benchmarks/results/tampered_load.md``.

    python benchmarks/tampered_load.py
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_persist as T  # noqa: E402

from cellvi.models import NBVAE  # noqa: E402


def main() -> None:
    NBVAE.load(T.FIXTURES[0] / "nbvae", device="cpu")  # imports warmed up, outside the timings
    rows = []
    for tamper, _ in T.TAMPERS:
        folder = Path(tempfile.mkdtemp()) / "m"
        shutil.copytree(T.FIXTURES[0] / "nbvae", folder)
        tamper(folder)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            NBVAE.load(folder, device="cpu")
            outcome = "LOADED (not refused)"
        except Exception as err:  # noqa: BLE001 - the point is to show what was raised
            outcome = f"{type(err).__name__}: {str(err).replace(str(folder), '<folder>')}"
        ms = 1000 * (time.perf_counter() - t0)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        rows.append(f"| {tamper.__name__[8:]} | {ms:.1f} | {grew:.0f} | {outcome} |")
        shutil.rmtree(folder.parent)
    out = ROOT / "benchmarks" / "results" / "tampered_load.md"
    out.write_text(
        "# Tampered model folders refused by `load`\n\n"
        "Command: `python benchmarks/tampered_load.py` (the tampers of `tests/test_persist.py`, "
        "applied to the NBVAE fixture in `tests/data/models_v0_1_0`; imports warmed up first).\n\n"
        "| tamper | ms to refuse | peak RSS growth (MiB) | what `load` raised |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
