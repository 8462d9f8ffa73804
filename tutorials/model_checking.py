# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Checking a model: bounds, flows, gaps, predictive checks, outliers, checkpoints
#
# A latent space is only as trustworthy as the model behind it. This tutorial takes the
# PBMC demo bundled with cellvi (Kang et al. 2018, 1,556 cells) and the bundled
# flowsom_68983 flow file and asks of a trained model:
#
# 1. how well does it explain held-out cells (`marginal_log_likelihood`, an
#    importance-weighted bound on log p(x))?
# 2. does a more flexible posterior (`posterior="iaf"`, a normalising flow) help?
# 3. how much does amortization cost (`cellvi.diagnostics.amortization_gap`), and does
#    per-cell refinement (`refine_steps=`) recover it?
# 4. is the likelihood right (`cellvi.diagnostics.predictive_check`: NB vs Poisson)?
# 5. which cells does it not explain (`obs["nbvae_outlier_score"]`, planted doublets)?
# 6. are its posteriors calibrated (`cellvi.diagnostics.calibration_report`, on simulators
#    whose exact posterior is known)?
# 7. can a killed training run be resumed (`checkpoint_dir=`, `resume=True`)?
#
# CI executes this file with `CELLVI_TUTORIAL_FAST=1` (few epochs, few samples): the figures
# it prints then only show that each step runs; drop that variable for real figures
# (`benchmarks/model_checking.py` measures them on Kang 8 donors).

# %%
import os
import tempfile

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

import cellvi

FAST = bool(os.environ.get("CELLVI_TUTORIAL_FAST"))
MAX_EPOCHS = 5 if FAST else None
K = 50 if FAST else 1000  # importance samples of log p(x)
STEPS = 20 if FAST else 200  # refinement steps

# %% [markdown]
# ## Held-out cells
# A tenth of the cells is kept out of training; every bound below is computed on them.

# %%
adata = cellvi.datasets.load("kang2018_pbmc_ctrl_stim_small")
rng = np.random.default_rng(0)
held = rng.random(adata.n_obs) < 0.1
train, test = adata[~held].copy(), adata[held].copy()
print(f"{train.n_obs} training cells, {test.n_obs} held out")

# %% [markdown]
# ## Marginal likelihood, diagonal vs flow posterior
# `marginal_log_likelihood` uses the model's own prior; it rises with the number of
# importance samples towards log p(x). The ELBO is below it.

# %%
models = {}
for posterior in ("normal", "iaf"):
    m = cellvi.models.NBVAE(train, batch_key="sample", posterior=posterior)
    models[posterior] = m.fit(max_epochs=MAX_EPOCHS, seed=0, verbose=False)
    elbo = m.elbo(test, n_samples=16).mean()
    mll = m.marginal_log_likelihood(test, n_samples=K).mean()
    print(f"{posterior:>6} posterior: ELBO {elbo:.1f}, IWAE-{K} {mll:.1f} nats/cell")

# %% [markdown]
# ## Amortization gap and refinement
# The gap between the ELBO and log p(x) splits into what a diagonal Gaussian cannot
# express (approximation gap) and what the encoder loses by predicting each cell's
# posterior instead of optimising it (amortization gap). `refine_steps` optimises each
# cell's posterior from the encoder's.

# %%
gaps = cellvi.diagnostics.amortization_gap(models["normal"], test, n_samples=K,
                                           refine_steps=STEPS)
print(gaps[["approximation_gap", "amortization_gap"]].mean().round(2))
refined = models["normal"].get_latent(test, refine_steps=STEPS)
print("refined latent:", refined.shape)

# %% [markdown]
# ## Is the likelihood right?
# Data replicated from the posterior predictive should show the spread of the real data.
# A Poisson likelihood cannot: its mean squared Pearson residual is far above 1.

# %%
poisson = cellvi.models.NBVAE(train, batch_key="sample", likelihood="poisson")
poisson.fit(max_epochs=MAX_EPOCHS, seed=0, verbose=False)
for name, m in (("nb", models["normal"]), ("poisson", poisson)):
    ppc = cellvi.diagnostics.predictive_check(m, test, n_samples=10)
    print(f"{name:>7}: median Pearson ratio {ppc.attrs['median_pearson_ratio']:.2f}, "
          f"observed/replicated variance {ppc.attrs['median_var_ratio']:.2f}")

# %% [markdown]
# ## Cells the model does not explain: planted doublets
# `tl.nbvae` writes `obs["nbvae_outlier_score"]` (negative ELBO, a robust z-score within
# batch). Doublets, made here by adding two cells of different types and thinning the sum
# to a real library size, should score high.

# %%
X = train.X.toarray() if sp.issparse(train.X) else np.asarray(train.X)
types = train.obs["cell_type"].astype(str).to_numpy()
n_dbl = max(20, train.n_obs // 20)
a = rng.integers(0, train.n_obs, n_dbl)
b = np.array([rng.choice(np.flatnonzero(types != types[i])) for i in a])
pair = X[a] + X[b]
lib = X.sum(1)[rng.integers(0, train.n_obs, n_dbl)]
dbl = rng.binomial(pair.astype(np.int64), np.minimum(1.0, lib / pair.sum(1))[:, None])
planted = ad.concat([train, ad.AnnData(sp.csr_matrix(dbl.astype(np.float32)),
                                       obs=train.obs.iloc[a].reset_index(drop=True),
                                       var=train.var)], index_unique="-")
is_dbl = np.r_[np.zeros(train.n_obs, bool), np.ones(n_dbl, bool)]
cellvi.tl.nbvae(planted, batch_key="sample", max_epochs=MAX_EPOCHS, verbose=False)
print("doublet AUROC of the outlier score:",
      round(roc_auc_score(is_dbl, planted.obs["nbvae_outlier_score"]), 3))

# %% [markdown]
# ## Flow cytometry: events with impossible marker combinations
# Events whose markers are shuffled across events match no population.

# %%
flow = cellvi.datasets.load("flowsom_68983_mouse_flow_gated")
markers = list(flow.var_names[flow.var["has_marker"].to_numpy(bool)])
Xf = np.asarray(flow.layers["compensated_logicle"], dtype=np.float32)
bad = rng.random(flow.n_obs) < 0.02
for j in (flow.var_names.get_loc(m) for m in markers):
    Xf[bad, j] = Xf[rng.permutation(flow.n_obs)[: bad.sum()], j]
flow.layers["compensated_logicle_shuffled"] = Xf
cellvi.tl.gmvae(flow, layer="compensated_logicle_shuffled", markers=markers,
                max_epochs=MAX_EPOCHS, verbose=False)
print("shuffled-event AUROC of the outlier score:",
      round(roc_auc_score(bad, flow.obs["gmvae_outlier_score"]), 3))

# %% [markdown]
# ## Calibration against an exact posterior
# Real data have no known posterior, so calibration is checked on oracles:
# `cellvi.datasets.gaussian_mixture` draws overlapping populations through a known linear
# map, whose exact `p(c | x)` and posterior of the noise-free signal
# (`cellvi.datasets.exact_posterior`) the report compares with the model's: coverage of
# credible intervals, simulation-based calibration ranks (uniform when calibrated), and
# the expected calibration error (ECE) of the cluster probabilities. The `exact` row shows
# what a perfect posterior scores with the same number of draws.

# %%
oracle = cellvi.datasets.gaussian_mixture(1500 if FAST else 6000, seed=0)
mix = cellvi.models.GMVAE(oracle, n_components=5).fit(max_epochs=MAX_EPOCHS, verbose=False)
report = cellvi.diagnostics.calibration_report(mix, oracle, n_samples=49 if FAST else 199)
print(report.summary.round(3))
print(report.reliability.round(3))  # confidence vs accuracy per bin: over-confident if below

# %% [markdown]
# On overlapping populations the GMVAE's probabilities are over-confident (confidence
# above accuracy: `benchmarks/results/calibration.md` measures it over seeds); read
# `gmvae_confidence` as a ranking of cells, not as a probability, until that is fixed.

# %% [markdown]
# ## A killed run resumes where it stopped
# `checkpoint_dir` saves the training state after every epoch (atomically). Here a callback
# interrupts the fit after two of four epochs, as a crash would; the same call with
# `resume=True` continues and ends exactly where an uninterrupted fit ends
# (`cellvi.settings.deterministic` makes the comparison exact at any thread count).

# %%
class Crash(cellvi.train.Callback):
    def on_validation_end(self, epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash")


cellvi.settings.deterministic = True
with tempfile.TemporaryDirectory() as tmp:
    plain = cellvi.models.NBVAE(train, batch_key="sample").fit(max_epochs=4, seed=1,
                                                                verbose=False)
    try:
        cellvi.models.NBVAE(train, batch_key="sample").fit(
            max_epochs=4, seed=1, verbose=False, checkpoint_dir=tmp, callbacks=[Crash()])
    except KeyboardInterrupt:
        print("crashed after epoch 2; checkpoint:", os.listdir(tmp))
    resumed = cellvi.models.NBVAE(train, batch_key="sample").fit(
        max_epochs=4, seed=1, verbose=False, checkpoint_dir=tmp, resume=True)
    same = np.array_equal(resumed.get_latent(test), plain.get_latent(test))
cellvi.settings.deterministic = False
print("the resumed fit gives identical latents to an uninterrupted one:", same)
assert same
