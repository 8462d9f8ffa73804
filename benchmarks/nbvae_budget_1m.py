"""NB-VAE training budgets on 1M synthetic cells (issue 22): fit seconds, validation ELBO per
epoch (the convergence curve in cells seen) and k-means ARI, with 2 threads.

Data: ``scaling.py``'s cached synthetic counts (``cellvi.datasets.synthetic_counts(n, 2000,
n_groups=5, n_batches=2, mean_library=470, seed=0)`` built in blocks, about 11% non-zeros):
run ``scaling.py`` once (or its ``nbgen`` child) to fill ``--cache``. Each configuration is a
``cellvi.models.NBVAE(adata, batch_key="batch")`` fitted with the given keyword arguments
(``{}`` = the defaults of ``tl.nbvae``), then ``transform``; the seconds of construction,
``fit`` and ``transform`` are measured in this process (the outlier score of ``tl.nbvae`` is
not included: ``scaling.py`` times it). Every epoch passes over 100,000 cells
(``TrainConfig.epoch_cells``), so the validation ELBO of epoch ``e`` is the model after
``(e + 1) * 100,000`` cells seen; the validation cells are the same for every configuration
(seeded split).

With ``--tl``, each configuration is instead one whole ``cellvi.tl.nbvae(adata,
batch_key="batch", verbose=False, **kwargs)`` call (construction, fit, latent and outlier
score written back), timed end to end and by phase (``NBVAE.__init__``, ``fit``,
``latent_and_elbo``), with its peak RSS (``getrusage``) and the k-means ARI
of ``obsm["X_nbvae"]``.

Usage::

    python benchmarks/nbvae_budget_1m.py --configs '{"default": {}}' --out /tmp/nbvae_budget.jsonl
    python benchmarks/nbvae_budget_1m.py --tl --out /tmp/nbvae_tl.jsonl

Writes one JSON line per configuration to ``--out``.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--configs", default='{"default": {}}',
                   help="JSON object: name -> NBVAE.fit keyword arguments")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/cellvi_scaling_cache")
    p.add_argument("--tl", action="store_true", help="time whole cellvi.tl.nbvae calls")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import scaling
    from _common import git_state

    from cellvi.models.nbvae import NBVAE

    adata = scaling.nb_adata(args.n, Path(args.cache))
    truth = adata.obs["group"].astype(str).to_numpy()
    meta = dict(git=git_state(), machine=platform.platform(), threads=args.threads, n=args.n,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(args.out, "a") as fh:
        for name, kwargs in json.loads(args.configs).items():
            if args.tl:
                fh.write(json.dumps(dict(meta, name=name, kwargs=kwargs,
                                         **time_tl(adata, truth, kwargs))) + "\n")
                fh.flush()
                continue
            t0 = time.perf_counter()
            model = NBVAE(adata, batch_key="batch")
            t1 = time.perf_counter()
            model.fit(verbose=False, **kwargs)
            t2 = time.perf_counter()
            z = model.transform(adata).latent
            t3 = time.perf_counter()
            ari, _ = scaling.kmeans_ari(z, truth, scaling.NB_SETTINGS["n_groups"])
            val = [float(v) for v in model.history["validation_elbo"]]
            rec = dict(meta, name=name, kwargs=kwargs, init_s=t1 - t0, fit_s=t2 - t1,
                       transform_s=t3 - t2, kmeans_ari=ari, epochs=len(val),
                       validation_elbo=val, best_validation_elbo=float(np.nanmax(val)),
                       train_settings={k: v for k, v in model.train_settings.items()
                                       if isinstance(v, (int, float, str, type(None)))})
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            print(f"{name}: fit {rec['fit_s']:.1f} s, {len(val)} epochs, best validation ELBO "
                  f"{rec['best_validation_elbo']:.2f}, ARI {ari:.3f}", flush=True)


def time_tl(adata, truth, kwargs: dict) -> dict:
    """One ``cellvi.tl.nbvae`` call on ``adata`` (its keys are overwritten): seconds, peak
    RSS, ARI."""
    import resource

    import scaling

    import cellvi
    from cellvi.models.nbvae import NBVAE

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    originals = {k: getattr(NBVAE, k) for k in ("__init__", "fit", "latent_and_elbo")}
    for k, fn in originals.items():
        setattr(NBVAE, k, timed(k.strip("_"), fn))
    a = adata
    try:
        t0 = time.perf_counter()
        model = cellvi.tl.nbvae(a, batch_key="batch", verbose=False, return_model=True, **kwargs)
        total = time.perf_counter() - t0
    finally:
        for k, fn in originals.items():
            setattr(NBVAE, k, fn)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ari, _ = scaling.kmeans_ari(a.obsm["X_nbvae"], truth, scaling.NB_SETTINGS["n_groups"])
    val = [float(v) for v in model.history["validation_elbo"]]
    print(f"tl.nbvae: {total:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in phases.items())}), "
          f"{len(val)} epochs, ARI {ari:.3f}, peak RSS {peak:.0f} MiB", flush=True)
    return dict(tl_s=total, phases_s=phases, peak_rss_mib=peak, kmeans_ari=ari, epochs=len(val),
                validation_elbo=val, best_validation_elbo=float(np.nanmax(val)),
                train_settings={k: v for k, v in model.train_settings.items()
                                if isinstance(v, (int, float, str, type(None)))},
                outlier_finite=bool(np.isfinite(a.obs["nbvae_outlier_score"]).all()))


if __name__ == "__main__":
    main()
