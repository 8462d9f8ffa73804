"""Population discovery benchmark on cytometry data: cellvi GMVAE against FlowSOM, a Gaussian
mixture, k-means, Leiden on the markers and scvi-tools CYTOVI + Leiden; plus batch mixing.

What. For each input matrix (events x markers; every method gets the same matrix), each
method, each seed in ``--seeds`` and two settings:

* ``K``: the number of true populations (scored labels only), for every method that takes a
  number of clusters (Leiden: the resolution is bisected, see below);
* ``default``: each method's own default number of clusters.

Scores, computed on the events whose true label is not excluded (excluded events -- e.g.
``Unlabeled`` -- are still in the fit): mean F1 over true populations after one-to-one
Hungarian matching (``cellvi.metrics.hungarian_f1``), ARI, NMI (``cellvi.metrics``), the number
of clusters found (over all events) and the method's wall-clock seconds. Tables give the mean
and the range (min - max) over seeds.

Inputs:

* ``flowsom``: ``flowsom_68983_mouse_flow_gated``, ``layers["compensated_logicle"]`` as shipped,
  the 10 fluorescence channels with a marker (``var["has_marker"]``; no Qdot 605, scatter,
  Time); truth ``cell_type``, ``Unlabeled`` excluded; K = 6.
* ``flowsom_raw``: the same file from raw ``X`` through cellvi's preprocessing
  (``cellvi.pp.compensate`` with ``uns["spillover_text"]``, then ``cellvi.pp.logicle``), same
  10 channels; cellvi and FlowSOM only.
* ``spectre``: ``spectre_mouse_bm_flow_2batches_synthetic_shift``, ``X / 1023``, all 15
  markers; truth ``cell_type``, ``Doublets`` and ``Other`` excluded; K = 12; batch
  ``obs["batch"]`` (A/B, a synthetic shift) given to cellvi (``batch_key``) and CYTOVI
  (``setup_anndata(batch_key=...)``); the other methods take no batch.
* ``flowcap``: ``flowcap1_dlbcl_flow_gated``, ``X`` as is (3 channels, values 1-804); truth
  ``label``, label 0 excluded; K = 2.  ``flowcap_asinh``: the same with ``arcsinh(X / 150)``.

Methods (all single-threaded):

* ``cellvi``: ``cellvi.tl.gmvae(adata, batch_key=..., n_components=K or None, seed=s,
  copy=True, verbose=False)`` with its defaults; labels ``obs["gmvae"]``; the whole call is
  timed.
* ``flowsom``: ``flowsom.FlowSOM(adata, cols_to_use=markers, xdim=10, ydim=10,
  n_clusters=K or 10, seed=s)`` (10 metaclusters is the FlowSOM default setting);
  labels ``obs["metaclustering"]`` of its cell data.
* ``gmm``: sklearn ``GaussianMixture(n_components=K, covariance_type="full",
  random_state=s)``.  Default setting: sklearn's default ``n_components=1`` is meaningless, so
  n_components is chosen by the lowest BIC over 2..15 (same settings otherwise); the time
  includes all 14 fits.
* ``kmeans``: sklearn ``KMeans(n_clusters=K, random_state=s, n_init=10)``; k-means has no
  default K, so it has no default-setting row.
* ``leiden``: ``sc.pp.neighbors(n_neighbors=15, use_rep="X", random_state=s)`` on the markers,
  then ``sc.tl.leiden(flavor="igraph", n_iterations=2, random_state=s)``; default:
  resolution 1.0; K: the resolution is bisected in [0.01, 3] (at most 12 Leiden runs) for
  exactly K clusters, else the closest count found (ties: the smaller resolution). The kNN
  graph is built once per seed; its time is counted in both settings.
* ``cytovi``: scvi-tools ``scvi.external.CYTOVI`` (its defaults: n_hidden 128, n_latent by its
  heuristic, MoG prior, normal likelihood), input = the same matrix min-max scaled per marker
  to (0, 1) by ``scvi.external.cytovi.scale`` (its tutorials' step; without batch, so the
  scaling does not itself correct batches), ``train(accelerator="cpu")`` with its defaults
  except ``max_epochs`` capped by ``--cytovi-max-epochs`` (its default is 1,000 epochs with
  early stopping, patience 30, and a 400-epoch KL warm-up, too slow here single-threaded);
  latent = ``get_latent_representation()``, then Leiden as above. Trained once per seed; the
  latent serves both settings; its seconds = training + latent + neighbors + Leiden.

Batch mixing (``spectre`` only), batches A/B: ``iLISI`` (``cellvi.metrics.ilisi``, scaled to
[0, 1]) and kBET acceptance (``cellvi.metrics.kbet_acceptance``) on a fixed random subsample
of 20,000 scored events (embeddings are fitted on all events), for the uncorrected markers,
the markers with each batch's mean subtracted (trivial control), Harmony on the markers
(``harmonypy.run_harmony(X, obs, "batch", random_state=s).Z_corr``), the cellvi GMVAE latent
(``obsm["X_gmvae"]`` of the default-setting runs) and the CYTOVI latent; plus cell-type
separation: ARI of k-means (K = 12) on the scored events' embedding vs truth, and the
silhouette by cell type on a 5,000-event subsample. Means over seeds (range in brackets).

Usage::

    python benchmarks/cytometry.py [--inputs flowsom spectre ...] [--methods cellvi flowsom ...]
        [--seeds 0 1 2 3 4] [--cytovi-max-epochs 50] [--cytovi-seeds 0 1 2]
        [--out benchmarks/results] [--quick]

``--quick`` is a smoke run: seed 0 only, 3,000 events per input (random subsample), CYTOVI at
most 5 epochs; it writes ``cytometry_quick.md/json``.
Data are read from ``$CELLVI_DATA_DIR`` (default ``../shared/data`` relative to the repo).
Writes ``<out>/cytometry.md`` and ``<out>/cytometry.json`` (all per-seed results), after every
method and seed so that an interrupted run keeps what is done. CYTOVI runs last on each input
(on ``spectre`` after the batch-mixing table, to which its row is appended). pynndescent and
FlowSOM's numba code is compiled by a warm-up before any timing.
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
from _common import data_dir, git_state, import_cellvi, log, purge_cellvi, versions
from _common import jsonable as _jsonable

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ALL_INPUTS = ["flowsom", "flowcap", "flowcap_asinh", "flowsom_raw", "spectre"]
ALL_METHODS = ["cellvi", "flowsom", "gmm", "kmeans", "leiden", "cytovi"]
METHOD_NAMES = {"cellvi": "cellvi GMVAE", "flowsom": "FlowSOM", "gmm": "GaussianMixture (full)",
                "kmeans": "k-means", "leiden": "Leiden (markers)", "cytovi": "CYTOVI + Leiden"}
RAW_METHODS = {"cellvi", "flowsom"}  # the only methods run on flowsom_raw
FLOWSOM_DEFAULT_K = 10
GMM_BIC_RANGE = range(2, 16)
LEIDEN_RES_RANGE = (0.01, 3.0)
LEIDEN_MAX_TRIES = 12
N_NEIGHBORS = 15
MIXING_EVENTS = 20000  # iLISI/kBET on a fixed random subsample of the scored events


def _read(name: str):
    import anndata as ad

    return ad.read_h5ad(data_dir() / f"{name}.h5ad")


# --------------------------------------------------------------------------------------------
# inputs


def load_input(name: str) -> dict:
    """The benchmark matrix of one input: X (events x markers, float32), markers, truth, ..."""
    if name in ("flowsom", "flowsom_raw"):
        a = _read("flowsom_68983_mouse_flow_gated")
        markers = list(a.var_names[a.var["has_marker"].to_numpy(bool)])
        idx = [a.var_names.get_loc(m) for m in markers]
        shipped = np.asarray(a.layers["compensated_logicle"], dtype=np.float32)[:, idx]
        d = dict(truth=a.obs["cell_type"].astype(str).to_numpy(), exclude=["Unlabeled"], K=6,
                 batch=None, markers=markers,
                 marker_names=list(a.var.loc[markers, "marker"].astype(str)))
        if name == "flowsom":
            d.update(X=shipped, matrix='layers["compensated_logicle"] (as shipped), 10 '
                                       'fluorescence channels with a marker')
        else:
            cellvi = import_cellvi()
            t0 = time.perf_counter()
            cellvi.pp.compensate(a)  # spillover from uns["spillover_text"] -> layers["compensated"]
            cellvi.pp.logicle(a, layer="compensated", key_added="logicle")
            secs = time.perf_counter() - t0
            X = np.asarray(a.layers["logicle"], dtype=np.float32)[:, idx]
            diff = np.abs(X.astype(np.float64) - shipped)
            d.update(X=X, matrix='raw X -> cellvi.pp.compensate (uns["spillover_text"]) -> '
                                 'cellvi.pp.logicle(layer="compensated"), same 10 channels',
                     pp_seconds=float(secs), max_abs_diff_vs_shipped=float(diff.max()),
                     mean_abs_diff_vs_shipped=float(diff.mean()))
        return d
    if name == "spectre":
        a = _read("spectre_mouse_bm_flow_2batches_synthetic_shift")
        return dict(X=np.asarray(a.X, dtype=np.float32) / 1023.0, markers=list(a.var_names),
                    marker_names=list(a.var_names),
                    truth=a.obs["cell_type"].astype(str).to_numpy(),
                    exclude=["Doublets", "Other"], K=12,
                    batch=a.obs["batch"].astype(str).to_numpy(),
                    matrix="X / 1023, all 15 markers; batch = obs['batch'] (A/B)")
    if name in ("flowcap", "flowcap_asinh"):
        a = _read("flowcap1_dlbcl_flow_gated")
        X = np.asarray(a.X, dtype=np.float32)
        if name == "flowcap_asinh":
            X = np.arcsinh(X / 150.0).astype(np.float32)
        return dict(X=X, markers=list(a.var_names), marker_names=list(a.var_names),
                    truth=a.obs["label"].astype(str).to_numpy(), exclude=["0"], K=2, batch=None,
                    matrix="X as is (channel values 1-804)" if name == "flowcap"
                    else "arcsinh(X / 150)")
    raise ValueError(f"unknown input {name!r}; choose from {ALL_INPUTS}")


def subsample(d: dict, n: int, seed: int = 0) -> dict:
    if len(d["X"]) <= n:
        return d
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(d["X"]), n, replace=False))
    out = dict(d)
    for k in ("X", "truth", "batch"):
        if out.get(k) is not None:
            out[k] = out[k][keep]
    return out


def make_adata(d: dict):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=[str(i) for i in range(len(d["X"]))])
    obs["truth"] = pd.Categorical(d["truth"])
    if d.get("batch") is not None:
        obs["batch"] = pd.Categorical(d["batch"])
    return ad.AnnData(X=np.array(d["X"], dtype=np.float32, copy=True), obs=obs,
                      var=pd.DataFrame(index=list(d["markers"])))


# --------------------------------------------------------------------------------------------
# methods; each returns {setting: (labels, seconds, info)} for the settings asked


def run_cellvi(d: dict, seed: int, settings: list[str], store: dict,
               retries: int = 3, wait: float = 60.0) -> dict:
    out = {}
    for setting in settings:
        for attempt in range(retries + 1):
            cellvi = import_cellvi()
            torch.set_num_threads(1)
            a = make_adata(d)
            try:
                t0 = time.perf_counter()
                res = cellvi.tl.gmvae(a, batch_key="batch" if d.get("batch") is not None else None,
                                      n_components=d["K"] if setting == "K" else None,
                                      seed=seed, copy=True, verbose=False)
                secs = time.perf_counter() - t0
                break
            except Exception as err:  # noqa: BLE001
                if attempt == retries:
                    raise
                log(f"   cellvi.tl.gmvae failed ({type(err).__name__}: {err}); "
                    f"the package may be mid-edit, retrying in {wait:.0f} s")
                purge_cellvi()
                time.sleep(wait)
        uns = res.uns.get("gmvae", {})
        hist = uns.get("history", {}) or {}
        n_ep = None
        for k, v in hist.items():
            if "train" in str(k) and hasattr(v, "__len__"):
                n_ep = int(len(v))
                break
        info = dict(n_epochs=n_ep, cellvi_version=str(uns.get("cellvi_version", "")),
                    train_settings=_jsonable(dict(uns.get("train_settings", {}) or {})))
        if setting == "default":
            store[seed] = np.asarray(res.obsm["X_gmvae"], dtype=np.float32)
        out[setting] = (res.obs["gmvae"].astype(str).to_numpy(), secs, info)
    return out


def run_flowsom(d: dict, seed: int, settings: list[str], store: dict) -> dict:
    import flowsom as fs
    from loguru import logger

    logger.disable("flowsom")
    out = {}
    for setting in settings:
        a = make_adata(d)
        k = d["K"] if setting == "K" else FLOWSOM_DEFAULT_K
        t0 = time.perf_counter()
        fsom = fs.FlowSOM(a, cols_to_use=list(d["markers"]), xdim=10, ydim=10, n_clusters=k,
                          seed=seed)
        labels = fsom.get_cell_data().obs["metaclustering"]
        secs = time.perf_counter() - t0
        out[setting] = (np.asarray(labels).astype(str), secs, dict(n_metaclusters=k))
    return out


def run_gmm(d: dict, seed: int, settings: list[str], store: dict) -> dict:
    from sklearn.mixture import GaussianMixture

    X = np.asarray(d["X"], dtype=np.float64)
    out = {}
    for setting in settings:
        t0 = time.perf_counter()
        if setting == "K":
            gm = GaussianMixture(n_components=d["K"], covariance_type="full", random_state=seed)
            labels = gm.fit_predict(X)
            info = dict(n_components=d["K"], converged=bool(gm.converged_))
        else:
            best, bics = None, {}
            for k in GMM_BIC_RANGE:
                gm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed)
                gm.fit(X)
                bics[k] = float(gm.bic(X))
                if best is None or bics[k] < bics[best[0]]:
                    best = (k, gm)
            labels = best[1].predict(X)
            info = dict(n_components=best[0], bic=bics,
                        bic_at_range_edge=best[0] == max(GMM_BIC_RANGE))
        secs = time.perf_counter() - t0
        out[setting] = (labels.astype(str), secs, info)
    return out


def run_kmeans(d: dict, seed: int, settings: list[str], store: dict) -> dict:
    from sklearn.cluster import KMeans

    out = {}
    if "K" in settings:
        t0 = time.perf_counter()
        labels = KMeans(n_clusters=d["K"], random_state=seed, n_init=10).fit_predict(
            np.asarray(d["X"], dtype=np.float64))
        out["K"] = (labels.astype(str), time.perf_counter() - t0, {})
    return out


def _neighbors(rep: np.ndarray, seed: int):
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=np.asarray(rep, dtype=np.float32))
    t0 = time.perf_counter()
    sc.pp.neighbors(a, n_neighbors=N_NEIGHBORS, use_rep="X", random_state=seed)
    return a, time.perf_counter() - t0


def _leiden(a, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2,
                 directed=False)
    return a.obs["leiden"].astype(str).to_numpy()


def leiden_settings(rep: np.ndarray, seed: int, settings: list[str], K: int,
                    extra_s: float = 0.0, extra_info: dict | None = None) -> dict:
    """Leiden on a representation: default resolution 1, and the K setting by bisection."""
    a, nn_s = _neighbors(rep, seed)
    out = {}
    for setting in settings:
        t0 = time.perf_counter()
        if setting == "default":
            labels = _leiden(a, 1.0, seed)
            info = dict(resolution=1.0, n_leiden_runs=1)
        else:
            lo, hi = LEIDEN_RES_RANGE
            best = None  # (|n - K|, resolution, labels)
            tries = []
            for _ in range(LEIDEN_MAX_TRIES):
                res = 0.5 * (lo + hi)
                lab = _leiden(a, res, seed)
                n = len(np.unique(lab))
                tries.append((round(res, 5), n))
                cand = (abs(n - K), res, lab)
                if best is None or cand[:2] < best[:2]:
                    best = cand
                if n == K:
                    break
                if n < K:
                    lo = res
                else:
                    hi = res
            labels = best[2]
            info = dict(resolution=best[1], n_leiden_runs=len(tries), tries=tries,
                        exact_K=best[0] == 0)
        secs = time.perf_counter() - t0 + nn_s + extra_s
        info.update(neighbors_s=nn_s, **(extra_info or {}))
        out[setting] = (labels, secs, info)
    return out


def warm_up_torch() -> None:
    """Build one torch optimiser: the first one in a process imports torch's compiler stack
    (about 1 s, once per process, whatever the model), which no fit should be timed for."""
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())


def warm_up() -> None:
    """Compile the numba code of pynndescent/scanpy/FlowSOM once, outside the timings (and
    :func:`warm_up_torch`)."""
    import flowsom as fs
    from loguru import logger

    warm_up_torch()

    logger.disable("flowsom")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 5)).astype(np.float32)  # > 4,096: scanpy's pynndescent path
    a, _ = _neighbors(X, 0)
    _leiden(a, 1.0, 0)
    d = dict(X=X, truth=np.zeros(len(X), str), markers=[f"m{i}" for i in range(5)])
    fs.FlowSOM(make_adata(d), cols_to_use=d["markers"], xdim=5, ydim=5, n_clusters=3, seed=0)


def run_leiden(d: dict, seed: int, settings: list[str], store: dict) -> dict:
    return leiden_settings(d["X"], seed, settings, d["K"])


def run_cytovi(d: dict, seed: int, settings: list[str], store: dict, max_epochs: int = 50) -> dict:
    import scvi
    from scvi.external import CYTOVI
    from scvi.external import cytovi as cyto

    scvi.settings.seed = seed
    torch.set_num_threads(1)
    a = make_adata(d)
    a.layers["transformed"] = a.X.copy()  # the shared input matrix (already transformed)
    t0 = time.perf_counter()
    cyto.scale(a, method="minmax", transformed_layer_key="transformed", scaled_layer_key="scaled")
    batch_key = "batch" if d.get("batch") is not None else None
    CYTOVI.setup_anndata(a, layer="scaled", batch_key=batch_key)
    model = CYTOVI(a)
    model.train(accelerator="cpu", devices=1, max_epochs=max_epochs, enable_progress_bar=False)
    z = np.asarray(model.get_latent_representation(a), dtype=np.float32)
    train_s = time.perf_counter() - t0
    hist = model.history.get("elbo_train")
    n_ep = int(len(hist)) if hist is not None else None
    store[seed] = z
    info = dict(cytovi_train_s=train_s, n_epochs=n_ep, max_epochs=max_epochs,
                early_stopped=(n_ep is not None and n_ep < max_epochs),
                n_latent=int(model.module.n_latent), batch_key=batch_key)
    return leiden_settings(z, seed, settings, d["K"], extra_s=train_s, extra_info=info)


RUNNERS = dict(cellvi=run_cellvi, flowsom=run_flowsom, gmm=run_gmm, kmeans=run_kmeans,
               leiden=run_leiden, cytovi=run_cytovi)
SETTINGS = {m: ["K", "default"] for m in ALL_METHODS}
SETTINGS["kmeans"] = ["K"]


# --------------------------------------------------------------------------------------------
# scoring


def score(d: dict, labels: np.ndarray) -> dict:
    from cellvi import metrics

    t = np.asarray(d["truth"]).astype(str)
    keep = ~np.isin(t, np.asarray(d["exclude"], dtype=str))
    f1, per = metrics.hungarian_f1(t, labels, exclude=d["exclude"])
    return dict(f1=f1, ari=metrics.ari(t[keep], labels[keep]),
                nmi=metrics.nmi(t[keep], labels[keep]),
                n_clusters=int(len(np.unique(labels))),
                per_label_f1={str(k): float(v[1]) for k, v in per.items()})


def batch_mixing(d: dict, embeddings: dict[str, dict[int, np.ndarray]], seed0: int = 0) -> list:
    """iLISI, kBET and cell-type separation of each embedding, over its seeds."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    from cellvi import metrics

    t = np.asarray(d["truth"]).astype(str)
    keep = ~np.isin(t, np.asarray(d["exclude"], dtype=str))
    b = np.asarray(d["batch"]).astype(str)
    rng = np.random.default_rng(seed0)
    n_keep = int(keep.sum())
    sub = rng.choice(n_keep, min(5000, n_keep), replace=False)
    mix = np.sort(rng.choice(n_keep, min(MIXING_EVENTS, n_keep), replace=False))
    rows = []
    for name, per_seed in embeddings.items():
        vals = []
        for seed, z in per_seed.items():
            z = np.asarray(z, dtype=np.float32)
            zk, tk, bk = z[keep], t[keep], b[keep]
            t0 = time.perf_counter()
            km = KMeans(n_clusters=d["K"], random_state=seed, n_init=10).fit_predict(zk)
            v = dict(seed=seed, ilisi=metrics.ilisi(zk[mix], bk[mix]),
                     kbet=metrics.kbet_acceptance(zk[mix], bk[mix]),
                     kmeans_ari=metrics.ari(tk, km),
                     silhouette=float(silhouette_score(zk[sub], tk[sub])))
            v["seconds"] = time.perf_counter() - t0
            vals.append(v)
            log(f"   batch mixing {name} seed {seed}: iLISI {v['ilisi']:.3f} kBET {v['kbet']:.3f} "
                f"k-means ARI {v['kmeans_ari']:.3f} silhouette {v['silhouette']:.3f}")
        rows.append(dict(embedding=name, per_seed=vals))
    return rows


def minus_batch_mean(X: np.ndarray, batch: np.ndarray) -> np.ndarray:
    x = np.asarray(X, dtype=np.float64).copy()
    for lev in np.unique(batch):
        m = batch == lev
        x[m] -= x[m].mean(axis=0)
    return x.astype(np.float32)


def run_harmony(X: np.ndarray, batch: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    import harmonypy
    import pandas as pd

    meta = pd.DataFrame({"batch": pd.Categorical(batch)})
    t0 = time.perf_counter()
    ho = harmonypy.run_harmony(np.asarray(X, dtype=np.float64), meta, "batch",
                               random_state=seed, verbose=False, ncores=1)
    z = np.asarray(ho.Z_corr)
    secs = time.perf_counter() - t0
    if z.shape[0] != len(X):  # older harmonypy returns dims x cells
        z = z.T
    return z.astype(np.float32), secs


# --------------------------------------------------------------------------------------------
# bookkeeping and output


def _versions() -> dict:
    return versions(("cellvi", "torch", "scvi-tools", "flowsom", "scikit-learn", "scanpy",
                     "leidenalg", "igraph", "harmonypy", "anndata", "numpy"))


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and range over seeds per (method, setting)."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows = []
    for (m, s), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "K")):
        row = dict(method=m, setting=s, seeds=[r["seed"] for r in rs])
        for key in ("f1", "ari", "nmi", "n_clusters", "seconds"):
            v = np.array([r[key] for r in rs], dtype=float)
            row[key] = dict(mean=float(v.mean()), min=float(v.min()), max=float(v.max()))
        rows.append(row)
    return rows


def _mr(s: dict, nd: int = 3) -> str:
    if abs(s["max"] - s["min"]) < 10 ** (-nd) / 2:
        return f"{s['mean']:.{nd}f}"
    return f"{s['mean']:.{nd}f} [{s['min']:.{nd}f}–{s['max']:.{nd}f}]"


def _nc(s: dict) -> str:
    if s["min"] == s["max"]:
        return f"{s['mean']:.0f}"
    return f"{s['mean']:.1f} [{s['min']:.0f}–{s['max']:.0f}]"


def write_outputs(res: dict, out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(res), indent=1))
    L = ["# Cytometry population discovery: cellvi GMVAE vs FlowSOM, GMM, k-means, Leiden, "
         "CYTOVI\n"]
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}  ")
    L.append(f"Machine: {res['machine']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ")
    g = res["git"]
    L.append(f"cellvi code: git {g['head']}, imported at {g['time']}; uncommitted changes "
             f"(`git diff --stat` at start):\n")
    L.append("```\n" + (g["diff_stat"] or "(none)") + "\n```\n")
    L.append("Protocol: see the module docstring of `benchmarks/cytometry.py`. In short: every "
             "method gets the same events x markers matrix; **K** = number of true (scored) "
             "populations, **default** = each method's own default (cellvi: "
             "`n_components=None`, discovery; FlowSOM: 10 metaclusters; GMM: n_components by "
             "lowest BIC over 2..15; Leiden and CYTOVI + Leiden: resolution 1; k-means has "
             "no default). Leiden's K setting bisects the resolution in [0.01, 3] (<= 12 "
             "runs). F1 = mean F1 over true populations after one-to-one Hungarian matching; "
             "F1/ARI/NMI on the events whose label is not excluded (excluded events are in "
             "the fit); n clusters counts all events. Cells: mean [min–max] over seeds. "
             "Seconds: wall-clock of the method (numba code compiled by a warm-up first), "
             "single-threaded (`OMP_NUM_THREADS=1` etc., "
             "`torch.set_num_threads(1)`) on a 2-core machine shared with another process, so "
             "they compare within this run only.\n")
    L.append(f"CYTOVI: `max_epochs` capped at **{res['cytovi_max_epochs']}** (its default is "
             "1,000 epochs with early stopping, patience 30, 400-epoch KL warm-up; "
             "uncapped it would not fit the time budget single-threaded); seeds "
             f"{', '.join(map(str, res['cytovi_seeds']))}. Input: the shared matrix min-max "
             "scaled to (0, 1) per marker with `scvi.external.cytovi.scale` (not per batch); "
             "`batch_key=\"batch\"` on spectre.\n")
    for inp in res["inputs"]:
        L.append(f"## {inp['input']}\n")
        L.append(f"{inp['n_obs']:,} events x {inp['n_markers']} markers "
                 f"({', '.join(inp['marker_names'])}); matrix: {inp['matrix']}; "
                 f"K = {inp['K']}; excluded from scoring: {', '.join(inp['exclude'])} "
                 f"({inp['n_excluded']:,} events).")
        if "max_abs_diff_vs_shipped" in inp:
            L[-1] += (f" cellvi.pp compensate + logicle took {inp['pp_seconds']:.2f} s; vs the "
                      f"shipped `compensated_logicle`: max |diff| "
                      f"{inp['max_abs_diff_vs_shipped']:.2e}, mean "
                      f"{inp['mean_abs_diff_vs_shipped']:.2e}.")
        L.append("")
        L.append("| method | setting | seeds | F1 | ARI | NMI | n clusters | seconds |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in summarize(inp["runs"]):
            L.append(f"| {METHOD_NAMES[r['method']]} | {r['setting']} | {len(r['seeds'])} | "
                     f"{_mr(r['f1'])} | {_mr(r['ari'])} | {_mr(r['nmi'])} | "
                     f"{_nc(r['n_clusters'])} | {_mr(r['seconds'], 1)} |")
        L.append("")
        notes = inp.get("notes") or []
        for n in notes:
            L.append(f"- {n}")
        if notes:
            L.append("")
        if inp.get("batch_mixing"):
            L.append(f"### Batch mixing ({inp['input']}, batches A/B)\n")
            L.append("iLISI and kBET on a fixed random subsample of 20,000 scored events. "
                     "iLISI: `cellvi.metrics.ilisi` (k = 30, scaled: 0 = "
                     "no mixing, 1 = perfect); kBET: `cellvi.metrics.kbet_acceptance` (k = 50, "
                     "alpha 0.05; 1 = every neighbourhood matches the global batch mix). "
                     "Cell-type separation: ARI of k-means (K = 12, n_init 10) on all scored "
                     "events "
                     "vs truth, and silhouette by cell type (5,000-event subsample). "
                     "Mean [min–max] over seeds.\n")
            L.append("| embedding | seeds | iLISI | kBET acceptance | k-means ARI | "
                     "silhouette (cell type) |")
            L.append("|---|---|---|---|---|---|")
            for row in inp["batch_mixing"]:
                ps = row["per_seed"]
                cells = []
                for key in ("ilisi", "kbet", "kmeans_ari", "silhouette"):
                    v = np.array([p[key] for p in ps], dtype=float)
                    cells.append(_mr(dict(mean=v.mean(), min=v.min(), max=v.max())))
                L.append(f"| {row['embedding']} | {len(ps)} | " + " | ".join(cells) + " |")
            L.append("")
    done = ", ".join(i["input"] for i in res["inputs"])
    L.append(f"Run time: {res['total_s'] / 60:.1f} min (inputs done or in progress: {done}).\n")
    (out / f"{stem}.md").write_text("\n".join(L))


def add_notes(inp: dict, cytovi_max_epochs: int) -> None:
    """GMM BIC at the range edge, K settings without K clusters, CYTOVI epochs."""
    notes = [n for n in inp["notes"] if "failed" in n]
    for r in inp["runs"]:
        i = r["info"]
        if r["method"] == "gmm" and r["setting"] == "default" and i.get("bic_at_range_edge"):
            notes.append(f"GMM default seed {r['seed']}: BIC chose the range edge "
                         f"({max(GMM_BIC_RANGE)} components).")
        if r["setting"] == "K" and r["n_clusters"] != inp["K"]:
            extra = (f" (closest the resolution bisection found: {i['resolution']:.4f})"
                     if "resolution" in i else "")
            notes.append(f"{METHOD_NAMES[r['method']]} K setting, seed {r['seed']}: "
                         f"{r['n_clusters']} clusters instead of K = {inp['K']}{extra}.")
    cyto = [r["info"] for r in inp["runs"] if r["method"] == "cytovi" and r["setting"] == "K"]
    if cyto:
        notes.append("CYTOVI epochs trained: " + ", ".join(str(i["n_epochs"]) for i in cyto)
                     + f" (cap {cytovi_max_epochs}); training + latent seconds: "
                     + ", ".join(f"{i['cytovi_train_s']:.0f}" for i in cyto) + ".")
    inp["notes"] = notes


def mixing(d: dict, inp: dict, latents: dict, seeds: list[int]) -> None:
    log("   batch mixing")
    emb: dict[str, dict[int, np.ndarray]] = {
        "markers, uncorrected": {0: d["X"]},
        "markers minus per-batch mean (control)": {0: minus_batch_mean(d["X"], d["batch"])}}
    harm = {}
    for seed in seeds:
        z, secs = run_harmony(d["X"], d["batch"], seed)
        harm[seed] = z
        log(f"   Harmony seed {seed}: {secs:.1f} s")
    emb["Harmony (markers)"] = harm
    if "cellvi" in latents:
        emb["cellvi GMVAE latent (default setting)"] = latents["cellvi"]
    if "cytovi" in latents:
        emb["CYTOVI latent"] = latents["cytovi"]
    inp["batch_mixing"] = batch_mixing(d, emb)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", nargs="+", default=ALL_INPUTS, choices=ALL_INPUTS)
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--cytovi-seeds", nargs="+", type=int, default=None,
                   help="seeds for CYTOVI only (default: --seeds)")
    p.add_argument("--cytovi-max-epochs", type=int, default=50)
    p.add_argument("--raw-methods", nargs="+", default=sorted(RAW_METHODS), choices=ALL_METHODS,
                   help="methods run on flowsom_raw (default: cellvi flowsom)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: seed 0, 3,000 events per input, CYTOVI <= 5 epochs")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning", "cellvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.cytovi_max_epochs = min(args.cytovi_max_epochs, 5)
    cyto_seeds = args.cytovi_seeds if args.cytovi_seeds is not None else args.seeds
    stem = "cytometry_quick" if args.quick else "cytometry"
    t_start = time.perf_counter()
    git = git_state()
    import_cellvi()
    warm_up()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(command="python " + " ".join(shlex.quote(a) for a in
                                            ["benchmarks/cytometry.py", *sys.argv[1:]]),
               date=time.strftime("%Y-%m-%d %H:%M %Z"),
               machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{platform.platform()}; all methods single-threaded",
               versions=_versions(), git=git, seeds=args.seeds, cytovi_seeds=cyto_seeds,
               cytovi_max_epochs=args.cytovi_max_epochs, quick=args.quick, inputs=[],
               total_s=0.0)

    def save():
        res["total_s"] = time.perf_counter() - t_start
        write_outputs(res, out, stem)

    for name in args.inputs:
        log(f"== {name}")
        d = load_input(name)
        if args.quick:
            d = subsample(d, 3000)
        t = np.asarray(d["truth"]).astype(str)
        inp = dict(input=name, n_obs=int(len(d["X"])), n_markers=int(d["X"].shape[1]),
                   marker_names=d["marker_names"], matrix=d["matrix"], K=d["K"],
                   exclude=d["exclude"], n_excluded=int(np.isin(t, d["exclude"]).sum()),
                   runs=[], notes=[])
        for k in ("pp_seconds", "max_abs_diff_vs_shipped", "mean_abs_diff_vs_shipped"):
            if k in d:
                inp[k] = d[k]
        res["inputs"].append(inp)
        methods = [m for m in args.methods
                   if name != "flowsom_raw" or m in args.raw_methods]
        methods = [m for m in methods if m != "cytovi"] + [m for m in methods if m == "cytovi"]
        latents: dict[str, dict[int, np.ndarray]] = {}
        for m in methods:
            if m == "cytovi" and d.get("batch") is not None:
                mixing(d, inp, latents, args.seeds)  # before the slow CYTOVI, then appended
                save()
            store: dict[int, np.ndarray] = {}
            seeds = cyto_seeds if m == "cytovi" else args.seeds
            for seed in seeds:
                kw = dict(max_epochs=args.cytovi_max_epochs) if m == "cytovi" else {}
                try:
                    got = RUNNERS[m](d, seed, SETTINGS[m], store, **kw)
                except Exception as err:  # noqa: BLE001
                    log(f"   {m} seed {seed} FAILED: {type(err).__name__}: {err}")
                    inp["notes"].append(f"{METHOD_NAMES[m]} seed {seed} failed: "
                                        f"{type(err).__name__}: {err}")
                    continue
                for setting, (labels, secs, info) in got.items():
                    sc_ = score(d, np.asarray(labels).astype(str))
                    inp["runs"].append(dict(method=m, setting=setting, seed=seed, seconds=secs,
                                            **sc_, info=info))
                    log(f"   {m:8s} {setting:7s} seed {seed}: F1 {sc_['f1']:.3f} "
                        f"ARI {sc_['ari']:.3f} NMI {sc_['nmi']:.3f} n {sc_['n_clusters']:3d} "
                        f"{secs:7.1f} s")
                add_notes(inp, args.cytovi_max_epochs)
                save()
            if store:
                latents[m] = store
        add_notes(inp, args.cytovi_max_epochs)
        if d.get("batch") is not None:
            if "batch_mixing" not in inp:
                mixing(d, inp, latents, args.seeds)
            elif "cytovi" in latents:
                inp["batch_mixing"] += batch_mixing(d, {"CYTOVI latent": latents["cytovi"]})
        save()
    save()
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min -> {out / stem}.md")


if __name__ == "__main__":
    main()
