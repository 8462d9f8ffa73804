"""Calibration of cellvi's posteriors against oracles whose exact posterior is known.

Protocol (``cellvi.diagnostics.calibration_report``, one thread):

* **mixture oracle**: ``cellvi.datasets.gaussian_mixture(seed=d)`` with its defaults (6,000
  cells; 5 overlapping populations in 3 latent dimensions, a random linear map to 12
  markers, noise 0.3; the Bayes classifier's accuracy 0.69-0.84 over data seeds 0-2);
  ``cellvi.models.GMVAE(oracle, n_components=5, **config).fit(seed=s)``, then the report on
  the training cells: ECE (15 bins), mean total variation to the exact ``p(c | x)``,
  accuracy (clusters matched to populations), signal coverage and SBC. Configurations:

  - ``default``: shipped defaults; probabilities averaged over 16 posterior draws;
  - ``default, at mean``: the same fit, probabilities ``p(c | z)`` at the posterior mean
    (``transform(n_samples=0)``, the v0.1 output);
  - ``n_latent=3``: the true latent dimension; ``overcluster=False``: K components from
    the start; both are diagnoses, not defaults;

  with references in the same run: the exact posterior, and sklearn's full-covariance
  ``GaussianMixture(5, n_init=3)`` on the markers (the true model class of ``x``).
* **linear-Gaussian oracle**: ``cellvi.datasets.linear_gaussian(2000, 12, seed=d)``
  (pPCA, 3 latent dimensions): ``GMVAE(n_components=1, n_latent=L)`` for L = 3 and 10:
  coverage of the 50% / 90% intervals of the signal and the SBC p-value.

Usage::

    python benchmarks/calibration.py --data-seeds 0 1 2 --seeds 0 1 --out benchmarks/results
    python benchmarks/calibration.py --data-seeds 0 --seeds 0 --quick --out /tmp/cal_smoke

Writes ``<out>/calibration.json`` and ``<out>/calibration.md``.
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

MIXTURE_CONFIGS = {"default": {}, "n_latent=3": {"n_latent": 3},
                   "overcluster=False": {"overcluster": False}}
LINEAR_LATENTS = (3, 10)
METRICS = ("ece", "tv", "accuracy", "coverage_50", "coverage_90", "sbc_pvalue", "seconds")


def _log_row(what: str, row: dict) -> None:
    log(f"{what}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k in METRICS))


def _row(summary, name: str, seconds: float | None = None) -> dict:
    out = {k: float(v) for k, v in summary.loc[name].items()}
    if seconds is not None:
        out["seconds"] = seconds
    return out


def mixture_runs(cellvi, dseed: int, seeds, quick: bool) -> list[dict]:
    from sklearn.mixture import GaussianMixture

    from cellvi.diagnostics import calibration_report, expected_calibration_error, match_clusters

    n = 1500 if quick else 6000
    oracle = cellvi.datasets.gaussian_mixture(n, seed=dseed)
    labels = oracle.obs["population"].cat.codes.to_numpy()
    exact = cellvi.datasets.exact_posterior(oracle).probs
    rows = []
    t = time.perf_counter()
    gmm = GaussianMixture(5, n_init=3, random_state=0).fit(oracle.X)
    probs = match_clusters(gmm.predict_proba(oracle.X), labels, 5)
    rows.append(dict(oracle="mixture", data_seed=dseed, seed=0, method="GMM (sklearn, full)",
                     ece=expected_calibration_error(probs, labels),
                     tv=float(0.5 * np.abs(probs - exact).sum(1).mean()),
                     accuracy=float((probs.argmax(1) == labels).mean()),
                     seconds=time.perf_counter() - t))
    for seed in seeds:
        for name, config in MIXTURE_CONFIGS.items():
            t = time.perf_counter()
            model = cellvi.models.GMVAE(oracle, n_components=5, **config)
            model.fit(seed=seed, verbose=False, **({"max_epochs": 10} if quick else {}))
            secs = time.perf_counter() - t
            report = calibration_report(model, oracle, seed=seed)
            rows.append(dict(oracle="mixture", data_seed=dseed, seed=seed, method=f"GMVAE {name}",
                             **_row(report.summary, "model", secs)))
            _log_row(f"mixture d{dseed} s{seed} {name}", rows[-1])
            if name == "default":
                mean_probs = match_clusters(model.transform(oracle, n_samples=0).probs
                                            .astype(np.float64), labels, 5)
                rows.append(dict(oracle="mixture", data_seed=dseed, seed=seed,
                                 method="GMVAE default, at mean",
                                 ece=expected_calibration_error(mean_probs, labels),
                                 tv=float(0.5 * np.abs(mean_probs - exact).sum(1).mean()),
                                 accuracy=float((mean_probs.argmax(1) == labels).mean())))
                if seed == seeds[0]:
                    rows.append(dict(oracle="mixture", data_seed=dseed, seed=0, method="exact",
                                     **_row(report.summary, "exact")))
    return rows


def linear_runs(cellvi, dseed: int, seeds, quick: bool) -> list[dict]:
    from cellvi.diagnostics import calibration_report

    oracle = cellvi.datasets.linear_gaussian(500 if quick else 2000, 12, seed=dseed)
    rows = []
    for seed in seeds:
        for n_latent in LINEAR_LATENTS:
            t = time.perf_counter()
            model = cellvi.models.GMVAE(oracle, n_components=1, n_latent=n_latent)
            model.fit(seed=seed, verbose=False, **({"max_epochs": 10} if quick else {}))
            secs = time.perf_counter() - t
            report = calibration_report(model, oracle, seed=seed)
            rows.append(dict(oracle="linear_gaussian", data_seed=dseed, seed=seed,
                             method=f"GMVAE K=1, n_latent={n_latent}",
                             **_row(report.summary, "model", secs)))
            _log_row(f"linear d{dseed} s{seed} L={n_latent}", rows[-1])
            if seed == seeds[0] and n_latent == LINEAR_LATENTS[0]:
                rows.append(dict(oracle="linear_gaussian", data_seed=dseed, seed=0,
                                 method="exact", **_row(report.summary, "exact")))
    return rows


def _agg(rows: list[dict], metric: str) -> str:
    vals = [r[metric] for r in rows if metric in r and np.isfinite(r[metric])]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"


def write_markdown(res: dict, path: Path) -> None:
    rows = res["rows"]
    lines = ["# Calibration against oracles with exact posteriors", "",
             f"`{res['command']}` on {res['git']['head']}"
             + (" + uncommitted cellvi/" if res["git"]["cellvi_dirty"] else "")
             + f", {res['git']['time']}; {res['seconds']:.0f} s, one thread.", "",
             "Each cell: mean over data seeds x training seeds, (min-max). ECE: top-label "
             "expected calibration error (15 bins) against the true populations; TV: mean "
             "total variation to the exact p(c|x); coverage of the central 50% / 90% credible "
             "intervals of the noise-free signal W z + b; SBC: Bonferroni-combined chi-square "
             "p-value of the rank histograms (uniform under a calibrated posterior; rejected "
             "at 1% below 0.01). `exact` applies the same estimators to the exact posterior.",
             ""]
    for oracle, cols in (("mixture", ("ece", "tv", "accuracy", "coverage_50", "coverage_90",
                                      "sbc_pvalue", "seconds")),
                         ("linear_gaussian", ("coverage_50", "coverage_90", "sbc_pvalue",
                                              "seconds"))):
        sub = [r for r in rows if r["oracle"] == oracle]
        if not sub:
            continue
        lines += [f"## {oracle}", "", "| method | runs | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for method in dict.fromkeys(r["method"] for r in sub):
            mr = [r for r in sub if r["method"] == method]
            lines.append(f"| {method} | {len(mr)} | " + " | ".join(_agg(mr, c) for c in cols) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--quick", action="store_true", help="small data, 10 epochs: a smoke test")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    cmd = "python benchmarks/calibration.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    res = dict(command=cmd, git=git_state(), versions=versions(["cellvi", "torch", "scikit-learn"]),
               rows=[])
    t0 = time.perf_counter()
    cellvi = import_cellvi()
    import cellvi.diagnostics  # noqa: F401, F811

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dseed in args.data_seeds:
        res["rows"] += mixture_runs(cellvi, dseed, args.seeds, args.quick)
        res["rows"] += linear_runs(cellvi, dseed, args.seeds, args.quick)
        res["seconds"] = time.perf_counter() - t0
        (out / "calibration.json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out / "calibration.md")
        log(f"data seed {dseed} done; wrote {out / 'calibration.md'}")


if __name__ == "__main__":
    main()
