"""GMVAE discovery on 1M events with both cores: one process vs two data-parallel processes.

Issue 22 asks for `cellvi.tl.gmvae` on the 1M-event resampled ``flowsom_68983`` in no more than
FlowSOM's wall-clock of the same run. A GMVAE step is compute-bound in small matrix products,
where a second *thread* does not help; a second *process* (``torchrun``, gloo, the documented
data-parallel route of :mod:`cellvi.distributed`) halves each process's share of the
mini-batch. FlowSOM's numba kernels are partly ``parallel=True``, so it gets the same two
cores through ``NUMBA_NUM_THREADS=2``. Arms, each in its own fresh process (group), one after
another, per seed:

- ``flowsom_1t`` / ``flowsom_2t``: FlowSOM 10 x 10, 10 metaclusters, 1 / 2 numba threads;
- ``gmvae_1p``: ``cellvi.tl.gmvae(adata, seed=s)`` in one process, 1 thread;
- ``gmvae_2p``: the same script under ``torchrun --standalone --nproc_per_node=2``, 1 thread
  per process (the global mini-batch stays 512; each process computes 256 cells of it).

The data are ``benchmarks/scaling.py``'s: ``flowsom_68983`` (compensated logicle, 10 markers)
resampled with replacement to 1,000,000 events with N(0, 0.02) jitter; F1 / ARI against the
gates as ``benchmarks/cytometry.py`` scores them. *seconds* is the method call alone (data
built, numba / torch warmed up before it: FlowSOM's JIT compile is not counted, as in
``scaling.py``); *command s* is the whole process (group) from launch to exit, start-up,
imports and the data included. Peak RSS per process.

Usage::

    python benchmarks/gmvae_ddp_1m.py --seeds 0 1 2 --out benchmarks/results

Writes ``<out>/gmvae_ddp_1m.{jsonl,md}`` (one record per arm and seed, appended as they finish).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 1_000_000
ARMS = ("flowsom_1t", "flowsom_2t", "gmvae_1p", "gmvae_2p")
LABELS = {"flowsom_1t": "FlowSOM, 1 thread", "flowsom_2t": "FlowSOM, 2 numba threads",
          "gmvae_1p": "cellvi tl.gmvae, 1 process x 1 thread",
          "gmvae_2p": "cellvi tl.gmvae, torchrun 2 processes x 1 thread (gloo)"}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(arm: str, seed: int, out: Path, n: int = N) -> None:
    """One arm in this process (under torchrun: one rank of it); writes ``out``/rank<r>.json."""
    import warnings

    numba_threads = os.environ.get("NUMBA_NUM_THREADS", "1")  # set by the parent
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.path.insert(0, str(HERE))
    import cytometry
    import scaling
    import torch

    # cytometry / scaling import _single_thread, which pins NUMBA_NUM_THREADS to 1; numba
    # re-reads the variable at each compile, so put the parent's value back before any
    os.environ["NUMBA_NUM_THREADS"] = numba_threads

    torch.set_num_threads(1)
    d = scaling.cyto_data(n)
    rec = dict(arm=arm, seed=seed, n=n)
    if arm.startswith("flowsom"):
        import flowsom as fs
        import numba
        import numpy as np
        from loguru import logger

        logger.disable("flowsom")
        rec["numba_threads"] = numba.get_num_threads()
        rng = np.random.default_rng(0)
        w = dict(X=rng.normal(size=(6000, 10)).astype(np.float32), truth=np.zeros(6000, str),
                 markers=[f"m{i}" for i in range(10)])
        fs.FlowSOM(cytometry.make_adata(w), cols_to_use=w["markers"], xdim=5, ydim=5,
                   n_clusters=3, seed=0)  # JIT compile, not timed
        labels, secs, _ = cytometry.run_flowsom(d, seed, ["default"], {})["default"]
        rank = 0
    else:
        import cellvi
        from cellvi import distributed

        cytometry.warm_up_torch()
        a = cytometry.make_adata(d)
        t0 = time.perf_counter()
        cellvi.tl.gmvae(a, seed=seed, verbose=False)
        secs = time.perf_counter() - t0
        labels = a.obs["gmvae"].astype(str).to_numpy()
        rank, size = distributed.world()
        u = a.uns["gmvae"]
        rec.update(processes=size, epochs=len(u["history"]["epoch"]),
                   batch_size=u["train_settings"].get("batch_size"))
    rec.update(seconds=round(secs, 2), peak_rss_mib=round(_peak_rss_mib(), 1),
               **{k: v for k, v in cytometry.score(d, labels).items()
                  if k in ("f1", "ari", "n_clusters")})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(rec, default=float))


def run_arm(arm: str, seed: int, scratch: Path, timeout: float, n: int = N) -> dict:
    threads = "2" if arm == "flowsom_2t" else "1"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS=threads, PYTHONPATH=str(HERE.parent))
    out = scratch / f"{arm}_s{seed}"
    me = [str(Path(__file__).resolve()), "--worker", arm, "--seed", str(seed), "--scratch",
          str(out), "--events", str(n)]
    if arm == "gmvae_2p":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *me]
    else:
        cmd = [sys.executable, *me]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    ranks = sorted(out.glob("rank*.json"))
    recs = [json.loads(p.read_text()) for p in ranks]
    rec = dict(recs[0])
    rec["command_s"] = round(wall, 1)
    rec["peak_rss_mib_per_process"] = [r["peak_rss_mib"] for r in recs]
    if len(recs) > 1:
        rec["seconds_per_rank"] = [r["seconds"] for r in recs]
    return rec


def render(records: list[dict], header: str) -> str:
    import numpy as np

    L = [header, "",
         "| arm | seeds | seconds | command s | x FlowSOM 1 thread (same seed) | "
         "x FlowSOM 2 threads | F1 | ARI | clusters | peak RSS MiB per process |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["arm"], r["seed"]): r for r in records}
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        if not rs:
            continue

        def mr(vals, nd=3):
            v = np.asarray(vals, float)
            return f"{v.mean():.{nd}f} ({v.min():.{nd}f}-{v.max():.{nd}f})" if len(v) > 1 \
                else f"{v[0]:.{nd}f}"

        ratios = {}
        for ref in ("flowsom_1t", "flowsom_2t"):
            rr = [r["seconds"] / by[(ref, r["seed"])]["seconds"] for r in rs
                  if (ref, r["seed"]) in by]
            ratios[ref] = mr(rr, 2) + "x" if rr else "–"
        rss = [max(r["peak_rss_mib_per_process"]) for r in rs]
        L.append(f"| {LABELS[arm]} | {', '.join(str(r['seed']) for r in rs)} | "
                 f"{mr([r['seconds'] for r in rs], 1)} | {mr([r['command_s'] for r in rs], 1)} | "
                 f"{ratios['flowsom_1t']} | {ratios['flowsom_2t']} | "
                 f"{mr([r['f1'] for r in rs])} | {mr([r['ari'] for r in rs])} | "
                 f"{', '.join(str(r['n_clusters']) for r in rs)} | {mr(rss, 0)} |")
    L += ["", "Every record:", "", "```"] + [json.dumps(r) for r in records] + ["```", ""]
    return "\n".join(L)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=ARMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--events", type=int, default=N, help="events (smoke tests: fewer)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--scratch", default="/tmp/gmvae_ddp_1m")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", action="store_true", help="only rewrite the md from the jsonl")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.seed, Path(args.scratch), args.events)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "gmvae_ddp_1m.jsonl"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                         text=True).stdout.strip()
    header = (f"# GMVAE discovery at 1M events: one process vs two data-parallel processes, "
              f"FlowSOM with 1 and 2 threads\n\n`python benchmarks/gmvae_ddp_1m.py "
              f"{' '.join(sys.argv[1:])}` at git {rev}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
              f"{platform.platform()}, {os.cpu_count()} CPUs. Protocol: this script's docstring; "
              "mean (min-max) over seeds; ratios per seed against FlowSOM of the same seed.")
    if args.render:
        recs = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
        (out / "gmvae_ddp_1m.md").write_text(render(recs, header))
        return
    recs = []
    scratch = Path(args.scratch)
    for seed in args.seeds:
        for arm in args.arms:
            rec = run_arm(arm, seed, scratch, args.timeout, args.events)
            rec["git"] = rev
            print(json.dumps(rec), flush=True)
            recs.append(rec)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            (out / "gmvae_ddp_1m.md").write_text(render(recs, header))


if __name__ == "__main__":
    main()
