"""The negative-binomial VAE for scRNA-seq counts (:class:`NBVAE`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from .._settings import seeded
from ..clustering import batch_balanced_groups
from ..data import BackedRows, CountData, check_var_names, prepare_counts
from ..decoders import DISPERSIONS, LIKELIHOODS, CountDecoder
from ..device import DeviceData
from ..errors import InvalidInputError, MissingKeyError
from ..metrics import batch_separation
from ..objectives import ELBO, PENALTIES, BatchAdversary
from ..posteriors import POSTERIORS
from ..priors import StandardNormal
from ..train import LARGE_DATA_CELLS, resolve_backward_precision, train
from ..vae import VAE
from ._base import (
    Model,
    _check_posterior,
    boolean,
    check_trainable,
    deterministic,
    make_encoder,
    penalty_groups_setting,
    positive_int,
)
from ._persist import choice, flag, integer, number, text, texts

logger = logging.getLogger("cellvi")

__all__ = ["NBVAE", "NBVAEOutput", "batch_log_ratios", "default_batch_penalty", "BATCH_PENALTY",
           "LARGE_BATCH_PENALTY", "PENALTY_CELLS", "PENALTY_GROUPS", "SEPARATION_THRESHOLD"]

#: the weight of ``fit``'s latent batch penalty on small data (``integration_panel_variants.md``:
#: 100 was the setting at least the best peer on every ~1,000-cell panel set with every seed
#: above the control; 1,000 over-corrects)
BATCH_PENALTY = 100.0
#: the weight from ``PENALTY_CELLS[1]`` cells on: on the full-size (~11,000-cell) protocol sets
#: 30 beat 100 on all three (``integration_panel_fullsize_mmd30*.md``), at 3,300 cells the two
#: tied (``integration_panel_3k_mmd30_100.md``)
LARGE_BATCH_PENALTY = 30.0
#: ``default_batch_penalty`` is :data:`BATCH_PENALTY` up to the first number of cells,
#: :data:`LARGE_BATCH_PENALTY` from the second on, and log-linear in both between
PENALTY_CELLS = (1_000, 11_000)
#: ``fit``'s default applies :func:`default_batch_penalty` when the raw counts' batches are at least
#: this far apart (:func:`cellvi.metrics.batch_separation`, the largest over the batch keys):
#: the panel's protocol batches lie at 0.95-1.00, the Kang donor batches (where the penalty
#: lowers the cell-type ARI) at 0.14-0.18 (``docs/design.md``, NB-VAE batch penalty)
SEPARATION_THRESHOLD = 0.5
#: clusters within which ``fit``'s batch penalty aligns the batches by default
#: (:func:`cellvi.clustering.batch_balanced_groups`): against the penalty on all cells alike,
#: on the panel's protocol sets the type missing from one batch kept more of its own cluster
#: (isolated-label score +0.02-0.03 at 1,000 cells, +0.01 at full size) and the scib Total
#: rose on four of five sets (``integration_panel_groups_{1k,fullsize}.md``, seeds 0-2)
PENALTY_GROUPS = 8


def default_batch_penalty(n_obs: int) -> float:
    """``fit``'s penalty weight for ``n_obs`` cells whose batches lie apart: 100 up to 1,000
    cells, 30 from 11,000 on, log-linear between (``docs/design.md``, NB-VAE batch penalty)."""
    lo, hi = PENALTY_CELLS
    if n_obs <= lo:
        return BATCH_PENALTY
    if n_obs >= hi:
        return LARGE_BATCH_PENALTY
    t = math.log(n_obs / lo) / math.log(hi / lo)
    return float(BATCH_PENALTY ** (1.0 - t) * LARGE_BATCH_PENALTY ** t)


def batch_log_ratios(data: CountData, pseudo: float = 1e-6) -> list[np.ndarray]:
    """Per batch category, ``log`` of its mean expression proportions over the pooled ones.

    Returns one ``(n_categories, n_genes)`` array per batch key (divided by the number of keys),
    used to start the decoder's batch offsets where the data put them.
    """
    X = data.X
    n = X.shape[0]
    # X.T @ (1 / library) and (one-hot / library) @ X: the proportions without copying X
    # (weights in X's dtype: a float64 factor would make scipy copy X in float64)
    inv_lib = np.exp(-data.log_library[:, 0].astype(np.float64)).astype(X.dtype)
    weights = []
    for j, key in enumerate(data.batch_keys):
        n_cat = len(data.categories[key])
        codes = data.covs[:, j]
        w = (inv_lib / np.bincount(codes, minlength=n_cat)[codes]).astype(X.dtype)
        weights.append(sp.csr_matrix((w, (codes, np.arange(n))), shape=(n_cat, n)))
    pooled = np.zeros(X.shape[1])
    means = [np.zeros((w.shape[0], X.shape[1])) for w in weights]
    blocks = X.chunks() if isinstance(X, BackedRows) else [(0, X)]
    for start, block in blocks:
        stop = start + block.shape[0]
        pooled += np.asarray(block.T @ inv_lib[start:stop], dtype=np.float64).ravel()
        for m, w in zip(means, weights, strict=True):
            part = w[:, start:stop] @ block
            m += part.toarray() if sp.issparse(part) else np.asarray(part)
    pooled = np.log(pooled / n + pseudo)
    return [((np.log(m + pseudo) - pooled) / len(data.batch_keys)).astype(np.float32)
            for m in means]


class NBVAEOutput:
    """What :meth:`NBVAE.transform` gives: ``latent``, the ``float32`` cells x ``n_latent``
    posterior means."""

    def __init__(self, latent: np.ndarray):
        self.latent = latent


#: the settings of a saved NBVAE and their sane bounds (checked by ``load`` before building)
_SCHEMA = dict(
    layer=(text(optional=True), ...), batch_keys=(texts(max_len=64), ...),
    n_latent=(integer(1, 4096), ...), likelihood=(choice(*LIKELIHOODS), ...),
    dispersion=(choice(*DISPERSIONS), ...), n_hidden=(integer(1, 16384), ...),
    n_layers=(integer(1, 64), ...), dropout=(number(0.0, 1.0), ...),
    norm=(choice("batch", "layer", None), ...), input_scale=(number(1e-12, 1e15, optional=True), None),
    posterior=(choice(*POSTERIORS), "normal"), n_flows=(integer(1, 32), 2),
    encode_batch=(flag, True),
)


class NBVAE(Model):
    """Negative-binomial VAE for scRNA-seq counts, with batch correction.

    ``q(z | x, s)`` is a diagonal Gaussian from an MLP on ``log1p(x)`` and the batch ``s``;
    ``p(z) = N(0, I)``; ``p(x | z, s)`` is NB (or ZINB / Poisson) with mean
    ``library * softmax(f(z, s))``. The latent ``z`` is the batch-corrected representation.

    Args:
        adata: AnnData with raw counts in ``X`` or ``layer``.
        layer: layer with the raw counts (``None``: ``adata.X``).
        batch_key: obs key (or list of keys) of categorical batch covariates.
        n_latent: latent dimension.
        likelihood: ``"nb"``, ``"zinb"`` or ``"poisson"``.
        dispersion: ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"``.
        n_hidden, n_layers, dropout, norm: network settings.
        posterior: ``"normal"`` (diagonal Gaussian, default) or ``"iaf"``: the Gaussian
            followed by ``n_flows`` inverse autoregressive steps conditioned on the encoder
            (:class:`cellvi.posteriors.IAFEncoder`), for skewed or correlated posteriors.
        input_scale: what the encoder sees. ``None`` (default): ``log1p`` of the counts as
            they are. A number: each cell scaled to that total first,
            ``log1p(x / library * input_scale)``, as ``normalize_total`` + ``log1p`` does;
            ``"median"``: to the median library size of the training cells (stored as a
            number). The decoder always gets the observed library size. The default keeps
            the integration scores (``docs/design.md``, NB-VAE defaults).
        encode_batch: whether the encoder sees the batch (``True``, default) or only the
            decoder does (``False``, as scVI); with ``False`` the latent of a cell does not
            depend on the batch label it is given, and new batches can be encoded.

    Example:
        >>> model = cellvi.models.NBVAE(adata, layer="counts", batch_key="donor")
        >>> model.fit()
        >>> adata.obsm["X_nbvae"] = model.transform(adata).latent
    """

    _schema = _SCHEMA
    #: posterior samples of :func:`cellvi.diagnostics.outlier_scores` by default: one draw
    #: ranks the cells as 64 do (Spearman 0.9998, same AUROC of planted shuffled cells) at a
    #: fifth of the time of 8 (``benchmarks/results/outlier_samples.md``)
    outlier_samples = 1

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | Sequence[str] | None = None,
        n_latent: int = 10,
        likelihood: str = "nb",
        dispersion: str = "gene",
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        norm: str | None = "batch",
        input_scale: float | str | None = None,
        posterior: str = "normal",
        n_flows: int = 2,
        encode_batch: bool = True,
    ):
        n_latent, n_hidden = positive_int("n_latent", n_latent), positive_int("n_hidden", n_hidden)
        n_layers = positive_int("n_layers", n_layers)
        posterior, n_flows = _check_posterior(posterior, n_flows)
        data = prepare_counts(adata, layer, batch_key)
        check_trainable(data.X.shape[0])
        if isinstance(input_scale, str) and input_scale == "median":
            input_scale = float(np.median(np.exp(data.log_library.astype(np.float64))))
        if input_scale is not None and (isinstance(input_scale, str) or not input_scale > 0):
            raise InvalidInputError(f"input_scale must be a positive number, 'median' or None, "
                             f"got {input_scale!r}")
        settings: dict[str, Any] = dict(
            layer=layer, batch_keys=data.batch_keys, n_latent=n_latent, likelihood=likelihood,
            dispersion=dispersion, n_hidden=n_hidden, n_layers=n_layers,
            dropout=float(dropout), norm=norm,
            input_scale=None if input_scale is None else float(input_scale),
            posterior=posterior, n_flows=n_flows, encode_batch=boolean("encode_batch", encode_batch),
        )
        self._setup(settings, data.var_names, data.categories, data)

    # -- construction -------------------------------------------------------------------
    def _build(self, seed: int = 0) -> VAE:
        s = self.settings
        n_cats = [len(self.categories[k]) for k in s["batch_keys"]]
        with seeded(seed):
            encoder = make_encoder(len(self.var_names), s, n_cats)
            decoder = CountDecoder(s["n_latent"], len(self.var_names), likelihood=s["likelihood"],
                                   dispersion=s["dispersion"], n_hidden=s["n_hidden"],
                                   n_layers=s["n_layers"], n_cats_per_cov=n_cats, norm=s["norm"])
            if self._data is not None and n_cats:
                decoder.init_batch_offsets(batch_log_ratios(self._data))
            return VAE(encoder, decoder, StandardNormal(s["n_latent"]), log1p_input=True,
                       input_scale=s.get("input_scale"))

    def _to_device(self, d: CountData, device: torch.device) -> DeviceData:
        return DeviceData.from_arrays(d.X, device, covs=d.covs, log_library=d.log_library)

    def _prepare(self, adata: AnnData) -> CountData:
        check_var_names(adata, self.var_names)
        return prepare_counts(adata, self.settings["layer"], self.settings["batch_keys"] or None,
                              categories=self.categories, check=False)

    # -- training -----------------------------------------------------------------------
    @deterministic
    def fit(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 512,
        lr: float = 1e-3,
        kl_weight: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "auto",
        verbose: bool = True,
        callbacks: Sequence = (),
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        objective: str | ELBO = "elbo",
        batch_penalty: float | None = None,
        penalty_groups: int | None = None,
        penalty: str = "mmd",
        **train_kwargs: Any,
    ) -> NBVAE:
        """Train on the AnnData given at construction.

        Args:
            max_epochs: ``None`` picks about 6,000 steps (10..400 epochs); early stopping on a
                10% validation split usually ends sooner. Above 111,111 cells (a training
                split larger than one 100,000-cell epoch) the budget falls log-linearly to 2M
                cells seen from 1M cells on (:data:`cellvi.train.LARGE_DATA_CELLS`; 20 epochs
                of 100,000 cells at batch 512; ``large_data_cells=None`` keeps 6,000 steps).
            batch_size: cells per mini-batch.
            lr: Adam learning rate.
            kl_weight: weight β of the KL term after the KL warm-up (1, the default, gives
                the ELBO; ``docs/design.md`` has the measured alternatives).
            seed: makes the weights, split and training reproducible on the CPU.
            device: ``"auto"`` (CUDA, then MPS, then CPU), or a torch device.
            verbose: progress bar.
            callbacks: ``callback(epoch, history)`` functions (or
                :class:`cellvi.train.Callback` objects) called after each epoch.
            checkpoint_dir: save the training state there every ``checkpoint_every``
                epochs (atomically; :mod:`cellvi.checkpoint`).
            resume: continue from the checkpoint in ``checkpoint_dir`` (same data and
                settings): the result is the same as an uninterrupted fit.
            objective: ``"elbo"`` (default), ``"iwae"`` / ``"iwae<K>"`` (the importance-weighted
                bound with 8 / K samples, :class:`cellvi.objectives.IWAE`) or an objective.
            batch_penalty: weight (nats per cell) of a penalty on the latent's dependence on
                the batch (MMD between each batch's latent means and all of them, annealed
                with the KL warm-up; :func:`cellvi.objectives.batch_mmd`). ``None``
                (default): :func:`default_batch_penalty` of the number of cells (100 up to
                1,000 cells, 30 from 11,000 on, log-linear between) when the batches of the
                raw counts lie apart (:func:`cellvi.metrics.batch_separation` at least
                :data:`SEPARATION_THRESHOLD`, as between protocols), else ``0``; the
                separation is logged and kept in ``train_settings["batch_separation"]``. The
                penalty lifted every integration-panel set above the best peer, but on mild
                donor batches it lowers the cell-type ARI (``docs/design.md``, NB-VAE batch
                penalty). A number sets the weight yourself (``0``: none).
            penalty_groups: with a batch penalty, align the batches within this many
                clusters of the per-batch-centred PCA of the raw counts
                (:func:`cellvi.clustering.batch_balanced_groups`): each batch is compared
                with all cells reweighted to its own mix of clusters, so that a cell type
                one batch lacks is not pulled towards that batch's cells
                (:func:`cellvi.objectives.batch_mmd` with ``groups``). ``None`` (default):
                :data:`PENALTY_GROUPS` (8); ``0``: each batch is compared with all cells
                alike (the default before 2026-12-07; ``docs/design.md``, NB-VAE batch
                penalty, has both on the panel).
            penalty: what measures the latent's dependence on the batch: ``"mmd"``
                (default, :func:`cellvi.objectives.batch_mmd`) or ``"adversary"`` (a
                classifier of the batch trained alongside, :class:`cellvi.objectives.BatchAdversary`;
                with ``penalty_groups`` it also sees the cell's group, and a cell is only
                pushed towards its group's mix of batches).
            **train_kwargs: further fields of :class:`cellvi.train.TrainConfig`
                (``kl_warmup_steps``, ``patience``, ``validation_fraction``, ...).
        """
        if penalty not in PENALTIES:
            raise InvalidInputError(f"penalty must be one of {PENALTIES}, got {penalty!r}")
        separation = None
        if batch_penalty is None:
            batch_penalty, separation = self._default_batch_penalty(self._require_data())
        objective = self._objective(objective, batch_penalty)
        penalty_groups = penalty_groups_setting(penalty_groups, objective.batch_penalty, PENALTY_GROUPS)
        arrays, data, seed = self._start_fit(seed, device)
        if penalty_groups:
            data.obs["mmd_groups"] = torch.as_tensor(
                self._penalty_groups(arrays, penalty_groups, seed), device=data.x.device)
        if penalty == "adversary" and objective.batch_penalty:
            objective = dataclasses.replace(objective, penalty=penalty)
            self.module.batch_adversary = BatchAdversary(
                self.settings["n_latent"], [len(self.categories[k]) for k in self.settings["batch_keys"]],
                n_groups=penalty_groups, seed=seed).to(self.device)
        train_kwargs.setdefault("large_data_cells", LARGE_DATA_CELLS)
        config = self._train_config(seed=seed, verbose=verbose, max_epochs=max_epochs,
                                    batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                                    **train_kwargs)
        checkpoint = self._checkpointer(checkpoint_dir, checkpoint_every, resume, data, seed,
                                        config, objective=repr(objective),
                                        penalty_groups=penalty_groups)
        try:
            self.history = train(self.module, data, config, objective=objective,
                                 callbacks=callbacks, checkpoint=checkpoint)
        finally:  # the classifier only serves training: the model keeps no trace of it
            if hasattr(self.module, "batch_adversary"):
                del self.module.batch_adversary
        self._finish_fit(max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                         kl_weight=kl_weight, seed=seed, device=str(self.device),
                         objective=repr(objective), batch_penalty=float(objective.batch_penalty),
                         batch_separation=separation, penalty_groups=penalty_groups,
                         penalty=objective.penalty,
                         **{**train_kwargs, "backward_precision": resolve_backward_precision(
                             config.backward_precision, self.device)})
        return self

    @staticmethod
    def _penalty_groups(d: CountData, n_groups: int, seed: int) -> np.ndarray:
        """:func:`cellvi.clustering.batch_balanced_groups` of the training counts."""
        return batch_balanced_groups(_row_reader(d.X), d.covs, n_groups, seed=seed)

    @staticmethod
    def _default_batch_penalty(d: CountData) -> tuple[float, float | None]:
        """``fit``'s default penalty and the batch separation it was chosen from (``None``
        without batches)."""
        if d.covs is None:
            return 0.0, None
        n = d.X.shape[0]
        idx = np.sort(np.random.default_rng(0).choice(n, min(n, 5000), replace=False))
        rows = _row_reader(d.X)[idx]
        seps = [batch_separation(rows, d.covs[idx, j], n_cells=len(idx))
                for j in range(d.covs.shape[1])]
        seps = [v for v in seps if np.isfinite(v)]
        if not seps:
            return 0.0, None
        separation = float(max(seps))
        penalty = default_batch_penalty(n) if separation >= SEPARATION_THRESHOLD else 0.0
        logger.info("batch separation of the raw counts %.3f (threshold %.2f): batch_penalty=%g",
                    separation, SEPARATION_THRESHOLD, penalty)
        return penalty, separation

    # -- inference ----------------------------------------------------------------------
    @deterministic
    def transform(self, adata: AnnData, *, batch_size: int = 4096,
                  refine_steps: int = 0) -> NBVAEOutput:
        """The batch-corrected latent (posterior means) of the cells of ``adata``; with
        ``refine_steps``, of each cell's refined posterior (:meth:`get_latent`)."""
        return NBVAEOutput(self.get_latent(adata, batch_size=batch_size, refine_steps=refine_steps))

    @deterministic
    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData,
        *,
        library_size: float = 1e4,
        transform_batch: str | dict[str, str] | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Denoised expression: decoder means at the posterior mean, scaled to ``library_size``.

        Args:
            library_size: counts per cell of the output (``1e4`` is CP10k).
            transform_batch: decode every cell as if it came from this batch category
                (of the first batch key, or ``{key: category}``) -- batch-corrected
                expression. ``None`` keeps each cell's own batch.

        Returns:
            ``float32`` array, cells x genes.
        """
        self._require_trained()
        self.module.eval()
        target = self._transform_codes(transform_batch)
        data = self._to_device(self._prepare(adata), self.device)
        out = []
        for batch in data.iter_batches(torch.arange(data.n_obs), batch_size):
            z = self.module.encode(batch).mean
            covs = batch.get("covs")
            if target is not None:
                covs = covs.clone()
                for j, code in target.items():
                    covs[:, j] = code
            out.append((self.module.decoder.proportions(z, covs) * library_size).cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def _transform_codes(self, transform_batch) -> dict[int, int] | None:
        if transform_batch is None:
            return None
        keys = self.settings["batch_keys"]
        if not keys:
            raise InvalidInputError("transform_batch needs a model trained with batch_key")
        if not isinstance(transform_batch, dict):
            transform_batch = {keys[0]: transform_batch}
        codes = {}
        for key, cat in transform_batch.items():
            if key not in keys:
                raise MissingKeyError(f"{key!r} is not one of the model's batch keys {keys}")
            cats = self.categories[key]
            if str(cat) not in cats:
                raise InvalidInputError(f"transform_batch: {cat!r} is not a category of {key!r} ({cats})")
            codes[keys.index(key)] = cats.index(str(cat))
        return codes

    def __repr__(self) -> str:
        s = self.settings
        return (f"NBVAE({len(self.var_names)} genes, n_latent={s['n_latent']}, "
                f"likelihood={s['likelihood']!r}, batch_keys={s['batch_keys']}, {self._state()})")


def _row_reader(X):
    """``X`` itself, or for a backed matrix a reader of its rows by index (as CSR)."""
    return _RowReader(X) if isinstance(X, BackedRows) else X


class _RowReader:
    """Rows of a backed matrix by index, as CSR (``reader[idx]``)."""

    def __init__(self, rows: BackedRows):
        self.rows, self.shape = rows, rows.shape

    def __getitem__(self, idx) -> sp.csr_matrix:
        return sp.csr_matrix(self.rows.matrix[idx])
