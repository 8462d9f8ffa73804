"""How the NB-VAE's latent improves with cells seen on 1M-cell data (issue 22): the evidence
behind the training budget of large inputs.

Each run fits ``cellvi.models.NBVAE(adata, batch_key="batch")`` with the defaults of
``tl.nbvae`` on one 1M-cell set, keeps the weights after every epoch (each epoch passes over
100,000 cells: ``TrainConfig.epoch_cells``), and then scores the latent of every kept epoch on
a fixed set of ``--eval-cells`` cells (the first rows, a random sample since the rows are
drawn at random):

* ``knn_acc``: share of each cell's 15 nearest neighbours (latent, Euclidean) with its label;
* ``kmeans_ari``: ARI of k-means (k = number of labels, ``n_init=4``) against the labels;
* ``batch_entropy``: the entropy of the batches among each cell's 30 nearest neighbours,
  divided by the entropy of the batches' overall shares (1 = as mixed as the data allow);
* the validation ELBO of that epoch (the model's own held-out cells).

Sets (``--dataset``):

* ``synthetic``: ``scaling.py``'s cached synthetic counts (1M x 2,000 genes, 5 groups,
  2 batches);
* ``kang_8donors``, ``3protocols``, ``protocol_strong``: the integration panel's real sets
  (``integration_panel.make_dataset``; 11k-12k real cells, 1,287 genes, real labels; the
  batches are the 8 donors, the shared file's simulated protocols, and
  ``cellvi.datasets.protocol_batches(strength="strong")``), upsampled to ``--n`` cells: rows
  drawn with replacement (``numpy.random.default_rng(1000 + n)``) and every count thinned
  binomially with a per-cell keep probability drawn from U(0.5, 1), so that no two cells
  are the same and the library sizes spread. Label and batch travel with the row.

Usage::

    python benchmarks/nbvae_budget_curves.py --dataset kang_8donors --seed 0 --out /tmp/curves.jsonl
    python benchmarks/nbvae_budget_curves.py --render /tmp/curves.jsonl > results/nbvae_budget_curves.md

Writes one JSON line per run (``--out``, appended; ``--tag`` names the code's budget rule);
``--render`` turns such lines into the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def upsample(adata, n: int, seed: int):
    """``n`` cells drawn with replacement from ``adata`` (raw counts in ``X``), each count
    thinned binomially with the cell's keep probability ~ U(0.5, 1)."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, adata.n_obs, n)
    keep = rng.uniform(0.5, 1.0, n)
    X = sp.csr_matrix(adata.X)[rows]
    X.data = rng.binomial(np.rint(X.data).astype(np.int64),
                          np.repeat(keep, np.diff(X.indptr))).astype(np.float32)
    X.eliminate_zeros()
    out = ad.AnnData(X, obs=adata.obs[["batch", "cell_type"]].iloc[rows].reset_index(drop=True),
                     var=adata.var[[]])
    out.obs_names = [f"cell{i}" for i in range(n)]
    return out


def load(name: str, n: int, cache: Path):
    if name == "synthetic":
        import scaling

        adata = scaling.nb_adata(n, cache)
        adata.obs["cell_type"] = adata.obs["group"]
        return adata
    import integration_panel

    base, _ = integration_panel.make_dataset(name, None)
    return upsample(base, n, 1000 + n)


def scores(z: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=31).fit(z)
    _, idx = nn.kneighbors(z)
    idx = idx[:, 1:]
    knn_acc = float((labels[idx[:, :15]] == labels[:, None]).mean())
    cats, codes = np.unique(batches, return_inverse=True)
    share = np.bincount(codes, minlength=len(cats)) / len(codes)
    h_all = -(share[share > 0] * np.log(share[share > 0])).sum()
    counts = np.stack([(codes[idx] == b).sum(1) for b in range(len(cats))], 1) / idx.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(counts > 0, counts * np.log(counts), 0.0).sum(1)
    k = len(np.unique(labels))
    km = KMeans(n_clusters=k, n_init=4, random_state=0).fit_predict(z)
    return dict(knn_acc=knn_acc, kmeans_ari=float(adjusted_rand_score(labels, km)),
                batch_entropy=float(h.mean() / h_all) if h_all > 0 else float("nan"))


#: checkpoints of the tables, in cells seen
CHECKPOINTS = (500_000, 1_000_000, 1_500_000, 2_000_000, 3_100_000)
METRICS = ("knn_acc", "batch_entropy", "kmeans_ari", "validation_elbo")


def _at(run: dict, cells: int) -> dict | None:
    return next((c for c in run["curve"] if c["cells_seen"] == cells), None)


def _fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ({v.min():.3f} to {v.max():.3f})"


def render(runs: list[dict]) -> str:
    """Markdown: per set, each metric after the checkpoints' cells seen (mean and range over
    the seeds) of the runs with the old 6,000-step budget (``tag`` empty), and the final
    model of runs tagged otherwise."""
    out = []
    sets = sorted({r["dataset"] for r in runs})
    curves = [r for r in runs if not r.get("tag")]
    out.append("Score after a given number of cells seen (the weights of that epoch of the "
               "6,000-step run), mean (range) over seeds; `score` = 0.6 kNN accuracy + 0.4 "
               "batch entropy.\n")
    out.append("| set | seeds | metric | " + " | ".join(f"{c / 1e6:.1f}M" for c in CHECKPOINTS)
               + " |")
    out.append("|---|---|---|" + "---:|" * len(CHECKPOINTS))
    for d in sets:
        rs = [r for r in curves if r["dataset"] == d]
        if not rs:
            continue
        for m in METRICS + ("score",):
            cells = []
            for c in CHECKPOINTS:
                pts = [_at(r, c) for r in rs]
                pts = [p for p in pts if p is not None]
                vals = [(0.6 * p["knn_acc"] + 0.4 * p["batch_entropy"]) if m == "score" else p[m]
                        for p in pts]
                cells.append(_fmt(vals) if vals else "")
            seeds = ",".join(str(r["seed"]) for r in rs)
            out.append(f"| {d} | {seeds} | {m} | " + " | ".join(cells) + " |")
    tagged = [r for r in runs if r.get("tag")]
    if tagged:
        out.append("\nFinal models (best validation epoch restored), by budget rule:\n")
        out.append("| set | seed | rule | epochs | fit s | kNN acc | batch entropy | k-means ARI "
                   "| score | best val. ELBO |")
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(runs, key=lambda r: (r["dataset"], r["seed"], r.get("tag", ""))):
            f = r["final"]
            best = max(c["validation_elbo"] for c in r["curve"])
            out.append(f"| {r['dataset']} | {r['seed']} | {r.get('tag') or '6,000 steps'} | "
                       f"{r['epochs']} | {r['fit_s']:.0f} | {f['knn_acc']:.4f} | "
                       f"{f['batch_entropy']:.4f} | {f['kmeans_ari']:.3f} | "
                       f"{0.6 * f['knn_acc'] + 0.4 * f['batch_entropy']:.4f} | {best:.2f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--render", help="JSON lines of earlier runs: print the markdown tables")
    p.add_argument("--tag", default="", help="a name for the budget rule of this code")
    p.add_argument("--dataset",
                   choices=["synthetic", "kang_8donors", "3protocols", "protocol_strong"])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-cells", type=int, default=10_000)
    p.add_argument("--cache", default="/tmp/cellvi_scaling_cache")
    p.add_argument("--fit", default="{}", help="JSON: NBVAE.fit keyword arguments")
    p.add_argument("--out")
    args = p.parse_args()
    if args.render:
        print(render([json.loads(line) for line in open(args.render) if line.strip()]))
        return
    if not (args.dataset and args.out):
        p.error("--dataset and --out are needed to run")

    import torch

    torch.set_num_threads(args.threads)
    from _common import git_state

    from cellvi.models.nbvae import NBVAE
    from cellvi.train import Callback

    t0 = time.perf_counter()
    adata = load(args.dataset, args.n, Path(args.cache))
    t_data = time.perf_counter() - t0
    ev = adata[: args.eval_cells].copy()
    labels = ev.obs["cell_type"].astype(str).to_numpy()
    batches = ev.obs["batch"].astype(str).to_numpy()

    states = []

    class Keep(Callback):
        def on_validation_end(self, epoch, history):
            states.append({k: v.detach().clone() for k, v in model.module.state_dict().items()})

    model = NBVAE(adata, batch_key="batch")
    t1 = time.perf_counter()
    model.fit(seed=args.seed, verbose=False, callbacks=[Keep()], **json.loads(args.fit))
    fit_s = time.perf_counter() - t1
    best = {k: v.clone() for k, v in model.module.state_dict().items()}
    val = [float(v) for v in model.history["validation_elbo"]]
    from cellvi.train import epoch_size

    epoch_cells = epoch_size(round((1 - model.train_settings.get("validation_fraction", 0.1))
                                   * adata.n_obs))
    curve = []
    for e, sd in enumerate(states):
        model.module.load_state_dict(sd)
        z = model.get_latent(ev)
        curve.append(dict(epoch=e, cells_seen=(e + 1) * epoch_cells, validation_elbo=val[e],
                          **scores(z, labels, batches)))
        print(json.dumps(curve[-1]), flush=True)
    model.module.load_state_dict(best)
    final = scores(model.get_latent(ev), labels, batches)
    rec = dict(git=git_state(), machine=platform.platform(), threads=args.threads,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dataset=args.dataset,
               n=args.n, n_genes=adata.n_vars, nnz_share=adata.X.nnz / adata.n_obs / adata.n_vars,
               seed=args.seed, tag=args.tag, fit=json.loads(args.fit), data_s=t_data, fit_s=fit_s,
               epochs=len(val), best_epoch=int(np.nanargmax(val)), final=final, curve=curve)
    with open(args.out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
