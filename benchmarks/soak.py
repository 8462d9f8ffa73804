"""Soak benchmark (not a test): NB-VAE training on many cells over the full default schedule,
with the process's resident memory (RSS) sampled through every epoch. No growth expected.

Data: the counts of ``cellvi.datasets.synthetic_counts(n_cells, 2000, n_groups=5, n_batches=2,
mean_library=470, seed=0)`` (about 10% non-zeros, the settings of ``speed_nbvae.py``), built
here in blocks of rows: the function itself holds several dense float64 cells x genes arrays at
once (16 GB each at 1M cells), far beyond this machine's memory. The block version draws the
same random numbers in the same order (the gamma draws of every block from one copy of the
generator, the Poisson draws from a second copy advanced past all the gamma draws), so its
AnnData is identical to the function's; for ``n_cells <= 50,000`` the script checks that at the
end, against the function itself.

Model: ``cellvi.models.NBVAE(adata, batch_key="batch").fit(verbose=False, seed=0,
callbacks=[sampler])`` with the default schedule (``max_epochs=None``: about 6,000 steps,
clipped to 10..400 epochs; 10 at 1M cells), on one thread. A ``cellvi.train.Callback`` reads
``VmRSS``, ``RssAnon``, ``RssFile`` and ``VmHWM`` of ``/proc/self/status`` at
``on_epoch_start``, ``on_epoch_end`` (after the optimiser steps) and ``on_validation_end`` of
every epoch, with wall-clock stamps; ``VmHWM`` (peak RSS) is reset (``/proc/self/clear_refs``)
before fit and after each validation, so each epoch's peak covers the time since the previous
one. A background thread also samples RSS every ``--interval`` seconds for the plot. RSS is
also recorded after the imports, after the data, after building the model, after fit and after
``model.transform(adata)`` (the latent of all cells).

Usage (from the repository root)::

    python benchmarks/soak.py --n-cells 1000000 --out benchmarks/results   # the defaults
    python benchmarks/soak.py --n-cells 20000 --out /tmp/soak_smoke         # smoke test

Writes ``soak.json`` (every sample, settings, timings, versions), ``soak.md`` (the per-epoch
table and the verdict) and ``soak_rss.png`` (RSS over time, epoch boundaries marked) to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import _single_thread  # noqa: F401  (pins every thread pool to one thread; import first)
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from _common import git_state, log, versions

import cellvi
import cellvi.models
import cellvi.train

torch.set_num_threads(1)

N_GENES = 2000
N_GROUPS = 5
N_BATCHES = 2
MEAN_LIBRARY = 470.0  # about 10% non-zeros with 2,000 genes (as in speed_nbvae.py)
CHECK_MAX_CELLS = 50_000  # compare with cellvi.datasets.synthetic_counts up to this size
T0 = time.perf_counter()


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------
def memory() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0  # kB
    return dict(rss_mib=out["VmRSS"], anon_mib=out.get("RssAnon", float("nan")),
                file_mib=out.get("RssFile", float("nan")), hwm_mib=out["VmHWM"])


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def sample(event: str, **extra) -> dict:
    return dict(event=event, t=time.perf_counter() - T0, **extra, **memory())


class RSSCallback(cellvi.train.Callback):
    """RSS at the start and end of each epoch's steps and after its validation."""

    def __init__(self):
        self.samples: list[dict] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.samples.append(sample("epoch_start", epoch=epoch))

    def on_epoch_end(self, epoch: int, history: dict) -> None:
        self.samples.append(sample("epoch_end", epoch=epoch))

    def on_validation_end(self, epoch: int, history: dict) -> None:
        self.samples.append(sample("validation_end", epoch=epoch,
                                   train_elbo=float(history["train_elbo"][-1]),
                                   validation_elbo=float(history["validation_elbo"][-1])))
        reset_peak()


class Poller(threading.Thread):
    """RSS every ``interval`` seconds, for the plot."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            m = memory()
            self.samples.append((time.perf_counter() - T0, m["rss_mib"], m["anon_mib"]))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
def synthetic_counts_blocks(n_cells: int, n_genes: int, *, n_groups: int, n_batches: int,
                            mean_library: float, seed: int, batch_strength: float = 1.0,
                            group_strength: float = 1.0, dispersion: float = 5.0,
                            block: int = 20_000):
    """``cellvi.datasets.synthetic_counts`` with the same arguments, built ``block`` rows at
    a time (same random numbers, same AnnData), so that the dense arrays stay small."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, n_genes)
    group_lfc = rng.normal(0.0, 2.0 * group_strength, (n_groups, n_genes)) * (
        rng.random((n_groups, n_genes)) < 0.2
    )
    batch_lfc = rng.normal(0.0, batch_strength, (n_batches, n_genes))
    group = rng.integers(0, n_groups, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    library = np.exp(rng.normal(np.log(mean_library), 0.3, n_cells))

    def clone(gen):
        out = np.random.Generator(type(gen.bit_generator)())
        out.bit_generator.state = gen.bit_generator.state
        return out

    def mu(lo: int, hi: int) -> np.ndarray:
        logits = base + group_lfc[group[lo:hi]] + batch_lfc[batch[lo:hi]]
        props = np.exp(logits - logits.max(1, keepdims=True))
        props /= props.sum(1, keepdims=True)
        return props * library[lo:hi, None]

    starts = range(0, n_cells, block)
    # The function draws all gamma variates, then all Poisson ones, from one stream: the
    # gamma draws come from a copy of the stream here, the Poisson draws from a second copy
    # that is first advanced past every gamma draw.
    gamma_rng, poisson_rng = clone(rng), rng
    for lo in starts:
        poisson_rng.gamma(dispersion, mu(lo, min(lo + block, n_cells)) / dispersion)
    data, indices, row_nnz = [], [], []
    for lo in starts:
        hi = min(lo + block, n_cells)
        counts = poisson_rng.poisson(gamma_rng.gamma(dispersion, mu(lo, hi) / dispersion))
        part = sp.csr_matrix(counts.astype(np.float32))
        del counts
        data.append(part.data)
        indices.append(part.indices)
        row_nnz.append(np.diff(part.indptr))
    nnz = sum(len(d) for d in data)
    index_dtype = np.int32 if max(nnz, n_genes) < 2**31 else np.int64
    indptr = np.zeros(n_cells + 1, dtype=index_dtype)
    np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    data = np.concatenate(data)
    indices = np.concatenate(indices).astype(index_dtype, copy=False)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes), copy=False)
    del data, indices, indptr
    adata = ad.AnnData(X)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["group"] = pd.Categorical([f"g{g}" for g in group])
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    adata.obs["library"] = np.asarray(X.sum(1)).ravel()
    adata.layers["counts"] = X.copy()
    adata.uns["simulation"] = dict(n_groups=n_groups, n_batches=n_batches,
                                   batch_strength=batch_strength, group_strength=group_strength,
                                   dispersion=dispersion, seed=seed)
    return adata


def same_as_cellvi(adata, n_cells: int) -> dict:
    """Compare with ``cellvi.datasets.synthetic_counts`` itself (small sizes only)."""
    ref = cellvi.datasets.synthetic_counts(n_cells, N_GENES, n_groups=N_GROUPS,
                                           n_batches=N_BATCHES, mean_library=MEAN_LIBRARY,
                                           seed=0)
    checks = {}
    for name, a, b in (("X", adata.X, ref.X), ("counts", adata.layers["counts"],
                                                 ref.layers["counts"])):
        checks[name] = bool(a.shape == b.shape and a.dtype == b.dtype
                            and a.indices.dtype == b.indices.dtype
                            and np.array_equal(a.indptr, b.indptr)
                            and np.array_equal(a.indices, b.indices)
                            and np.array_equal(a.data, b.data))
    checks["obs"] = bool(adata.obs.equals(ref.obs))
    checks["obs_names"] = bool(adata.obs_names.equals(ref.obs_names))
    checks["var_names"] = bool(adata.var_names.equals(ref.var_names))
    checks["uns"] = adata.uns["simulation"] == ref.uns["simulation"]
    checks["all"] = all(checks.values())
    return checks


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def epoch_rows(samples: list[dict]) -> list[dict]:
    by = {}
    for s in samples:
        by.setdefault(s["epoch"], {})[s["event"]] = s
    rows = []
    for epoch in sorted(by):
        e = by[epoch]
        start, end, val = e.get("epoch_start"), e.get("epoch_end"), e.get("validation_end")
        if not (start and end and val):
            continue
        rows.append(dict(epoch=epoch + 1, start_t=start["t"], seconds=val["t"] - start["t"],
                         train_seconds=end["t"] - start["t"],
                         validation_seconds=val["t"] - end["t"],
                         rss_start_mib=start["rss_mib"], rss_steps_end_mib=end["rss_mib"],
                         rss_end_mib=val["rss_mib"], anon_end_mib=val["anon_mib"],
                         peak_mib=val["hwm_mib"], validation_elbo=val["validation_elbo"]))
    return rows


def growth(rows: list[dict], key: str) -> dict:
    first, last = rows[0][key], rows[-1][key]
    out = dict(first_mib=first, last_mib=last, mib=last - first,
               percent=100.0 * (last - first) / first)
    if len(rows) >= 3:  # least-squares slope over epochs 2..N (epoch 1 warms up)
        x = np.array([r["epoch"] for r in rows[1:]], float)
        y = np.array([r[key] for r in rows[1:]], float)
        out["slope_mib_per_epoch_from_2"] = float(np.polyfit(x, y, 1)[0])
    return out


def plot(path: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    poll = np.array(res["poll"]) if res["poll"] else np.zeros((0, 3))
    rows = res["epochs"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(11, 8), height_ratios=(3, 2))
    if len(poll):
        ax.plot(poll[:, 0], poll[:, 1], lw=1.2, color="C0", label="RSS (polled)")
        ax.plot(poll[:, 0], poll[:, 2], lw=0.8, color="C2", alpha=0.7, label="RssAnon (polled)")
    for i, r in enumerate(rows):
        ax.axvline(r["start_t"], color="grey", lw=0.6, ls=":",
                   label="epoch start" if i == 0 else None)
        ax.axvspan(r["start_t"] + r["train_seconds"], r["start_t"] + r["seconds"],
                   color="orange", alpha=0.25, lw=0, label="validation" if i == 0 else None)
    ends = [(r["start_t"] + r["seconds"], r["rss_end_mib"]) for r in rows]
    if ends:
        ax.plot(*zip(*ends, strict=True), "o", ms=4, color="C3", label="RSS at epoch end")
    for i, s in enumerate(res["phases"]):
        ax.plot(s["t"], s["rss_mib"], "k.", ms=5)
        ax.annotate(s["event"], (s["t"], s["rss_mib"]), textcoords="offset points",
                    xytext=(4, -14 - 10 * (i % 3)), fontsize=7)
    if 1 < len(rows) <= 40:
        for r in rows:
            ax.text(r["start_t"] + r["seconds"] / 2, 0.02, str(r["epoch"]),
                    transform=ax.get_xaxis_transform(), ha="center", fontsize=7, color="grey")
    ax.set_xlabel("seconds since the start of the process (grey numbers: epochs)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"cellvi NBVAE soak: {res['n_cells']:,} cells x {res['n_genes']:,} genes, "
                 f"{res['n_epochs']} epochs, 1 thread")
    ax.legend(loc="lower right", fontsize=8)
    epochs = [r["epoch"] for r in rows]
    bx.plot(epochs, [r["rss_end_mib"] for r in rows], "o-", ms=3, color="C3",
            label="RSS at epoch end")
    bx.plot(epochs, [r["rss_steps_end_mib"] for r in rows], "s--", ms=2, lw=0.8, color="C0",
            label="RSS after the steps (before validation)")
    bx.plot(epochs, [r["peak_mib"] for r in rows], "^:", ms=2, lw=0.8, color="C1",
            label="peak RSS in the epoch")
    bx.set_xlabel("epoch")
    bx.set_ylabel("MiB (zoomed)")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict) -> str:
    rows, g = res["epochs"], res["growth"]
    ph = {s["event"]: s for s in res["phases"]}
    d = res["data"]
    L = ["# Soak: NB-VAE training, RSS through the full default schedule", ""]
    L.append(f"Made by `{res['command']}`, started {res['git']['time']}, took "
             f"{res['total_seconds'] / 60:.1f} min.")
    L.append("")
    if res.get("note"):
        L += [f"**{res['note']}**", ""]
    v = res["versions"]
    L.append(f"- Machine: `nproc` = {os.cpu_count()}, {res['mem_total_gib']:.0f} GiB RAM, "
             f"{res['platform']}; shared with other work. Load average (1, 5, 15 min): start "
             f"{res['loadavg_start']}, end {res['loadavg_end']}")
    L.append(f"- Versions: Python {v['python']}, torch {v['torch']}, cellvi {v['cellvi']} "
             f"(git {res['git']['head']}, uncommitted changes under `cellvi/`: "
             f"{'yes' if res['git']['cellvi_dirty'] else 'no'}; the modules were imported at the "
             f"start), anndata {v['anndata']}, numpy {v['numpy']}, scipy {v['scipy']}")
    L.append(f"- One thread: `benchmarks/_single_thread.py`, `torch.set_num_threads(1)`; "
             f"CPU time / wall time over fit {res['fit_cpu_util']:.2f}")
    L.append("")
    L.append("## Data")
    L.append("")
    L.append(f"The counts of `cellvi.datasets.synthetic_counts({res['n_cells']}, {res['n_genes']}, "
             f"n_groups={N_GROUPS}, n_batches={N_BATCHES}, mean_library={MEAN_LIBRARY:g}, "
             f"seed=0)`: CSR float32 in `X` and a copy in `layers['counts']`, as the function "
             f"returns them. The function holds several dense float64 cells x genes arrays at "
             f"once (16 GB each at 1M cells), so the script builds the same AnnData in blocks of "
             f"rows with the same random draws (`synthetic_counts_blocks` in `soak.py`).")
    if d.get("identical_to_cellvi") is not None:
        L.append(f" Compared with the function itself at this size: identical = "
                 f"{d['identical_to_cellvi']['all']} ({d['identical_to_cellvi']}).")
    else:
        L.append(f" (The script compares the two byte for byte for n_cells <= "
                 f"{CHECK_MAX_CELLS:,}; they were identical in the 20,000-cell smoke run.)")
    L.append("")
    L.append(f"{d['nnz']:,} non-zeros ({d['nonzero_fraction']:.4f}), mean library "
             f"{d['mean_library']:.0f}, built in {d['seconds']:.0f} s; X is "
             f"{d['x_mib']:.0f} MiB (data + indices + indptr), with the `counts` copy "
             f"{2 * d['x_mib']:.0f} MiB.")
    L.append("")
    L.append("## RSS by phase")
    L.append("")
    L.append("| point | seconds since start | RSS MiB | RssAnon MiB | peak RSS since the last "
             "reset MiB |")
    L.append("|---|---:|---:|---:|---:|")
    for s in res["phases"]:
        L.append(f"| {s['event']} | {s['t']:.0f} | {s['rss_mib']:,.0f} | {s['anon_mib']:,.0f} | "
                 f"{s['hwm_mib']:,.0f} |")
    L.append("")
    L.append("Peak RSS (`VmHWM`) was reset after the data were built, before fit, after every "
             "validation and before transform.")
    first_start = min(s["t"] for s in res["callback_samples"] if s["event"] == "epoch_start")
    setup = [p for p in res["poll"] if ph["before fit"]["t"] <= p[0] <= first_start]
    if setup:
        top = max(p[1] for p in setup)
        L.append("")
        L.append(f"Transient peaks: `NBVAE(adata, ...)` {ph['after NBVAE()']['hwm_mib']:,.0f} MiB "
                 f"({ph['after NBVAE()']['hwm_mib'] - ph['after data']['rss_mib']:+,.0f} over "
                 f"the data); the setup of fit before the first step (polled) {top:,.0f} MiB "
                 f"({top - ph['before fit']['rss_mib']:+,.0f} over the RSS before fit). So epoch "
                 f"1's *peak* below includes that setup; epochs 2.. do not.")
    L.append("")
    L.append("## Per epoch")
    L.append("")
    L.append(f"`NBVAE(adata, batch_key=\"batch\").fit(verbose=False, seed=0)`: the default "
             f"schedule chose {res['max_epochs_default']} epochs; {res['n_epochs']} ran "
             f"(batch size 512, 10% validation, early stopping on). Epochs are numbered from 1. "
             f"*seconds* = `on_epoch_start` to `on_validation_end` (steps + validation); "
             f"*RSS at epoch end* = at `on_validation_end`; *after steps* = at `on_epoch_end` "
             f"(before validation); *peak* = `VmHWM` since the previous validation ended.")
    L.append("")
    L.append("| epoch | seconds (steps + validation) | RSS at start MiB | after steps MiB | "
             "RSS at epoch end MiB | change from epoch 1 MiB | RssAnon at end MiB | peak MiB | "
             "validation ELBO |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = rows[0]["rss_end_mib"]
    for r in rows:
        L.append(f"| {r['epoch']} | {r['seconds']:.1f} ({r['train_seconds']:.1f} + "
                 f"{r['validation_seconds']:.1f}) | {r['rss_start_mib']:,.0f} | "
                 f"{r['rss_steps_end_mib']:,.0f} | {r['rss_end_mib']:,.1f} | "
                 f"{r['rss_end_mib'] - first:+,.1f} | {r['anon_end_mib']:,.0f} | "
                 f"{r['peak_mib']:,.0f} | {r['validation_elbo']:.2f} |")
    L.append("")
    slope = g.get("slope_mib_per_epoch_from_2")
    L.append(f"**RSS grew by {g['mib']:.1f} MiB ({g['percent']:.2f}%) from the end of epoch 1 to "
             f"the end of the last epoch ({rows[-1]['epoch']})** ({g['first_mib']:,.1f} -> "
             f"{g['last_mib']:,.1f} MiB)."
             + (f" Least-squares slope of RSS at epoch end over epochs 2..{rows[-1]['epoch']}: "
                f"{slope:+.2f} MiB/epoch." if slope is not None else ""))
    ga = res["growth_anon"]
    gs = res["growth_after_steps"]
    L.append("")
    L.append(f"The same for RssAnon (anonymous memory, what a leak would grow): {ga['mib']:+.1f} "
             f"MiB ({ga['percent']:+.2f}%); for RSS after the steps (before validation): "
             f"{gs['mib']:+.1f} MiB ({gs['percent']:+.2f}%).")
    L.append("")
    L.append(f"fit took {res['fit_seconds']:.0f} s; transform (latent of all "
             f"{res['n_cells']:,} cells) {res['transform_seconds']:.1f} s. RSS after fit "
             f"{ph['after fit']['rss_mib']:,.0f} MiB, after transform "
             f"{ph['after transform']['rss_mib']:,.0f} MiB.")
    L.append("")
    L.append("![RSS over time](soak_rss.png)")
    L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polled samples")
    p.add_argument("--block", type=int, default=20_000, help="rows per data block")
    p.add_argument("--note", default="", help="a line to put at the top of soak.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/soak.py " + " ".join(shlex.quote(a) for a in
                                                      (argv or sys.argv[1:]))
    git = git_state()
    load_start = [round(x, 2) for x in os.getloadavg()]
    poller = Poller(args.interval)
    poller.start()
    phases = [sample("after imports")]
    log(f"soak: {args.n_cells:,} cells, RSS {phases[0]['rss_mib']:.0f} MiB")

    t = time.perf_counter()
    reset_peak()
    adata = synthetic_counts_blocks(args.n_cells, N_GENES, n_groups=N_GROUPS,
                                    n_batches=N_BATCHES, mean_library=MEAN_LIBRARY, seed=0,
                                    block=args.block)
    X = adata.X
    data = dict(seconds=time.perf_counter() - t, nnz=int(X.nnz),
                nonzero_fraction=float(X.nnz / (X.shape[0] * X.shape[1])),
                mean_library=float(adata.obs["library"].mean()),
                x_mib=(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20,
                index_dtype=str(X.indices.dtype),
                batch_counts={str(k): int(v) for k, v in adata.obs["batch"].value_counts().items()})
    del X
    phases.append(sample("after data"))
    log(f"data: {data['nnz']:,} non-zeros ({data['nonzero_fraction']:.4f}) in "
        f"{data['seconds']:.0f} s; RSS {phases[-1]['rss_mib']:.0f} MiB "
        f"(peak {phases[-1]['hwm_mib']:.0f})")

    reset_peak()
    model = cellvi.models.NBVAE(adata, batch_key="batch")
    phases.append(sample("after NBVAE()"))
    callback = RSSCallback()
    max_epochs_default = cellvi.train.default_max_epochs(args.n_cells, 512)
    log(f"fit: default schedule {max_epochs_default} epochs")
    reset_peak()
    phases.append(sample("before fit"))
    t, cpu = time.perf_counter(), time.process_time()
    model.fit(verbose=False, seed=0, callbacks=[callback])
    fit_seconds = time.perf_counter() - t
    fit_cpu_util = (time.process_time() - cpu) / fit_seconds
    phases.append(sample("after fit"))
    rows = epoch_rows(callback.samples)
    log(f"fit: {len(rows)} epochs in {fit_seconds:.0f} s; RSS {phases[-1]['rss_mib']:.0f} MiB")

    reset_peak()
    t = time.perf_counter()
    latent = model.transform(adata)
    transform_seconds = time.perf_counter() - t
    phases.append(sample("after transform"))
    z = np.asarray(latent.latent)
    log(f"transform: {z.shape} in {transform_seconds:.1f} s; "
        f"RSS {phases[-1]['rss_mib']:.0f} MiB")
    poller.stop()

    if args.n_cells <= CHECK_MAX_CELLS:
        data["identical_to_cellvi"] = same_as_cellvi(adata, args.n_cells)
        log(f"same as cellvi.datasets.synthetic_counts: {data['identical_to_cellvi']}")
    else:
        data["identical_to_cellvi"] = None

    with open("/proc/meminfo") as fh:
        mem_total = int(fh.readline().split()[1]) / 2**20
    res = dict(
        command=command, n_cells=args.n_cells, n_genes=N_GENES,
        settings=dict(n_groups=N_GROUPS, n_batches=N_BATCHES, mean_library=MEAN_LIBRARY, seed=0,
                      batch_key="batch", fit=dict(verbose=False, seed=0, max_epochs=None),
                      poll_interval_s=args.interval, block=args.block, threads=1),
        note=args.note, git=git, versions=versions(["torch", "cellvi", "anndata", "numpy",
                                                    "scipy", "pandas"]),
        platform=platform.platform(), mem_total_gib=mem_total,
        loadavg_start=load_start, loadavg_end=[round(x, 2) for x in os.getloadavg()],
        data=data, max_epochs_default=max_epochs_default, n_epochs=len(rows),
        history_epochs=len(model.history["epoch"]), latent_shape=list(z.shape),
        latent_finite=bool(np.isfinite(z).all()),
        fit_seconds=fit_seconds, fit_cpu_util=fit_cpu_util, transform_seconds=transform_seconds,
        total_seconds=time.perf_counter() - T0,
        epochs=rows, growth=growth(rows, "rss_end_mib"), growth_anon=growth(rows, "anon_end_mib"),
        growth_after_steps=growth(rows, "rss_steps_end_mib"),
        phases=phases, callback_samples=callback.samples,
        poll=[list(s) for s in poller.samples],
    )
    (out / "soak.json").write_text(json.dumps(res, indent=1))
    plot(out / "soak_rss.png", res)
    (out / "soak.md").write_text(markdown(res))
    g = res["growth"]
    log(f"RSS grew by {g['mib']:.1f} MiB ({g['percent']:.2f}%) from the end of epoch 1 to the "
        f"end of epoch {rows[-1]['epoch']}; wrote {out}/soak.md, .json, _rss.png")


if __name__ == "__main__":
    main()
