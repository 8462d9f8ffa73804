"""scib-metrics benchmark of cellvi's NB-VAE against PCA, Harmony and scVI.

For each dataset (raw counts in ``X``, batch ``donor``, label ``cell_type``):

* genes: ``sc.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=2000, subset=True)``
  on counts; when the dataset has <= 2,000 genes all genes are kept (recorded in the output);
* ``X_pca`` (unintegrated): normalize_total 1e4 + log1p + ``sc.pp.pca(n_comps=50)``; it is
  also scib's pre-integrated embedding (``pre_integrated_embedding_obsm_key="X_pca"``);
* ``X_pca_minus_batch_mean``: trivial control, ``X_pca`` with each donor's mean subtracted
  (scib's PCR-comparison term rewards merely removing batch means);
* ``X_harmony``: harmonypy on the 50 PCs, by donor;
* ``X_scVI``: scvi-tools ``SCVI`` with its defaults (n_latent 10, n_hidden 128, 1 layer,
  default max_epochs heuristic, no early stopping), ``accelerator="cpu"``, on counts;
* ``X_nbvae``: ``cellvi.tl.nbvae(adata, layer="counts", batch_key="donor", seed=seed)``
  with its defaults.

All methods see the same genes. Scores: scib-metrics ``Benchmarker`` with the default
``BioConservation()`` / ``BatchCorrection()`` sets and ``get_results(min_max_scale=False)``.

Threads: every method runs with one thread (``OMP_NUM_THREADS=1`` etc. set before any import,
``torch.set_num_threads(1)``, harmonypy ``ncores=1``, scib ``n_jobs=1``), so wall-clock times
are comparable between methods within one run only.

Usage::

    python benchmarks/scib_nbvae.py [--datasets NAME ...] [--seeds 0 1 2] [--out benchmarks/results]

Data are read from ``$CELLVI_DATA_DIR`` (default ``../shared/data`` relative to the repo).
Writes ``<out>/scib_nbvae.md`` and ``<out>/scib_nbvae.json``.
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import data_dir, git_state, import_cellvi, log, versions

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = ["kang2018_pbmc_ctrl_8donors", "kang2018_pbmc_ctrl_stim_small"]
BATCH_KEY, LABEL_KEY = "donor", "cell_type"
N_TOP_GENES = 2000
N_PCS = 50

BATCH_COLS = ["BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison"]
BIO_COLS = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI"]
AGG_COLS = ["Batch correction", "Bio conservation", "Total"]


def load_dataset(name: str):
    import anndata as ad

    data_dir()  # sets CELLVI_DATA_DIR when unset
    cellvi = import_cellvi()
    try:
        return cellvi.datasets.load(name)
    except KeyError:  # not in the registry: read the file directly
        return ad.read_h5ad(Path(os.environ["CELLVI_DATA_DIR"]) / f"{name}.h5ad")


def preprocess(adata) -> dict:
    """HVGs on counts, counts layer, log-normalized X, 50-PC PCA. Returns notes."""
    import scanpy as sc

    adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].astype(str).astype("category")
    adata.obs[LABEL_KEY] = adata.obs[LABEL_KEY].astype(str).astype("category")
    n_vars_in = adata.n_vars
    if adata.n_vars > N_TOP_GENES:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_TOP_GENES,
                                    subset=True)
        genes = f"{N_TOP_GENES} seurat_v3 HVGs of {n_vars_in}"
    else:
        genes = f"all genes kept: n_vars {n_vars_in} <= {N_TOP_GENES}, no HVG selection"
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=N_PCS, random_state=0)
    return dict(genes=genes, n_obs=int(adata.n_obs), n_vars=int(adata.n_vars),
                n_batches=int(adata.obs[BATCH_KEY].nunique()),
                n_labels=int(adata.obs[LABEL_KEY].nunique()))


def pca_minus_batch_mean(adata) -> np.ndarray:
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float64).copy()
    b = adata.obs[BATCH_KEY].to_numpy()
    for lev in np.unique(b):
        m = b == lev
        x[m] -= x[m].mean(axis=0)
    return x.astype(np.float32)


def run_harmony(adata, seed: int) -> tuple[np.ndarray, float]:
    import harmonypy

    t0 = time.perf_counter()
    ho = harmonypy.run_harmony(np.asarray(adata.obsm["X_pca"], dtype=np.float64), adata.obs,
                               BATCH_KEY, random_state=seed, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr)
    secs = time.perf_counter() - t0
    if z.shape[0] != adata.n_obs:  # older harmonypy returns PCs x cells
        z = z.T
    return z.astype(np.float32), secs


def run_scvi(adata, seed: int) -> tuple[np.ndarray, float, dict]:
    import scvi

    scvi.settings.seed = seed
    torch.set_num_threads(1)
    a = adata.copy()
    a.X = a.layers["counts"]
    scvi.model.SCVI.setup_anndata(a, layer="counts", batch_key=BATCH_KEY)
    model = scvi.model.SCVI(a)  # defaults: n_latent 10, n_hidden 128, n_layers 1
    t0 = time.perf_counter()
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False)
    secs = time.perf_counter() - t0
    z = model.get_latent_representation(a)
    hist = model.history.get("elbo_train")
    info = dict(n_epochs=int(len(hist)) if hist is not None else None,
                n_latent=model.module.n_latent)
    return np.asarray(z, dtype=np.float32), secs, info


def add_nbvae_kwargs_option(parser) -> None:
    """``--nbvae-kwargs``: JSON keyword arguments passed on to ``cellvi.tl.nbvae``."""
    parser.add_argument("--nbvae-kwargs", default={}, type=json.loads,
                        help='JSON keyword arguments of cellvi.tl.nbvae, e.g. \'{"n_latent": 20}\'')


def run_cellvi(adata, seed: int, retries: int = 3, wait: float = 60.0, **nbvae_kwargs):
    for attempt in range(retries + 1):
        cellvi = import_cellvi()
        torch.set_num_threads(1)
        a = adata.copy()
        try:
            t0 = time.perf_counter()
            cellvi.tl.nbvae(a, layer="counts", batch_key=BATCH_KEY, seed=seed, verbose=False,
                            **nbvae_kwargs)
            secs = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001
            if attempt == retries:
                raise
            log(f"cellvi.tl.nbvae failed ({type(err).__name__}: {err}); "
                f"the package may be mid-edit, retrying in {wait:.0f} s")
            for mod in [m for m in sys.modules if m == "cellvi" or m.startswith("cellvi.")]:
                del sys.modules[mod]
            time.sleep(wait)
            continue
        uns = a.uns.get("nbvae", {})
        hist = uns.get("history", {})
        n_ep = None
        for k in ("train_elbo", "validation_elbo"):
            if k in hist:
                n_ep = int(len(hist[k]))
                break
        info = dict(n_epochs=n_ep, cellvi_version=str(uns.get("cellvi_version", "")),
                    train_settings={k: (v.tolist() if hasattr(v, "tolist") else v)
                                    for k, v in dict(uns.get("train_settings", {})).items()})
        return np.asarray(a.obsm["X_nbvae"], dtype=np.float32), secs, info
    raise RuntimeError("unreachable")


def score_rows(methods: dict, scores) -> list[dict]:
    """One row per method: its info and its scib scores (a Benchmarker results frame)."""
    rows = []
    for key, info in methods.items():
        row = dict(key=key, **info)
        row.update({c: float(scores.loc[key, c]) for c in scores.columns})
        rows.append(row)
    return rows


def scib_scores(adata, keys: list[str]):
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    bm = Benchmarker(adata, batch_key=BATCH_KEY, label_key=LABEL_KEY, embedding_obsm_keys=keys,
                     pre_integrated_embedding_obsm_key="X_pca",
                     bio_conservation_metrics=BioConservation(),
                     batch_correction_metrics=BatchCorrection(), n_jobs=1, progress_bar=False)
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    return df.drop(index="Metric Type").astype(float)


def benchmark_dataset(name: str, seeds: list[int]) -> dict:
    log(f"== {name}")
    adata = load_dataset(name)
    notes = preprocess(adata)
    log(f"   {notes}")
    methods: dict[str, dict] = {}  # obsm key -> info

    adata.obsm["X_pca_minus_batch_mean"] = pca_minus_batch_mean(adata)
    methods["X_pca"] = dict(method="PCA (unintegrated)", seed=None, train_s=None)
    methods["X_pca_minus_batch_mean"] = dict(method="PCA minus per-batch mean (control)",
                                             seed=None, train_s=None)

    z, secs = run_harmony(adata, seed=0)
    adata.obsm["X_harmony"] = z
    methods["X_harmony"] = dict(method="Harmony", seed=0, train_s=secs)
    log(f"   Harmony {secs:.1f} s")

    for seed in seeds:
        z, secs, info = run_cellvi(adata, seed)
        key = f"X_nbvae_s{seed}"
        adata.obsm[key] = z
        methods[key] = dict(method="cellvi NB-VAE", seed=seed, train_s=secs, **info)
        log(f"   cellvi seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")

        z, secs, info = run_scvi(adata, seed)
        key = f"X_scVI_s{seed}"
        adata.obsm[key] = z
        methods[key] = dict(method="scVI", seed=seed, train_s=secs, **info)
        log(f"   scVI seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")

    t0 = time.perf_counter()
    scores = scib_scores(adata, list(methods))
    log(f"   scib-metrics {time.perf_counter() - t0:.1f} s")
    rows = score_rows(methods, scores)

    summary = {}
    for method in ("cellvi NB-VAE", "scVI"):
        tot = [r["Total"] for r in rows if r["method"] == method]
        secs = [r["train_s"] for r in rows if r["method"] == method]
        summary[method] = dict(seeds=seeds, total=tot, total_mean=float(np.mean(tot)),
                               total_min=float(np.min(tot)), total_max=float(np.max(tot)),
                               train_s_mean=float(np.mean(secs)))
    return dict(dataset=name, notes=notes, rows=rows, seed_summary=summary,
                scib_columns=list(scores.columns))


def _versions() -> dict:
    return versions(("cellvi", "torch", "scvi-tools", "scib-metrics", "harmonypy", "scanpy",
                     "anndata", "numpy", "jax", "lightning"))


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float) and nd == 1 and v < 1:
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_markdown(res: dict, path: Path) -> None:
    L = []
    L.append("# scib-metrics benchmark: cellvi NB-VAE vs PCA, Harmony, scVI\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ")
    g = res.get("git") or {}
    if g:
        L.append(f"cellvi code: git {g['head']}"
                 + (" with uncommitted changes under cellvi/" if g["cellvi_dirty"] else "")
                 + f", imported once at {g['time']}  ")
    L.append(f"Machine: {res['machine']}\n")
    L.append("Protocol. Raw counts, batch `donor`, label `cell_type`. Same genes for every "
             "method (2,000 seurat_v3 HVGs on counts; **a dataset with <= 2,000 genes keeps all "
             "its genes**, as both datasets here do, see each table). PCA: normalize_total 1e4 + "
             "log1p + 50 PCs; `X_pca` is the unintegrated embedding and scib's "
             "pre-integrated embedding. *PCA minus per-batch mean* is a trivial control "
             "(each donor's mean subtracted from `X_pca`): scib's PCR-comparison term rewards "
             "merely removing batch means, so a method should beat this. Harmony: harmonypy "
             "on the 50 PCs by donor. scVI: scvi-tools `SCVI` defaults (n_latent 10, "
             "n_hidden 128, 1 layer, default max_epochs heuristic, no early stopping), "
             "`accelerator=\"cpu\"`. cellvi: `cellvi.tl.nbvae(adata, layer=\"counts\", "
             "batch_key=\"donor\", seed=s)` with its defaults (its own max_epochs heuristic "
             "and early stopping). Scores: scib-metrics `Benchmarker` with default "
             "`BioConservation()`/`BatchCorrection()`, `get_results(min_max_scale=False)`; "
             "Total = 0.6 Bio conservation + 0.4 Batch correction.\n")
    L.append("Threads: the machine has 2 CPU cores shared with another heavy process, so "
             "**every method ran single-threaded** (`OMP_NUM_THREADS=1` and friends set "
             "before any import, `torch.set_num_threads(1)`, harmonypy `ncores=1`, scib "
             "`n_jobs=1`). Training seconds are wall-clock and comparable between methods "
             "within this run only (scVI/cellvi: `train`/`nbvae` call; Harmony: "
             "`run_harmony`).\n")
    for d in res["datasets"]:
        n = d["notes"]
        L.append(f"## {d['dataset']}\n")
        L.append(f"{n['n_obs']:,} cells x {n['n_vars']:,} genes ({n['genes']}); "
                 f"{n['n_batches']} donors, {n['n_labels']} cell types.\n")
        seed0 = [r for r in d["rows"] if r["seed"] in (None, 0)]
        L.append("### Summary (seed 0)\n")
        L.append("| method | **Total** | Batch correction | Bio conservation | **iLISI** | "
                 "**KBET** | train s | epochs |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(seed0, key=lambda r: -r["Total"]):
            L.append(f"| {r['method']} | **{_fmt(r['Total'])}** | {_fmt(r['Batch correction'])}"
                     f" | {_fmt(r['Bio conservation'])} | **{_fmt(r['iLISI'])}** | "
                     f"**{_fmt(r['KBET'])}** | {_fmt(r['train_s'], 1)} | "
                     f"{_fmt(r.get('n_epochs'))} |")
        L.append("")
        L.append("### All scib columns (every run)\n")
        cols = d["scib_columns"]
        extra = [c for c in cols if c not in AGG_COLS]
        L.append("| method | seed | " + " | ".join(extra + AGG_COLS) + " | train s |")
        L.append("|---|---|" + "---|" * (len(extra) + len(AGG_COLS)) + "---|")
        for r in d["rows"]:
            vals = [_fmt(r[c]) for c in extra + AGG_COLS]
            L.append(f"| {r['method']} | {_fmt(r['seed'])} | " + " | ".join(vals)
                     + f" | {_fmt(r['train_s'], 1)} |")
        L.append("")
        if len(d["seed_summary"]["scVI"]["seeds"]) > 1:
            L.append("### Seeds\n")
            L.append("| method | seeds | Total mean | Total range | mean train s |")
            L.append("|---|---|---|---|---|")
            for m, s in d["seed_summary"].items():
                L.append(f"| {m} | {', '.join(map(str, s['seeds']))} | {s['total_mean']:.3f} |"
                         f" {s['total_min']:.3f} – {s['total_max']:.3f} | "
                         f"{s['train_s_mean']:.1f} |")
            L.append("")
        c = d["comparison"]
        L.append(f"cellvi Total (seed 0) {c['cellvi_total_seed0']:.3f} vs scVI "
                 f"{c['scvi_total_seed0']:.3f} (cellvi >= scVI: **{c['cellvi_ge_scvi_seed0']}**)"
                 f", vs Harmony {c['harmony_total']:.3f} (cellvi >= Harmony: "
                 f"**{c['cellvi_ge_harmony_seed0']}**), vs PCA-minus-batch-mean control "
                 f"{c['control_total']:.3f} (cellvi >= control: **{c['cellvi_ge_control_seed0']}"
                 f"**).")
        if c.get("cellvi_ge_scvi_mean") is not None:
            L[-1] += (f" Over seeds (mean Total): cellvi {c['cellvi_total_mean']:.3f} vs scVI "
                     f"{c['scvi_total_mean']:.3f} (cellvi >= scVI: **{c['cellvi_ge_scvi_mean']}"
                     f"**).")
        L.append("")
    done = ", ".join(d["dataset"] for d in res["datasets"])
    L.append(f"Run time: {res['total_s'] / 60:.1f} min (datasets finished: {done}).\n")
    path.write_text("\n".join(L))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--multi-seed-datasets", nargs="+", default=None,
                   help="datasets that get every --seeds value for scVI and cellvi; the others "
                        "get seed 0 only (default: all datasets get all seeds)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if 0 not in args.seeds:
        args.seeds = [0] + args.seeds
    t_start = time.perf_counter()
    args.git = git_state()  # at start: cellvi is imported once, so this is the code measured
    import_cellvi()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in args.datasets:
        multi = args.multi_seed_datasets is None or name in args.multi_seed_datasets
        d = benchmark_dataset(name, args.seeds if multi else [0])
        rows = {(r["method"], r["seed"]): r for r in d["rows"]}
        cv, sv = rows[("cellvi NB-VAE", 0)]["Total"], rows[("scVI", 0)]["Total"]
        hv = rows[("Harmony", 0)]["Total"]
        ctl = rows[("PCA minus per-batch mean (control)", None)]["Total"]
        comp = dict(cellvi_total_seed0=cv, scvi_total_seed0=sv, harmony_total=hv,
                    control_total=ctl, cellvi_ge_scvi_seed0=bool(cv >= sv),
                    cellvi_ge_harmony_seed0=bool(cv >= hv), cellvi_ge_control_seed0=bool(cv >= ctl))
        if len(d["seed_summary"]["scVI"]["seeds"]) > 1:
            cm = d["seed_summary"]["cellvi NB-VAE"]["total_mean"]
            sm = d["seed_summary"]["scVI"]["total_mean"]
            comp.update(cellvi_total_mean=cm, scvi_total_mean=sm,
                        cellvi_ge_scvi_mean=bool(cm >= sm),
                        cellvi_ge_harmony_mean=bool(cm >= hv))
        d["comparison"] = comp
        results.append(d)
        log(f"   {comp}")
        _write(args, argv, results, t_start, out)


def _write(args, argv, results, t_start, out) -> None:
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    res = dict(
        command="python benchmarks/scib_nbvae.py " + " ".join(shlex.quote(a) for a in cmd_args),
        date=time.strftime("%Y-%m-%d %H:%M %Z"),
        versions=_versions(),
        git=getattr(args, "git", None),
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs, single-threaded runs",
        threads=dict(OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
                     torch_num_threads=torch.get_num_threads()),
        seeds=args.seeds,
        multi_seed_datasets=args.multi_seed_datasets,
        datasets=results,
        total_s=time.perf_counter() - t_start,
    )
    (out / "scib_nbvae.json").write_text(json.dumps(res, indent=2, default=str))
    write_markdown(res, out / "scib_nbvae.md")
    log(f"wrote {out / 'scib_nbvae.md'} and {out / 'scib_nbvae.json'} "
        f"({res['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
