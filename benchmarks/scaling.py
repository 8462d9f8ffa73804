"""Scaling benchmark (issue 22, item 5): wall-clock, throughput, accuracy and peak memory of
cellvi's amortized models at 100k and 1M cells, against FlowSOM (cytometry) and scvi-tools
SCVI (counts), single-threaded.

Cytometry. ``flowsom_68983_mouse_flow_gated``, the 10 fluorescence channels with a marker,
``layers["compensated_logicle"]`` (``cytometry.load_input("flowsom")``), resampled with
replacement to ``n`` events (``numpy.random.default_rng(DATA_SEED + n)``: ``integers`` for the
rows, then ``normal(0, 0.02)`` jitter added to every value), the gate labels carried along
(``Unlabeled`` kept in the fit and excluded from the scores, as in ``cytometry.py``). Methods:

* ``flowsom``: ``cytometry.run_flowsom`` (10 x 10 SOM; 10 metaclusters = ``default``, 6 = ``K``);
* ``cellvi``: ``cellvi.tl.gmvae(adata, seed=s, verbose=False)``, its defaults (discovery).

Scores: ``cytometry.score`` (mean F1 after Hungarian matching, ARI, NMI vs the gates, clusters).

Counts. ``cellvi.datasets.synthetic_counts(n, 2000, n_groups=5, n_batches=2, mean_library=470,
seed=0)`` (about 11% non-zeros), built by ``soak.synthetic_counts_blocks`` (the same AnnData
made in blocks of rows, so that 1M cells fit in memory) in a child of its own and cached as
``.npy`` files in ``--cache``; ``X`` only (the ``counts`` copy is dropped). Methods:

* ``nbvae``: ``cellvi.tl.nbvae(adata, batch_key="batch", verbose=False)``, its defaults;
* ``scvi``: scvi-tools ``SCVI(adata, gene_likelihood="nb", n_hidden=128, n_latent=10,
  n_layers=1)`` (the architecture of ``speed_nbvae.py``), ``train(accelerator="cpu")`` with
  its defaults except ``max_epochs`` (``--scvi-epochs``; ``None`` = its default,
  ``min(round(20000 / n * 400), 400)`` epochs); the latent is ``get_latent_representation()``.
  When capped, the default-epochs time is extrapolated from the median epoch (marked as such).

Score: ARI of ``KMeans(n_clusters=5, n_init=10, random_state=0)`` on the latent vs
``obs["group"]``.

Every method runs in a fresh child process (``python scaling.py --child SPEC``), single-threaded
(``_single_thread``, ``torch.set_num_threads(1)``), on a copy of ``cellvi/`` exported from the
git commit ``HEAD`` at the start (``git archive``) so that edits to the working tree during a
run cannot leak in. Each child reports: wall-clock seconds of the method call (data
preparation, imports and the numba/torch warm-up are outside), the process CPU seconds over the
same window (CPU / wall < 1 means another process took the core), peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``, read right after the method, before scoring) and the
RSS before the method. The cellvi children also time the phases of the call by wrapping
(without changing) ``GMVAE``/``NBVAE`` ``__init__``, ``fit`` and ``transform`` (the GMVAE's
``transform_and_elbo`` counts as *transform*), ``cellvi.tl.outlier_scores`` (and
``robust_scores``), ``cellvi.tl.group_medians``, the GMVAE phases (``warm_up``,
``initialise``, ``fit_mixture``, ``merge_and_tune``), every ``cellvi.train.train`` call
(its name, epochs, optimiser steps counted by a global ``torch.optim`` step hook) and
``cellvi.train.evaluate`` (validation), and the GMVAE M-step (``_Run.mixture_step``).

A parent watchdog samples each child's RSS (``psutil``) every second and kills it above
``--rss-limit-mib``, or after ``--child-timeout`` seconds; both are recorded as results.

Usage::

    python benchmarks/scaling.py                       # the full run (see --help for parts)
    python benchmarks/scaling.py --quick --out /tmp/scaling_quick   # smoke test, tiny n
    python benchmarks/scaling.py --render benchmarks/results/scaling.json [--notes FILE]
    python benchmarks/scaling.py ... --code-rev REV --resume benchmarks/results/scaling.json
        # add the jobs the file lacks (e.g. after an interruption), on the same cellvi commit

A killed child (``--child-timeout``, ``--rss-limit-mib``) keeps its progress lines (the end of
each timed phase, and of every 50 mini-batches of the outlier score's per-cell ELBO), from
which the table states what it had done and projects the outlier pass (marked as projected).

Writes ``<out>/scaling.json`` (every child's result), ``<out>/scaling.md`` and
``<out>/scaling.png`` (seconds vs n, log-log), after every child (``scaling_quick.*`` with
``--quick``).
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import jsonable as _jsonable

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DATA_SEED = 0
JITTER_SD = 0.02
N_GENES = 2000
NB_SETTINGS = dict(n_groups=5, n_batches=2, mean_library=470.0, seed=0)  # as in soak.py
ARCH = dict(n_hidden=128, n_latent=10, n_layers=1)  # speed_nbvae.py's SCVI architecture
TARGET_NB_SECONDS = 180.0
TARGET_NB_ARI = 0.9
TARGET_F1_GAP = 0.01


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _mib_status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ============================================================================================
# children
# ============================================================================================
def cyto_data(n: int) -> dict:
    """flowsom_68983 resampled with replacement to n events, N(0, 0.02) jitter added."""
    import cytometry

    d = cytometry.load_input("flowsom")
    rng = np.random.default_rng(DATA_SEED + n)
    idx = rng.integers(0, len(d["X"]), n)
    X = d["X"][idx] + rng.normal(0.0, JITTER_SD, (n, d["X"].shape[1])).astype(np.float32)
    out = dict(d)
    out.update(X=X.astype(np.float32), truth=d["truth"][idx], n_source=int(len(d["X"])))
    return out


class PhaseTimer:
    """Wraps functions to add up their wall seconds (nested calls count in both)."""

    def __init__(self, progress: str | None = None):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.trains: list[dict] = []
        self.steps = 0
        self.progress = progress
        self.t0 = None  # set when the timed call starts

    def note(self, **entry) -> None:
        """Append a line to the progress file (read by the parent if the child is killed)."""
        if self.progress is None:
            return
        entry.update(t=None if self.t0 is None else time.perf_counter() - self.t0,
                     peak_rss_mib=_maxrss_mib(), rss_mib=_mib_status()["VmRSS"])
        with open(self.progress, "a") as fh:
            fh.write(json.dumps(_jsonable(entry)) + "\n")

    def count_elbo_batches(self, owner, name: str = "elbo_per_cell", every: int = 50) -> None:
        """Count the mini-batches of per-cell ELBO passes (the outlier score), noting progress."""
        f = getattr(owner, name)
        timer = self
        state = dict(batches=0, cells=0)

        @functools.wraps(f)
        def g(module, batch, *a, **k):
            out = f(module, batch, *a, **k)
            state["batches"] += 1
            state["cells"] += int(len(out))
            if state["batches"] % every == 0:
                timer.note(event="elbo_batches", batches=state["batches"], cells=state["cells"])
            return out

        setattr(owner, name, g)

    def wrap(self, owner, name: str, label: str) -> None:
        if not hasattr(owner, name):  # an older --code-rev without it
            return
        f = getattr(owner, name)
        timer = self

        @functools.wraps(f)
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                secs = time.perf_counter() - t0
                timer.seconds[label] = timer.seconds.get(label, 0.0) + secs
                timer.calls[label] = timer.calls.get(label, 0) + 1
                if label != "validation" and label != "m_step":
                    timer.note(event="end", label=label, seconds=secs)

        setattr(owner, name, g)

    def wrap_train(self, owner, name: str = "train") -> None:
        f = getattr(owner, name)
        timer = self

        @functools.wraps(f)
        def g(module, data, config=None, **k):
            t0, s0 = time.perf_counter(), timer.steps
            hist = f(module, data, config, **k)
            timer.note(event="train_end", desc=str(getattr(config, "desc", "")),
                       epochs=len(hist.get("epoch", [])), steps=timer.steps - s0,
                       seconds=time.perf_counter() - t0)
            timer.trains.append(dict(
                desc=str(getattr(config, "desc", "")), n_obs=int(data.n_obs),
                epoch_cells=getattr(config, "epoch_cells", None),
                batch_size=getattr(config, "batch_size", None),
                max_epochs=getattr(config, "max_epochs", None),
                epochs=len(hist.get("epoch", [])), steps=timer.steps - s0,
                seconds=time.perf_counter() - t0))
            return hist

        setattr(owner, name, g)

    def count_steps(self) -> None:
        def hook(optimizer, args, kwargs):
            self.steps += 1

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(hook)


def _import_cellvi():
    from _common import import_cellvi

    import_cellvi()
    import cellvi
    import cellvi.models
    import cellvi.train  # noqa: F401

    return cellvi


def child_cyto(spec: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # mudata, inside FlowSOM
    import cytometry

    d = cyto_data(spec["n"])
    res = dict(n_source=d["n_source"])
    method, seed = spec["method"], spec["seed"]
    if method == "flowsom":
        import flowsom as fs
        from loguru import logger

        logger.disable("flowsom")
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        w = dict(X=rng.normal(size=(6000, 10)).astype(np.float32), truth=np.zeros(6000, str),
                 markers=[f"m{i}" for i in range(10)])
        fs.FlowSOM(cytometry.make_adata(w), cols_to_use=w["markers"], xdim=5, ydim=5,
                   n_clusters=3, seed=0)
        res["warmup_s"] = time.perf_counter() - t0
        res["rss_before_mib"] = _mib_status()["VmRSS"]
        c0 = _cpu_s()
        out = cytometry.run_flowsom(d, seed, [spec["setting"]], {})
        labels, secs, info = out[spec["setting"]]
        res.update(cpu_s=_cpu_s() - c0, peak_rss_mib=_maxrss_mib(), seconds=secs, info=info)
    else:
        cellvi = _import_cellvi()
        import cellvi.models._gmvae_phases as ph
        import cellvi.models.gmvae as gm

        res["cellvi_file"] = cellvi.__file__
        cytometry.warm_up_torch()
        pt = PhaseTimer(spec.get("progress"))
        pt.count_steps()
        for owner, name, label in (
                (gm.GMVAE, "__init__", "model_init"), (gm.GMVAE, "fit", "fit"),
                (gm.GMVAE, "transform", "transform"), (cellvi.tl, "outlier_scores", "outlier_score"),
                # tl.gmvae's one inference pass (latent, probabilities and ELBO) and the
                # robust scores made from its ELBO
                (gm.GMVAE, "transform_and_elbo", "transform"), (cellvi.tl, "robust_scores", "outlier_score"),
                (cellvi.tl, "group_medians", "marker_medians"), (gm, "warm_up", "fit.warm_up"),
                (gm, "initialise", "fit.initialise"), (gm, "fit_mixture", "fit.mixture"),
                (gm, "merge_and_tune", "fit.merge_and_tune"),
                (cellvi.train, "evaluate", "validation"),
                (ph._Run, "mixture_step", "m_step")):
            pt.wrap(owner, name, label)
        pt.wrap_train(ph)
        a = cytometry.make_adata(d)
        res["rss_before_mib"] = _mib_status()["VmRSS"]
        c0, t0 = _cpu_s(), time.perf_counter()
        pt.t0 = t0
        cellvi.tl.gmvae(a, seed=seed, verbose=False)
        secs = time.perf_counter() - t0
        res.update(cpu_s=_cpu_s() - c0, peak_rss_mib=_maxrss_mib(), seconds=secs)
        labels = a.obs["gmvae"].astype(str).to_numpy()
        u = a.uns["gmvae"]
        hist = u.get("history", {}) or {}
        phases = [str(p) for p in hist.get("phase", [])]
        res.update(
            epochs=int(len(hist.get("epoch", []))), steps=int(pt.steps),
            epochs_by_phase={p: phases.count(p) for p in dict.fromkeys(phases)},
            phase_seconds=pt.seconds, phase_calls=pt.calls, trains=pt.trains,
            train_settings=_jsonable(u.get("train_settings", {})),
            n_components_start=int(u["settings"]["n_start"]),
            cellvi_version=str(u.get("cellvi_version", "")))
    t0 = time.perf_counter()
    res.update(cytometry.score(d, labels))
    res["score_s"] = time.perf_counter() - t0
    return res


def child_nbgen(spec: dict) -> dict:
    import soak

    n, cache = spec["n"], Path(spec["cache"])
    t0 = time.perf_counter()
    adata = soak.synthetic_counts_blocks(n, N_GENES, **NB_SETTINGS)
    secs = time.perf_counter() - t0
    X = adata.X
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache / f"counts_{n}"
    for part in ("data", "indices", "indptr"):
        np.save(f"{stem}_{part}.npy", getattr(X, part))
    np.save(f"{stem}_group.npy", adata.obs["group"].cat.codes.to_numpy())
    np.save(f"{stem}_batch.npy", adata.obs["batch"].cat.codes.to_numpy())
    info = dict(n=n, n_genes=N_GENES, nnz=int(X.nnz), nonzero_fraction=float(X.nnz / (n * N_GENES)),
                mean_library_observed=float(np.asarray(X.sum(1)).mean()), build_s=secs,
                peak_rss_mib=_maxrss_mib(), simulation=NB_SETTINGS)
    (Path(f"{stem}_info.json")).write_text(json.dumps(info))
    return info


def nb_adata(n: int, cache: Path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    stem = cache / f"counts_{n}"
    parts = [np.load(f"{stem}_{p}.npy") for p in ("data", "indices", "indptr")]
    X = sp.csr_matrix(tuple(parts), shape=(n, N_GENES), copy=False)
    del parts
    adata = ad.AnnData(X)
    adata.obs_names = [f"cell{i}" for i in range(n)]
    adata.var_names = [f"gene{j}" for j in range(N_GENES)]
    g, b = np.load(f"{stem}_group.npy"), np.load(f"{stem}_batch.npy")
    adata.obs["group"] = pd.Categorical([f"g{i}" for i in g])
    adata.obs["batch"] = pd.Categorical([f"b{i}" for i in b])
    return adata


def kmeans_ari(z: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    lab = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(np.asarray(z, np.float32))
    return float(adjusted_rand_score(truth, lab)), time.perf_counter() - t0


def child_nb(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    n, cache = spec["n"], Path(spec["cache"])
    res = {}
    if spec["method"] == "nbvae":
        cellvi = _import_cellvi()
        import cellvi.models.nbvae as nbm

        res["cellvi_file"] = cellvi.__file__
        import cellvi.models._base as mbase

        torch.optim.Adam(torch.nn.Linear(1, 1).parameters())  # warm-up (see cytometry.py)
        pt = PhaseTimer(spec.get("progress"))
        pt.count_steps()
        for owner, name, label in (
                (nbm.NBVAE, "__init__", "model_init"), (nbm.NBVAE, "fit", "fit"),
                (nbm.NBVAE, "transform", "transform"), (cellvi.tl, "outlier_scores", "outlier_score"),
                (cellvi.train, "evaluate", "validation")):
            pt.wrap(owner, name, label)
        pt.wrap_train(nbm)
        pt.count_elbo_batches(mbase)
        t0 = time.perf_counter()
        adata = nb_adata(n, cache)
        res.update(load_s=time.perf_counter() - t0, rss_before_mib=_mib_status()["VmRSS"],
                   peak_rss_load_mib=_maxrss_mib())
        c0, t0 = _cpu_s(), time.perf_counter()
        pt.t0 = t0
        pt.note(event="start", n_obs=n, load_s=res["load_s"])
        cellvi.tl.nbvae(adata, batch_key="batch", verbose=False)
        secs = time.perf_counter() - t0
        res.update(cpu_s=_cpu_s() - c0, peak_rss_mib=_maxrss_mib(), seconds=secs)
        u = adata.uns["nbvae"]
        hist = u.get("history", {}) or {}
        ts = _jsonable(u.get("train_settings", {}))
        res.update(epochs=int(len(hist.get("epoch", []))), steps=int(pt.steps),
                   default_max_epochs=int(cellvi.train.default_max_epochs(n)),
                   phase_seconds=pt.seconds, phase_calls=pt.calls, trains=pt.trains,
                   train_settings=ts, cellvi_version=str(u.get("cellvi_version", "")))
        z = adata.obsm["X_nbvae"]
    else:  # scvi
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        import scvi
        from lightning.pytorch.callbacks import Callback

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        torch.set_num_threads(1)
        scvi.settings.seed = 0
        scvi.settings.num_threads = 1

        class EpochTimer(Callback):
            def __init__(self):
                self.start, self.end = [], []

            def on_train_epoch_start(self, trainer, pl_module):
                self.start.append(time.perf_counter())

            def on_train_epoch_end(self, trainer, pl_module):
                self.end.append(time.perf_counter())

        adata = nb_adata(n, cache)
        res["rss_before_mib"] = _mib_status()["VmRSS"]
        default_epochs = int(min(round((20000 / n) * 400), 400))
        max_epochs = spec.get("max_epochs") or default_epochs
        timer = EpochTimer()
        c0, t0 = _cpu_s(), time.perf_counter()
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.SCVI(adata, gene_likelihood="nb", **ARCH)
        t_fit = time.perf_counter()
        model.train(max_epochs=max_epochs, accelerator="cpu", devices=1,
                    enable_progress_bar=False, callbacks=[timer])
        t_fit_end = time.perf_counter()
        z = model.get_latent_representation()
        secs = time.perf_counter() - t0
        res.update(cpu_s=_cpu_s() - c0, peak_rss_mib=_maxrss_mib(), seconds=secs)
        ep = [e - s for s, e in zip(timer.start, timer.end, strict=False)]
        med = float(np.median(ep[1:] if len(ep) > 1 else ep))
        res.update(epochs=len(ep), max_epochs=max_epochs, default_epochs=default_epochs,
                   epoch_s=ep, epoch_s_median=med, setup_s=t_fit - t0,
                   train_s=t_fit_end - t_fit, latent_s=time.perf_counter() - t_fit_end - 0.0,
                   batch_size=128, scvi_version=scvi.__version__)
        if max_epochs < default_epochs:
            res["extrapolated_default_s"] = (secs - (t_fit_end - t_fit)
                                             + sum(ep) + med * (default_epochs - len(ep)))
    truth = adata.obs["group"].astype(str).to_numpy()
    res["kmeans_ari"], res["kmeans_s"] = kmeans_ari(z, truth, NB_SETTINGS["n_groups"])
    res["n_groups"] = NB_SETTINGS["n_groups"]
    return res


def child_main(spec_json: str, out_path: str) -> None:
    spec = json.loads(spec_json)
    sys.path.insert(0, spec["code"])  # the cellvi copy exported from git HEAD
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    fn = dict(cyto=child_cyto, nbgen=child_nbgen, nb=child_nb)[spec["kind"]]
    res = fn(spec)
    res.update(child_wall_s=time.perf_counter() - t0, loadavg_start=list(load0),
               loadavg_end=list(os.getloadavg()))
    Path(out_path).write_text(json.dumps(_jsonable(res)))


# ============================================================================================
# parent
# ============================================================================================
def run_child(spec: dict, scratch: Path, timeout: float, rss_limit: float) -> dict:
    import psutil

    out = scratch / f"child_{time.time_ns()}.json"
    progress = scratch / f"{out.stem}.progress.jsonl"
    spec = dict(spec, progress=str(progress))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec),
           "--child-out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(BENCH))
    ps = psutil.Process(proc.pid)
    killed, max_seen = None, 0.0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss / 2**20
        except psutil.Error:
            rss = 0.0
        max_seen = max(max_seen, rss)
        elapsed = time.perf_counter() - t0
        if rss > rss_limit or elapsed > timeout:
            killed = (f"RSS {rss:,.0f} MiB > {rss_limit:,.0f}" if rss > rss_limit
                      else f"over {timeout:.0f} s")
            proc.kill()
            proc.wait()
            break
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    spec.pop("progress")
    if killed or proc.returncode != 0 or not out.exists():
        prog = ([json.loads(line) for line in progress.read_text().splitlines()]
                if progress.exists() else [])
        return dict(spec, error=killed or f"exit code {proc.returncode}", child_wall_s=wall,
                    polled_max_rss_mib=max_seen, progress=prog)
    res = json.loads(out.read_text())
    out.unlink()
    progress.unlink(missing_ok=True)
    return dict(spec, **res, polled_max_rss_mib=max_seen)


def export_code(scratch: Path, rev: str = "HEAD") -> dict:
    """``git archive REV cellvi`` into scratch/code; the children import that copy."""
    code = scratch / "code"
    code.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "cellvi"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=arch, check=True)
    return dict(code=str(code))


def plan(args) -> list[dict]:
    """Seed 0 of every size first (cytometry, then counts, then SCVI), then the extra seeds at
    the large sizes, so that an interrupted run has one complete pass."""
    jobs, extra = [], []
    for n in args.cyto_sizes:
        seeds = args.cyto_seeds_large if n >= args.large else args.cyto_seeds
        for i, s in enumerate(seeds):
            group = [dict(kind="cyto", n=n, method="flowsom", seed=s, setting=setting)
                     for setting in args.flowsom_settings]
            group.append(dict(kind="cyto", n=n, method="cellvi", seed=s, setting="default"))
            (jobs if i == 0 else extra).extend(group)
    for n in args.nb_sizes:
        jobs.append(dict(kind="nbgen", n=n))
        jobs.append(dict(kind="nb", n=n, method="nbvae", seed=0))
    for n in args.scvi_sizes:
        if n not in args.nb_sizes:
            jobs.append(dict(kind="nbgen", n=n))
        jobs.append(dict(kind="nb", n=n, method="scvi", seed=0, max_epochs=args.scvi_epochs))
    return jobs + extra


def parent_main(args) -> None:
    from _common import git_state, versions

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "scaling_quick" if args.quick else "scaling"
    scratch = Path(tempfile.mkdtemp(prefix="scaling_"))
    cache = Path(args.cache)
    base = export_code(scratch, args.code_rev)
    code_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.code_rev],
                              capture_output=True, text=True, check=True).stdout.strip()
    meta = dict(
        command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        git=dict(git_state(), code_rev=code_rev), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=dict(nproc=os.cpu_count(), platform=platform.platform(),
                     mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)),
        loadavg_start=list(os.getloadavg()),
        versions=versions(["torch", "numpy", "scipy", "anndata", "scikit-learn", "flowsom",
                           "scvi-tools", "lightning"]),
        settings=dict(data_seed=DATA_SEED, jitter_sd=JITTER_SD, nb=NB_SETTINGS, n_genes=N_GENES,
                      scvi_arch=ARCH, rss_limit_mib=args.rss_limit_mib,
                      child_timeout_s=args.child_timeout, code="git archive HEAD cellvi"),
        results=[])
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        runs = old.pop("runs", [dict((k, old[k]) for k in ("command", "git", "started",
                                                           "loadavg_start") if k in old)])
        runs.append(dict(command=meta["command"], git=meta["git"], started=meta["started"],
                         loadavg_start=meta["loadavg_start"]))
        done = [r for r in old["results"] if "error" not in r or not args.retry_errors]
        old.update(runs=runs, results=done)
        old.pop("finished", None)
        meta = old
    key = ("kind", "n", "method", "seed", "setting")
    have = {tuple(r.get(k) for k in key) for r in meta["results"]}
    jobs = [j for j in plan(args) if tuple(j.get(k) for k in key) not in have]
    log(f"{len(jobs)} children; scratch {scratch}; cellvi from git {code_rev}")
    t_all = time.perf_counter() - meta.get("total_s", 0.0)
    for job in jobs:
        spec = dict(job, code=base["code"], cache=str(cache))
        if job["kind"] == "nbgen":
            info = cache / f"counts_{job['n']}_info.json"
            if info.exists():
                r = dict(spec, **json.loads(info.read_text()), cached=True)
                meta["results"].append(r)
                log(f"nbgen n={job['n']}: cached ({r['nonzero_fraction']:.4f} non-zeros)")
                continue
        log(f"start {job}")
        timeout = args.gen_timeout if job["kind"] == "nbgen" else args.child_timeout
        r = run_child(spec, scratch, timeout, args.rss_limit_mib)
        r.pop("code", None)
        r.pop("cache", None)
        meta["results"].append(r)
        log("  -> " + (f"ERROR {r['error']}" if "error" in r else
                       ", ".join(f"{k} {r[k]:.4g}" for k in ("seconds", "cpu_s", "peak_rss_mib",
                                                             "f1", "ari", "kmeans_ari", "build_s",
                                                             "nonzero_fraction")
                                 if isinstance(r.get(k), (int, float)))))
        meta["total_s"] = time.perf_counter() - t_all
        meta["loadavg_end"] = list(os.getloadavg())
        write(meta, out_dir, stem)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write(meta, out_dir, stem)
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min: {out_dir / stem}.md")


# ============================================================================================
# report
# ============================================================================================
def write(meta: dict, out_dir: Path, stem: str, notes: str | None = None) -> None:
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=1))
    (out_dir / f"{stem}.md").write_text(render(meta, stem, notes))
    try:
        plot(meta, out_dir / f"{stem}.png")
    except Exception as err:  # noqa: BLE001
        log(f"no plot: {type(err).__name__}: {err}")


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def render(meta: dict, stem: str, notes: str | None = None) -> str:
    R = meta["results"]
    L = ["# Scaling: cellvi GMVAE vs FlowSOM and NB-VAE (vs SCVI) at 100k-1M cells, one thread", ""]
    if meta.get("runs"):
        L.append("Made in " + str(len(meta["runs"])) + " runs (`--resume` adds the jobs a results "
                 "file lacks), children's time together "
                 + (f"{meta['total_s'] / 60:.1f} min" if "total_s" in meta else "?")
                 + ("" if meta.get("finished") else " (**unfinished**: the rows so far)") + ":")
        L.append("")
        for run in meta["runs"]:
            L.append(f"- `{run['command']}`, started {run['started']}, cellvi from git "
                     f"{run['git'].get('code_rev', run['git']['head'])}, load average at start "
                     f"{[round(x, 2) for x in run.get('loadavg_start', [])]}")
    else:
        L.append(f"Made by `{meta['command']}`, started {meta['started']}"
                 + (f", took {meta['total_s'] / 60:.1f} min" if "total_s" in meta else "")
                 + ("" if meta.get("finished") else " (**unfinished**: the rows so far)") + ".")
    L.append("")
    heads = sorted({run["git"].get("code_rev", run["git"]["head"])
                    for run in meta.get("runs", [meta])})
    L.append(f"- Code: cellvi exported from git {', '.join(heads)} (`git archive REV cellvi` at "
             "the start of each run, REV = `--code-rev`, default HEAD; uncommitted changes in the "
             "working tree are not used).")
    m = meta["machine"]
    la = [[round(x, 2) for x in meta.get(k) or []] for k in ("loadavg_start", "loadavg_end")]
    L.append(f"- Machine: {m['nproc']} CPUs, {m['mem_gib']} GiB, {m['platform']}; shared with "
             f"other work. Load average (1, 5, 15 min) at the first start {la[0]}, at the end "
             f"{la[1]}. Every method single-threaded in its own process; "
             "*CPU/wall* < 1 means another process held the core part of the time.")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    L.append("- *seconds*: wall-clock of the method call alone (data, imports and warm-up "
             "excluded); *peak RSS*: the child's `ru_maxrss` right after the call (includes the "
             "data); *RSS before*: the child's RSS before the call.")
    L.append("")

    cy = [r for r in R if r["kind"] == "cyto"]
    if cy:
        src = next((r.get("n_source") for r in cy if r.get("n_source")), None)
        L += ["## Cytometry: flowsom_68983, resampled", "",
              f"`flowsom_68983_mouse_flow_gated`, `layers[\"compensated_logicle\"]`, 10 marker "
              f"channels ({src:,} events) resampled with replacement to n events, "
              f"N(0, {JITTER_SD}) jitter (data seed {DATA_SEED} + n); scored against the gates "
              "without `Unlabeled`. FlowSOM: 10 x 10 SOM, 10 (default) or 6 (K) metaclusters; "
              "cellvi: `tl.gmvae(adata, seed=s)` defaults (discovery, 30 starting components).",
              "",
              "| n | method | seed | seconds | CPU/wall | events/s | F1 | ARI | NMI | clusters "
              "| peak RSS MiB | RSS before MiB | epochs | steps |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cy:
            name = ("FlowSOM " + ("K=10" if r["setting"] == "default" else "K=6")
                    if r["method"] == "flowsom" else "cellvi GMVAE")
            if "error" in r:
                L.append(f"| {r['n']:,} | {name} | {r['seed']} | **{r['error']}** "
                         "| | | | | | | | | | |")
                continue
            L.append(f"| {r['n']:,} | {name} | {r['seed']} | {r['seconds']:.1f} | "
                     f"{r['cpu_s'] / r['seconds']:.2f} | {r['n'] / r['seconds']:,.0f} | "
                     f"{r['f1']:.3f} | {r['ari']:.3f} | {r['nmi']:.3f} | {r['n_clusters']} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['rss_before_mib']:,.0f} | "
                     f"{r.get('epochs', '-')} | {_f(r.get('steps'), '{:,}')} |")
        L += ["", "Ratios within the same n and seed (cellvi / FlowSOM K=10, the FlowSOM "
              "default); the issue's target at 1M: ratio <= 1 and F1 >= FlowSOM's - 0.01.", "",
              "| n | seed | cellvi s | FlowSOM s | ratio | CPU-s ratio | F1 cellvi | F1 FlowSOM "
              "| F1 gap | ARI cellvi | ARI FlowSOM | time target | F1 target |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for n in sorted({r["n"] for r in cy}):
            for s in sorted({r["seed"] for r in cy if r["n"] == n}):
                c = next((r for r in cy if r["n"] == n and r["seed"] == s
                          and r["method"] == "cellvi" and "error" not in r), None)
                f = next((r for r in cy if r["n"] == n and r["seed"] == s
                          and r["method"] == "flowsom" and r["setting"] == "default"
                          and "error" not in r), None)
                if not (c and f):
                    continue
                gap = c["f1"] - f["f1"]
                L.append(f"| {n:,} | {s} | {c['seconds']:.1f} | {f['seconds']:.1f} | "
                         f"{c['seconds'] / f['seconds']:.2f} | {c['cpu_s'] / f['cpu_s']:.2f} | "
                         f"{c['f1']:.3f} | {f['f1']:.3f} | {gap:+.3f} | {c['ari']:.3f} | "
                         f"{f['ari']:.3f} | {'met' if c['seconds'] <= f['seconds'] else 'not met'} "
                         f"| {'met' if gap >= -TARGET_F1_GAP else 'not met'} |")
        L += ["", "Where the cellvi seconds go (wall seconds of the wrapped calls; `fit.*` are "
              "inside `fit`; *train loops* = all `cellvi.train.train` calls, which contain the "
              "*validation* and the *M-step* after each epoch):", "",
              "| n | seed | total | GMVAE() | fit | fit.warm_up | fit.initialise | fit.mixture "
              "| fit.merge_and_tune | train loops | validation | M-step | transform | outlier "
              "score | medians | rest |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cy:
            if r["method"] != "cellvi" or "error" in r:
                continue
            p = r["phase_seconds"]
            tl = sum(t["seconds"] for t in r["trains"])
            rest = r["seconds"] - sum(p.get(k, 0.0) for k in (
                "model_init", "fit", "transform", "outlier_score", "marker_medians"))
            L.append(f"| {r['n']:,} | {r['seed']} | {r['seconds']:.1f} | "
                     + " | ".join(f"{p.get(k, 0.0):.1f}" for k in (
                         "model_init", "fit", "fit.warm_up", "fit.initialise", "fit.mixture",
                         "fit.merge_and_tune"))
                     + f" | {tl:.1f} | {p.get('validation', 0.0):.1f} | {p.get('m_step', 0.0):.1f} | "
                     + " | ".join(f"{p.get(k, 0.0):.1f}" for k in (
                         "transform", "outlier_score", "marker_medians"))
                     + f" | {rest:.1f} |")
        L += ["", "Training runs of each cellvi fit (phase name, epochs, optimiser steps, cells per "
              "epoch, seconds):", ""]
        for r in cy:
            if r["method"] != "cellvi" or "error" in r:
                continue
            parts = []
            for t in r["trains"]:
                per = min(math.ceil(0.9 * t["n_obs"]), t["epoch_cells"] or 10**12)
                parts.append(f"{t['desc'] or '?'} {t['epochs']} ep / {t['steps']:,} steps "
                             f"({per:,} cells/ep) {t['seconds']:.1f} s")
            L.append(f"- n {r['n']:,}, seed {r['seed']}: " + "; ".join(parts)
                     + f". Epochs by phase in `history`: {r.get('epochs_by_phase')}.")

    nb = [r for r in R if r["kind"] in ("nb", "nbgen")]
    if nb:
        L += ["", "## Counts: NB-VAE (and SCVI) on synthetic counts", ""]
        for r in (r for r in nb if r["kind"] == "nbgen"):
            if "error" in r:
                L.append(f"- data n {r['n']:,}: **{r['error']}**")
                continue
            L.append(f"- data n {r['n']:,} x {N_GENES:,}: `synthetic_counts(n, 2000, n_groups=5, "
                     f"n_batches=2, mean_library=470, seed=0)` via `soak.synthetic_counts_blocks`: "
                     f"{r['nnz']:,} non-zeros ({r['nonzero_fraction']:.4f}), mean library "
                     f"{r['mean_library_observed']:.0f}; built in {r['build_s']:.0f} s"
                     + (" (earlier run, cached)" if r.get("cached") else "") + ".")
        L += ["", "| n | method | seconds | CPU/wall | cells/s | k-means ARI (K=5) | peak RSS MiB "
              "| RSS before MiB | epochs | steps | target |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in nb if r["kind"] == "nb"):
            name = ("cellvi NB-VAE" if r["method"] == "nbvae" else
                    f"scvi-tools SCVI (batch 128, {r.get('epochs', '?')} of its default "
                    f"{r.get('default_epochs', '?')} epochs)")
            if "error" in r:
                L.append(f"| {r['n']:,} | {name} | **killed: {r['error']}** (see below) | | | | "
                         f"{r.get('polled_max_rss_mib', 0):,.0f} (polled) | | | | |")
                continue
            tgt = "-"
            if r["method"] == "nbvae" and r["n"] >= 1_000_000:
                ok = r["seconds"] <= TARGET_NB_SECONDS and r["kmeans_ari"] >= TARGET_NB_ARI
                tgt = ("met" if ok else "not met") + f" (<= {TARGET_NB_SECONDS:.0f} s, ARI >= 0.9)"
            steps = r.get("steps")
            L.append(f"| {r['n']:,} | {name} | {r['seconds']:.1f} | {r['cpu_s'] / r['seconds']:.2f} "
                     f"| {r['n'] / r['seconds']:,.0f} | {r['kmeans_ari']:.3f} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['rss_before_mib']:,.0f} | "
                     f"{r.get('epochs', '-')} | {_f(steps, '{:,}')} | {tgt} |")
        L += ["", "Where the NB-VAE seconds go:", "",
              "| n | total | NBVAE() | fit | of which train loop | of which validation "
              "| transform | outlier score | rest |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in nb if r["kind"] == "nb" and r["method"] == "nbvae"
                  and "error" not in r):
            p = r["phase_seconds"]
            tl = sum(t["seconds"] for t in r["trains"])
            rest = r["seconds"] - sum(p.get(k, 0.0) for k in (
                "model_init", "fit", "transform", "outlier_score"))
            L.append(f"| {r['n']:,} | {r['seconds']:.1f} | {p.get('model_init', 0):.1f} | "
                     f"{p.get('fit', 0):.1f} | {tl:.1f} | {p.get('validation', 0):.1f} | "
                     f"{p.get('transform', 0):.1f} | {p.get('outlier_score', 0):.1f} | {rest:.1f} |")
        L.append("")
        for r in (r for r in nb if r["kind"] == "nb" and "error" in r):
            L.append(f"- {r['method']} n {r['n']:,}: **{r['error']}** (child wall "
                     f"{r['child_wall_s']:.0f} s). " + progress_text(r))
        for r in (r for r in nb if r["kind"] == "nb" and "error" not in r):
            if r["method"] == "nbvae":
                t = r["trains"][0] if r["trains"] else {}
                L.append(f"- NB-VAE n {r['n']:,}: {r['epochs']} epochs (max "
                         f"{r.get('default_max_epochs')}), {r['steps']:,} steps, "
                         f"{t.get('steps', 0) / max(1, t.get('seconds', 1)):.1f} steps/s in the "
                         f"train loop; data load {r['load_s']:.0f} s (peak RSS after load "
                         f"{r['peak_rss_load_mib']:,.0f} MiB); k-means {r['kmeans_s']:.0f} s.")
            else:
                L.append(f"- SCVI n {r['n']:,}: {r['epochs']} epochs, median "
                         f"{r['epoch_s_median']:.1f} s/epoch, setup {r['setup_s']:.1f} s, "
                         f"latent {r['latent_s']:.1f} s"
                         + (f"; its default {r['default_epochs']} epochs would take about "
                            f"{r['extrapolated_default_s']:.0f} s (extrapolated from the median "
                            "epoch, not measured)" if "extrapolated_default_s" in r else "")
                         + ".")
        for n in sorted({r["n"] for r in nb if r["kind"] == "nb"}):
            c = next((r for r in nb if r["kind"] == "nb" and r["n"] == n
                      and r["method"] == "nbvae" and "error" not in r), None)
            s = next((r for r in nb if r["kind"] == "nb" and r["n"] == n
                      and r["method"] == "scvi" and "error" not in r), None)
            if c and s:
                line = (f"- n {n:,}: SCVI / cellvi wall-clock {s['seconds'] / c['seconds']:.2f} "
                        f"as run ({s['epochs']} SCVI epochs)")
                if "extrapolated_default_s" in s:
                    line += (f"; {s['extrapolated_default_s'] / c['seconds']:.2f} with SCVI's "
                             "default epochs extrapolated")
                L.append(line + ".")
    if notes:
        L += ["", "## Notes", "", notes.strip()]
    return "\n".join(L) + "\n"


def projected_seconds(r: dict) -> float | None:
    """A killed NB child's projected call time: the end of transform + the outlier pass at
    the rate its progress lines show (``None`` without them)."""
    prog = r.get("progress") or []
    t0 = next((e["t"] for e in prog if e["event"] == "end" and e["label"] == "transform"), None)
    last = [e for e in prog if e["event"] == "elbo_batches"]
    if t0 is None or not last:
        return None
    return t0 + (last[-1]["t"] - t0) * r["n"] / last[-1]["cells"]


def progress_text(r: dict) -> str:
    """What a killed child had done, from its progress lines."""
    prog = r.get("progress") or []
    if not prog:
        return "No progress was recorded."
    parts, t_outlier0 = [], None
    for e in prog:
        if e["event"] == "start":
            parts.append(f"data loaded in {e.get('load_s', 0):.0f} s")
        elif e["event"] == "train_end":
            parts.append(f"train loop '{e['desc']}' {e['epochs']} epochs / {e['steps']:,} steps "
                         f"in {e['seconds']:.1f} s")
        elif e["event"] == "end":
            parts.append(f"{e['label']} ended at {e['t']:.1f} s ({e['seconds']:.1f} s; peak RSS "
                         f"{e['peak_rss_mib']:,.0f} MiB)")
            if e["label"] == "transform":
                t_outlier0 = e["t"]
    last = [e for e in prog if e["event"] == "elbo_batches"]
    if last and t_outlier0 is not None:
        e = last[-1]
        el = e["t"] - t_outlier0
        parts.append(f"outlier score (per-cell ELBO, 8 samples): {e['cells']:,} of {r['n']:,} "
                     f"cells in {el:.0f} s by {e['t']:.0f} s into the call, i.e. "
                     f"{e['cells'] / el:,.0f} cells/s: the whole pass would take about "
                     f"{el * r['n'] / e['cells']:.0f} s and the call about "
                     f"{t_outlier0 + el * r['n'] / e['cells']:.0f} s (projected, not measured); "
                     f"peak RSS by then {e['peak_rss_mib']:,.0f} MiB")
    return "; ".join(parts) + "."


def plot(meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = [r for r in meta["results"] if r["kind"] in ("cyto", "nb") and "error" not in r]
    series = {}
    for r in R:
        name = {"flowsom": "FlowSOM " + ("K=10" if r.get("setting") == "default" else "K=6"),
                "cellvi": "cellvi GMVAE (cytometry)", "nbvae": "cellvi NB-VAE (2,000 genes)",
                "scvi": "SCVI (2,000 genes, capped epochs)"}[r["method"]]
        series.setdefault(name, {}).setdefault(r["n"], []).append(r["seconds"])
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    colours = {}
    for name, pts in series.items():
        ns = sorted(pts)
        line, = ax.plot(ns, [np.mean(pts[n]) for n in ns], "o-", label=name)
        colours[name] = line.get_color()
        for n in ns:
            ax.scatter([n] * len(pts[n]), pts[n], s=8, color="grey", zorder=3)
    # not measured: a killed NB-VAE's projection, SCVI's default epochs extrapolated
    for r in meta["results"]:
        if r["kind"] != "nb":
            continue
        if r["method"] == "nbvae" and "error" in r and projected_seconds(r):
            name = "cellvi NB-VAE (2,000 genes)"
            y, lab = projected_seconds(r), f"NB-VAE {r['n']:,}: killed, projected"
        elif r["method"] == "scvi" and "extrapolated_default_s" in r:
            name = "SCVI (2,000 genes, capped epochs)"
            y, lab = r["extrapolated_default_s"], "SCVI default epochs, extrapolated"
        else:
            continue
        c = colours.get(name, "black")
        ax.scatter([r["n"]], [y], s=50, facecolors="none", edgecolors=c, zorder=4, label=lab)
        if name in series and min(series[name]) < r["n"]:
            n0 = max(n for n in series[name] if n < r["n"])
            ax.plot([n0, r["n"]], [np.mean(series[name][n0]), y], "--", color=c)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cells / events")
    ax.set_ylabel("wall-clock seconds (one thread)")
    ax.set_title(f"scaling, git {meta['git']['head']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--cyto-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--cyto-seeds", type=int, nargs="+", default=[0], help="below --large")
    p.add_argument("--cyto-seeds-large", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--flowsom-settings", nargs="+", default=["default", "K"])
    p.add_argument("--nb-sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--scvi-sizes", type=int, nargs="*", default=[])
    p.add_argument("--scvi-epochs", type=int, default=None,
                   help="cap SCVI's epochs (default: its own default)")
    p.add_argument("--cache", default="/tmp/cellvi_scaling_cache")
    p.add_argument("--rss-limit-mib", type=float, default=10_000)
    p.add_argument("--child-timeout", type=float, default=1000,
                   help="seconds per method child (data load included)")
    p.add_argument("--gen-timeout", type=float, default=1800, help="seconds per data child")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny n, seed 0")
    p.add_argument("--code-rev", default="HEAD", help="the git revision whose cellvi/ is run")
    p.add_argument("--resume", help="add to this results JSON, running only the jobs it lacks "
                   "(written to --out; the runs are listed in its header)")
    p.add_argument("--retry-errors", action="store_true",
                   help="with --resume: also rerun the jobs that ended in an error")
    p.add_argument("--render", help="re-render the markdown/png from a results JSON")
    p.add_argument("--notes", help="a text file appended to the markdown as Notes (--render)")
    args = p.parse_args()
    if args.child:
        child_main(args.child, args.child_out)
        return
    if args.render:
        meta = json.loads(Path(args.render).read_text())
        if args.notes:
            meta["notes"] = Path(args.notes).read_text()
        notes = meta.get("notes")
        src = Path(args.render)
        write(meta, src.parent, src.stem, notes)
        return
    if args.quick:
        args.cyto_sizes, args.nb_sizes = [4000, 8000], [4000]
        args.cyto_seeds = args.cyto_seeds_large = [0]
        args.large = 8000
        args.scvi_sizes = [4000] if args.scvi_sizes else []
        args.cyto_seeds_large = [0, 1]
        args.scvi_epochs = 2
        args.cache = args.cache + "_quick"
    parent_main(args)


if __name__ == "__main__":
    main()
