"""Integration robustness panel (issue 21, item 1): cellvi NB-VAE vs PCA, the PCA-minus-batch-mean
control, Harmony and scVI on batch effects of known form.

Datasets (label ``cell_type``, batch ``batch``):

* ``3protocols``: ``kang2018_pbmc_3protocols_simulated_shift`` (shared data file; P1/P2 thinned
  with gene-specific capture, composition shifted);
* ``protocol_strong`` / ``protocol_medium``: ``cellvi.datasets.protocol_batches(kang 8 donors,
  label_key="cell_type", strength=..., seed=0)`` (a type missing from the last batch, one made
  rare in the first);
* each also as ``*_1k``: a seeded random subsample of 1,000 cells (``numpy`` ``default_rng(0)``,
  without replacement), since small files behave differently; ``*_3k``: 3,300 cells the same
  way (between the 1k and the full ~11k sets on a log scale).

Every method, the preprocessing (all 1,287 genes kept: <= 2,000, so no HVG selection;
normalize_total 1e4 + log1p + 50 PCs), and the scib-metrics ``Benchmarker`` call
(``min_max_scale=False``) are imported from ``scib_nbvae.py``, with its batch key set to
``batch``. scVI and cellvi are trained for each of ``--seeds``; Harmony once (seed 0).

``--variants`` (JSON: name -> ``cellvi.tl.nbvae`` keyword arguments, passed on as
``scib_nbvae.run_cellvi`` passes them) replaces the single cellvi fit per seed by one fit per
variant and seed (obsm key ``X_nbvae_<name>_s<seed>``, method ``cellvi NB-VAE (<name>)``), all
scored in the same ``Benchmarker`` call as the peers; the tables then show each variant's mean
and range over seeds, its margin to the best peer and whether every seed is above the control.
``--scvi-seeds`` trains scVI for only some of the seeds (its full-size fits are the run's
longest); the tables count its fits as ``scVI (xN)``. ``--skip-scvi`` leaves scVI out (quick
checks only: the best peer is then Harmony or the control).

For the simulated sets the silhouette score of the *missing* type
(``uns["simulation"]["missing"]``) is also computed per embedding, with the formula scib's
isolated-label score uses (mean of (ASW + 1) / 2 over that type's cells, ASW against the cell-type
labels); ``iso_labels`` records which labels scib itself treated as isolated (those present in the
fewest batches), so one can see whether its "Isolated labels" column is that type alone.

Usage::

    python benchmarks/integration_panel.py --quick            # smoke test, ~300 cells, 1 seed
    python benchmarks/integration_panel.py --datasets 3protocols_1k protocol_strong_1k \\
        protocol_medium_1k --seeds 0 1 2 --out benchmarks/results
    python benchmarks/integration_panel.py --quick --skip-scvi \\
        --variants '{"default": {}, "dec": {"encode_batch": false}}'

Writes ``<out>/integration_panel.md`` and ``.json`` (``--tag`` appends a suffix), after every
dataset, so a partial run leaves its finished datasets.
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
import scib_nbvae as base
import torch
from _common import git_state, import_cellvi, log

base.BATCH_KEY = "batch"  # scib_nbvae's functions read this module global at call time
LABEL_KEY = base.LABEL_KEY
torch.set_num_threads(1)

DATASETS = {
    "3protocols": ("file", "kang2018_pbmc_3protocols_simulated_shift", None),
    "protocol_strong": ("sim", "kang2018_pbmc_ctrl_8donors", "strong"),
    "protocol_medium": ("sim", "kang2018_pbmc_ctrl_8donors", "medium"),
    # the real donor batches (batch = obs["donor"]): the sets today's defaults were chosen on
    "kang_8donors": ("file", "kang2018_pbmc_ctrl_8donors", None),
    "kang_small": ("file", "kang2018_pbmc_ctrl_stim_small", None),
}
DEFAULT_ORDER = ["3protocols_1k", "protocol_strong_1k", "protocol_medium_1k",
                 "3protocols", "protocol_strong", "protocol_medium"]
CONTROL = "PCA minus per-batch mean (control)"
CELLVI = "cellvi NB-VAE"
METHODS = ["PCA (unintegrated)", CONTROL, "Harmony", "scVI", CELLVI]
PEERS = ("Harmony", "scVI", CONTROL)
TABLE_COLS = ["Total", "Bio conservation", "Batch correction", "iLISI", "KBET",
              "Isolated labels"]
BIO_COLS = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI"]
KM_TOTAL = "Total (k-means mean)"
KM_COLS = [KM_TOTAL, "Bio (k-means mean)", "KMeans NMI (mean)", "KMeans NMI (min)",
           "KMeans ARI (mean)"]


SIZES = {"_1k": 1000, "_3k": 3300}


def _split_size(label: str) -> tuple[str, int | None]:
    """``"protocol_strong_3k"`` -> ``("protocol_strong", 3300)``; no suffix: full size."""
    for suffix, n in SIZES.items():
        if label.endswith(suffix):
            return label[: -len(suffix)], n
    return label, None


def make_dataset(label: str, n_sub: int | None, sim_seed: int = 0):
    """Returns (adata with raw counts in X, description dict)."""
    name, size = _split_size(label)
    kind, source, strength = DATASETS[name]
    cellvi = import_cellvi()
    adata = base.load_dataset(source)
    desc = dict(source=source)
    if kind == "sim":
        adata = cellvi.datasets.protocol_batches(adata, label_key=LABEL_KEY, strength=strength,
                                                 seed=sim_seed)
        sim = adata.uns["simulation"]
        desc.update(simulator=f"cellvi.datasets.protocol_batches(strength={strength!r}, "
                              f"seed={sim_seed})",
                    missing=str(sim.get("missing", "")), rare=str(sim.get("rare", "")))
    else:
        sim = adata.uns.get("simulation", {})
        desc.update(simulator="shared file")
        if "batch" not in adata.obs and "donor" in adata.obs:
            adata.obs["batch"] = adata.obs["donor"]
            desc.update(batch="obs['donor']")
    if n_sub is None and size is not None:
        n_sub = size
    if n_sub is not None and adata.n_obs > n_sub:
        idx = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_sub, replace=False))
        adata = adata[idx].copy()
        desc["subsample"] = f"{n_sub} cells, numpy default_rng(0) choice without replacement"
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    ct = adata.obs.groupby(["batch", LABEL_KEY], observed=False).size().unstack(fill_value=0)
    desc["cells_per_batch_and_type"] = {b: {k: int(v) for k, v in row.items()}
                                        for b, row in ct.iterrows()}
    return adata, desc


def missing_type_asw(adata, keys: list[str], missing: str) -> dict:
    """scib's isolated-label formula restricted to one type: mean (ASW + 1) / 2 over its cells."""
    from scib_metrics.utils import silhouette_samples

    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    m = labels == missing
    out = {}
    for k in keys:
        s = np.asarray(silhouette_samples(np.asarray(adata.obsm[k]), labels))
        out[k] = float(np.mean((s[m] + 1) / 2))
    return out


def kmeans_over_inits(adata, keys: list[str], n_inits: int) -> dict:
    """scib's KMeans NMI / ARI over ``n_inits`` initialisations per embedding.

    scib-metrics' Benchmarker runs its k-means (k = number of labels) from ONE k-means++
    initialisation (``scib_metrics.utils.KMeans(n_init=1, seed=0)``), so two nearly equal
    latents can score KMeans NMI 0.43 and 0.68. Here the same KMeans class runs with seeds
    0..n_inits-1 and the scores are averaged: the expectation over the metric's own
    randomness, the same for every method.
    """
    import jax
    from scib_metrics.utils import KMeans
    from scib_metrics.utils._utils import validate_seed
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = adata.obs[LABEL_KEY].astype(str).to_numpy()
    k = len(np.unique(labels))
    out = {}
    for key in keys:
        x = np.ascontiguousarray(adata.obsm[key], dtype=np.float32)
        nmi, ari = [], []
        km = KMeans(k)  # one instance per embedding: its jitted run is compiled once
        for seed in range(n_inits):
            km.seed = validate_seed(seed)
            pred = km.fit(x.copy()).labels_
            nmi.append(normalized_mutual_info_score(labels, pred, average_method="arithmetic"))
            ari.append(adjusted_rand_score(labels, pred))
        out[key] = dict(nmi=float(np.mean(nmi)), nmi_min=float(np.min(nmi)),
                        ari=float(np.mean(ari)))
        # each instance's jitted run stays compiled until the caches are cleared; over a few
        # datasets of one process LLVM then fails to map memory for new code
        del km
        jax.clear_caches()
    return out


def add_kmeans_mean(row: dict, km: dict) -> None:
    """The row's Bio and Total recomputed with the k-means scores averaged over inits
    (Bio = mean of scib's five bio metrics, Total = 0.6 Bio + 0.4 Batch, as the Benchmarker)."""
    bio = [row[c] for c in BIO_COLS if c not in ("KMeans NMI", "KMeans ARI")]
    bio = float(np.mean(bio + [km["nmi"], km["ari"]]))
    row.update({"KMeans NMI (mean)": km["nmi"], "KMeans NMI (min)": km["nmi_min"],
                "KMeans ARI (mean)": km["ari"], "Bio (k-means mean)": bio,
                KM_TOTAL: 0.6 * bio + 0.4 * row["Batch correction"]})


def isolated_label_set(adata) -> list[str]:
    from scib_metrics.metrics._isolated_labels import _get_isolated_labels

    return [str(x) for x in _get_isolated_labels(adata.obs[LABEL_KEY].astype(str).to_numpy(),
                                                 adata.obs["batch"].astype(str).to_numpy(), None)]


def variant_method(name: str) -> str:
    return f"{CELLVI} ({name})"


def parse_variants(text: str) -> dict[str, dict]:
    """``--variants``: a JSON object, variant name -> ``cellvi.tl.nbvae`` keyword arguments."""
    v = json.loads(text)
    if not isinstance(v, dict) or not v or not all(isinstance(x, dict) for x in v.values()):
        raise argparse.ArgumentTypeError("--variants takes a non-empty JSON object of objects, "
                                         'e.g. \'{"default": {}, "dec": {"encode_batch": false}}\'')
    bad = [k for k in v if not k or any(c in k for c in " /()")]
    if bad:
        raise argparse.ArgumentTypeError(f"variant names must be non-empty, without spaces, "
                                         f"slashes or brackets: {bad}")
    return v


def run_dataset(label: str, seeds: list[int], n_sub: int | None, quick: bool,
                variants: dict[str, dict] | None = None, skip_scvi: bool = False,
                scvi_seeds: list[int] | None = None, kmeans_inits: int = 0) -> dict:
    log(f"== {label}")
    adata, desc = make_dataset(label, n_sub)
    notes = base.preprocess(adata)
    log(f"   {notes}")
    methods: dict[str, dict] = {}
    adata.obsm["X_pca_minus_batch_mean"] = base.pca_minus_batch_mean(adata)
    methods["X_pca"] = dict(method="PCA (unintegrated)", seed=None, train_s=None)
    methods["X_pca_minus_batch_mean"] = dict(method=CONTROL, seed=None, train_s=None)
    z, secs = base.run_harmony(adata, seed=0)
    adata.obsm["X_harmony"] = z
    methods["X_harmony"] = dict(method="Harmony", seed=0, train_s=secs)
    log(f"   Harmony {secs:.1f} s")
    for seed in seeds:
        kw = dict(max_epochs=5) if quick else {}
        if variants is None:
            z, secs, info = base.run_cellvi(adata, seed, **kw)
            adata.obsm[f"X_nbvae_s{seed}"] = z
            methods[f"X_nbvae_s{seed}"] = dict(method=CELLVI, seed=seed, train_s=secs, **info)
            log(f"   cellvi seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")
        for name, vkw in (variants or {}).items():
            z, secs, info = base.run_cellvi(adata, seed, **{**vkw, **kw})
            key = f"X_nbvae_{name}_s{seed}"
            adata.obsm[key] = z
            methods[key] = dict(method=variant_method(name), variant=name, nbvae_kwargs=vkw,
                                seed=seed, train_s=secs, **info)
            log(f"   cellvi ({name}) seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")
        if skip_scvi or (scvi_seeds is not None and seed not in scvi_seeds):
            continue
        if quick:
            import scvi

            scvi.settings.seed = seed
            a = adata.copy()
            scvi.model.SCVI.setup_anndata(a, layer="counts", batch_key="batch")
            model = scvi.model.SCVI(a)
            t0 = time.perf_counter()
            model.train(max_epochs=5, accelerator="cpu", devices=1, enable_progress_bar=False)
            secs = time.perf_counter() - t0
            z, info = model.get_latent_representation(a), dict(n_epochs=5)
        else:
            z, secs, info = base.run_scvi(adata, seed)
        adata.obsm[f"X_scVI_s{seed}"] = np.asarray(z, dtype=np.float32)
        methods[f"X_scVI_s{seed}"] = dict(method="scVI", seed=seed, train_s=secs, **info)
        log(f"   scVI seed {seed}: {secs:.1f} s, {info.get('n_epochs')} epochs")
    t0 = time.perf_counter()
    scores = base.scib_scores(adata, list(methods))
    log(f"   scib-metrics {time.perf_counter() - t0:.1f} s")
    desc["iso_labels"] = isolated_label_set(adata)
    miss = desc.get("missing") or ""
    miss_asw = missing_type_asw(adata, list(methods), miss) if miss else {}
    km = {}
    if kmeans_inits:
        t0 = time.perf_counter()
        km = kmeans_over_inits(adata, list(methods), kmeans_inits)
        log(f"   k-means over {kmeans_inits} inits {time.perf_counter() - t0:.1f} s")
    rows = []
    for key, info in methods.items():
        row = dict(key=key, **info)
        row.update({c: float(scores.loc[key, c]) for c in scores.columns})
        if miss_asw:
            row["missing_type_iso"] = miss_asw[key]
        if km:
            add_kmeans_mean(row, km[key])
        rows.append(row)
    cv_methods = [CELLVI] if variants is None else [variant_method(n) for n in variants]
    return dict(dataset=label, desc=desc, notes=notes, rows=rows,
                scib_columns=list(scores.columns), kmeans_inits=kmeans_inits,
                summary=summarise(rows, None if variants is None else cv_methods))


def _methods_in(rows: list[dict]) -> list[str]:
    """METHODS' order, then the cellvi variants in order of first appearance."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return [m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]


def summarise(rows: list[dict], cellvi_methods: list[str] | None = None) -> dict:
    """Per method: mean / min / max of each column over seeds; cellvi's margins (with
    ``cellvi_methods``, the variants', under ``variants``)."""
    per = {}
    for m in _methods_in(rows):
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        cols = TABLE_COLS + ["train_s"] + (["missing_type_iso"] if "missing_type_iso" in rs[0]
                                           else []) + [c for c in KM_COLS if c in rs[0]]
        d = dict(n=len(rs), seeds=[r["seed"] for r in rs])
        for c in cols:
            v = [r[c] for r in rs if r.get(c) is not None]
            if v:
                d[c] = dict(mean=float(np.mean(v)), min=float(np.min(v)), max=float(np.max(v)))
        per[m] = d
    order = sorted(per, key=lambda m: -per[m]["Total"]["mean"])
    ranks = {m: i + 1 for i, m in enumerate(order)}
    peers = {m: per[m]["Total"]["mean"] for m in PEERS if m in per}
    best_peer = max(peers, key=peers.get)

    def margins(m, col="Total"):
        pk = {p: per[p][col]["mean"] for p in PEERS if p in per}
        best, c0 = max(pk, key=pk.get), per[CONTROL][col]["mean"]
        tot = [r[col] for r in rows if r["method"] == m]
        return dict(margin_to_best_peer=float(per[m][col]["mean"] - pk[best]),
                    seeds_below_control=[r["seed"] for r in rows
                                         if r["method"] == m and r[col] < c0],
                    min_minus_control=float(min(tot) - c0), best_peer=best)

    out = dict(per_method=per, rank_by_mean_total=ranks, best_peer=best_peer)
    if KM_TOTAL in rows[0]:
        ms = cellvi_methods or [CELLVI]
        out["kmeans_mean"] = {m: margins(m, KM_TOTAL) for m in ms}
    if cellvi_methods is None:
        c = margins(CELLVI)
        out.update(cellvi_margin_to_best_peer=c["margin_to_best_peer"],
                   cellvi_seeds_below_control=c["seeds_below_control"],
                   cellvi_min_minus_control=c["min_minus_control"])
    else:
        out["variants"] = {}
        for m in cellvi_methods:
            c = margins(m)
            c.update(ge_best_peer=c["margin_to_best_peer"] >= 0,
                     all_seeds_above_control=c["min_minus_control"] > 0)
            out["variants"][m] = c
    return out


def _seeds(seeds) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds)) if seeds \
        else "none"


def _f(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def _cell(d, c, nd=3):
    if c not in d:
        return "–"
    s = d[c]
    if d["n"] == 1 or s["min"] == s["max"]:
        return _f(s["mean"], nd)
    return f"{_f(s['mean'], nd)} ({_f(s['min'], nd)}–{_f(s['max'], nd)})"


def provenance_lines(res: dict, title: str) -> list[str]:
    """The title, a PARTIAL mark, command, date, versions, git state and machine."""
    L = [f"# {title}\n"]
    if res.get("partial"):
        L.append(f"**PARTIAL: {res['partial']}**\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ")
    g = res.get("git") or {}
    if g:
        L.append(f"cellvi code: git {g['head']}"
                 + (" with uncommitted changes under cellvi/" if g["cellvi_dirty"] else "")
                 + (f", imported once at {g['time']}" if g.get("time") else "") + "  ")
    L.append(f"Machine: {res['machine']}\n")
    return L


def write_markdown(res: dict, path: Path) -> None:
    L = provenance_lines(res, "Integration robustness panel (issue 21 item 1, first slice)")
    L.append(
        "Protocol: `scib_nbvae.py`'s preprocessing, methods and scib-metrics `Benchmarker` call "
        "(imported; `min_max_scale=False`, Total = 0.6 Bio + 0.4 Batch), batch key `batch`, label "
        "`cell_type`. All 1,287 genes kept (<= 2,000: no HVG selection); PCA = normalize_total "
        "1e4 + log1p + 50 PCs; control = `X_pca` minus each batch's mean; Harmony on the 50 PCs "
        "(seed 0); scVI `SCVI` defaults (`accelerator=\"cpu\"`); cellvi `tl.nbvae(adata, "
        "layer=\"counts\", batch_key=\"batch\", seed=s)` defaults. scVI and cellvi: one fit per "
        f"seed ({', '.join(map(str, res['seeds']))}); cells show the mean and, in brackets, the "
        "range over seeds. `*_1k`: a seeded random subsample (1,000 cells) of the set. Everything "
        "single-threaded on a 2-core machine shared with 2-3 other heavy jobs, so training seconds "
        "are noisy and comparable only within one table.\n")
    if res.get("variants"):
        L.append("cellvi variants (each `tl.nbvae(adata, layer=\"counts\", batch_key=\"batch\", "
                 "seed=s, **kwargs)`, one fit per seed, all in the same Benchmarker call): "
                 + "; ".join(f"**{n}** `{json.dumps(kw)}`" for n, kw in res["variants"].items())
                 + ".\n")
    if res.get("skip_scvi"):
        L.append("**scVI left out (`--skip-scvi`)**: the best peer is Harmony or the control.\n")
    if res.get("scvi_seeds") is not None:
        L.append(f"**scVI trained for {_seeds(res['scvi_seeds'])} only** (`--scvi-seeds`; its "
                 "fits are the run's longest); cellvi for every seed.\n")
    L.append(
        "*missing-type iso*: for the simulated sets, the type removed from the last batch "
        "(`uns[\"simulation\"][\"missing\"]`), scored with scib's isolated-label formula (mean of "
        "(ASW+1)/2 over its cells, silhouette against the cell-type labels) computed here, since "
        "the Benchmarker reports only the mean over its isolated labels. scib's own isolated "
        "labels (types present in the fewest batches) are listed per dataset.\n")
    for d in res["datasets"]:
        n, s = d["notes"], d["summary"]
        L.append(f"## {d['dataset']}\n")
        desc = d["desc"]
        extra = ""
        if desc.get("missing"):
            extra = (f"; missing from the last batch: **{desc['missing']}**, rare in the first: "
                     f"{desc.get('rare') or '–'}")
        L.append(f"{desc['source']} ({desc['simulator']}"
                 + (f"; subsample: {desc['subsample']}" if desc.get("subsample") else "")
                 + f"): {n['n_obs']:,} cells x {n['n_vars']:,} genes, {n['n_batches']} batches, "
                 f"{n['n_labels']} cell types{extra}. scib's isolated labels: "
                 f"{', '.join(desc['iso_labels']) or '–'}.\n")
        has_miss = any("missing_type_iso" in r for r in d["rows"])
        head = ["method", "rank", *TABLE_COLS] + (["missing-type iso"] if has_miss else []) \
            + ["train s"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        per = s["per_method"]
        for m in sorted(per, key=lambda m: s["rank_by_mean_total"][m]):
            p = per[m]
            cells = [m + (f" (x{p['n']})" if p["n"] > 1 else ""), str(s["rank_by_mean_total"][m])]
            cells += [("**" + _cell(p, c) + "**") if c == "Total" else _cell(p, c)
                      for c in TABLE_COLS]
            if has_miss:
                cells.append(_cell(p, "missing_type_iso"))
            cells.append(_cell(p, "train_s", 1))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        if "kmeans_mean" in s:
            _kmeans_section(d, L)
        if "variants" in s:
            L.append(f"Best peer (of Harmony/scVI/control): {s['best_peer']} "
                     f"{per[s['best_peer']]['Total']['mean']:.3f}; control "
                     f"{per[CONTROL]['Total']['mean']:.3f}.\n")
            L.append("| variant | mean Total minus best peer | >= best peer | seeds below control "
                     "| worst seed minus control | every seed above control |")
            L.append("|---|---|---|---|---|---|")
            for m, c in s["variants"].items():
                L.append(f"| {m} | **{c['margin_to_best_peer']:+.3f}** | {_yn(c['ge_best_peer'])}"
                         f" | {_seeds(c['seeds_below_control'])} | "
                         f"{c['min_minus_control']:+.3f} | {_yn(c['all_seeds_above_control'])} |")
            L.append("")
            continue
        below = s["cellvi_seeds_below_control"]
        L.append(f"cellvi mean Total minus the best of Harmony/scVI/control ({s['best_peer']}): "
                 f"**{s['cellvi_margin_to_best_peer']:+.3f}**. cellvi seeds below the control: "
                 f"**{_seeds(below)}** (worst seed minus "
                 f"control {s['cellvi_min_minus_control']:+.3f}).\n")
    if res["datasets"]:
        L.append("## Summary\n")
        names = [d["dataset"] for d in res["datasets"]]
        L.append("| method | " + " | ".join(f"rank {x}" for x in names) + " | mean rank |")
        L.append("|---|" + "---|" * (len(names) + 1))
        for m in _methods_in([r for d in res["datasets"] for r in d["rows"]]):
            rk = [d["summary"]["rank_by_mean_total"].get(m) for d in res["datasets"]]
            ok = [r for r in rk if r is not None]
            L.append(f"| {m} | " + " | ".join("–" if r is None else str(r) for r in rk)
                     + f" | {np.mean(ok):.2f} |")
        L.append("")
        if "variants" in res["datasets"][0]["summary"]:
            _variant_summary(res, L)
        else:
            _cellvi_summary(res, L)
        L.append("### Every run (all scib columns)\n")
        for d in res["datasets"]:
            cols = [c for c in d["scib_columns"]]
            L.append(f"**{d['dataset']}**\n")
            L.append("| method | seed | " + " | ".join(cols) + " | train s | epochs |")
            L.append("|---|---|" + "---|" * (len(cols) + 2))
            for r in d["rows"]:
                L.append(f"| {r['method']} | {'–' if r['seed'] is None else r['seed']} | "
                         + " | ".join(_f(r[c]) for c in cols)
                         + f" | {_f(r['train_s'], 1)} | {r.get('n_epochs') or '–'} |")
            L.append("")
    L.append(f"Run time: {res['total_s'] / 60:.1f} min.\n")
    path.write_text("\n".join(L))


def _kmeans_section(d: dict, L: list[str]) -> None:
    """Per method: scib's Total next to the Total with KMeans NMI / ARI averaged over inits."""
    s, per = d["summary"], d["summary"]["per_method"]
    L.append(f"With scib's k-means averaged over {d['kmeans_inits']} initialisations (the "
             "Benchmarker runs it from one; `kmeans_over_inits`), bio and Total recomputed:\n")
    head = ["method", "Total (scib)", "Total (k-means mean)", "Bio (k-means mean)",
            "KMeans NMI (scib)", "KMeans NMI (mean)", "KMeans NMI (min)", "KMeans ARI (mean)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for m in sorted(per, key=lambda m: -per[m][KM_TOTAL]["mean"]):
        p = per[m]
        nmi = [r["KMeans NMI"] for r in d["rows"] if r["method"] == m]
        scib_nmi = dict(n=len(nmi), mean=float(np.mean(nmi)), min=min(nmi), max=max(nmi))
        cells = [_cell(p, "Total"), "**" + _cell(p, KM_TOTAL) + "**",
                 _cell(p, "Bio (k-means mean)"), _cell({"n": len(nmi), "x": scib_nmi}, "x"),
                 *(_cell(p, c) for c in KM_COLS[2:])]
        L.append(f"| {m}" + (f" (x{p['n']})" if p["n"] > 1 else "") + " | "
                 + " | ".join(cells) + " |")
    L.append("")
    for m, c in s["kmeans_mean"].items():
        L.append(f"- {m}: mean Total (k-means mean) minus the best peer's ({c['best_peer']}) "
                 f"**{c['margin_to_best_peer']:+.3f}**; seeds below the control: "
                 f"{_seeds(c['seeds_below_control'])} (worst seed minus control "
                 f"{c['min_minus_control']:+.3f}).")
    L.append("")


def _yn(b) -> str:
    return "yes" if b else "**no**"


def _cellvi_summary(res: dict, L: list[str]) -> None:
    km = all("kmeans_mean" in d["summary"] for d in res["datasets"])
    extra = (" Total, k-means mean | its best peer | its margin | seeds below control (k-means "
             "mean) |") if km else ""
    L.append("| dataset | cellvi Total (mean) | best peer | peer Total | margin | "
             "cellvi seeds below control |" + extra)
    L.append("|---|---|---|---|---|---|" + ("---|" * 4 if km else ""))
    for d in res["datasets"]:
        s = d["summary"]
        per = s["per_method"]
        row = (f"| {d['dataset']} | {per[CELLVI]['Total']['mean']:.3f} | "
               f"{s['best_peer']} | {per[s['best_peer']]['Total']['mean']:.3f} | "
               f"{s['cellvi_margin_to_best_peer']:+.3f} | "
               f"{_seeds(s['cellvi_seeds_below_control'])} |")
        if km:
            c = s["kmeans_mean"][CELLVI]
            row += (f" {per[CELLVI][KM_TOTAL]['mean']:.3f} | {c['best_peer']} "
                    f"{per[c['best_peer']][KM_TOTAL]['mean']:.3f} | "
                    f"{c['margin_to_best_peer']:+.3f} | {_seeds(c['seeds_below_control'])} |")
        L.append(row)
    L.append("")


def _variant_summary(res: dict, L: list[str]) -> None:
    """Per variant: Total per dataset, and whether it is >= the best peer on every dataset with
    every seed above the control."""
    ds = res["datasets"]
    names = [d["dataset"] for d in ds]
    variants = list(ds[0]["summary"]["variants"])
    L.append("Mean Total (range over seeds) per dataset; *margin*: mean Total minus the best "
             "peer's (of Harmony/scVI/control); *ctl*: worst seed minus the control.\n")
    L.append("| method | " + " | ".join(names) + " | >= best peer on every dataset | every "
             "seed above control on every dataset | mean train s | mean epochs |")
    L.append("|---|" + "---|" * (len(names) + 4))
    for m in variants:
        cells, ge, above = [], True, True
        for d in ds:
            s = d["summary"]
            c, p = s["variants"][m], s["per_method"][m]
            cells.append(f"{_cell(p, 'Total')}; margin {c['margin_to_best_peer']:+.3f}; ctl "
                         f"{c['min_minus_control']:+.3f}")
            ge &= bool(c["ge_best_peer"])
            above &= bool(c["all_seeds_above_control"])
        rs = [r for d in ds for r in d["rows"] if r["method"] == m]
        secs = [r["train_s"] for r in rs if r.get("train_s") is not None]
        eps = [r["n_epochs"] for r in rs if r.get("n_epochs") is not None]
        L.append(f"| {m} | " + " | ".join(cells) + f" | {_yn(ge)} | {_yn(above)} | "
                 f"{_f(float(np.mean(secs)) if secs else None, 1)} | "
                 f"{_f(float(np.mean(eps)) if eps else None, 0)} |")
    for m in [x for x in PEERS if all(x in d["summary"]["per_method"] for d in ds)]:
        cells = [_cell(d["summary"]["per_method"][m], "Total") for d in ds]
        L.append(f"| {m} | " + " | ".join(cells) + " | | | | |")
    L.append("")
    L.append("| dataset | best peer | peer Total | control Total |")
    L.append("|---|---|---|---|")
    for d in ds:
        s = d["summary"]
        per = s["per_method"]
        L.append(f"| {d['dataset']} | {s['best_peer']} | {per[s['best_peer']]['Total']['mean']:.3f}"
                 f" | {per[CONTROL]['Total']['mean']:.3f} |")
    L.append("")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=DEFAULT_ORDER,
                   choices=[*DATASETS, *(k + sfx for sfx in SIZES for k in DATASETS)])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--scvi-seeds", nargs="+", type=int, default=None,
                   help="train scVI only for these of --seeds (default: all); its full-size fits "
                        "took 18-68 min each on one shared thread here")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 300-cell subsamples, seed 0, 5 epochs for scVI and cellvi")
    p.add_argument("--out", default=str(base.REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--variants", default=None, type=parse_variants, metavar="JSON",
                   help="cellvi variants, a JSON object name -> tl.nbvae keyword arguments, e.g. "
                        '\'{"default": {}, "dec": {"encode_batch": false}}\'; each is trained '
                        "for every seed (default: one cellvi fit with tl.nbvae's defaults)")
    p.add_argument("--kmeans-inits", type=int, default=20,
                   help="also score scib's KMeans NMI / ARI averaged over this many k-means "
                        "initialisations (the Benchmarker uses one) and the Total recomputed "
                        "with them; 0: off")
    p.add_argument("--skip-scvi", action="store_true",
                   help="leave scVI out (quick checks only)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the markdown next to this JSON from it")
    args = p.parse_args(argv)
    if args.render:
        src = Path(args.render)
        write_markdown(json.loads(src.read_text()), src.with_suffix(".md"))
        return
    warnings.filterwarnings("ignore")
    for lg in ("scvi", "lightning", "lightning.pytorch"):
        logging.getLogger(lg).setLevel(logging.WARNING)
    n_sub = None
    if args.quick:
        args.seeds, n_sub = [0], 300
        if argv is None and "--datasets" not in sys.argv:
            args.datasets = ["3protocols_1k", "protocol_strong_1k"]
    t_start = time.perf_counter()
    git = git_state()
    import_cellvi()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag.lstrip("_")  # "--tag _x" and "--tag x" both give integration_panel_x
    stem = "integration_panel" + (("_" + tag) if tag else "")
    cmd = "python benchmarks/integration_panel.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else list(argv)))
    results = []

    def write(partial):
        res = dict(command=cmd, date=time.strftime("%Y-%m-%d %H:%M %Z"), versions=base._versions(),
                   git=git, machine=f"{platform.platform()}, {os.cpu_count()} CPUs, "
                                    "single-threaded runs",
                   seeds=args.seeds, quick=args.quick, datasets=results, partial=partial,
                   total_s=time.perf_counter() - t_start)
        if args.variants is not None:
            res["variants"] = args.variants
        if args.skip_scvi:
            res["skip_scvi"] = True
        if args.scvi_seeds is not None:
            res["scvi_seeds"] = args.scvi_seeds
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
        write_markdown(res, out / f"{stem}.md")
        log(f"wrote {out / stem}.md/.json ({res['total_s'] / 60:.1f} min)")

    for i, label in enumerate(args.datasets):
        results.append(run_dataset(label, args.seeds, n_sub, args.quick, args.variants,
                                   args.skip_scvi, args.scvi_seeds, args.kmeans_inits))
        rest = args.datasets[i + 1:]
        write(f"datasets not yet run: {', '.join(rest)}" if rest else None)


if __name__ == "__main__":
    main()
