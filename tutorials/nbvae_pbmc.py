# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Batch-corrected latent space of PBMC with the NB-VAE
#
# This tutorial runs on the PBMC demo bundled with cellvi (Kang et al. 2018: 1,556 cells,
# two donors, control and IFN-β stimulated cells). It shows the whole Scanpy round trip:
# raw counts in, `cellvi.tl.nbvae`, neighbours/UMAP/Leiden on `X_nbvae`, denoised
# expression, saving and reloading the model.
#
# CI executes this file with `CELLVI_TUTORIAL_FAST=1` (few epochs); drop that variable for
# the real thing.

# %%
import logging
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import scanpy as sc  # noqa: E402

import cellvi  # noqa: E402

logging.basicConfig(level=logging.INFO)
FAST = bool(os.environ.get("CELLVI_TUTORIAL_FAST"))
MAX_EPOCHS = 5 if FAST else None  # None: chosen from the data size, with early stopping

# %% [markdown]
# ## Data: raw counts
# The model reads raw integer counts. Keep them in a layer before normalising, so that the
# log-normalised matrix can be used for plots and marker genes.

# %%
adata = cellvi.datasets.load("kang2018_pbmc_ctrl_stim_small")
adata.layers["counts"] = adata.X.copy()
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
print(adata)

# %% [markdown]
# ## Train the NB-VAE, correcting for the donor
# `cellvi.tl.nbvae` writes the posterior means to `adata.obsm["X_nbvae"]` and the settings
# and training history to `adata.uns["nbvae"]`. It never touches `X` or the layers.

# %%
model = cellvi.tl.nbvae(adata, layer="counts", batch_key="donor", max_epochs=MAX_EPOCHS,
                        seed=0, return_model=True, verbose=False)
hist = adata.uns["nbvae"]["history"]
print(f"{len(hist['epoch'])} epochs, final validation ELBO {hist['validation_elbo'][-1]:.1f}")

# %% [markdown]
# ## The usual Scanpy steps on the latent

# %%
sc.pp.neighbors(adata, use_rep="X_nbvae", random_state=0)
sc.tl.umap(adata, random_state=0)
sc.tl.leiden(adata, flavor="igraph", n_iterations=2, random_state=0)
fig = sc.pl.umap(adata, color=["cell_type", "donor", "condition", "leiden"], show=False,
                 return_fig=True)

# %% [markdown]
# How well do clusters match the annotation, and how well are donors mixed?

# %%
z = adata.obsm["X_nbvae"]
print("Leiden ARI vs cell_type:", round(cellvi.metrics.ari(adata.obs["cell_type"], adata.obs["leiden"]), 3))
print("donor iLISI (0 = separated, 1 = mixed):", round(cellvi.metrics.ilisi(z, adata.obs["donor"]), 3))

# %% [markdown]
# ## Denoised, batch-corrected expression
# Decode every cell as if it came from donor 101, at 10,000 counts per cell.

# %%
adata.layers["denoised"] = model.get_normalized_expression(adata, library_size=1e4,
                                                           transform_batch="101")
print(adata.to_df("denoised")[["ISG15", "CD14", "MS4A1"]].groupby(adata.obs["cell_type"], observed=True).mean().round(1))

# %% [markdown]
# ## Save and reload
# Weights go to safetensors, settings and gene names to JSON. Loading checks the genes and
# the donor categories of the AnnData you give it.

# %%
with tempfile.TemporaryDirectory() as tmp:
    model.save(tmp + "/pbmc_nbvae")
    again = cellvi.models.NBVAE.load(tmp + "/pbmc_nbvae", adata=adata)
    assert np.array_equal(again.get_latent(adata), z)
print("reloaded model gives identical latents")
