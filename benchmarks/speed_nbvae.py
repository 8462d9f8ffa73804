"""Speed benchmark: cellvi ``NBVAE`` vs scvi-tools ``SCVI`` with the same architecture.

Both tools train an NB VAE (n_hidden=128, n_latent=10, n_layers=1, one batch covariate with
two categories) on the same synthetic CSR float32 counts (``cellvi.datasets.synthetic_counts``,
about 10% non-zeros). Every training runs in its own fresh subprocess, so that

* the torch thread count and ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``
  are set identically for both tools before torch is imported, and
* the peak memory is the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

Per-epoch timing (one-off setup and the first epoch are excluded):

* cellvi: ``cellvi.train.train`` validates once at the end of every epoch (validation ELBO on
  the 10% held-out split), between the ``on_epoch_end`` and ``on_validation_end`` hooks of its
  callbacks. A ``cellvi.train.Callback`` passed through ``NBVAE.fit(callbacks=[...])`` stamps
  both hooks: the training part of epoch k >= 1 runs from the end of the validation of epoch
  k-1 to the start of the validation of epoch k; the wall time per epoch includes the
  validation.
* scvi-tools: a Lightning callback records ``on_train_epoch_start`` and the last
  ``on_train_batch_end`` of each epoch (training part) and ``on_train_epoch_end`` (wall).
  With ``early_stopping=False`` scvi-tools runs no validation by default.

Epoch 0 is a warm-up in both tools; cells/s = training cells actually seen in epochs
1..E-1 / the training time of those epochs (cellvi: 0.9 n cells per epoch, validation cells
are not counted; scvi-tools: 0.9 n too, ``train_size=0.9``). The peers are interleaved
(cellvi, scvi bs=128, scvi bs=512, cellvi, ...) and repeated; ratios are computed within a
repeat, and medians are reported.

Usage::

    python benchmarks/speed_nbvae.py [--sizes 10000 50000] [--epochs 5] [--threads 1]
                                     [--repeats 3] [--out benchmarks/results]

``--threads 2 1`` also runs a 2-thread block (blocks run in the order given; put 2 first, so
that it starts on a quiet machine); a block with more than one thread is skipped (and said so)
when the 1-minute load average is >= 0.5 when it would start, because torch with 2 threads on
a 2-core machine that is busy elsewhere becomes many times slower (``--force-threads``
overrides). Import times and the profile use the smallest thread count given.

The cellvi package is copied into the scratch folder at the start and every child imports that
copy, so edits to the working tree during a run cannot mix code versions; the markdown records
the git commit and whether the tree had uncommitted changes. ``--render RESULTS.json`` rewrites
the markdown from a results JSON without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_GENES = 2000
MEAN_LIBRARY = 470.0  # gives about 10% non-zeros with 2,000 genes
ARCH = dict(n_hidden=128, n_latent=10, n_layers=1)
VALIDATION_FRACTION = 0.1  # cellvi's default; scvi's default train_size=0.9


# ----------------------------------------------------------------------------------------
# child modes (each runs in its own fresh interpreter)
# ----------------------------------------------------------------------------------------
def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_generate(args) -> dict:
    import numpy as np

    import cellvi

    adata = cellvi.datasets.synthetic_counts(args.n_cells, N_GENES, n_batches=2,
                                             mean_library=MEAN_LIBRARY, seed=0)
    del adata.layers["counts"]  # X holds the same counts
    adata.X = adata.X.astype(np.float32)
    adata.write_h5ad(args.h5ad)
    X = adata.X
    return dict(n_cells=int(X.shape[0]), n_genes=int(X.shape[1]), nnz=int(X.nnz),
                nonzero_fraction=float(X.nnz / (X.shape[0] * X.shape[1])),
                format=type(X).__name__, dtype=str(X.dtype),
                mean_library=float(np.asarray(X.sum(1)).mean()),
                batch_counts={str(k): int(v) for k, v in adata.obs["batch"].value_counts().items()})


def _load(h5ad: str):
    import anndata as ad

    adata = ad.read_h5ad(h5ad)
    return adata


def _summarise(train_s, wall_s, cpu_s, cells, extra) -> dict:
    """Per-epoch lists (epoch 0 = warm-up, excluded) -> throughput numbers."""
    meas = slice(1, None)
    t_train = sum(train_s[meas])
    return dict(
        epochs=len(train_s),
        train_s_per_epoch=train_s,
        wall_s_per_epoch=wall_s,
        cells_per_epoch=cells,
        measured_epochs=len(train_s[meas]),
        train_cells_per_s=sum(cells[meas]) / t_train if t_train > 0 else float("nan"),
        train_s_per_epoch_median=statistics.median(train_s[meas]),
        wall_s_per_epoch_median=statistics.median(wall_s[meas]),
        # process CPU time / wall time during the measured training windows: ~threads when the
        # process had its cores to itself, lower when something else competed for them
        cpu_util=sum(cpu_s[meas]) / t_train if t_train > 0 else float("nan"),
        **extra,
    )


def child_train_cellvi(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import cellvi
    import cellvi.train as ctrain

    adata = _load(args.h5ad)
    rss_loaded = _maxrss_mib()
    n = adata.n_obs

    marks = []  # (kind, perf_counter, process_time)

    class ValidationTimer(ctrain.Callback):
        """Validation runs right after ``on_epoch_end`` and ends at ``on_validation_end``."""

        def on_epoch_end(self, epoch, history):
            marks.append(("val_start", time.perf_counter(), time.process_time()))

        def on_validation_end(self, epoch, history):
            marks.append(("val_end", time.perf_counter(), time.process_time()))

    t0 = time.perf_counter()
    model = cellvi.models.NBVAE(adata, batch_key="batch", likelihood="nb", **ARCH)
    t_fit = time.perf_counter()
    c_fit = time.process_time()
    model.fit(max_epochs=args.epochs, batch_size=args.batch_size, seed=0, device="cpu",
              verbose=False, early_stopping=False, callbacks=[ValidationTimer()])
    t_end = time.perf_counter()

    starts = [m for m in marks if m[0] == "val_start"]
    ends = [m for m in marks if m[0] == "val_end"]
    assert len(starts) == len(ends) == args.epochs, (len(starts), args.epochs)
    prev_t, prev_c = t_fit, c_fit  # epoch 0 "training" includes fit()'s setup
    train_s, wall_s, cpu_s, val_s = [], [], [], []
    for (_, ts, cs), (_, te, ce) in zip(starts, ends, strict=True):
        train_s.append(ts - prev_t)
        cpu_s.append(cs - prev_c)
        val_s.append(te - ts)
        wall_s.append(te - prev_t)
        prev_t, prev_c = te, ce
    n_val = int(round(VALIDATION_FRACTION * n))
    n_train = n - n_val
    return _summarise(train_s, wall_s, cpu_s, [n_train] * args.epochs, dict(
        tool="cellvi", cellvi_file=cellvi.__file__, batch_size=args.batch_size, n_cells=n,
        n_train=n_train, n_val=n_val,
        validation_each_epoch=True, val_s_per_epoch=val_s,
        build_s=t_fit - t0, fit_total_s=t_end - t_fit,
        torch_threads=torch.get_num_threads(),
        maxrss_after_load_mib=rss_loaded, maxrss_mib=_maxrss_mib(),
        final_train_elbo=model.history["train_elbo"][-1],
    ))


def child_train_scvi(args) -> dict:
    import logging
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import scvi
    from lightning.pytorch.callbacks import Callback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)  # in case importing scvi changed it
    scvi.settings.seed = 0

    adata = _load(args.h5ad)
    rss_loaded = _maxrss_mib()
    n = adata.n_obs

    class EpochTimer(Callback):
        def __init__(self):
            self.start, self.last_batch, self.end, self.cells = [], [], [], []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start.append((time.perf_counter(), time.process_time()))
            self.last_batch.append(None)
            self.cells.append(0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last_batch[-1] = (time.perf_counter(), time.process_time())
            self.cells[-1] += int(batch[scvi.REGISTRY_KEYS.X_KEY].shape[0])

        def on_train_epoch_end(self, trainer, pl_module):
            self.end.append((time.perf_counter(), time.process_time()))

    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, gene_likelihood="nb", **ARCH)
    timer = EpochTimer()
    t_fit = time.perf_counter()
    kw = {} if args.batch_size == 128 else {"batch_size": args.batch_size}
    model.train(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                early_stopping=False, callbacks=[timer], **kw)
    t_end = time.perf_counter()
    assert len(timer.start) == len(timer.end) == args.epochs
    train_s = [lb[0] - s[0] for s, lb in zip(timer.start, timer.last_batch, strict=True)]
    cpu_s = [lb[1] - s[1] for s, lb in zip(timer.start, timer.last_batch, strict=True)]
    wall_s = [e[0] - s[0] for s, e in zip(timer.start, timer.end, strict=True)]
    elbo = model.history.get("elbo_train")
    return _summarise(train_s, wall_s, cpu_s, timer.cells, dict(
        tool="scvi", batch_size=args.batch_size, n_cells=n, n_train=timer.cells[-1],
        n_val=int(len(model.validation_indices)) if model.validation_indices is not None else None,
        validation_each_epoch=False,
        build_s=t_fit - t0, fit_total_s=t_end - t_fit,
        torch_threads=torch.get_num_threads(),
        maxrss_after_load_mib=rss_loaded, maxrss_mib=_maxrss_mib(),
        final_train_elbo=float(elbo.iloc[-1, 0]) if elbo is not None else None,
    ))


def child_profile(args) -> dict:
    """Profile the training part of epoch 1 (epoch 0 is a warm-up) of a cellvi fit."""
    import cProfile
    import io
    import pstats

    import torch

    torch.set_num_threads(args.threads)
    import cellvi
    import cellvi.train as ctrain

    adata = _load(args.h5ad)
    state = {}
    if args.profiler == "torch":
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                      record_shapes=True)
    else:
        prof = cProfile.Profile()

    def start():
        if args.profiler == "torch":
            prof.start()
        else:
            prof.enable()

    def stop():
        if args.profiler == "torch":
            prof.stop()
        else:
            prof.disable()

    class EpochProfiler(ctrain.Callback):
        """Profiles the training part of epoch 1: from its start to its last optimiser step
        (``on_epoch_end`` comes before the validation)."""

        def on_epoch_start(self, epoch):
            if epoch == 1:
                state["t_start"] = time.perf_counter()
                start()

        def on_epoch_end(self, epoch, history):
            if epoch == 1:
                stop()
                state["t_stop"] = time.perf_counter()

    model = cellvi.models.NBVAE(adata, batch_key="batch", likelihood="nb", **ARCH)
    model.fit(max_epochs=2, batch_size=args.batch_size, seed=0, device="cpu", verbose=False,
              early_stopping=False, callbacks=[EpochProfiler()])
    wall = state["t_stop"] - state["t_start"]
    rows = []
    if args.profiler == "torch":
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]:
            rows.append(dict(name=e.key, self_ms=e.self_cpu_time_total / 1e3,
                             self_pct=100.0 * e.self_cpu_time_total / total, calls=e.count,
                             total_ms=e.cpu_time_total / 1e3))
        by_shape = prof.key_averages(group_by_input_shape=True)
        top_shapes = [dict(name=e.key, input_shapes=str(e.input_shapes),
                           self_ms=e.self_cpu_time_total / 1e3,
                           self_pct=100.0 * e.self_cpu_time_total / total, calls=e.count)
                      for e in sorted(by_shape, key=lambda e: e.self_cpu_time_total,
                                      reverse=True)[:15]]
        table = events.table(sort_by="self_cpu_time_total", row_limit=25)
        total_ms = total / 1e3
    else:
        top_shapes = None
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        total = st.total_tt
        for (file, line, func), (_cc, nc, tt, ct, _) in sorted(
                st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]:
            rows.append(dict(name=f"{Path(file).name}:{line}({func})", self_ms=tt * 1e3,
                             self_pct=100.0 * tt / total, calls=nc, total_ms=ct * 1e3))
        st.sort_stats("cumulative").print_stats(30)
        table = s.getvalue()
        total_ms = total * 1e3
    return dict(profiler=args.profiler, wall_s=wall, total_self_ms=total_ms, top=rows,
                top_by_input_shape=top_shapes,
                table=table, n_cells=adata.n_obs, batch_size=args.batch_size,
                threads=args.threads)


def child_import(args) -> dict:
    t = time.perf_counter()
    __import__(args.module)
    return dict(module=args.module, import_s=time.perf_counter() - t)


# ----------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------
SNAPSHOT_DIR: Path | None = None  # set by main(): a frozen copy of the cellvi package


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    if SNAPSHOT_DIR is not None:  # every child imports the same frozen copy of cellvi
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SNAPSHOT_DIR)] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_child(mode: str, workdir: Path, threads: int, timeout: float = 900, **kw) -> dict:
    result = workdir / f"result_{mode}_{time.time_ns()}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--result", str(result),
           "--threads", str(threads)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = workdir / "children.log"
    t = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=workdir, env=thread_env(threads), stdout=fh,
                              stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise RuntimeError(f"child {mode} {kw} failed:\n" + "\n".join(tail))
    out = json.loads(result.read_text())
    out["process_wall_s"] = wall
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
        except Exception:  # pragma: no cover
            return ""

    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return dict(
        nproc=sh("nproc"),
        cpu_model=sh("lscpu | grep -i 'model name' | head -1 | cut -d: -f2-").strip(),
        python=platform.python_version(), platform=platform.platform(),
        torch=ver("torch"), scvi_tools=ver("scvi-tools"), cellvi=ver("cellvi"),
        lightning=ver("lightning"), anndata=ver("anndata"), numpy=ver("numpy"),
        scipy=ver("scipy"),
        cellvi_git=sh(f"git -C {Path(__file__).resolve().parents[1]} rev-parse --short HEAD"),
        mem_total=sh("free -g | awk '/Mem:/{print $2\" GiB\"}'"),
    )


def snapshot_cellvi(workdir: Path) -> dict:
    """Copy the cellvi package (as installed, e.g. an editable working tree) into ``workdir``
    so that code edited while the benchmark runs cannot mix versions between runs."""
    import hashlib
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("cellvi")
    if spec is None or spec.origin is None:  # no package here, or only a namespace portion
        # (an overlay venv that sees an editable install's package data but not its finder):
        # take this checkout's package
        src = Path(__file__).resolve().parents[1] / "cellvi"
    else:
        src = Path(spec.origin).parent
    dst = workdir / "snapshot"
    shutil.copytree(src, dst / "cellvi", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for f in sorted((dst / "cellvi").rglob("*.py")):
        digest.update(f.relative_to(dst).as_posix().encode() + b"\0" + f.read_bytes())
    repo = src.parent

    def git(*a):
        r = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    changed = (git("diff", "--name-only", "HEAD", "--", src.name) or "").splitlines()
    untracked = git("ls-files", "--others", "--exclude-standard", "--", src.name)
    changed += (untracked or "").splitlines()
    return dict(source=str(src), snapshot=str(dst / "cellvi"), sha256=digest.hexdigest()[:16],
                git_head=git("rev-parse", "--short", "HEAD"),
                uncommitted=[c for c in changed if c],
                diff_stat=git("diff", "--stat", "HEAD", "--", src.name))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def bench_imports(workdir: Path, threads: int, repeats: int) -> dict:
    modules = ["cellvi", "cellvi.models", "scvi", "torch"]
    res = {m: [] for m in modules}
    wall = {m: [] for m in modules}
    for m in modules:  # discarded warm-up (file-system cache, .pyc)
        run_child("import", workdir, threads, module=m)
    for _ in range(repeats):
        for m in modules:
            r = run_child("import", workdir, threads, module=m)
            res[m].append(r["import_s"])
            wall[m].append(r["process_wall_s"])
    return {m: dict(import_s=res[m], import_s_median=median(res[m]), process_wall_s=wall[m],
                    process_wall_s_median=median(wall[m])) for m in modules}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--import-repeats", type=int, default=7)
    p.add_argument("--scvi-batch-sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--cellvi-batch-size", type=int, default=512)
    p.add_argument("--no-profile", action="store_true", help="skip the cellvi epoch profile")
    p.add_argument("--profile-size", type=int, default=10000)
    p.add_argument("--force-threads", action="store_true",
                   help="run >1-thread blocks even when the load average is >= 0.5")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the markdown next to --out from an existing results JSON")
    # child-only arguments
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--h5ad", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-cells", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--module", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profiler", default="torch", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["summary"] = summarise(res)
        Path(args.render).write_text(json.dumps(res, indent=1))
        md = Path(args.out) / "speed_nbvae.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render_md(res))
        print(md.read_text())
        return

    if args.child:
        args.threads = args.threads[0]
        fn = {"generate": child_generate, "cellvi": child_train_cellvi, "scvi": child_train_scvi,
              "profile": child_profile, "import": child_import}[args.child]
        out = fn(args)
        Path(args.result).write_text(json.dumps(out))
        return

    t_start = time.perf_counter()
    command = "python " + shlex.join(sys.argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="speed_nbvae_"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    global SNAPSHOT_DIR
    info["cellvi_snapshot"] = snapshot_cellvi(workdir)
    SNAPSHOT_DIR = Path(info["cellvi_snapshot"]["snapshot"]).parent
    results = dict(command=command, machine=info, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                   loadavg_start=loadavg(), settings=dict(
                       sizes=args.sizes, epochs=args.epochs, threads=args.threads,
                       repeats=args.repeats, n_genes=N_GENES, mean_library=MEAN_LIBRARY,
                       arch=ARCH, cellvi_batch_size=args.cellvi_batch_size,
                       scvi_batch_sizes=args.scvi_batch_sizes), data={}, runs=[], skipped=[])
    print(f"[speed_nbvae] workdir {workdir}; load {loadavg()}", flush=True)

    # data: generated once per size, shared by every child through an .h5ad file
    files = {}
    for n in args.sizes:
        path = workdir / f"synthetic_{n}x{N_GENES}.h5ad"
        results["data"][str(n)] = run_child("generate", workdir, 1, h5ad=path, n_cells=n)
        files[n] = path
        print(f"[speed_nbvae] data {n}: {results['data'][str(n)]['nonzero_fraction']:.4f} "
              "non-zero", flush=True)

    peers = [("cellvi", args.cellvi_batch_size)] + [("scvi", b) for b in args.scvi_batch_sizes]
    for threads in args.threads:
        la = loadavg()
        if threads > 1 and la[0] >= 0.5 and not args.force_threads:
            msg = f"{threads}-thread block skipped: 1-min load average {la[0]} >= 0.5"
            print("[speed_nbvae] " + msg, flush=True)
            results["skipped"].append(dict(threads=threads, loadavg=la, reason=msg))
            continue
        for n in args.sizes:
            for rep in range(args.repeats):
                for tool, bs in peers:
                    la = loadavg()
                    r = run_child(tool, workdir, threads, h5ad=files[n], epochs=args.epochs,
                                  batch_size=bs)
                    r.update(threads=threads, repeat=rep, loadavg_before=la,
                             loadavg_after=loadavg())
                    results["runs"].append(r)
                    print(f"[speed_nbvae] t={threads} n={n} rep={rep} {tool:6s} bs={bs:4d}: "
                          f"{r['train_cells_per_s']:9.0f} cells/s  "
                          f"(train {r['train_s_per_epoch_median']:.2f} s/epoch, "
                          f"cpu util {r['cpu_util']:.2f}, maxrss {r['maxrss_mib']:.0f} MiB, "
                          f"load {la[0]})", flush=True)

    print("[speed_nbvae] import times", flush=True)
    results["imports"] = bench_imports(workdir, min(args.threads), args.import_repeats)
    results["imports"]["loadavg"] = loadavg()

    if not args.no_profile:
        n = args.profile_size
        if n not in files:
            path = workdir / f"synthetic_{n}x{N_GENES}.h5ad"
            results["data"][str(n)] = run_child("generate", workdir, 1, h5ad=path, n_cells=n)
            files[n] = path
        print("[speed_nbvae] profiling one cellvi epoch", flush=True)
        results["profile"] = {
            prof: run_child("profile", workdir, min(args.threads), h5ad=files[n],
                            batch_size=args.cellvi_batch_size, profiler=prof)
            for prof in ("torch", "cprofile")
        }

    results["loadavg_end"] = loadavg()
    results["elapsed_s"] = time.perf_counter() - t_start
    results["summary"] = summarise(results)
    (out_dir / "speed_nbvae.json").write_text(json.dumps(results, indent=1))
    (out_dir / "speed_nbvae.md").write_text(render_md(results))
    print((out_dir / "speed_nbvae.md").read_text())


def summarise(results: dict) -> list[dict]:
    rows = []
    runs = results["runs"]
    keys = sorted({(r["threads"], r["n_cells"]) for r in runs})
    for threads, n in keys:
        sel = [r for r in runs if r["threads"] == threads and r["n_cells"] == n]
        cellvi = {r["repeat"]: r for r in sel if r["tool"] == "cellvi"}
        for tool, bs in sorted({(r["tool"], r["batch_size"]) for r in sel},
                               key=lambda x: (x[0] != "cellvi", x[1])):
            rr = [r for r in sel if r["tool"] == tool and r["batch_size"] == bs]
            ratios = [cellvi[r["repeat"]]["train_cells_per_s"] / r["train_cells_per_s"]
                      for r in rr if tool == "scvi" and r["repeat"] in cellvi]
            cpu_ratios = [(cellvi[r["repeat"]]["train_cells_per_s"]
                           / cellvi[r["repeat"]]["cpu_util"])
                          / (r["train_cells_per_s"] / r["cpu_util"])
                          for r in rr if tool == "scvi" and r["repeat"] in cellvi]
            rows.append(dict(
                threads=threads, n_cells=n, tool=tool, batch_size=bs, repeats=len(rr),
                n_train=rr[0]["n_train"],
                train_cells_per_s=[r["train_cells_per_s"] for r in rr],
                train_cells_per_s_median=median([r["train_cells_per_s"] for r in rr]),
                train_s_per_epoch_median=median([r["train_s_per_epoch_median"] for r in rr]),
                wall_s_per_epoch_median=median([r["wall_s_per_epoch_median"] for r in rr]),
                val_s_per_epoch_median=median([median(r["val_s_per_epoch"][1:]) for r in rr])
                if tool == "cellvi" else None,
                fit_total_s_median=median([r["fit_total_s"] for r in rr]),
                first_epoch_s_median=median([r["wall_s_per_epoch"][0] for r in rr]),
                maxrss_mib_median=median([r["maxrss_mib"] for r in rr]),
                maxrss_after_load_mib_median=median([r["maxrss_after_load_mib"] for r in rr]),
                cpu_util_median=median([r["cpu_util"] for r in rr]),
                cpu_util_min=min(r["cpu_util"] for r in rr),
                train_cells_per_cpu_s=[r["train_cells_per_s"] / r["cpu_util"] for r in rr],
                train_cells_per_cpu_s_median=median(
                    [r["train_cells_per_s"] / r["cpu_util"] for r in rr]),
                ratio_cpu=cpu_ratios,
                ratio_cpu_median=median(cpu_ratios) if cpu_ratios else None,
                ratio_cellvi_over_this=ratios,
                ratio_median=median(ratios) if ratios else None,
                loadavg_before=[r["loadavg_before"][0] for r in rr],
            ))
    return rows


def render_md(res: dict) -> str:
    m = res["machine"]
    s = res["settings"]
    L = []
    L.append("# Speed: cellvi `NBVAE` vs scvi-tools `SCVI` (CPU)\n")
    L.append(f"Made by `{res['command']}` (interpreter `{sys.executable}`), started "
             f"{res['started']}, took {res['elapsed_s'] / 60:.1f} min.\n")
    L.append(f"- Machine: `nproc` = {m['nproc']}, CPU model `{m['cpu_model']}`, "
             f"{m['mem_total']} RAM, {m['platform']}, Python {m['python']}")
    L.append(f"- Versions: torch {m['torch']}, scvi-tools {m['scvi_tools']} (lightning "
             f"{m['lightning']}), cellvi {m['cellvi']} (git {m['cellvi_git']}), anndata "
             f"{m['anndata']}, numpy {m['numpy']}, scipy {m['scipy']}")
    snap = m.get("cellvi_snapshot")
    if snap:
        dirty = (f"uncommitted changes in {', '.join(snap['uncommitted'])}"
                 if snap["uncommitted"] else "clean")
        L.append(f"- cellvi code measured: working tree at git {snap['git_head']} ({dirty}), "
                 f"frozen at the start of the run (package sha256 {snap['sha256']}) and "
                 "imported by every child through `PYTHONPATH`, so edits made during the run "
                 "cannot mix versions")
    L.append(f"- Load average (1, 5, 15 min): start {res['loadavg_start']}, end "
             f"{res['loadavg_end']}; per-run 1-min load before each run is in the JSON "
             "(`runs[].loadavg_before`)")
    L.append(f"- Threads: `torch.set_num_threads(t)` and `OMP_NUM_THREADS` = "
             f"`OPENBLAS_NUM_THREADS` = `MKL_NUM_THREADS` = t for both tools, t in "
             f"{s['threads']}")
    for sk in res["skipped"]:
        L.append(f"- **{sk['reason']}**")
    L.append("")
    L.append("## Data\n")
    L.append("`cellvi.datasets.synthetic_counts(n_cells, 2000, n_batches=2, "
             f"mean_library={s['mean_library']:g}, seed=0)`, CSR float32 counts, written once "
             "to an .h5ad file and read by every training process.\n")
    L.append("| cells | genes | non-zeros | non-zero fraction | mean library | batches |")
    L.append("|---:|---:|---:|---:|---:|---|")
    for d in res["data"].values():
        L.append(f"| {d['n_cells']:,} | {d['n_genes']:,} | {d['nnz']:,} | "
                 f"{d['nonzero_fraction']:.4f} | {d['mean_library']:.0f} | "
                 f"{', '.join(f'{k}: {v}' for k, v in d['batch_counts'].items())} |")
    L.append("")
    L.append("## Training throughput\n")
    L.append(f"Same architecture: n_hidden=128, n_latent=10, n_layers=1, NB likelihood, "
             "batch covariate `batch` (2 categories); cellvi "
             f"`NBVAE(..., likelihood=\"nb\").fit(max_epochs={s['epochs']}, batch_size="
             f"{s['cellvi_batch_size']}, seed=0, device=\"cpu\", early_stopping=False)`; scvi "
             f"`SCVI(..., gene_likelihood=\"nb\").train(max_epochs={s['epochs']}, "
             "accelerator=\"cpu\", devices=1, early_stopping=False)` with its default "
             "batch_size=128 and, as an extra row, batch_size=512 (both train_size=0.9). "
             "Both keep their default dropout 0.1 and BatchNorm.\n")
    L.append("**Method.** Each training runs in a fresh subprocess; the peers are interleaved "
             f"(cellvi, scvi bs=128, scvi bs=512, repeated {s['repeats']}x). Epoch 0 is a "
             f"warm-up and is excluded; epochs 1..{s['epochs'] - 1} are timed. cellvi: a "
             "`cellvi.train.Callback` passed to `fit(callbacks=[...])` stamps `on_epoch_end` "
             "and `on_validation_end`, between which the validation ELBO is computed once every "
             "epoch; this gives the training part of each epoch (from the end of the previous "
             "validation to the start of this one) and the validation time. "
             "scvi: a Lightning callback gives `on_train_epoch_start` → last "
             "`on_train_batch_end` (training part) and → `on_train_epoch_end` (wall). "
             "**cells/s counts only the cells trained on** (0.9 n for both; cellvi's 10% "
             "validation cells are not counted). *ratio* = cellvi cells/s ÷ scvi cells/s "
             "within the same repeat, median over repeats. *wall s/epoch* includes cellvi's "
             "validation pass over 0.1 n cells every epoch; scvi-tools runs no validation with "
             "`early_stopping=False` (its default `check_val_every_n_epoch` is then never). "
             "*CPU util* = process CPU time ÷ wall time in the timed training windows (≈ the "
             "thread count when the process had its cores to itself; lower = contention). "
             "*peak RSS* = `ru_maxrss` of the training process (includes the Python "
             "interpreter, torch and the loaded AnnData; RSS after loading the data is shown "
             "separately).\n")
    L.append("*cells per CPU-s* = cells/s ÷ CPU util: the throughput per second of CPU the "
             "process actually got; with 1 thread it is robust to other processes taking the "
             "core part of the time (they still cost cache), so its ratio is shown too.\n")
    L.append("| threads | cells | tool | batch size | train cells/s (median) | per repeat | "
             "ratio cellvi/this (median; per repeat) | cells per CPU-s (median) | "
             "ratio per CPU-s (median; per repeat) | train s/epoch | wall s/epoch | "
             "first epoch incl. setup (s) | fit() total (s) | CPU util (median, min) | "
             "peak RSS MiB (after data load) | 1-min load before runs |")
    L.append("|---:|---:|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---|---|---|")
    for r in res["summary"]:
        ratio = ("—" if r["ratio_median"] is None else
                 f"**{r['ratio_median']:.2f}x** "
                 f"({', '.join(f'{x:.2f}' for x in r['ratio_cellvi_over_this'])})")
        ratio_cpu = ("—" if r.get("ratio_cpu_median") is None else
                     f"**{r['ratio_cpu_median']:.2f}x** "
                     f"({', '.join(f'{x:.2f}' for x in r['ratio_cpu'])})")
        wall = f"{r['wall_s_per_epoch_median']:.2f}"
        if r["val_s_per_epoch_median"] is not None:
            wall += f" (val {r['val_s_per_epoch_median']:.2f})"
        L.append(
            f"| {r['threads']} | {r['n_cells']:,} | {r['tool']} | {r['batch_size']} | "
            f"{r['train_cells_per_s_median']:,.0f} | "
            f"{', '.join(f'{x:,.0f}' for x in r['train_cells_per_s'])} | {ratio} | "
            f"{r['train_cells_per_cpu_s_median']:,.0f} | {ratio_cpu} | "
            f"{r['train_s_per_epoch_median']:.2f} | {wall} | {r['first_epoch_s_median']:.2f} | "
            f"{r['fit_total_s_median']:.1f} | "
            f"{r['cpu_util_median']:.2f}, {r['cpu_util_min']:.2f} | "
            f"{r['maxrss_mib_median']:,.0f} ({r['maxrss_after_load_mib_median']:,.0f}) | "
            f"{', '.join(str(x) for x in r['loadavg_before'])} |")
    L.append("")
    if "imports" in res:
        im = res["imports"]
        L.append("## Import time\n")
        L.append("Fresh subprocess per import, interleaved, one discarded warm-up each, "
                 f"{len(im['cellvi']['import_s'])} repeats, median; *import* is "
                 "`time.perf_counter()` around `import X` inside the process, *process* is the "
                 f"whole subprocess wall time (interpreter start-up included). Load after: "
                 f"{im['loadavg']}. `import cellvi` is lazy (it does not import torch); "
                 "`import cellvi.models` is what training needs (torch, anndata included).\n")
        L.append("| module | import s (median) | all | process wall s (median) |")
        L.append("|---|---:|---|---:|")
        for mod in ("cellvi", "cellvi.models", "scvi", "torch"):
            d = im[mod]
            L.append(f"| `import {mod}` | {d['import_s_median']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in d['import_s'])} | "
                     f"{d['process_wall_s_median']:.2f} |")
        L.append("")
    if "profile" in res:
        pt = res["profile"]["torch"]
        L.append(f"## Profile of one cellvi training epoch ({pt['n_cells']:,} x 2,000, "
                 f"batch size {pt['batch_size']}, {pt['threads']} thread)\n")
        L.append("The training part of epoch 1 (after a warm-up epoch 0; validation excluded), "
                 f"`torch.profiler` (CPU): wall {pt['wall_s']:.2f} s under the profiler, "
                 f"{pt['total_self_ms']:.0f} ms of operator self time. Top operators by self "
                 "CPU time:\n")
        L.append("| operator | self ms | % of op self time | calls |")
        L.append("|---|---:|---:|---:|")
        for row in pt["top"]:
            L.append(f"| `{row['name']}` | {row['self_ms']:.1f} | {row['self_pct']:.1f} | "
                     f"{row['calls']} |")
        L.append("")
        L.append("Top (operator, input shapes) pairs:\n")
        L.append("| operator | input shapes | self ms | % | calls |")
        L.append("|---|---|---:|---:|---:|")
        for row in pt["top_by_input_shape"]:
            L.append(f"| `{row['name']}` | `{row['input_shapes']}` | {row['self_ms']:.1f} | "
                     f"{row['self_pct']:.1f} | {row['calls']} |")
        L.append("")
        pc = res["profile"]["cprofile"]
        L.append(f"cProfile of the same epoch part (wall {pc['wall_s']:.2f} s under cProfile), "
                 "top Python-level functions by own time:\n")
        L.append("| function | own ms | % | calls | cumulative ms |")
        L.append("|---|---:|---:|---:|---:|")
        for row in pc["top"]:
            L.append(f"| `{row['name']}` | {row['self_ms']:.1f} | {row['self_pct']:.1f} | "
                     f"{row['calls']} | {row['total_ms']:.1f} |")
        L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
