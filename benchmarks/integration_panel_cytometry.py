"""Integration robustness panel, cytometry family (issue 21, item 1): the cellvi GMVAE's latent
vs the markers, the per-batch-centred control and Harmony, on batch effects of known form.

Datasets (label ``cell_type``, batch ``batch``):

* ``spectre``: ``spectre_mouse_bm_flow_2batches_synthetic_shift`` (real cells, the batch shift
  added synthetically by the Spectre authors), ``X / 1023``, all 15 markers, batches A/B;
  ``Doublets`` and ``Other`` are trained on but not scored;
* ``flowsom_mild`` / ``flowsom_medium`` / ``flowsom_strong``: ``flowsom_68983`` (compensated
  logicle as shipped, the 10 channels with a marker) through
  ``cellvi.datasets.cytometry_batches(n_batches=3, seed=0, **STRENGTHS[s])``: per batch and
  marker a gain, an offset and a monotone bend, plus population-specific shifts. ``strong``
  also removes one population (the median-sized gated one) from the last batch, so that
  over-correction shows. ``Unlabeled`` events are trained on but not scored;
* ``fcs_cytof``: the six real CyTOF files of ``../shared/data/fcs`` (3 patients = 3 batches,
  ``metadata.csv``), arcsinh with cofactor 5 on the 25 surface markers. No cell labels: it is
  scored on mixing only (iLISI, kBET) and on how much of each event's within-batch
  neighbourhood in the markers the embedding keeps (*kNN kept*: mean share of an event's 15
  nearest same-batch neighbours in the markers that are among its 15 nearest same-batch
  neighbours in the embedding; 1 = the within-batch structure untouched).

Methods: the markers themselves (unintegrated; also the Benchmarker's pre-integrated
embedding), the markers minus each batch's mean (control), Harmony on the markers
(``harmonypy.run_harmony``, seed 0, as ``cytometry.py``), and the cellvi GMVAE latent
(``obsm["X_gmvae"]`` of ``cellvi.tl.gmvae(adata, batch_key="batch", seed=s, **kwargs)``) for
each variant of ``--variants`` (JSON: name -> ``tl.gmvae`` keyword arguments) and seed. The
labelled sets are scored by scib-metrics' ``Benchmarker`` (``scib_nbvae.scib_scores``:
default metrics, ``min_max_scale=False``, Total = 0.6 Bio + 0.4 Batch) on a fixed random
subsample of at most ``--score-events`` scored events (``numpy`` ``default_rng(0)``); each
GMVAE run also reports the F1 (Hungarian matching, ``cytometry.score``) of its clusters.
The summary tables (mean and range over seeds, margins to the best peer of Harmony and the
control, seeds below the control) are ``integration_panel.py``'s.

Usage::

    python benchmarks/integration_panel_cytometry.py --seeds 0 1 2 \\
        --variants '{"default": {}, "mmd10": {"batch_penalty": 10}}'
    python benchmarks/integration_panel_cytometry.py --quick   # smoke test

Writes ``<out>/integration_panel_cytometry<tag>.md`` and ``.json`` after every dataset.
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

import cytometry as cy
import integration_panel as ip
import numpy as np
import scib_nbvae as base
from _common import data_dir, git_state, import_cellvi, jsonable, log

CONTROL = "markers minus per-batch mean (control)"
UNCORRECTED = "markers (unintegrated)"
CELLVI = "cellvi GMVAE"
# integration_panel's summaries read these module globals at call time
ip.CONTROL, ip.CELLVI = CONTROL, CELLVI
ip.METHODS = [UNCORRECTED, CONTROL, "Harmony", CELLVI]
ip.PEERS = ("Harmony", CONTROL)

STRENGTHS = {  # cellvi.datasets.cytometry_batches keyword arguments
    "mild": dict(scale_sd=0.07, shift_sd=0.15, warp=0.25, population_shift_sd=0.1),
    "medium": dict(scale_sd=0.15, shift_sd=0.3, warp=0.5, population_shift_sd=0.2),
    "strong": dict(scale_sd=0.3, shift_sd=0.6, warp=0.9, population_shift_sd=0.4),
}
DATASETS = ["spectre", "flowsom_mild", "flowsom_medium", "flowsom_strong", "fcs_cytof"]
FCS_MARKERS = ["CD235ab_CD61", "CD45", "CD66", "CD7", "CD19", "CD45RA", "CD11b", "CD4", "CD8a",
               "CD11c", "CD123", "TCRgd", "CXCR3", "CD161", "CD33", "CD16", "CCR9", "CD25",
               "CD3", "CCR7", "CD15", "CCR2", "HLADR", "CD14", "CD56"]
KNN = 15


def make_dataset(name: str) -> dict:
    """``dict(X, truth, exclude, batch, markers, desc)``."""
    cellvi = import_cellvi()
    if name == "spectre":
        d = cy.load_input("spectre")
        return dict(d, desc=dict(source="spectre_mouse_bm_flow_2batches_synthetic_shift",
                                 matrix=d["matrix"], simulator="shared file"))
    if name.startswith("flowsom_"):
        strength = name.split("_", 1)[1]
        d = cy.load_input("flowsom")
        a = cy.make_adata(d)
        b = cellvi.datasets.cytometry_batches(a, label_key="truth", n_batches=3, seed=0,
                                              **STRENGTHS[strength])
        X, truth = np.asarray(b.X, dtype=np.float32), d["truth"]
        batch = b.obs["batch"].astype(str).to_numpy()
        desc = dict(source="flowsom_68983_mouse_flow_gated", matrix=d["matrix"],
                    simulator=f"cellvi.datasets.cytometry_batches(n_batches=3, seed=0, "
                              f"**{STRENGTHS[strength]})")
        if strength == "strong":
            labels, sizes = np.unique(truth[~np.isin(truth, d["exclude"])], return_counts=True)
            missing = str(labels[np.argsort(sizes)[len(sizes) // 2]])
            keep = ~((truth == missing) & (batch == "B2"))
            X, truth, batch = X[keep], truth[keep], batch[keep]
            desc.update(missing=missing, missing_note=f"{missing} removed from batch B2")
        return dict(X=X, truth=truth, exclude=d["exclude"], batch=batch, markers=d["markers"],
                    K=d["K"], desc=desc)
    if name == "fcs_cytof":
        import pandas as pd

        folder = data_dir() / "fcs"
        meta = pd.read_csv(folder / "metadata.csv")
        a = cellvi.io.read_fcs([folder / f for f in meta["file_name"]])
        cellvi.pp.arcsinh(a, cofactor=5, channels=FCS_MARKERS, key_added="arcsinh")
        idx = [a.var_names.get_loc(m) for m in FCS_MARKERS]
        X = np.asarray(a.layers["arcsinh"], dtype=np.float32)[:, idx]
        stem_to_batch = {Path(f).stem: str(b) for f, b in zip(meta["file_name"], meta["batch"],
                                                              strict=True)}
        batch = a.obs["sample"].astype(str).map(stem_to_batch).to_numpy()
        return dict(X=X, truth=None, exclude=[], batch=batch, markers=FCS_MARKERS,
                    desc=dict(source="../shared/data/fcs (6 files)",
                              matrix="arcsinh(x / 5) of 25 surface markers",
                              simulator="real batches (patients), no labels"))
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def knn_kept(X: np.ndarray, Z: np.ndarray, batch: np.ndarray, k: int = KNN) -> float:
    """Mean share of each event's k nearest same-batch neighbours in ``X`` that are among
    its k nearest same-batch neighbours in ``Z``."""
    from sklearn.neighbors import NearestNeighbors

    shares = []
    for b in np.unique(batch):
        m = np.flatnonzero(batch == b)
        nx = NearestNeighbors(n_neighbors=k + 1).fit(X[m]).kneighbors(X[m], return_distance=False)
        nz = NearestNeighbors(n_neighbors=k + 1).fit(Z[m]).kneighbors(Z[m], return_distance=False)
        shares += [len(set(a[1:]) & set(c[1:])) / k for a, c in zip(nx, nz, strict=True)]
    return float(np.mean(shares))


def run_dataset(name: str, seeds: list[int], variants: dict[str, dict], score_events: int,
                quick: bool) -> dict:
    import anndata as ad
    import pandas as pd

    cellvi = import_cellvi()
    from cellvi import metrics

    log(f"== {name}")
    d = make_dataset(name)
    if quick:
        d = cy.subsample(d, 3000, seed=0)
    X, batch = d["X"], np.asarray(d["batch"]).astype(str)
    obs = pd.DataFrame(index=[str(i) for i in range(len(X))])
    obs["batch"] = pd.Categorical(batch)
    a = ad.AnnData(X=np.array(X, copy=True), obs=obs, var=pd.DataFrame(index=list(d["markers"])))
    emb = {"X_markers": X.astype(np.float32), "X_control": cy.minus_batch_mean(X, batch)}
    methods = {"X_markers": dict(method=UNCORRECTED, seed=None, train_s=None),
               "X_control": dict(method=CONTROL, seed=None, train_s=None)}
    z, secs = cy.run_harmony(X, batch, seed=0)
    emb["X_harmony"] = z
    methods["X_harmony"] = dict(method="Harmony", seed=0, train_s=secs)
    log(f"   Harmony {secs:.1f} s")
    for vname, kw in variants.items():
        for seed in seeds:
            kw2 = dict(kw, max_epochs=5, warmup_epochs=2) if quick else kw
            t0 = time.perf_counter()
            cellvi.tl.gmvae(a, batch_key="batch", seed=seed, verbose=False, **kw2)
            secs = time.perf_counter() - t0
            key = f"X_gmvae_{vname}_s{seed}"
            emb[key] = np.asarray(a.obsm["X_gmvae"], dtype=np.float32)
            info = dict(method=f"{CELLVI} ({vname})", variant=vname, gmvae_kwargs=kw,
                        seed=seed, train_s=secs, n_clusters=int(a.obs["gmvae"].nunique()),
                        n_epochs=len(a.uns["gmvae"]["history"]["epoch"]))
            if d["truth"] is not None:
                sc = cy.score(d, a.obs["gmvae"].astype(str).to_numpy())
                info.update(f1=sc["f1"], cluster_ari=sc["ari"])
            methods[key] = info
            log(f"   cellvi ({vname}) seed {seed}: {secs:.1f} s, {info['n_clusters']} clusters"
                + (f", F1 {info['f1']:.3f}" if "f1" in info else ""))
    rng = np.random.default_rng(0)
    if d["truth"] is None:  # mixing only
        rows = []
        for key, info in methods.items():
            Z = emb[key]
            row = dict(key=key, **info, iLISI=metrics.ilisi(Z, batch),
                       KBET=metrics.kbet_acceptance(Z, batch), knn_kept=knn_kept(X, Z, batch))
            rows.append(row)
            log(f"   {info['method']} seed {info['seed']}: iLISI {row['iLISI']:.3f} kBET "
                f"{row['KBET']:.3f} kNN kept {row['knn_kept']:.3f}")
        return dict(dataset=name, desc=d["desc"], rows=rows, mixing_only=True,
                    n_obs=len(X), n_markers=X.shape[1], n_batches=int(len(np.unique(batch))))
    truth = np.asarray(d["truth"]).astype(str)
    scored = np.flatnonzero(~np.isin(truth, np.asarray(d["exclude"], dtype=str)))
    if len(scored) > score_events:
        scored = np.sort(rng.choice(scored, score_events, replace=False))
    s = ad.AnnData(X=X[scored], obs=pd.DataFrame({"batch": pd.Categorical(batch[scored]),
                                                  "cell_type": pd.Categorical(truth[scored])},
                                                 index=[str(i) for i in scored]))
    for key, Z in emb.items():
        s.obsm[key] = Z[scored]
    s.obsm["X_pca"] = s.obsm["X_markers"]  # the Benchmarker's pre-integrated embedding
    t0 = time.perf_counter()
    scores = base.scib_scores(s, list(methods))
    log(f"   scib-metrics {time.perf_counter() - t0:.1f} s")
    rows = base.score_rows(methods, scores)
    cv = [f"{CELLVI} ({v})" for v in variants]
    return dict(dataset=name, desc=d["desc"], rows=rows, scib_columns=list(scores.columns),
                summary=ip.summarise(rows, cv), n_obs=len(X), n_scored=len(scored),
                n_markers=X.shape[1], n_batches=int(len(np.unique(batch))),
                n_labels=int(len(np.unique(truth[scored]))),
                per_batch_and_type=pd.crosstab(batch, truth).to_dict())


def write_markdown(res: dict, path: Path) -> None:
    f, cell = ip._f, ip._cell
    L = ip.provenance_lines(res, "Integration robustness panel: cytometry (issue 21, item 1)")
    L.append("Protocol: this script's docstring. cellvi variants (each `tl.gmvae(adata, "
             "batch_key=\"batch\", seed=s, **kwargs)`, one fit per seed, "
             f"seeds {', '.join(map(str, res['seeds']))}): "
             + "; ".join(f"**{n}** `{json.dumps(kw)}`" for n, kw in res["variants"].items())
             + ". Cells show the mean and, in brackets, the range over seeds. Peers: Harmony "
             "and the control (scVI has no cytometry model of this kind; CYTOVI is left out). "
             "Single-threaded on a 2-core machine shared with other work: seconds are "
             "comparable only within a table.\n")
    labelled = [d for d in res["datasets"] if not d.get("mixing_only")]
    for d in res["datasets"]:
        desc = d["desc"]
        L.append(f"## {d['dataset']}\n")
        L.append(f"{desc['source']}: {desc['matrix']}; {desc['simulator']}"
                 + (f"; **{desc['missing_note']}**" if desc.get("missing_note") else "")
                 + f". {d['n_obs']:,} events x {d['n_markers']} markers, {d['n_batches']} "
                 "batches" + (f", {d['n_labels']} populations scored on {d['n_scored']:,} "
                              "events" if not d.get("mixing_only") else ", no labels") + ".\n")
        if d.get("mixing_only"):
            L.append("| method | seeds | iLISI | KBET | kNN kept | train s |")
            L.append("|---|---|---|---|---|---|")
            for m in dict.fromkeys(r["method"] for r in d["rows"]):
                rs = [r for r in d["rows"] if r["method"] == m]
                p = dict(n=len(rs))
                for c in ("iLISI", "KBET", "knn_kept", "train_s"):
                    v = [r[c] for r in rs if r.get(c) is not None]
                    if v:
                        p[c] = dict(mean=float(np.mean(v)), min=float(np.min(v)),
                                    max=float(np.max(v)))
                L.append(f"| {m} | {len(rs)} | {cell(p, 'iLISI')} | {cell(p, 'KBET')} | "
                         f"{cell(p, 'knn_kept')} | {cell(p, 'train_s', 1)} |")
            L.append("")
            continue
        s = d["summary"]
        per = s["per_method"]
        cols = ip.TABLE_COLS
        L.append("| method | rank | " + " | ".join(cols) + " | cluster F1 | train s |")
        L.append("|" + "---|" * (len(cols) + 4))
        for m in sorted(per, key=lambda m: s["rank_by_mean_total"][m]):
            p = per[m]
            rs = [r for r in d["rows"] if r["method"] == m and "f1" in r]
            f1 = "–"
            if rs:
                v = [r["f1"] for r in rs]
                f1 = f"{np.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})"
            cells = [("**" + cell(p, c) + "**") if c == "Total" else cell(p, c) for c in cols]
            times = f" (x{p['n']})" if p["n"] > 1 else ""
            L.append(f"| {m}{times} | "
                     f"{s['rank_by_mean_total'][m]} | " + " | ".join(cells)
                     + f" | {f1} | {cell(p, 'train_s', 1)} |")
        L.append("")
        L.append(f"Best peer: {s['best_peer']} {per[s['best_peer']]['Total']['mean']:.3f}; "
                 f"control {per[CONTROL]['Total']['mean']:.3f}.\n")
        L.append("| variant | mean Total minus best peer | >= best peer | seeds below control | "
                 "worst seed minus control |")
        L.append("|---|---|---|---|---|")
        for m, c in s["variants"].items():
            L.append(f"| {m} | **{c['margin_to_best_peer']:+.3f}** | {ip._yn(c['ge_best_peer'])} "
                     f"| {ip._seeds(c['seeds_below_control'])} | {c['min_minus_control']:+.3f} |")
        L.append("")
    if labelled:
        L.append("## Summary (labelled sets)\n")
        ip._variant_summary(dict(datasets=labelled), L)
        L.append("### Every run (all scib columns)\n")
        for d in labelled:
            cols = d["scib_columns"]
            L.append(f"**{d['dataset']}**\n")
            L.append("| method | seed | " + " | ".join(cols) + " | F1 | clusters | train s |")
            L.append("|---|---|" + "---|" * (len(cols) + 3))
            for r in d["rows"]:
                L.append(f"| {r['method']} | {'–' if r['seed'] is None else r['seed']} | "
                         + " | ".join(f(r[c]) for c in cols)
                         + f" | {f(r.get('f1'))} | {r.get('n_clusters', '–')} | "
                         f"{f(r['train_s'], 1)} |")
            L.append("")
    L.append(f"Run time: {res['total_s'] / 60:.1f} min.\n")
    path.write_text("\n".join(L))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", type=ip.parse_variants, default={"default": {}}, metavar="JSON")
    p.add_argument("--score-events", type=int, default=15000)
    p.add_argument("--quick", action="store_true", help="3,000 events, 5 epochs: a smoke test")
    p.add_argument("--out", default=str(base.REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-render a results file")
    args = p.parse_args(argv)
    out = Path(args.out)
    stem = "integration_panel_cytometry" + (f"_{args.tag}" if args.tag else "")
    if args.render:
        write_markdown(json.loads(Path(args.render).read_text()), Path(args.render).with_suffix(".md"))
        return
    import_cellvi()
    t_start = time.perf_counter()
    res = dict(command="python benchmarks/integration_panel_cytometry.py "
                       + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               versions=base._versions(), git=git_state(),
               machine=f"{platform.platform()}, {os.cpu_count()} CPUs, single-threaded runs",
               seeds=args.seeds, variants=args.variants, datasets=[])
    for i, name in enumerate(args.datasets):
        res["datasets"].append(run_dataset(name, args.seeds, args.variants, args.score_events,
                                           args.quick))
        left = args.datasets[i + 1:]
        res["partial"] = f"datasets still to run: {', '.join(left)}" if left else None
        res["total_s"] = time.perf_counter() - t_start
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(jsonable(res), indent=1))
        write_markdown(res, out / f"{stem}.md")
        log(f"   wrote {out / stem}.md")


if __name__ == "__main__":
    main()
