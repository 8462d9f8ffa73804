"""Does the NB-VAE's latent batch penalty cost cell-type structure? (Kang 8 donors, test protocol.)

``tests/test_realdata.py`` failed once with ``batch_penalty=100`` as the default (Leiden
cell-type ARI 0.302 vs its bound 0.35). This script repeats that test's protocol over
several training seeds and penalty weights, so that one draw can be told from a systematic
loss:

* preprocessing as the test's ``kang`` fixture, done once: counts to ``layers["counts"]``,
  2,000 seurat_v3 HVGs on counts (all 1,287 genes of this file are kept), normalize_total
  1e4 + log1p, 30 PCs (``random_state=0``);
* per setting ``batch_penalty`` in ``--penalties`` and training seed in ``--seeds``:
  ``cellvi.tl.nbvae(adata, layer="counts", batch_key="donor", seed=s, batch_penalty=λ,
  verbose=False)`` with two schedules, ``test`` (``max_epochs=80``, as the test) and
  ``default`` (``max_epochs`` not given: early stopping). All ``test`` runs come first;
* per run: k-means ARI (the test's ``_kmeans``: k = number of cell types, ``n_init=10``,
  ``random_state=0``), Leiden ARI as the test (``sc.pp.neighbors(use_rep="X_nbvae",
  random_state=0)``, ``sc.tl.leiden(flavor="igraph", n_iterations=2, random_state=0)``) and
  with Leiden ``random_state`` 1 and 2, the number of Leiden clusters, iLISI on donor
  (``cellvi.metrics.ilisi``, as the test), training seconds and epochs trained (length of
  ``uns["nbvae"]["history"]["train_elbo"]``);
* PCA's k-means and Leiden ARIs once, as the test computes them.

The test's bounds: k-means ARI > 0.4 and >= PCA's - 0.05
(``test_latent_separates_cell_types_about_as_well_as_pca``), Leiden ARI (``random_state=0``)
> 0.35 (``test_neighbors_leiden_umap_on_more_than_8192_cells``), iLISI >= PCA's - 0.02
(``test_donors_are_mixed_in_the_latent``).

Usage::

    python benchmarks/celltype_ari_penalty.py --seeds 0 1 2 3 4 --penalties 0 30 100 --jobs 2

Writes ``<out>/celltype_ari_penalty.json`` after every run (so a cut-off run keeps its
numbers) and ``<out>/celltype_ari_penalty.md``. Training is single-threaded, ``--jobs`` runs
at a time.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import logging
import multiprocessing as mp
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from _common import data_dir, jsonable, versions

DATASET = "kang2018_pbmc_ctrl_8donors"
BATCH_KEY = "donor"
LABEL_KEY = "cell_type"
LEIDEN_SEEDS = (0, 1, 2)
SCHEDULES = {"test": {"max_epochs": 80}, "default": {}}
# the test's bounds
KMEANS_MIN, KMEANS_VS_PCA, LEIDEN_MIN, ILISI_VS_PCA = 0.4, 0.05, 0.35, 0.02

log = logging.getLogger("celltype_ari_penalty")
_ADATA = None  # the preprocessed AnnData in each worker


def preprocess():
    """The test's ``kang`` fixture up to (not including) the NB-VAE fit."""
    import scanpy as sc

    import cellvi

    adata = cellvi.datasets.load(DATASET)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000, layer="counts")
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    return adata


def _kmeans(X, k):
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=0).fit_predict(X)


def score(adata, rep: str) -> dict:
    """The test's measures on ``obsm[rep]``: k-means ARI, Leiden ARI and cluster count for
    each Leiden seed, iLISI on donor."""
    import scanpy as sc

    from cellvi.metrics import ari, ilisi

    labels = adata.obs[LABEL_KEY]
    a = adata.copy()
    out = {"kmeans_ari": float(ari(labels, _kmeans(a.obsm[rep], labels.nunique())))}
    sc.pp.neighbors(a, use_rep=rep, random_state=0)
    for s in LEIDEN_SEEDS:
        key = f"leiden_{s}"
        sc.tl.leiden(a, flavor="igraph", n_iterations=2, random_state=s, key_added=key)
        out[f"leiden_ari_rs{s}"] = float(ari(labels, a.obs[key]))
        out[f"leiden_n_rs{s}"] = int(a.obs[key].nunique())
    out["ilisi"] = float(ilisi(a.obsm[rep], a.obs[BATCH_KEY]))
    return out


def _init_worker(path: str) -> None:
    global _ADATA
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    _ADATA = ad.read_h5ad(path)


def run_one(schedule: str, penalty: float, seed: int) -> dict:
    import torch

    import cellvi

    torch.set_num_threads(1)
    a = _ADATA.copy()
    kwargs = dict(SCHEDULES[schedule])
    t0 = time.perf_counter()
    cellvi.tl.nbvae(a, layer="counts", batch_key=BATCH_KEY, seed=seed, batch_penalty=penalty,
                    verbose=False, **kwargs)
    secs = time.perf_counter() - t0
    uns = a.uns["nbvae"]
    hist = uns.get("history", {})
    epochs = int(len(hist["train_elbo"])) if "train_elbo" in hist else None
    ts = dict(uns.get("train_settings", {}))
    row = dict(schedule=schedule, batch_penalty=penalty, seed=seed, train_s=secs, epochs=epochs,
               max_epochs=jsonable(ts.get("max_epochs")),
               train_settings=jsonable(ts))
    t1 = time.perf_counter()
    row.update(score(a, "X_nbvae"))
    row["score_s"] = time.perf_counter() - t1
    return row


def _fmt(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    sep = " to " if min(vals) < 0 else "–"
    if all(isinstance(v, int) for v in vals):
        return f"{np.mean(vals):.1f} ({min(vals)}{sep}{max(vals)})"
    return f"{np.mean(vals):+.3f} ({min(vals):+.3f}{sep}{max(vals):+.3f})" if min(vals) < 0 \
        else f"{np.mean(vals):.3f} ({min(vals):.3f}{sep}{max(vals):.3f})"


def fails(row: dict, pca: dict) -> dict:
    """Which of the test's assertions this run would fail."""
    return dict(kmeans=not (row["kmeans_ari"] > KMEANS_MIN
                            and row["kmeans_ari"] >= pca["kmeans_ari"] - KMEANS_VS_PCA),
                leiden=not row["leiden_ari_rs0"] > LEIDEN_MIN,
                ilisi=not row["ilisi"] >= pca["ilisi"] - ILISI_VS_PCA)


def write_report(out: Path, result: dict) -> None:
    (out / "celltype_ari_penalty.json").write_text(json.dumps(jsonable(result), indent=1))
    pca, rows = result["pca"], result["rows"]
    lines = [
        "# Cell-type ARI of the NB-VAE latent vs its batch penalty (Kang 8 donors, test protocol)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}  ",
        f"cellvi code: {result['cellvi']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        f"Machine: {result['machine']}, single-threaded runs, {result['jobs']} at a time",
        "",
        f"Protocol: `tests/test_realdata.py`'s fixture ({result['dataset']}), "
        f"then `cellvi.tl.nbvae(adata, layer=\"counts\", batch_key=\"donor\", seed=s, "
        f"batch_penalty=λ, verbose=False)` with `max_epochs=80` (schedule **test**) or "
        f"without `max_epochs` (schedule **default**). k-means: the test's `_kmeans`. "
        f"Leiden: `sc.pp.neighbors(use_rep=..., random_state=0)` + `sc.tl.leiden(flavor="
        f"\"igraph\", n_iterations=2, random_state=r)`; rs0 is the test's call, rs1/rs2 "
        f"Leiden's own seed noise. iLISI: `cellvi.metrics.ilisi` on donor. Cells: mean "
        f"(min–max) over the training seeds done.",
        "",
        f"PCA (30 PCs): k-means ARI {pca['kmeans_ari']:.3f}, Leiden ARI rs0/rs1/rs2 "
        f"{pca['leiden_ari_rs0']:.3f}/{pca['leiden_ari_rs1']:.3f}/{pca['leiden_ari_rs2']:.3f} "
        f"({pca['leiden_n_rs0']} clusters at rs0), iLISI {pca['ilisi']:.3f}.",
        "",
        f"Test bounds: k-means ARI > {KMEANS_MIN} and >= PCA - {KMEANS_VS_PCA} "
        f"(= {pca['kmeans_ari'] - KMEANS_VS_PCA:.3f}); Leiden ARI (rs0) > {LEIDEN_MIN}; "
        f"iLISI >= PCA - {ILISI_VS_PCA} (= {pca['ilisi'] - ILISI_VS_PCA:.3f}).",
        "",
        "| schedule | λ | seeds | k-means ARI | Leiden ARI rs0 | Leiden ARI rs1 | Leiden ARI rs2 "
        "| Leiden mean rs0-2 | clusters rs0 | iLISI | epochs | train s | fail k-means | "
        "fail Leiden | fail iLISI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sched in SCHEDULES:
        for lam in result["penalties"]:
            rs = [r for r in rows if r["schedule"] == sched and r["batch_penalty"] == lam]
            if not rs:
                continue
            f = [fails(r, pca) for r in rs]

            def col(k, rs=rs):
                return _fmt([r[k] for r in rs])

            lmean = _fmt([float(np.mean([r[f"leiden_ari_rs{s}"] for s in LEIDEN_SEEDS]))
                          for r in rs])
            lines.append(
                f"| {sched} | {lam:g} | {len(rs)} | {col('kmeans_ari')} | {col('leiden_ari_rs0')} "
                f"| {col('leiden_ari_rs1')} | {col('leiden_ari_rs2')} | {lmean} "
                f"| {col('leiden_n_rs0')} | {col('ilisi')} | {col('epochs')} | "
                f"{_fmt([round(r['train_s']) for r in rs])} | {sum(x['kmeans'] for x in f)}/{len(rs)} | "
                f"{sum(x['leiden'] for x in f)}/{len(rs)} | {sum(x['ilisi'] for x in f)}/{len(rs)} |")
    lines += ["", "Paired by training seed: λ's run minus λ=0's run of the same seed and schedule, "
              "mean (min–max) and how many seeds are lower:", "",
              "| schedule | λ | seeds | Δ k-means ARI | lower | Δ Leiden ARI rs0 | lower "
              "| Δ Leiden mean rs0-2 | lower | Δ iLISI |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sched in SCHEDULES:
        base = {r["seed"]: r for r in rows if r["schedule"] == sched and r["batch_penalty"] == 0}
        for lam in result["penalties"]:
            if lam == 0:
                continue
            pairs = [(r, base[r["seed"]]) for r in rows if r["schedule"] == sched
                     and r["batch_penalty"] == lam and r["seed"] in base]
            if not pairs:
                continue

            def lm(r):
                return float(np.mean([r[f"leiden_ari_rs{s}"] for s in LEIDEN_SEEDS]))

            cells = []
            for get in (lambda r: r["kmeans_ari"], lambda r: r["leiden_ari_rs0"], lm):
                d = [get(a) - get(b) for a, b in pairs]
                cells += [_fmt(d), f"{sum(x < 0 for x in d)}/{len(d)}"]
            cells.append(_fmt([a["ilisi"] - b["ilisi"] for a, b in pairs]))
            lines.append(f"| {sched} | {lam:g} | {len(pairs)} | " + " | ".join(cells) + " |")
    lines += ["", "Per run:", "",
              "| schedule | λ | seed | k-means | Leiden rs0 | rs1 | rs2 | clusters rs0/1/2 "
              "| iLISI | epochs | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(SCHEDULES).index(r["schedule"]),
                                         r["batch_penalty"], r["seed"])):
        ns = "/".join(str(r[f"leiden_n_rs{s}"]) for s in LEIDEN_SEEDS)
        lines.append(
            f"| {r['schedule']} | {r['batch_penalty']:g} | {r['seed']} | {r['kmeans_ari']:.3f} "
            f"| {r['leiden_ari_rs0']:.3f} | {r['leiden_ari_rs1']:.3f} | {r['leiden_ari_rs2']:.3f} "
            f"| {ns} | {r['ilisi']:.3f} | {r['epochs']} | {r['train_s']:.0f} |")
    missing = result.get("missing") or []
    if missing:
        lines += ["", f"Not run (yet, or cut off): {len(missing)} runs: " + ", ".join(
            f"{s}/λ={lam:g}/seed {sd}" for s, lam, sd in missing)]
    if result.get("notes"):
        lines += ["", "Notes: " + result["notes"]]
    (out / "celltype_ari_penalty.md").write_text("\n".join(lines) + "\n")


def _cellvi_code() -> str:
    import cellvi

    root = Path(cellvi.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "cellvi"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{root} at git {head or '?'}" + (" (cellvi/ has uncommitted changes)" if dirty else "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--penalties", type=float, nargs="+", default=[0.0, 30.0, 100.0])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results")
    p.add_argument("--notes", default="")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the .md (beside JSON) from an earlier run's JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    if args.render:
        result = json.loads(args.render.read_text())
        if args.notes:
            result["notes"] = args.notes
        write_report(args.render.parent, result)
        return
    import platform

    import torch

    torch.set_num_threads(1)
    data_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("preprocessing %s", DATASET)
    adata = preprocess()
    pca = score(adata, "X_pca")
    log.info("PCA: %s", pca)
    tasks = [(sched, lam, s) for sched in args.schedules for s in args.seeds
             for lam in args.penalties]
    result = dict(
        command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        date=time.strftime("%Y-%m-%d %H:%M %Z"), cellvi=_cellvi_code(),
        versions=versions(["cellvi", "torch", "scanpy", "anndata", "numpy", "scikit-learn",
                           "igraph"]),
        machine=f"{platform.platform()}, {mp.cpu_count()} CPUs", jobs=args.jobs,
        dataset=f"{DATASET}: {adata.n_obs:,} cells x {adata.n_vars:,} genes, "
                f"{adata.obs[BATCH_KEY].nunique()} donors, {adata.obs[LABEL_KEY].nunique()} cell types",
        penalties=args.penalties, seeds=args.seeds, schedules=args.schedules, pca=pca, rows=[],
        missing=[list(t) for t in tasks], notes=args.notes)
    write_report(args.out, result)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "kang_pre.h5ad")
        adata.write_h5ad(path)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(path,)) as pool:
            pending = list(tasks)
            running = {}
            while pending or running:
                while pending and len(running) < args.jobs:
                    t = pending.pop(0)
                    running[pool.submit(run_one, *t)] = t
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    t = running.pop(fut)
                    row = fut.result()
                    result["rows"].append(row)
                    result["missing"].remove(list(t))
                    result["total_s"] = time.perf_counter() - t0
                    write_report(args.out, result)
                    log.info("%s λ=%g seed %d: k-means %.3f, Leiden %.3f/%.3f/%.3f (%d clusters), "
                             "iLISI %.3f, %s epochs, %.0f s", *t, row["kmeans_ari"],
                             row["leiden_ari_rs0"], row["leiden_ari_rs1"], row["leiden_ari_rs2"],
                             row["leiden_n_rs0"], row["ilisi"], row["epochs"], row["train_s"])
    log.info("done in %.0f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
