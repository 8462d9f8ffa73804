"""scib Total of cellvi's NB-VAE over more training seeds, against PCA and Harmony.

``scib_nbvae.py`` trains scVI beside cellvi for every seed; on Kang 8 donors a scVI fit takes
15-20 min single-threaded, so more seeds of cellvi alone come from this script. It uses the
same preprocessing, the same ``cellvi.tl.nbvae`` call and the same scib-metrics
``Benchmarker`` settings (imported from ``scib_nbvae.py``), so its Totals compare with that
script's tables. PCA, the PCA-minus-batch-mean control and Harmony (seed 0) are scored in
the same call for reference.

Usage::

    python benchmarks/scib_cellvi_seeds.py --dataset kang2018_pbmc_ctrl_8donors --seeds 3 4 5 6 7 --out DIR

Writes ``<out>/scib_cellvi_seeds_<dataset>.md`` and ``.json``.
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
import scib_nbvae as base
from _common import git_state, import_cellvi, log

COLUMNS = ["iLISI", "KBET", "PCR comparison", "Batch correction", "Bio conservation", "Total"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="kang2018_pbmc_ctrl_8donors")
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--out", default=str(base.REPO / "benchmarks" / "results"))
    base.add_nbvae_kwargs_option(p)
    args = p.parse_args(argv)
    kwargs = args.nbvae_kwargs
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    git = git_state()
    import_cellvi()
    adata = base.load_dataset(args.dataset)
    notes = base.preprocess(adata)
    adata.obsm["X_pca_minus_batch_mean"] = base.pca_minus_batch_mean(adata)
    methods = {"X_pca": ("PCA (unintegrated)", None, None),
               "X_pca_minus_batch_mean": ("PCA minus per-batch mean (control)", None, None)}
    adata.obsm["X_harmony"], secs = base.run_harmony(adata, seed=0)
    methods["X_harmony"] = ("Harmony", 0, secs)
    for seed in args.seeds:
        z, secs, info = base.run_cellvi(adata, seed, **kwargs)
        adata.obsm[f"X_nbvae_s{seed}"] = z
        methods[f"X_nbvae_s{seed}"] = ("cellvi NB-VAE", seed, secs)
        log(f"   cellvi seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")
    scores = base.scib_scores(adata, list(methods))
    rows = [dict(key=k, method=m, seed=s, train_s=t, **{c: float(scores.loc[k, c]) for c in COLUMNS})
            for k, (m, s, t) in methods.items()]
    cellvi_totals = [r["Total"] for r in rows if r["method"] == "cellvi NB-VAE"]
    harmony = next(r["Total"] for r in rows if r["method"] == "Harmony")
    res = dict(command="python benchmarks/scib_cellvi_seeds.py "
               + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
               date=time.strftime("%Y-%m-%d %H:%M %Z"), git=git, versions=base._versions(),
               dataset=args.dataset, nbvae_kwargs=kwargs, notes=notes, rows=rows,
               cellvi_total_mean=float(np.mean(cellvi_totals)), harmony_total=harmony,
               cellvi_seeds_below_harmony=int(sum(t < harmony for t in cellvi_totals)),
               total_s=time.perf_counter() - t_start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scib_cellvi_seeds_{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(res))
    log(f"wrote {stem}.md ({res['total_s'] / 60:.1f} min)")


def markdown(res: dict) -> str:
    git = res["git"] or {}
    lines = [f"# scib Total of cellvi NB-VAE over training seeds: {res['dataset']}\n",
             f"Command: `{res['command']}`  ",
             f"Date: {res['date']}  ",
             f"cellvi code: git {git.get('head', '?')}{' (uncommitted changes under cellvi/)' if git.get('cellvi_dirty') else ''}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "\n",
             "Same preprocessing, `cellvi.tl.nbvae` call"
             + "".join(f" ({k}={v!r})" for k, v in res.get("nbvae_kwargs", {}).items())
             + " and scib-metrics `Benchmarker` settings "
             "as `scib_nbvae.py` (single-threaded; `min_max_scale=False`); scVI is not run here "
             f"(see `scib_nbvae.md`). Genes: {res['notes']['genes']}.\n",
             "| method | seed | " + " | ".join(COLUMNS) + " | train s |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for r in res["rows"]:
        secs = "–" if r["train_s"] is None else f"{r['train_s']:.1f}"
        seed = "–" if r["seed"] is None else str(r["seed"])
        lines.append(f"| {r['method']} | {seed} | "
                     + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + f" | {secs} |")
    n = sum(r["method"] == "cellvi NB-VAE" for r in res["rows"])
    lines += ["", f"cellvi mean Total over {n} seeds: **{res['cellvi_total_mean']:.3f}**; "
              f"Harmony {res['harmony_total']:.3f}; seeds below Harmony: "
              f"{res['cellvi_seeds_below_harmony']} of {n}.",
              f"\nRun time: {res['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
