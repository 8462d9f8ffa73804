"""NB-VAE training speed on a GPU (and the CPU of the same machine), cellvi only.

Runs on a machine with CUDA; needs torch, numpy, scipy, pandas, anndata (no scanpy).
Synthetic NB counts, n_cells x 2,000 genes, 2 batches; n_hidden=128, n_latent=10, 1 layer.
Times epochs 2..E (epoch 1 includes CUDA warm-up) from per-epoch timestamps that a
``cellvi.train.Callback`` (passed through ``NBVAE.fit(callbacks=[...])``) takes in
``on_epoch_end``, after the epoch's optimiser steps and just before its validation (the device
synchronised first): each interval is one epoch's training plus one validation. Reports
training cells/s (90% of cells train).

    python benchmarks/gpu_nbvae.py --sizes 10000 50000 200000 --epochs 6 --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cellvi  # noqa: E402
from cellvi import train as train_mod  # noqa: E402


def synthetic(n_cells: int, seed: int = 0):
    return cellvi.datasets.synthetic_counts(n_cells, 2000, n_groups=5, n_batches=2,
                                            mean_library=3000.0, seed=seed)


class EpochStamps(train_mod.Callback):
    """A timestamp at the end of each epoch's optimiser steps, before its validation (the
    point where the evaluation used to be wrapped), after synchronising a CUDA device."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.stamps: list[float] = []

    def on_epoch_end(self, epoch: int, history: dict) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def time_fit(adata, device: str, epochs: int, batch_size: int):
    timer = EpochStamps(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = cellvi.models.NBVAE(adata, batch_key="batch", n_latent=10, n_hidden=128, n_layers=1)
    t0 = time.perf_counter()
    model.fit(max_epochs=epochs, batch_size=batch_size, device=device, verbose=False,
              early_stopping=False, callbacks=[timer])
    total = time.perf_counter() - t0
    stamps = timer.stamps
    per_epoch = float(np.median(np.diff(stamps))) if len(stamps) > 1 else float("nan")
    n_train = int(round(0.9 * adata.n_obs))
    out = dict(device=device, n_cells=adata.n_obs, batch_size=batch_size, epochs=epochs,
               seconds_per_epoch=per_epoch, train_cells_per_s=n_train / per_epoch,
               total_seconds=total)
    if device.startswith("cuda"):
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out, model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 200000])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--cpu", action="store_true", help="also time the CPU of this machine")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = []
    info = dict(torch=torch.__version__, cellvi=cellvi.__version__,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                cpu_threads=torch.get_num_threads())
    for n in args.sizes:
        adata = synthetic(n)
        nnz = adata.X.nnz / (adata.n_obs * adata.n_vars)
        for bs in args.batch_sizes:
            res, model = time_fit(adata, "cuda", args.epochs, bs)
            res["nonzero_fraction"] = nnz
            rows.append(res)
            print(json.dumps(res), flush=True)
        if args.cpu and n <= 50000:
            res, _ = time_fit(adata, "cpu", max(3, args.epochs // 2), 512)
            res["nonzero_fraction"] = nnz
            rows.append(res)
            print(json.dumps(res), flush=True)
    # recovery on the GPU: groups found in the latent
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    adata = cellvi.datasets.synthetic_counts(5000, 500, n_groups=3, n_batches=2, seed=1)
    model = cellvi.models.NBVAE(adata, batch_key="batch").fit(device="cuda", verbose=False)
    z = model.get_latent(adata)
    info["gpu_recovery_ari"] = float(adjusted_rand_score(
        adata.obs["group"], KMeans(3, n_init=10, random_state=0).fit_predict(z)))
    info["gpu_recovery_ilisi"] = cellvi.metrics.ilisi(z, adata.obs["batch"])
    info["gpu_recovery_epochs"] = len(model.history["epoch"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_nbvae.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    lines = ["# NB-VAE training speed on a GPU", "",
             f"Command: `python benchmarks/gpu_nbvae.py {' '.join(sys.argv[1:])}`", "",
             f"GPU: {info['gpu']}; torch {info['torch']}; cellvi {info['cellvi']}", "",
             "| device | cells | batch size | s/epoch | train cells/s | peak GPU MB | non-zeros |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['n_cells']:,} | {r['batch_size']} | {r['seconds_per_epoch']:.3f} | "
                     f"{r['train_cells_per_s']:,.0f} | {r.get('peak_gpu_memory_mb', float('nan')):.0f} | "
                     f"{r['nonzero_fraction']:.3f} |")
    lines += ["", f"Recovery on the GPU (5,000 cells, 3 groups x 2 batches, defaults): k-means ARI "
              f"{info['gpu_recovery_ari']:.3f}, iLISI {info['gpu_recovery_ilisi']:.3f}, "
              f"{info['gpu_recovery_epochs']} epochs."]
    (out / "gpu_nbvae.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
