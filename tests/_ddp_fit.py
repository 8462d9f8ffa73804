"""Worker of ``test_distributed.py``: fits an NB-VAE or a GMVAE (under ``torchrun``:
data-parallel) and writes the fit's figures to ``<out>/rank<r>.json``; ``gather`` only checks
that :func:`cellvi.distributed.gather_rows` undoes :func:`~cellvi.distributed.shard`.
``python tests/_ddp_fit.py OUT SEED [nbvae|gmvae|gather]``."""

import hashlib
import json
import sys
from pathlib import Path

import torch

import cellvi
from cellvi import distributed

out, seed = Path(sys.argv[1]), int(sys.argv[2])
kind = sys.argv[3] if len(sys.argv) > 3 else "nbvae"
torch.set_num_threads(1)
if kind == "gather":
    distributed.setup(torch.device("cpu"))
    rank, size = distributed.world()
    n = 11  # shares of 6 and 5 rows
    rows = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    got = distributed.gather_rows(rows[distributed.shard(torch.arange(n))], n)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, size=size, equal=bool(torch.equal(got, rows)), shape=list(got.shape))))
    sys.exit(0)
extra = {}
if kind == "gmvae":
    adata = cellvi.datasets.synthetic_cytometry(3000, 10, n_populations=5, seed=2)
    model = cellvi.models.GMVAE(adata, batch_key="batch")  # discovery: prunes, then merges
    short = cellvi.models.GMVAESchedule(warmup_steps=100, mixture_steps=300)
    model.fit(seed=seed, verbose=False, device="cpu", schedule=short)
    from sklearn.metrics import adjusted_rand_score

    labels = model.transform(adata).labels
    extra = dict(n_clusters=model.n_clusters, n_components=model.history["n_components"],
                 ari=float(adjusted_rand_score(adata.obs["population"], labels)),
                 merges=len(model.merges))
else:
    adata = cellvi.datasets.synthetic_counts(2000, 200, n_groups=3, n_batches=2, seed=1)
    model = cellvi.models.NBVAE(adata, batch_key="batch", n_hidden=64)
    model.fit(max_epochs=25, seed=seed, verbose=False, device="cpu", early_stopping=False)
weights = b"".join(v.numpy().tobytes() for v in model.module.state_dict().values())
elbo = model.elbo(adata, n_samples=8)  # under torchrun: each process scores its share
rank, size = distributed.world()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps(dict(
    rank=rank, size=size, seed=seed, elbo=float(elbo.mean()), elbo_cells=len(elbo),
    elbo_hash=hashlib.sha256(elbo.tobytes()).hexdigest(), n_obs=adata.n_obs,
    weights=hashlib.sha256(weights).hexdigest(), device=str(model.device),
    validation_elbo=model.history["validation_elbo"], main=distributed.is_main_process(),
    **extra)))
