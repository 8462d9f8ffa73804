"""Writes the saved-model fixtures of ``tests/test_persist.py`` (run once per cellvi version
whose format should stay loadable; never overwrite an existing version's folder).

    python tests/data/make_fixtures.py

Each ``models_v<version>/`` holds a tiny trained NBVAE and GMVAE (``nbvae/``, ``gmvae/``:
``config.json`` + ``model.safetensors``), the small inputs they were trained on
(``counts.h5ad``, ``cyto.h5ad``) and the outputs they gave (``expected.npz``).
"""

from pathlib import Path

import numpy as np
import torch

import cellvi

torch.set_num_threads(1)
out = Path(__file__).parent / f"models_v{cellvi.__version__.replace('.', '_')}"
if out.exists():
    raise SystemExit(f"{out} exists; fixtures of a released version are never rewritten")
out.mkdir()
counts = cellvi.datasets.synthetic_counts(120, 30, n_groups=3, n_batches=2, seed=0)
counts.obs = counts.obs[["batch"]]
counts.obsm.clear()
counts.write_h5ad(out / "counts.h5ad")
nb = cellvi.models.NBVAE(counts, batch_key="batch", n_latent=3, n_hidden=8)
nb.fit(max_epochs=3, verbose=False)
nb.save(out / "nbvae")
cyto = cellvi.datasets.synthetic_cytometry(300, 5, n_populations=3, seed=0)
cyto.obs = cyto.obs[["batch"]]
cyto.write_h5ad(out / "cyto.h5ad")
gm = cellvi.models.GMVAE(cyto, batch_key="batch", n_components=3, n_latent=2, n_hidden=8)
gm.fit(max_epochs=3, warmup_epochs=2, verbose=False)
gm.save(out / "gmvae")
res = gm.transform(cyto, n_samples=0)  # v0.1 probabilities (p(c|z) at the mean)
np.savez(out / "expected.npz", nbvae_latent=nb.transform(counts).latent, gmvae_latent=res.latent,
         gmvae_probs=res.probs, gmvae_labels=res.labels.codes)
print("wrote", out)
