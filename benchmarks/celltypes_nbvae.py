"""Cell types in the NB-VAE latent vs PCA (and scVI, Harmony): k-means and Leiden ARI over training seeds.

The foundation issue asks that the latent of ``cellvi.tl.nbvae`` on Kang 8 donors separates
``cell_type`` at least as well as PCA on log-normalized data (ARI of k-means or Leiden). A
single training seed moves that ARI by about 0.06, so this script scores several seeds with
several clusterings on one preprocessing (``scib_nbvae.preprocess``: 2,000 seurat_v3 HVGs
when there are more genes, normalize_total 1e4 + log1p, 50 PCs) and the same
``cellvi.tl.nbvae`` call as ``scib_nbvae.py`` (defaults, batch ``donor``).

Per embedding:

* k-means ARI: k = number of cell types, ``n_init=10``, mean over k-means seeds 0, 1, 2;
* Leiden ARI on ``sc.pp.neighbors`` (15 neighbours, ``random_state=0``) over scib's grid of
  resolutions (0.1, 0.2, ..., 2.0, as in ``scib.metrics.cluster_optimal_resolution``): at
  resolution 1 (scanpy's default), the best over the grid (scib's "optimal resolution"
  protocol) and at the resolution whose cluster count is closest to the number of cell types
  (the mean over ties). Leiden's own ``random_state`` is 0; ``--leiden-seeds N`` repeats the
  grid with Leiden seeds 0..N-1 and reports each measure as the mean over them (PCA has no
  training seed, so this is the only way its figure can be a mean too).

``--latents FILE`` scores the latents saved by an earlier ``--save-latents`` run instead of
training (same preprocessing; seeds taken from the file).

Usage::

    python benchmarks/celltypes_nbvae.py --seeds 0 1 2 3 --jobs 2 --out DIR
    python benchmarks/celltypes_nbvae.py --latents DIR/celltypes_nbvae_latents.npz --leiden-seeds 3 --out DIR2
    python benchmarks/celltypes_nbvae.py --seeds 0 1 2 3 --scvi-seeds 0 1 2 3 --harmony --jobs 2 --out DIR

``--scvi-seeds`` and ``--harmony`` score the peers of ``scib_nbvae.py`` (scvi-tools ``SCVI``
with its defaults, Harmony on the 50 PCs) the same way, so that the cellvi figures can be read
beside another VAE and the usual integration method.

Writes ``<out>/celltypes_nbvae.md`` and ``.json``. Training runs single-threaded, ``--jobs``
seeds at a time.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import multiprocessing as mp
import shlex
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scib_nbvae as base
from _common import git_state, import_cellvi, log, versions

RESOLUTIONS = [round(0.1 * i, 1) for i in range(1, 21)]  # scib's optimal-resolution grid
KMEANS_SEEDS = [0, 1, 2]
MEASURES = {"kmeans": "k-means ARI", "leiden_res1": "Leiden ARI, resolution 1",
            "leiden_best": "Leiden ARI, best resolution", "leiden_k": "Leiden ARI, ~K clusters"}


def _train_scvi(adata, seed: int):
    z, secs, info = base.run_scvi(adata, seed)
    return seed, z, secs, info.get("n_epochs")


def _train(adata, seed: int, kwargs: dict):
    z, secs, info = base.run_cellvi(adata, seed, **kwargs)
    return seed, z, secs, info.get("n_epochs")


def score(adata, rep: str, labels: np.ndarray, leiden_seeds: int = 1) -> dict:
    """k-means and Leiden ARIs of one embedding; the Leiden measures are means over Leiden
    seeds 0..leiden_seeds-1 (``leiden`` holds the grid of seed 0, ``leiden_runs`` each
    seed's measures)."""
    import scanpy as sc
    from sklearn.cluster import KMeans

    cellvi = import_cellvi()
    X = np.asarray(adata.obsm[rep])
    k = len(np.unique(labels))
    km = [cellvi.metrics.ari(labels, KMeans(k, n_init=10, random_state=s).fit_predict(X))
          for s in KMEANS_SEEDS]
    sc.pp.neighbors(adata, use_rep=rep, random_state=0, key_added=rep)
    runs, grids = [], []
    for leiden_seed in range(leiden_seeds):
        grid = []
        for r in RESOLUTIONS:
            sc.tl.leiden(adata, resolution=r, flavor="igraph", n_iterations=2,
                         random_state=leiden_seed, neighbors_key=rep, key_added="_leiden")
            grid.append(dict(resolution=r, ari=cellvi.metrics.ari(labels, adata.obs["_leiden"]),
                             n_clusters=int(adata.obs["_leiden"].nunique())))
        gap = [abs(g["n_clusters"] - k) for g in grid]
        near = [g["ari"] for g, d in zip(grid, gap, strict=True) if d == min(gap)]
        best = max(grid, key=lambda g: g["ari"])
        runs.append(dict(leiden_seed=leiden_seed, leiden_res1=grid[RESOLUTIONS.index(1.0)]["ari"],
                         leiden_best=best["ari"], leiden_best_resolution=best["resolution"],
                         leiden_k=float(np.mean(near))))
        grids.append(grid)
    del adata.obs["_leiden"]
    mean = {m: float(np.mean([r[m] for r in runs])) for m in ("leiden_res1", "leiden_best", "leiden_k")}
    return dict(kmeans=float(np.mean(km)), kmeans_runs=km, leiden=grids[0], leiden_runs=runs,
                leiden_best_resolution=runs[0]["leiden_best_resolution"], **mean)


def _seed(row: dict) -> str:
    return "–" if row.get("seed") is None else str(row["seed"])


def write_markdown(res: dict, path: Path) -> None:
    L = ["# Cell types in the NB-VAE latent vs PCA" + (" and peers" if res.get("scvi_seeds") or res.get("harmony") else "")
         + " (k-means and Leiden ARI)", "",
         f"Command: `{res['command']}`  ",
         f"Date: {res['date']}  ",
         f"cellvi code: git {res['git']['head']}"
         + (" (uncommitted changes under cellvi/)" if res["git"]["cellvi_dirty"] else "")
         + (f"; latents not trained here but read from `{res['latents']}`"
            if res.get("latents") else ""),
         "", "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), "",
         f"Dataset `{res['dataset']}`: {res['notes']['n_obs']:,} cells x "
         f"{res['notes']['n_vars']:,} genes ({res['notes']['genes']}), "
         f"{res['notes']['n_batches']} donors, {res['notes']['n_labels']} cell types. "
         "PCA: normalize_total 1e4 + log1p + 50 PCs (and their first 30). cellvi: "
         "`cellvi.tl.nbvae(adata, layer=\"counts\", batch_key=\"donor\", seed=s"
         + "".join(f", {k}={v!r}" for k, v in res.get("nbvae_kwargs", {}).items())
         + ")`, otherwise defaults, "
         "single-threaded. "
         + ("scVI: scvi-tools `SCVI(adata)` with its defaults (batch `donor`, counts), "
            "single-threaded. " if res.get("scvi_seeds") else "")
         + ("Harmony: harmonypy on the 50 PCs, batch `donor`, random_state 0. "
            if res.get("harmony") else "")
         + "k-means: k = number of cell types, n_init 10, mean of k-means "
         "seeds 0-2. Leiden: 15 neighbours, resolutions " + ", ".join(map(str, RESOLUTIONS))
         + "; '~K clusters' is the resolution whose cluster count is nearest the number of "
         "cell types. " + (f"Leiden measures: mean over Leiden seeds 0-{res['leiden_seeds'] - 1} "
                           "(best resolution and the grid below: Leiden seed 0)."
                           if res.get("leiden_seeds", 1) > 1 else "Leiden seed 0."), "",
         "| embedding | seed | " + " | ".join(MEASURES.values())
         + " | best resolution | train s | epochs |",
         "|---|---|" + "---|" * (len(MEASURES) + 3)]
    for row in res["rows"]:
        vals = " | ".join(f"{row[m]:.3f}" for m in MEASURES)
        t = row.get("train_s")
        secs = "–" if t is None else f"{t:.0f}" if t >= 10 else f"{t:.1f}"
        L.append(f"| {row['embedding']} | {_seed(row)} | {vals} | {row['leiden_best_resolution']} | {secs} | {row.get('epochs') or '–'} |")
    L += ["", "## Over training seeds vs PCA (50 PCs)", "",
          "| measure | embedding | mean (range) | PCA 50 | PCA 30 | seeds >= PCA 50 |",
          "|---|---|---|---|---|---|"]
    for m, name in MEASURES.items():
        by_emb = res["summary"][m]
        if "mean" in by_emb:  # a json written before the peers (cellvi only)
            by_emb = {"cellvi NB-VAE": by_emb}
        for emb, s in by_emb.items():
            L.append(f"| {name} | {emb} | {s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f}) | "
                     f"{s['pca50']:.3f} | {s['pca30']:.3f} | {s['n_at_least_pca50']} of {s['n']} |")
    L += ["", "## Leiden grid (ARI / clusters)", "",
          "| embedding | seed | " + " | ".join(map(str, RESOLUTIONS)) + " |",
          "|---|---|" + "---|" * len(RESOLUTIONS)]
    for row in res["rows"]:
        cells = " | ".join(f"{g['ari']:.3f} / {g['n_clusters']}" for g in row["leiden"])
        L.append(f"| {row['embedding']} | {_seed(row)} | {cells} |")
    L += ["", f"Total time: {res['total_s']:.0f} s.", ""]
    path.write_text("\n".join(L))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="kang2018_pbmc_ctrl_8donors")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at once (one thread each)")
    p.add_argument("--out", default=str(base.REPO / "benchmarks" / "results"))
    p.add_argument("--save-latents", action="store_true",
                   help="also write the latents to <out>/celltypes_nbvae_latents.npz")
    p.add_argument("--leiden-seeds", type=int, default=1,
                   help="Leiden random seeds per embedding (measures are their mean)")
    p.add_argument("--latents", default=None,
                   help="score latents saved by --save-latents (keys seed<N>) instead of training")
    p.add_argument("--scvi-seeds", nargs="*", type=int, default=[],
                   help="also score scvi-tools SCVI (its defaults, as scib_nbvae.py) over these seeds")
    p.add_argument("--harmony", action="store_true",
                   help="also score Harmony on the 50 PCs (harmonypy, random_state 0)")
    base.add_nbvae_kwargs_option(p)
    args = p.parse_args(argv)
    kwargs = args.nbvae_kwargs
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    git = git_state()
    import_cellvi()
    adata = base.load_dataset(args.dataset)
    notes = base.preprocess(adata)
    labels = adata.obs[base.LABEL_KEY].astype(str).to_numpy()
    adata.obsm["X_pca30"] = np.asarray(adata.obsm["X_pca"])[:, :30]
    trained = {}  # obsm key -> (training seconds, epochs)
    if args.latents:  # score saved latents: no training, so no seconds or epochs
        saved = np.load(args.latents)
        args.seeds = sorted(int(key[len("seed"):]) for key in saved.files if key.startswith("seed"))
        for seed in args.seeds:
            adata.obsm[f"X_nbvae_s{seed}"] = saved[f"seed{seed}"]
    seeds = [] if args.latents else args.seeds
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        jobs = ([("X_nbvae", "cellvi", pool.submit(_train, adata, s, kwargs)) for s in seeds]
                + [("X_scvi", "scVI", pool.submit(_train_scvi, adata, s)) for s in args.scvi_seeds])
        for key, name, job in jobs:
            seed, z, secs, epochs = job.result()
            log(f"{name} seed {seed}: {secs:.0f} s, {epochs} epochs")
            adata.obsm[f"{key}_s{seed}"] = z
            trained[f"{key}_s{seed}"] = (secs, epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.save_latents:  # before scoring, so that a failure there loses no training
        np.savez_compressed(out / "celltypes_nbvae_latents.npz",
                            **{f"seed{s}": adata.obsm[f"X_nbvae_s{s}"] for s in args.seeds},
                            **{f"scvi{s}": adata.obsm[f"X_scvi_s{s}"] for s in args.scvi_seeds})
    embeddings = [("X_pca", "PCA (50 PCs)", None), ("X_pca30", "PCA (30 PCs)", None)]
    if args.harmony:
        adata.obsm["X_harmony"], secs = base.run_harmony(adata, 0)
        trained["X_harmony"] = (secs, None)
        embeddings.append(("X_harmony", "Harmony (50 PCs)", None))
    embeddings += ([(f"X_nbvae_s{s}", "cellvi NB-VAE", s) for s in args.seeds]
                   + [(f"X_scvi_s{s}", "scVI", s) for s in args.scvi_seeds])
    rows = []
    for rep, name, seed in embeddings:
        row = dict(embedding=name, seed=seed, **score(adata, rep, labels, args.leiden_seeds))
        row["train_s"], row["epochs"] = trained.get(rep, (None, None))
        rows.append(row)
        log(f"{name} {seed}: " + ", ".join(f"{m} {row[m]:.3f}" for m in MEASURES))
    pca50, pca30 = rows[0], rows[1]
    summary = {}
    for m in MEASURES:
        summary[m] = {}
        for emb in dict.fromkeys(r["embedding"] for r in rows[2:]):
            v = np.array([r[m] for r in rows[2:] if r["embedding"] == emb])
            summary[m][emb] = dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()),
                                   pca50=pca50[m], pca30=pca30[m], n=len(v),
                                   n_at_least_pca50=int((v >= pca50[m]).sum()))
    res = dict(command="python " + " ".join(shlex.quote(a) for a in
                                            ["benchmarks/celltypes_nbvae.py", *sys.argv[1:]]),
               date=time.strftime("%Y-%m-%d %H:%M %Z"), git=git,
               versions=versions(("cellvi", "torch", "scanpy", "scikit-learn", "leidenalg",
                                  "igraph")),
               dataset=args.dataset, nbvae_kwargs=kwargs, notes=notes, seeds=args.seeds,
               latents=args.latents, leiden_seeds=args.leiden_seeds, scvi_seeds=args.scvi_seeds,
               harmony=args.harmony, rows=rows, summary=summary,
               total_s=time.perf_counter() - t_start)
    (out / "celltypes_nbvae.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / "celltypes_nbvae.md")
    log(f"wrote {out / 'celltypes_nbvae.md'}")


if __name__ == "__main__":
    main()
