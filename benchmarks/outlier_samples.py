"""How many posterior samples do the outlier scores need? (issue 23, item 5; the default
``n_samples`` of ``cellvi.diagnostics.outlier_scores``, which ``tl.nbvae`` / ``tl.gmvae``
call for ``obs[key + "_outlier_score"]``.)

The score is the negative per-cell ELBO, a Monte Carlo average over ``n_samples`` draws of
``q(z | x)``, as a robust z-score within batch. More draws lower its noise and cost
proportionally more. For each model and seed ``s``:

* ``nbvae``: ``kang2018_pbmc_ctrl_8donors`` (12,261 cells x 1,287 genes, ``donor`` the
  batch) plus 2% planted *gene-shuffled* cells (``numpy.random.default_rng(s)``: each gene's
  count copied from an independently drawn real cell; the donor of a random real cell);
  ``cellvi.tl.nbvae(adata, batch_key="donor", seed=s, max_epochs=--nb-epochs)``;
* ``gmvae``: ``flowsom_68983`` (raw X, compensated and logicle-transformed by cellvi, 10
  marker channels; ``outliers.load_flow("flowsom_raw")``) plus 2% marker-shuffled events
  (``outliers.plant_shuffled``); ``cellvi.tl.gmvae(adata, seed=s)`` with its defaults.

Then, on the trained model, ``outlier_scores(model, adata, n_samples=n, seed=s)`` for each
``n`` of ``--samples`` (timed, one thread), scored by: AUROC of the planted cells; Spearman
correlation with the ``n = max(--samples)`` score; and the share of the top 1% of cells
(by the reference score) that are also in the top 1% at ``n``.

Usage::

    python benchmarks/outlier_samples.py --seeds 0 1 2
    python benchmarks/outlier_samples.py --quick

Writes ``<out>/outlier_samples.md`` and ``.json``.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import outliers as ol
from _common import git_state, import_cellvi, jsonable, log

REPO = Path(__file__).resolve().parents[1]


def plant_gene_shuffled(real, frac: float, seed: int):
    """``real`` plus ``round(frac * n)`` cells whose every gene's count is copied from an
    independently drawn real cell."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = real.X.toarray() if sp.issparse(real.X) else np.asarray(real.X)
    n, p = X.shape
    n_o = int(round(frac * n))
    Xo = X[rng.integers(n, size=(n_o, p)), np.arange(p)[None, :]]
    donor = real.obs[ol.BATCH_KEY].astype(str).to_numpy()
    obs = pd.DataFrame({ol.BATCH_KEY: pd.Categorical(np.r_[donor, donor[rng.integers(n, size=n_o)]]),
                        "is_outlier": np.r_[np.zeros(n, bool), np.ones(n_o, bool)]},
                       index=list(real.obs_names) + [f"shuffled_{i}" for i in range(n_o)])
    return ad.AnnData(X=sp.csr_matrix(np.vstack([X, Xo]).astype(np.float32)), obs=obs,
                      var=real.var[[]].copy())


def score(cellvi, model, adata, seed: int, samples: list[int]) -> dict:
    from sklearn.metrics import roc_auc_score

    y = adata.obs["is_outlier"].to_numpy().astype(int)
    scores, seconds = {}, {}
    for n in samples:
        t0 = time.perf_counter()
        scores[n] = cellvi.diagnostics.outlier_scores(model, adata, n_samples=n, seed=seed)
        seconds[n] = time.perf_counter() - t0
    ref = scores[max(samples)]
    top = ref >= np.quantile(ref, 0.99)
    out = {}
    for n in samples:
        mine = scores[n] >= np.quantile(scores[n], 0.99)
        out[str(n)] = dict(auroc=float(roc_auc_score(y, scores[n])), seconds=seconds[n],
                      spearman_vs_ref=float(ol._spearman(scores[n], ref)),
                      top1_overlap=float((mine & top).sum() / top.sum()))
        log(f"      n_samples={n}: AUROC {out[str(n)]['auroc']:.3f}, Spearman "
            f"{out[str(n)]['spearman_vs_ref']:.4f}, top-1% {out[str(n)]['top1_overlap']:.3f}, "
            f"{seconds[n]:.2f} s")
    return out


def render(res: dict) -> str:
    samples = res["args"]["samples"]
    lines = ["# Outlier scores: how many posterior samples (issue 23, item 5)", "",
             f"Made by `{res['command']}` at {res['git'].get('head')}, {res['started']}, "
             f"{res['machine']} (one thread). Method: the docstring of "
             "`benchmarks/outlier_samples.py`. Mean (range) over seeds "
             f"{res['args']['seeds']}; the reference is n = {max(samples)}.", ""]
    for model, runs in res["runs"].items():
        if not runs:
            continue
        lines += [f"## {model} ({runs[0]['data']})", "",
                  "| n_samples | AUROC (planted shuffled) | Spearman vs reference | top-1% overlap "
                  "| seconds | x time of n=1 |", "|---|---|---|---|---|---|"]
        for n in samples:
            def mr(key, nd=3, n=n, runs=runs):
                v = [r["scores"][str(n)][key] for r in runs]
                return f"{np.mean(v):.{nd}f} ({min(v):.{nd}f}-{max(v):.{nd}f})"
            ratio = np.mean([r["scores"][str(n)]["seconds"] / r["scores"][str(samples[0])]["seconds"]
                             for r in runs])
            lines.append(f"| {n} | {mr('auroc')} | {mr('spearman_vs_ref', 4)} | "
                         f"{mr('top1_overlap')} | {mr('seconds', 2)} | {ratio:.1f} |")
        train = [r["train_seconds"] for r in runs]
        lines += ["", f"Training (`tl.{model}`, which includes its own outlier pass): "
                      f"{np.mean(train):.0f} s mean over seeds.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=["nbvae", "gmvae"], choices=["nbvae", "gmvae"])
    p.add_argument("--samples", nargs="+", type=int, default=[1, 2, 4, 8, 64])
    p.add_argument("--frac", type=float, default=0.02)
    p.add_argument("--nb-epochs", type=int, default=80)
    p.add_argument("--quick", action="store_true", help="2,000 cells / 3,000 events, 5 epochs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.samples = sorted(set(args.samples))
    cellvi = import_cellvi()
    res = dict(command="python benchmarks/outlier_samples.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               git=git_state(), started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               machine=f"{platform.machine()}, {os.cpu_count()} cores", args=vars(args),
               runs={m: [] for m in args.models})
    out = Path(args.out)
    stem = "outlier_samples_quick" if args.quick else "outlier_samples"

    def save():
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(jsonable(res), indent=1))
        (out / f"{stem}.md").write_text(render(jsonable(res)))

    real = ol.load_kang(args.quick) if "nbvae" in args.models else None
    flow = ol.load_flow("flowsom_raw", args.quick) if "gmvae" in args.models else None
    for seed in args.seeds:
        if real is not None:
            adata = plant_gene_shuffled(real, args.frac, seed)
            t0 = time.perf_counter()
            model = cellvi.tl.nbvae(adata, batch_key=ol.BATCH_KEY, seed=seed, verbose=False,
                                    return_model=True, max_epochs=5 if args.quick else args.nb_epochs)
            secs = time.perf_counter() - t0
            log(f"nbvae seed {seed}: {adata.n_obs} cells, trained in {secs:.0f} s")
            res["runs"]["nbvae"].append(dict(
                seed=seed, data=f"Kang 8 donors + {args.frac:.0%} gene-shuffled cells",
                train_seconds=secs, scores=score(cellvi, model, adata, seed, args.samples)))
            save()
        if flow is not None:
            adata = ol.plant_shuffled(flow, args.frac, seed)
            t0 = time.perf_counter()
            kw = dict(max_epochs=5, warmup_epochs=2) if args.quick else {}
            model = cellvi.tl.gmvae(adata, seed=seed, verbose=False, return_model=True, **kw)
            secs = time.perf_counter() - t0
            log(f"gmvae seed {seed}: {adata.n_obs} events, trained in {secs:.0f} s")
            res["runs"]["gmvae"].append(dict(
                seed=seed, data=f"flowsom_68983 (raw X, compensated + logicle) + {args.frac:.0%} "
                                "marker-shuffled events",
                train_seconds=secs, scores=score(cellvi, model, adata, seed, args.samples)))
            save()
    log(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
