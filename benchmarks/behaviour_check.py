"""Behaviour check for refactors: the same seeds must give the same outputs.

Runs, single-threaded, for seeds 0-2:

* ``cellvi.tl.nbvae`` on ``kang2018_pbmc_ctrl_stim_small`` (raw counts in ``X``,
  ``batch_key="sample"``);
* ``cellvi.tl.gmvae`` on ``flowsom_68983_mouse_flow_gated`` (``layers["compensated_logicle"]``,
  the 10 marker channels), in discovery and with ``n_components=6``;

and saves the latents, labels and probabilities to an ``.npz``. With ``--compare FILE`` it
prints the largest absolute difference of each output against a file saved before.

Usage::

    CELLVI_DATA_DIR=../shared/data python benchmarks/behaviour_check.py --save ref.npz
    CELLVI_DATA_DIR=../shared/data python benchmarks/behaviour_check.py --compare ref.npz
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import _single_thread  # noqa: F401  (pins every thread pool to one thread; import first)
import anndata as ad
import numpy as np
import torch

import cellvi

torch.set_num_threads(1)
SEEDS = (0, 1, 2)


def _read(name: str) -> ad.AnnData:
    return ad.read_h5ad(Path(os.environ["CELLVI_DATA_DIR"]) / f"{name}.h5ad")


def run(seeds=SEEDS) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    kang = _read("kang2018_pbmc_ctrl_stim_small")
    flow = _read("flowsom_68983_mouse_flow_gated")
    markers = list(flow.var_names[flow.var["has_marker"].to_numpy(bool)])
    for seed in seeds:
        t0 = time.perf_counter()
        a = kang.copy()
        cellvi.tl.nbvae(a, batch_key="sample", seed=seed, verbose=False)
        out[f"nbvae_s{seed}_latent"] = np.asarray(a.obsm["X_nbvae"])
        t1 = time.perf_counter()
        for name, k in (("discovery", None), ("k6", 6)):
            f = flow.copy()
            cellvi.tl.gmvae(f, layer="compensated_logicle", markers=markers, n_components=k,
                            seed=seed, verbose=False)
            out[f"gmvae_{name}_s{seed}_latent"] = np.asarray(f.obsm["X_gmvae"])
            out[f"gmvae_{name}_s{seed}_labels"] = f.obs["gmvae"].cat.codes.to_numpy()
            out[f"gmvae_{name}_s{seed}_probs"] = np.asarray(f.obsm["gmvae_probs"])
            out[f"gmvae_{name}_s{seed}_confidence"] = f.obs["gmvae_confidence"].to_numpy()
        print(f"seed {seed}: nbvae {t1 - t0:.1f} s, gmvae x2 {time.perf_counter() - t1:.1f} s",
              flush=True)
    return out


def compare(new: dict[str, np.ndarray], ref_path: str) -> float:
    ref = np.load(ref_path)
    worst = 0.0
    for key in sorted(ref.files):
        a, b = ref[key], new.get(key)
        if b is None:
            print(f"{key}: missing in the new run")
            worst = np.inf
            continue
        if a.shape != b.shape:
            print(f"{key}: shape {a.shape} -> {b.shape}")
            worst = np.inf
            continue
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        worst = max(worst, diff)
        print(f"{key}: max |diff| {diff:.3g}")
    print(f"largest difference over all outputs: {worst:.3g}")
    return worst


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--save", help="write the outputs to this .npz")
    p.add_argument("--compare", help="compare with the outputs saved in this .npz")
    p.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    args = p.parse_args(argv)
    out = run(args.seeds)
    if args.save:
        np.savez_compressed(args.save, **out)
    if args.compare:
        compare(out, args.compare)


if __name__ == "__main__":
    main()
