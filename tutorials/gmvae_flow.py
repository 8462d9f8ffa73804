# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Cell populations of a flow cytometry sample with the GMVAE
#
# This tutorial runs on the flow cytometry demo bundled with cellvi: 19,225 events of a mouse
# sample from the FlowSOM example (`flowsom_68983_mouse_flow_gated`). The events have been
# gated by hand, so we can check the populations the model finds. It shows the whole round
# trip a flow user makes:
#
# 1. compensate raw intensities and transform them (`cellvi.pp`);
# 2. discover populations (`cellvi.tl.gmvae`), then name them from marker medians;
# 3. ask for a fixed number of clusters instead;
# 4. label new events with the trained model, then save and reload it.
#
# CI executes this file with `CELLVI_TUTORIAL_FAST=1` (few epochs on a fifth of the events).
# Drop that variable for the real thing.

# %%
import logging
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402

import cellvi  # noqa: E402

logging.basicConfig(level=logging.INFO)
FAST = bool(os.environ.get("CELLVI_TUTORIAL_FAST"))
MAX_EPOCHS = 5 if FAST else None  # None: chosen from the data size, with early stopping

# %% [markdown]
# ## Data: raw, uncompensated intensities
# `X` holds the intensities as the instrument wrote them. `uns["spillover_text"]` holds the
# file's `SPILL` keyword. `var["has_marker"]` flags the 10 fluorescence channels that carry a
# marker; the others are scatter, time and an unused channel. (For your own files,
# `cellvi.io.read_fcs` builds such an AnnData and keeps the spillover matrix in `uns`.)

# %%
adata = cellvi.datasets.load("flowsom_68983_mouse_flow_gated")
if FAST:  # CI: a random fifth of the events
    adata = sc.pp.subsample(adata, n_obs=4000, random_state=0, copy=True)
markers = list(adata.var_names[adata.var["has_marker"].astype(bool)])
names = dict(zip(adata.var_names, adata.var["marker"].astype(str), strict=True))
print(adata)
print("markers:", [names[m] for m in markers])

# %% [markdown]
# ## Compensation, then logicle
# Fluorescence spills into neighbouring detectors. Compensate first, then transform;
# transforming uncompensated data gives wrong populations. Both steps write new layers, so
# `X` stays as it was. They also record what was done in `uns["cellvi_preprocessing"]`.

# %%
cellvi.pp.compensate(adata)  # spillover from uns; writes layers["compensated"]
cellvi.pp.logicle(adata, layer="compensated", key_added="logicle", channels=markers)
print(adata.uns["cellvi_preprocessing"])

# %% [markdown]
# ## Population discovery
# With `n_components=None` (the default), the model starts from 30 mixture components. A
# sparse prior empties the ones it does not need, and components that share their cells are
# merged. The number of populations is found, not given. The call writes:
#
# - `obs["gmvae"]`: labels "0", "1", ..., ordered by size;
# - `obs["gmvae_confidence"]`: the cluster posterior of each event's label;
# - `obsm["X_gmvae"]`: the latent;
# - `obsm["gmvae_probs"]`: all the cluster probabilities;
# - `uns["gmvae"]`: settings, history, per-cluster marker medians and the merges.

# %%
model = cellvi.tl.gmvae(adata, layer="logicle", markers=markers, max_epochs=MAX_EPOCHS, seed=0,
                        return_model=True, verbose=False)
print(model)
print(adata.obs["gmvae"].value_counts().sort_index())
print("median confidence:", round(float(adata.obs["gmvae_confidence"].median()), 3))

# %% [markdown]
# How the clusters came about: every merge of components, with its score (the entropy
# drop per cell of the smaller side). Scores just above `merge_threshold` (0.125) are the
# close calls; raise `merge_threshold` to keep such neighbours apart, or pass `n_components`.
# Rows with the rule `vetoed (bimodal)` are entangled pairs that were kept apart because
# their cells form two modes in the markers (`cellvi.clustering.bimodality`).

# %%
print(adata.uns["gmvae"]["merges"].round(3).to_string())

# %% [markdown]
# ## Naming the clusters
# The marker medians of each cluster, on the logicle scale, are what a flow user reads to
# name a population (CD3+ CD4+ are CD4 T cells, CD19+ are B cells, ...).

# %%
medians = adata.uns["gmvae"]["marker_medians"].rename(columns=names)
fig, ax = plt.subplots(figsize=(6, 0.4 * len(medians) + 1.5))
im = ax.imshow(medians.to_numpy(), aspect="auto", cmap="viridis")
ax.set_xticks(range(medians.shape[1]), medians.columns, rotation=90)
ax.set_yticks(range(len(medians)), medians.index)
ax.set_xlabel("marker")
ax.set_ylabel("cluster")
fig.colorbar(im, label="median (logicle)")
fig.tight_layout()
print(medians.round(2))

# %% [markdown]
# Here the events were also gated by hand (`obs["cell_type"]`). This is how the clusters
# compare with the gates. `Unlabeled` events fell in no gate, so they are left out of the F1.

# %%
print(pd.crosstab(adata.obs["cell_type"], adata.obs["gmvae"]))
f1, per_population = cellvi.metrics.hungarian_f1(adata.obs["cell_type"], adata.obs["gmvae"],
                                                 exclude=["Unlabeled"])
print("mean F1 after one-to-one matching:", round(f1, 3))

# %% [markdown]
# ## A UMAP of the latent
# The latent is an ordinary embedding for Scanpy.

# %%
sc.pp.neighbors(adata, use_rep="X_gmvae", random_state=0)
sc.tl.umap(adata, random_state=0)
fig = sc.pl.umap(adata, color=["gmvae", "cell_type"], show=False, return_fig=True)

# %% [markdown]
# ## A fixed number of clusters
# To get exactly K clusters, pass `n_components=K`. The model first fits about 3K components,
# then merges the most entangled ones; when only distinct groups are left and there are still
# more than K, the smallest group joins the one it shares most cells with. Use `key_added` to
# keep both results.

# %%
cellvi.tl.gmvae(adata, layer="logicle", markers=markers, n_components=6, key_added="gmvae6",
                max_epochs=MAX_EPOCHS, seed=0, verbose=False)
print(adata.obs["gmvae6"].value_counts().sort_index())

# %% [markdown]
# ## Labels for new events, and a saved model
# `transform` gives the latent, labels and probabilities of events the model has not seen,
# such as another sample measured with the same panel and preprocessing. Here a fifth of the events are held out of the training.
# The model is saved as safetensors + JSON (no pickle). Reloaded, it gives the same latent
# and labels.

# %%
rng = np.random.default_rng(0)
held_out = rng.random(adata.n_obs) < 0.2
train, new = adata[~held_out].copy(), adata[held_out].copy()
model = cellvi.models.GMVAE(train, layer="logicle", markers=markers)
model.fit(max_epochs=MAX_EPOCHS, seed=0, verbose=False)
out = model.transform(new)  # .latent, .labels, .probs, .confidence
labels = out.labels
print("held-out events per cluster:", np.bincount(labels.codes, minlength=model.n_clusters))
print("median confidence of the held-out events:", float(np.median(out.confidence)))

with tempfile.TemporaryDirectory() as tmp:
    model.save(os.path.join(tmp, "gmvae"))
    back = cellvi.models.GMVAE.load(os.path.join(tmp, "gmvae"), new)
    again = back.transform(new)
    same = np.array_equal(again.latent, out.latent)
    same_labels = np.array_equal(again.labels.codes, labels.codes)
print("reloaded model gives identical latents:", same, "and identical labels:", same_labels)
assert same and same_labels
