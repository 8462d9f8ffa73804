"""Where Leiden on the NB-VAE latent and on PCA part ways with the cell-type labels (Kang 8 donors).

``celltypes_nbvae.py`` gives the ARI; this script shows which labels a clustering splits or
merges. It trains ``cellvi.tl.nbvae`` once (same preprocessing and call as
``celltypes_nbvae.py``), runs Leiden (15 neighbours, ``random_state=0``) on the latent and on
the 50 PCs at the resolution whose cluster count is nearest the number of cell types, and
writes for each embedding the clusters x labels table with each cluster's mean log10 library
size and largest donor share. Where the latent splits one label into two large clusters, it
lists the genes that separate the two halves within that label (Wilcoxon, scanpy's
``rank_genes_groups`` on log-normalized counts) and the mean expression of T-cell state
markers in each half.

Usage::

    python benchmarks/celltypes_split.py --seed 0 --out DIR

Writes ``<out>/celltypes_split.md``.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scib_nbvae as base
from _common import git_state, import_cellvi, log

RESOLUTIONS = [round(0.1 * i, 1) for i in range(1, 11)]
STATE_MARKERS = ["CCR7", "SELL", "LEF1", "TCF7", "IL7R", "S100A4", "ANXA1", "CREM", "GZMK", "ISG15"]


def leiden_near_k(adata, rep: str, k: int) -> tuple[float, pd.Series]:
    """Leiden labels at the first resolution (of ``RESOLUTIONS``) whose cluster count is
    nearest ``k``."""
    import scanpy as sc

    sc.pp.neighbors(adata, use_rep=rep, random_state=0, key_added=rep)
    best = None
    for r in RESOLUTIONS:
        sc.tl.leiden(adata, resolution=r, flavor="igraph", n_iterations=2, random_state=0,
                     neighbors_key=rep, key_added="_leiden")
        labels = adata.obs["_leiden"].copy()
        gap = abs(labels.nunique() - k)
        if best is None or gap < best[0]:
            best = (gap, r, labels)
    del adata.obs["_leiden"]
    return best[1], best[2]


def table(adata, clusters: pd.Series, lib: np.ndarray) -> pd.DataFrame:
    ct = pd.crosstab(clusters.to_numpy(), adata.obs[base.LABEL_KEY].astype(str).to_numpy())
    ct.index.name = "cluster"
    ct["cells"] = ct.sum(1)
    groups = pd.Series(lib).groupby(clusters.to_numpy())
    ct["mean log10 library"] = groups.mean().map("{:.2f}".format)
    ct["largest donor share"] = (adata.obs[base.BATCH_KEY].groupby(clusters.to_numpy(), observed=True)
                                 .agg(lambda s: s.value_counts(normalize=True).iloc[0])
                                 .map("{:.2f}".format))
    return ct


def markdown_table(df: pd.DataFrame) -> str:
    rows = ["| " + " | ".join([str(df.index.name or "")] + [str(c) for c in df.columns]) + " |",
            "|" + "---|" * (len(df.columns) + 1)]
    rows += ["| " + " | ".join([str(i)] + [str(v) for v in r]) + " |"
             for i, r in zip(df.index, df.itertuples(index=False), strict=True)]
    return "\n".join(rows)


def split_genes(adata, clusters: pd.Series, ct: pd.DataFrame) -> dict | None:
    """The label whose two largest clusters both hold >= 20% of it, and what separates them."""
    import scanpy as sc

    labels = [c for c in ct.columns if c not in ("cells", "mean log10 library", "largest donor share")]
    for label in sorted(labels, key=lambda c: -ct[c].sum()):
        col = ct[label].sort_values(ascending=False)
        if col.iloc[1] >= 0.2 * col.sum():
            a, b = str(col.index[0]), str(col.index[1])
            keep = ((adata.obs[base.LABEL_KEY].astype(str) == label).to_numpy()
                    & clusters.astype(str).isin([a, b]).to_numpy())
            sub = adata[keep].copy()
            sub.obs["_half"] = pd.Categorical(clusters.astype(str).to_numpy()[keep])
            sc.tl.rank_genes_groups(sub, "_half", method="wilcoxon")
            top = {g: sc.get.rank_genes_groups_df(sub, g).head(12) for g in (a, b)}
            means = {}
            for gene in [g for g in STATE_MARKERS if g in sub.var_names]:
                x = sub[:, gene].X
                x = np.asarray(x.todense() if hasattr(x, "todense") else x).ravel()
                means[gene] = {g: float(x[sub.obs["_half"].to_numpy() == g].mean()) for g in (a, b)}
            return dict(label=label, halves=(a, b), sizes=(int(col.iloc[0]), int(col.iloc[1])),
                        top=top, means=means)
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="kang2018_pbmc_ctrl_8donors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(base.REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    git = git_state()
    import_cellvi()
    adata = base.load_dataset(args.dataset)
    base.preprocess(adata)  # normalize_total 1e4 + log1p in X, 50 PCs, counts in layers
    z, secs, _ = base.run_cellvi(adata, args.seed)
    adata.obsm["X_nbvae"] = z
    lib = np.log10(np.asarray(adata.layers["counts"].sum(1), dtype=np.float64).ravel())
    k = adata.obs[base.LABEL_KEY].nunique()
    cellvi = import_cellvi()
    L = [f"# {__doc__.splitlines()[0]}", "",
         "Command: `python " + " ".join(shlex.quote(a) for a in
                                        ["benchmarks/celltypes_split.py", *sys.argv[1:]]) + "`  ",
         f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  ", f"cellvi code: git {git['head']}"
         + (" (uncommitted changes under cellvi/)" if git["cellvi_dirty"] else ""), "",
         f"`cellvi.tl.nbvae(adata, layer=\"counts\", batch_key=\"donor\", seed={args.seed})` "
         f"({secs:.0f} s) vs 50 PCs of log-normalized data; Leiden at the resolution of "
         f"{', '.join(map(str, RESOLUTIONS))} whose cluster count is nearest {k} (the number "
         "of cell types).", ""]
    for rep, name in (("X_pca", "PCA (50 PCs)"), ("X_nbvae", f"cellvi NB-VAE, seed {args.seed}")):
        r, clusters = leiden_near_k(adata, rep, k)
        ct = table(adata, clusters, lib)
        ari = cellvi.metrics.ari(adata.obs[base.LABEL_KEY], clusters)
        L += [f"## {name}: resolution {r}, {clusters.nunique()} clusters, ARI {ari:.3f}", "",
              markdown_table(ct), ""]
        log(f"{name}: resolution {r}, {clusters.nunique()} clusters, ARI {ari:.3f}")
        split = split_genes(adata, clusters, ct)
        if split is None:
            L += ["No label is split into two clusters that each hold >= 20% of it.", ""]
            continue
        a, b = split["halves"]
        L += [f"**{split['label']}** is split into clusters {a} ({split['sizes'][0]} cells) and "
              f"{b} ({split['sizes'][1]}). Genes up in each half (log fold change):", ""]
        for g in (a, b):
            df = split["top"][g]
            L.append(f"- cluster {g}: " + ", ".join(f"{n} {lfc:.2f}" for n, lfc in
                                                     zip(df["names"], df["logfoldchanges"], strict=True)))
        L += ["", "| marker | " + " | ".join(f"mean in cluster {g}" for g in (a, b)) + " |",
              "|---|---|---|"]
        L += [f"| {gene} | {m[a]:.2f} | {m[b]:.2f} |" for gene, m in split["means"].items()]
        L.append("")
    L.append(f"Run time: {(time.perf_counter() - t0) / 60:.1f} min.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "celltypes_split.md").write_text("\n".join(L) + "\n")
    log(f"wrote {out / 'celltypes_split.md'}")


if __name__ == "__main__":
    main()
