"""GMVAE cluster probabilities at the posterior mean vs averaged over posterior draws, on
the real cytometry inputs of ``benchmarks/cytometry.py``: do the labels (their argmax) keep
their F1 / ARI, and how calibrated are the confidences against the manual gates?

Protocol: for each input and seed, one ``cellvi.models.GMVAE(adata, batch_key=...)`` fit in
discovery mode (``n_components=None``) with its defaults, ``fit(seed=s)``; then, on the same
fit, ``transform(n_samples=0)`` (``p(c | z)`` at the posterior mean, the v0.1 output) and
``transform()`` (the default, ``E_{q(z|x)}[p(c | z)]`` over 16 draws). Scores as in
``benchmarks/cytometry.py`` (Hungarian F1 over gated populations, ARI), plus the expected
calibration error of the probabilities against the gates on the gated events, clusters
matched to gates by ``cellvi.diagnostics.match_clusters`` (gates are a human's labels, not
an exact posterior: this shows the direction, the oracle in ``calibration.py`` the size).

Usage::

    python benchmarks/gmvae_probs.py --inputs flowsom spectre --seeds 0 1 2 3 4 --out benchmarks/results

Writes ``<out>/gmvae_probs.json`` and ``<out>/gmvae_probs.md``.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import REPO, git_state, import_cellvi, log, versions
from cytometry import load_input, make_adata, score


def run(cellvi, name: str, seed: int) -> list[dict]:
    from cellvi.diagnostics import expected_calibration_error, match_clusters

    d = load_input(name)
    a = make_adata(d)
    t = time.perf_counter()
    model = cellvi.models.GMVAE(a, batch_key="batch" if d.get("batch") is not None else None)
    model.fit(seed=seed, verbose=False)
    secs = time.perf_counter() - t
    truth = np.asarray(d["truth"]).astype(str)
    gated = ~np.isin(truth, np.asarray(d["exclude"], dtype=str))
    names, codes = np.unique(truth[gated], return_inverse=True)
    rows = []
    for label, n_samples in (("at mean (v0.1)", 0), ("averaged, 16 draws", 16)):
        t = time.perf_counter()
        out = model.transform(a, n_samples=n_samples)
        tsecs = time.perf_counter() - t
        s = score(d, np.asarray(out.labels).astype(str))
        probs = match_clusters(out.probs[gated].astype(np.float64), codes, len(names))
        rows.append(dict(input=name, seed=seed, probs=label, f1=s["f1"], ari=s["ari"],
                         n_clusters=s["n_clusters"], ece_vs_gates=expected_calibration_error(probs, codes),
                         mean_confidence=float(out.confidence[gated].mean()),
                         gate_accuracy=float((probs.argmax(1) == codes).mean()),
                         fit_seconds=secs, transform_seconds=tsecs))
        log(f"{name} s{seed} {label}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float)))
    return rows


def _agg(vals) -> str:
    vals = [v for v in vals if np.isfinite(v)]
    return (f"{np.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})" if len(vals) > 1
            else f"{vals[0]:.3f}")


def write_markdown(res: dict, path: Path) -> None:
    cols = ("f1", "ari", "n_clusters", "ece_vs_gates", "mean_confidence", "gate_accuracy",
            "transform_seconds")
    lines = ["# GMVAE probabilities at the posterior mean vs averaged over posterior draws", "",
             f"`{res['command']}` on {res['git']['head']}"
             + (" + uncommitted cellvi/" if res["git"]["cellvi_dirty"] else "")
             + f", {res['git']['time']}; one thread. Same fit for both rows of a seed; "
             "mean (min-max) over seeds. ECE against the manual gates (15 bins), on gated events.",
             "", "| input | probabilities | seeds | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name in dict.fromkeys(r["input"] for r in res["rows"]):
        for label in dict.fromkeys(r["probs"] for r in res["rows"]):
            mr = [r for r in res["rows"] if r["input"] == name and r["probs"] == label]
            if mr:
                lines.append(f"| {name} | {label} | {len(mr)} | "
                             + " | ".join(_agg([r[c] for r in mr]) for c in cols) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", nargs="+", default=["flowsom", "spectre"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    cmd = "python benchmarks/gmvae_probs.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    res = dict(command=cmd, git=git_state(), versions=versions(["cellvi", "torch"]), rows=[])
    cellvi = import_cellvi()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.inputs:
        for seed in args.seeds:
            res["rows"] += run(cellvi, name, seed)
            (out / "gmvae_probs.json").write_text(json.dumps(res, indent=1))
            write_markdown(res, out / "gmvae_probs.md")


if __name__ == "__main__":
    main()
