"""Out-of-core NB-VAE (issue 22 item 3): ``cellvi.tl.nbvae`` on a backed ``.h5ad`` of 2M cells.

The file: synthetic counts, ``--cells`` x 2,000 genes (``--unique`` cells drawn, then
repeated with their labels), 5 groups x 2 batches with
``synthetic_counts``' generative model (shared baseline, sparse group log-fold changes, batch
log-fold changes, log-normal libraries of mean 470, NB with θ = 5; about 11% non-zeros),
written ``--block`` rows at a time through anndata's own on-disk API
(``anndata.io.write_elem`` + ``sparse_dataset(...).append``), so that generating it never
holds the matrix either.

The measurement runs in a fresh child process: ``anndata.read_h5ad(path, backed="r")``, then
``cellvi.tl.nbvae(adata, batch_key="batch", seed=0, ...)`` (construction with its chunked
checks, training, the latent and the outlier score over every cell), then k-means (k = 5)
ARI of the latent against the groups on a 50,000-cell subsample. Reported: seconds per phase,
optimiser steps, chunks read, and the child's peak RSS (``VmHWM``).

Usage::

    python benchmarks/backed.py --cells 2000000 --out benchmarks/results   # ~1 h on 1 thread
    python benchmarks/backed.py --cells 50000 --max-epochs 2 --quick       # smoke test
"""

from __future__ import annotations

import _single_thread  # noqa: F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import git_state, import_cellvi, log

N_GENES = 2000
SETTINGS = dict(n_groups=5, n_batches=2, mean_library=470.0, dispersion=5.0, seed=0)


def write_counts(path: Path, n_cells: int, block: int, unique: int | None = None) -> dict:
    """Write the synthetic counts file, ``block`` rows at a time; with ``unique``, the first
    ``unique`` cells are drawn and then repeated (with their labels) up to ``n_cells``, which
    makes a large file quickly (drawing is ~0.5 ms per cell here)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    s = SETTINGS
    rng = np.random.default_rng(s["seed"])
    base = rng.normal(0.0, 1.0, N_GENES)
    group_lfc = rng.normal(0.0, 2.0, (s["n_groups"], N_GENES)) * (rng.random((s["n_groups"], N_GENES)) < 0.2)
    batch_lfc = rng.normal(0.0, 1.0, (s["n_batches"], N_GENES))
    unique = min(n_cells, unique or n_cells)
    group = np.resize(rng.integers(0, s["n_groups"], unique), n_cells)
    batch = np.resize(rng.integers(0, s["n_batches"], unique), n_cells)
    library = np.exp(rng.normal(np.log(s["mean_library"]), 0.3, unique))
    obs = pd.DataFrame({"group": pd.Categorical(group.astype(str)),
                        "batch": pd.Categorical(np.char.add("b", batch.astype(str)))},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    t0, nnz = time.perf_counter(), 0
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        parts = []
        for lo in range(0, unique, block):
            hi = min(lo + block, unique)
            logits = base + group_lfc[group[lo:hi]] + batch_lfc[batch[lo:hi]]
            props = np.exp(logits - logits.max(1, keepdims=True))
            props /= props.sum(1, keepdims=True)
            mu = props * library[lo:hi, None]
            counts = rng.poisson(rng.gamma(s["dispersion"], mu / s["dispersion"]))
            counts[:, 0] += counts.sum(1) == 0  # no empty cells
            parts.append(sp.csr_matrix(counts.astype(np.float32)))
        written = 0
        while written < n_cells:
            for part in parts:
                part = part[: n_cells - written]
                if not part.shape[0]:
                    break
                if written == 0:
                    write_elem(f, "X", part)
                else:
                    sparse_dataset(f["X"]).append(part)
                written += part.shape[0]
                nnz += part.nnz
            log(f"wrote {written:,} / {n_cells:,} cells")
    return dict(n_cells=n_cells, unique_cells=unique, nnz=nnz, density=nnz / n_cells / N_GENES,
                file_gb=path.stat().st_size / 1e9, write_s=time.perf_counter() - t0)


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, it does not
    carry over the parent's peak through fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, max_epochs: int | None, out: str) -> None:
    """The measured run (own process, so that ru_maxrss is this run's)."""
    import anndata as ad
    from sklearn.cluster import KMeans

    cellvi = import_cellvi()
    from cellvi.data import BackedRows
    from cellvi.metrics import ari

    reads = [0]
    chunk = BackedRows.chunk

    def counted(self, a, b):
        reads[0] += 1
        return chunk(self, a, b)
    BackedRows.chunk = counted
    phases, t0 = {}, time.perf_counter()
    adata = ad.read_h5ad(path, backed="r")
    model = cellvi.models.NBVAE(adata, batch_key="batch")
    phases["construct_s"] = time.perf_counter() - t0
    rss_construct = peak_rss_mib()
    t = time.perf_counter()
    model.fit(max_epochs=max_epochs, seed=0, verbose=False)
    phases["fit_s"] = time.perf_counter() - t
    reads_fit = reads[0]
    t = time.perf_counter()
    z = model.get_latent(adata)
    phases["latent_s"] = time.perf_counter() - t
    t = time.perf_counter()
    score = cellvi.diagnostics.outlier_scores(model, adata)
    phases["outlier_s"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    sub = np.random.default_rng(0).choice(len(z), min(50_000, len(z)), replace=False)
    truth = adata.obs["group"].to_numpy()[sub]
    k_ari = ari(truth, KMeans(5, n_init=5, random_state=0).fit_predict(z[sub]))
    Path(out).write_text(json.dumps(dict(
        phases=phases, total_s=total, epochs=len(model.history["epoch"]),
        kmeans_ari=k_ari,
        chunks_read=reads[0], chunks_read_by_fit=reads_fit,
        chunk_rows=cellvi.data.CHUNK_ROWS, peak_rss_mib=peak_rss_mib(),
        rss_after_construct_mib=rss_construct, outlier_finite=bool(np.isfinite(score).all()),
        validation_elbo=model.history["validation_elbo"][-1])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--block", type=int, default=20_000)
    p.add_argument("--unique", type=int, default=200_000,
                   help="cells drawn; the file repeats them up to --cells")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="fit's max_epochs (default: the defaults' budget)")
    p.add_argument("--scratch", default="/tmp/cellvi_backed")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--quick", action="store_true", help="write nothing to --out")
    p.add_argument("--child", nargs=3, metavar=("PATH", "MAX_EPOCHS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], None if args.child[1] == "none" else int(args.child[1]), args.child[2])
        return
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"counts_{args.cells}.h5ad"
    info_file = path.with_suffix(".json")
    if not info_file.exists():
        info_file.write_text(json.dumps(write_counts(path, args.cells, args.block, args.unique)))
    data_info = json.loads(info_file.read_text())
    log(f"data: {data_info}")
    out_json = scratch / "child.json"
    cmd = [sys.executable, __file__, "--child", str(path),
           "none" if args.max_epochs is None else str(args.max_epochs), str(out_json)]
    git = git_state()  # before the run: the code the child imports
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    result = json.loads(out_json.read_text())
    result.update(wall_s=time.perf_counter() - t0, data=data_info, command=" ".join(sys.argv),
                  git=git, max_epochs=args.max_epochs)
    log(json.dumps(result, indent=1))
    if not args.quick:
        out = Path(args.out)
        (out / "backed.json").write_text(json.dumps(result, indent=1))
        (out / "backed.md").write_text(render(result))


def render(r: dict) -> str:
    d, ph = r["data"], r["phases"]
    return "\n".join([
        "# Out-of-core NB-VAE: `tl.nbvae` on a backed .h5ad", "",
        f"Command: `{r['command']}` (git {r['git'].get('head')}); one thread; "
        f"the measured run in its own process.", "",
        f"Data: {d['n_cells']:,} cells x {N_GENES:,} genes, {d['density']:.1%} non-zeros, "
        f"{d['file_gb']:.2f} GB on disk (`benchmarks/backed.py`'s generator: "
        f"{d['unique_cells']:,} cells drawn, repeated up to {d['n_cells']:,}, written in blocks "
        f"through `anndata.io`).", "",
        "| phase | seconds |", "|---|---|",
        *(f"| {k[:-2]} | {v:.0f} |" for k, v in ph.items()),
        f"| total | {r['total_s']:.0f} |", "",
        f"- peak RSS of the run: **{r['peak_rss_mib']:,.0f} MiB** (after construction: "
        f"{r['rss_after_construct_mib']:,.0f} MiB)",
        f"- epochs {r['epochs']} (max_epochs={r['max_epochs']}), chunks of "
        f"{r['chunk_rows']:,} rows read: {r['chunks_read_by_fit']} by construction + fit, "
        f"{r['chunks_read']} in all",
        f"- k-means (k = 5) ARI of the latent against the groups (50,000-cell subsample): "
        f"{r['kmeans_ari']:.3f}; final validation ELBO {r['validation_elbo']:.1f}",
        "",
    ])


if __name__ == "__main__":
    main()
