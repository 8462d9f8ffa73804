"""Data registry and simulators with known ground truth.

Registry names (see :func:`available`) resolve, in this order, to:

1. ``$CELLVI_DATA_DIR/<file>`` (CI points it at the shared data folder),
2. the demo files bundled with the package,
3. the local cache (``cache_dir``, default ``pooch.os_cache("cellvi")``),
4. a download with :mod:`pooch` into the cache, where the registry has a ``url``.

Every file's SHA-256 is checked against the registry; a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger("cellvi")

__all__ = ["available", "registry", "path", "load", "synthetic_counts", "synthetic_cytometry",
           "linear_gaussian", "gaussian_mixture", "exact_posterior", "ExactPosterior",
           "protocol_batches", "cytometry_batches", "PROTOCOL_STRENGTHS",
           "DataNotFoundError"]


class DataNotFoundError(FileNotFoundError):
    """A registry dataset could not be found locally or downloaded."""


def registry_dir() -> Path:
    """Folder holding ``registry.toml`` and the bundled demo files."""
    installed = Path(__file__).parent / "data_registry"  # wheel install
    if (installed / "registry.toml").exists():
        return installed
    return Path(__file__).resolve().parents[1] / "data_registry"  # source / editable install


def registry(registry_file: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The registry as ``{name: entry}``."""
    file = Path(registry_file) if registry_file else registry_dir() / "registry.toml"
    with open(file, "rb") as fh:
        return tomllib.load(fh)


def available() -> pd.DataFrame:
    """Table of the registry datasets (name, shape, kind, license, bundled, url)."""
    rows = []
    for name, e in registry().items():
        rows.append(dict(name=name, n_obs=e["shape"][0], n_vars=e["shape"][1], kind=e.get("kind", ""),
                         bundled=e.get("bundled", False), license=e.get("license", ""),
                         downloadable=bool(e.get("url")), description=e.get("description", "")))
    return pd.DataFrame(rows).set_index("name")


@lru_cache(maxsize=64)
def _sha256(file: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(file: Path, expected: str) -> Path:
    st = file.stat()
    got = _sha256(str(file), st.st_size, st.st_mtime)
    if got != expected:
        raise ValueError(
            f"checksum mismatch for {file}: sha256 {got}, registry expects {expected}. The file is "
            "damaged or a different version; delete it (or fix CELLVI_DATA_DIR) and try again."
        )
    return file


def path(
    name: str,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    registry_file: str | Path | None = None,
) -> Path:
    """Local path of registry dataset ``name``, checksum-verified (see module docs for order)."""
    reg = registry(registry_file)
    if name not in reg:
        raise KeyError(f"unknown dataset {name!r}; registry names: {sorted(reg)}")
    entry = reg[name]
    fname, sha = entry["file"], entry["sha256"]
    candidates = []
    data_dir = data_dir or os.environ.get("CELLVI_DATA_DIR")
    if data_dir:
        candidates.append(Path(data_dir) / fname)
    if entry.get("bundled"):
        candidates.append(registry_dir() / fname)
    import pooch

    cache = Path(cache_dir) if cache_dir else Path(pooch.os_cache("cellvi"))
    candidates.append(cache / fname)
    for cand in candidates:
        if cand.is_file():
            return _verify(cand, sha)
    url = entry.get("url", "")
    if url and download:
        logger.info("downloading %s from %s", name, url)
        got = pooch.retrieve(url, known_hash=f"sha256:{sha}", fname=fname, path=cache,
                             progressbar=False)
        return Path(got)
    raise DataNotFoundError(
        f"dataset {name!r} ({fname}) was not found in {[str(c.parent) for c in candidates]}"
        + ("" if url else " and the registry has no download url for it")
        + ". Set CELLVI_DATA_DIR to the folder holding it."
    )


def load(name: str, **kwargs: Any):
    """Read registry dataset ``name`` as AnnData (arguments as in :func:`path`).

    Example:
        >>> adata = cellvi.datasets.load("kang2018_pbmc_ctrl_stim_small")
    """
    import anndata as ad

    adata = ad.read_h5ad(path(name, **kwargs))
    expected = tuple(registry(kwargs.get("registry_file"))[name]["shape"])
    if adata.shape != expected:
        raise ValueError(f"{name}: shape {adata.shape} differs from the registry's {expected}")
    return adata


def synthetic_counts(
    n_cells: int = 2000,
    n_genes: int = 500,
    *,
    n_groups: int = 3,
    n_batches: int = 2,
    batch_strength: float = 1.0,
    group_strength: float = 1.0,
    mean_library: float = 1500.0,
    dispersion: float = 5.0,
    seed: int = 0,
):
    """Negative-binomial counts with known cell groups and a multiplicative batch effect.

    Each group has its own expression profile (a shared baseline with ``group_strength``
    log-fold changes on random genes); each batch multiplies every gene by a random
    log-normal factor with standard deviation ``batch_strength`` (1.0 is a strong effect:
    the batches separate completely in PCA of log-normalized data). Library sizes vary
    log-normally around ``mean_library``.

    Returns:
        AnnData with raw counts in ``X`` (CSR) and ``layers["counts"]``; ``obs["group"]``,
        ``obs["batch"]`` (categorical) and ``obs["library"]``; ``uns["simulation"]`` with
        the settings.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, n_genes)
    group_lfc = rng.normal(0.0, 2.0 * group_strength, (n_groups, n_genes)) * (
        rng.random((n_groups, n_genes)) < 0.2
    )
    batch_lfc = rng.normal(0.0, batch_strength, (n_batches, n_genes))
    group = rng.integers(0, n_groups, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    logits = base + group_lfc[group] + batch_lfc[batch]
    props = np.exp(logits - logits.max(1, keepdims=True))
    props /= props.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(mean_library), 0.3, n_cells))
    mu = props * library[:, None]
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    X = sp.csr_matrix(counts)
    adata = ad.AnnData(X)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["group"] = pd.Categorical([f"g{g}" for g in group])
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    adata.obs["library"] = np.asarray(X.sum(1)).ravel()
    adata.layers["counts"] = X.copy()
    adata.uns["simulation"] = dict(n_groups=n_groups, n_batches=n_batches, batch_strength=batch_strength,
                                   group_strength=group_strength, dispersion=dispersion, seed=seed)
    return adata


def synthetic_cytometry(
    n_cells: int = 5000,
    n_markers: int = 12,
    *,
    n_populations: int = 6,
    n_latent: int = 3,
    n_batches: int = 2,
    batch_shift: float = 0.5,
    separation: float = 6.0,
    noise: float = 0.1,
    weights: np.ndarray | None = None,
    seed: int = 0,
):
    """Cytometry-like data with known populations: ``n_populations`` Gaussian clusters in a
    ``n_latent``-dimensional space, pushed through a random nonlinear map (a two-layer
    network with ``tanh``) to ``n_markers`` transformed-scale markers, plus Gaussian noise
    and an additive per-marker shift for each batch.

    Args:
        n_cells, n_markers: size of the output.
        n_populations: true number of populations ``K``.
        n_latent: dimension of the space the clusters live in.
        n_batches: batches, each with its own random shift of every marker.
        batch_shift: standard deviation of the batch shifts (in marker units).
        separation: smallest distance between two cluster centres, in units of the
            within-cluster standard deviation (at most 1); larger is easier.
        noise: standard deviation of the measurement noise added to every marker.
        weights: population proportions (default: unequal, Dirichlet(2) draws).
        seed: random seed.

    Returns:
        AnnData with markers in ``X`` (``float32``, on an arcsinh-like 0..6 scale);
        ``obs["population"]`` and ``obs["batch"]`` (categorical); ``obsm["X_true"]`` (the
        latent positions); ``uns["simulation"]`` with the settings.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    if weights is None:
        weights = rng.dirichlet(np.full(n_populations, 2.0))
    weights = np.asarray(weights, dtype=float) / np.sum(weights)
    centres = _spread_points(rng, n_populations, n_latent, separation)
    scales = rng.uniform(0.6, 1.0, (n_populations, n_latent))
    pop = rng.choice(n_populations, size=n_cells, p=weights)
    batch = rng.integers(0, n_batches, n_cells)
    u = centres[pop] + scales[pop] * rng.normal(size=(n_cells, n_latent))
    w1 = rng.normal(0.0, 1.0 / np.sqrt(n_latent), (n_latent, 32))
    w2 = rng.normal(0.0, 1.0 / np.sqrt(32), (32, n_markers))
    h = np.tanh(u @ w1 + rng.normal(0.0, 0.5, 32))
    x = h @ w2 * 1.5
    x = (x - x.min(0)) / (x.max(0) - x.min(0)) * 5.0  # 0..5, like arcsinh-transformed data
    x += rng.normal(0.0, batch_shift, (n_batches, n_markers))[batch]
    x += rng.normal(0.0, noise, x.shape)
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs_names = [f"event{i}" for i in range(n_cells)]
    adata.var_names = [f"marker{j}" for j in range(n_markers)]
    adata.obs["population"] = pd.Categorical([f"p{p}" for p in pop])
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    adata.obsm["X_true"] = u.astype(np.float32)
    adata.uns["simulation"] = dict(n_populations=n_populations, n_latent=n_latent,
                                   n_batches=n_batches, batch_shift=batch_shift,
                                   separation=separation, noise=noise, seed=seed,
                                   weights=weights)
    return adata


# -- technical batch effects on real cells ---------------------------------------------------
#: per strength: sd of the log capture efficiency per gene and batch, the range of the batches'
#: depth factors (largest / smallest), the largest extra dropout probability of a gene
PROTOCOL_STRENGTHS = {
    "mild": dict(capture_sd=0.2, depth_ratio=2.0, dropout=0.0),
    "medium": dict(capture_sd=0.5, depth_ratio=3.5, dropout=0.1),
    "strong": dict(capture_sd=1.0, depth_ratio=5.0, dropout=0.25),
}


def protocol_batches(adata, *, label_key: str, strength: str = "medium", n_batches: int = 3,
                     layer: str | None = None, missing: str | None = "auto",
                     rare: str | None = "auto", rare_fraction: float = 0.1,
                     min_counts: int = 50, seed: int = 0):
    """Protocol-like technical batches simulated on real counts, with the cell types kept.

    Each cell goes to one of ``n_batches`` batches; every count is thinned binomially with
    ``p = depth_b * capture_bg``, then zeroed with a gene's extra dropout probability in that
    batch. Thinning only removes molecules, so the result is count data a protocol could give:

    - **capture**: ``capture_bg = exp(N(0, capture_sd²))`` per batch and gene (median 1;
      gene-specific efficiencies, not only depth);
    - **depth**: batch depth factors spread geometrically over ``depth_ratio``
      (2x / 3.5x / 5x from mild to strong), the first batch the deepest at 0.7; the
      thinning probability is ``min(1, depth_b * capture_bg)``;
    - **dropout**: a gene's extra zero probability ``U(0, dropout)`` per batch (none, 10%,
      25% at most);
    - **composition**: the ``missing`` cell type is absent from the last batch and the
      ``rare`` type keeps only ``rare_fraction`` of its cells in the first batch (``"auto"``:
      a seeded choice among the types with at least 2% of the cells; ``None``: none), so
      that over-correction (a type merged into another to mix the batches) shows.

    ``strength`` is one of :data:`PROTOCOL_STRENGTHS` (``"mild"``, ``"medium"``,
    ``"strong"``). Cells left with fewer than ``min_counts`` counts are dropped.

    Returns:
        A new AnnData: counts in ``X`` (``float32`` CSR; the input is not modified),
        ``obs["batch"]`` (categorical ``"P0"``, ``"P1"``, ...), the input's ``obs`` columns,
        and ``uns["simulation"]`` with every setting, the capture efficiencies' sd, the depth
        factors and the missing / rare types.

    Example:
        >>> shifted = cellvi.datasets.protocol_batches(kang, label_key="cell_type", strength="strong")
    """
    import anndata as ad

    if strength not in PROTOCOL_STRENGTHS:
        raise ValueError(f"strength must be one of {list(PROTOCOL_STRENGTHS)}, got {strength!r}")
    if label_key not in adata.obs:
        raise KeyError(f"adata.obs has no {label_key!r}: pass the cell-type column as label_key")
    if n_batches < 2:
        raise ValueError(f"n_batches must be at least 2, got {n_batches}")
    cfg = PROTOCOL_STRENGTHS[strength]
    rng = np.random.default_rng(seed)
    X = adata.X if layer is None else adata.layers[layer]
    X = sp.csr_matrix(X, dtype=np.float64)
    if X.nnz and (X.data.min() < 0 or not np.allclose(X.data, np.round(X.data))):
        raise ValueError("protocol_batches needs raw counts (non-negative integers) in "
                         + ("X" if layer is None else f"layers[{layer!r}]"))
    labels = adata.obs[label_key].astype(str).to_numpy()
    types, counts = np.unique(labels, return_counts=True)
    common = types[counts >= 0.02 * len(labels)]
    pick = list(rng.permutation(common))
    missing = pick.pop() if missing == "auto" and pick else (None if missing == "auto" else missing)
    rare = pick.pop() if rare == "auto" and pick else (None if rare == "auto" else rare)
    batch = rng.integers(0, n_batches, adata.n_obs)
    keep = np.ones(adata.n_obs, dtype=bool)
    if missing is not None:
        keep &= ~((labels == missing) & (batch == n_batches - 1))
    if rare is not None:
        keep &= ~((labels == rare) & (batch == 0) & (rng.random(adata.n_obs) > rare_fraction))
    depth = 0.7 * cfg["depth_ratio"] ** (-np.arange(n_batches) / (n_batches - 1))
    capture = np.exp(rng.normal(0.0, cfg["capture_sd"], (n_batches, X.shape[1])))
    dropout = rng.uniform(0.0, cfg["dropout"], (n_batches, X.shape[1]))
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    b, g = batch[rows], X.indices
    thinned = rng.binomial(X.data.astype(np.int64), np.minimum(1.0, depth[b] * capture[b, g]))
    thinned[rng.random(len(thinned)) < dropout[b, g]] = 0
    out = sp.csr_matrix((thinned.astype(np.float32), X.indices.copy(), X.indptr.copy()),
                        shape=X.shape)
    out.eliminate_zeros()
    keep &= np.asarray(out.sum(1)).ravel() >= min_counts
    result = ad.AnnData(out[keep], obs=adata.obs.iloc[np.flatnonzero(keep)].copy(),
                        var=adata.var[[]].copy())
    result.obs["batch"] = pd.Categorical([f"P{k}" for k in batch[keep]],
                                         categories=[f"P{k}" for k in range(n_batches)])
    result.uns["simulation"] = dict(kind="protocol_batches", strength=strength, seed=seed,
                                    n_batches=n_batches, label_key=label_key,
                                    missing=missing or "", rare=rare or "",
                                    rare_fraction=rare_fraction, depth=depth, **cfg)
    return result


def cytometry_batches(adata, *, label_key: str, n_batches: int = 2, layer: str | None = None,
                      scale_sd: float = 0.15, shift_sd: float = 0.3, warp: float = 0.5,
                      population_shift_sd: float = 0.2, seed: int = 0):
    """Acquisition-like batch effects on transformed cytometry data (arcsinh or logicle
    scale), beyond a mean shift. For each batch ``b`` and marker ``m``, a monotone
    non-linear map ``x -> a x + s + w tanh((x - c) / h)`` with ``a = exp(N(0, scale_sd²))``
    (gain), ``s ~ N(0, shift_sd²)`` (offset), a bend ``w ~ U(-warp, warp) * h`` at the
    marker's median ``c`` with ``h`` its interquartile range (``|w| / h < a`` keeps the map
    increasing), then for each batch, population and marker a shift ``N(0,
    population_shift_sd²)`` in units of the marker's IQR (population-specific effects, as
    when a reagent lot binds one cell type differently). The first batch is left as it is,
    the reference.

    Returns:
        A new AnnData (the input is not modified) with the distorted values in ``X``
        (``float32``), the input's ``obs`` plus ``obs["batch"]`` (``"B0"``, ``"B1"``, ...)
        and ``uns["simulation"]`` with the maps' parameters.
    """
    import anndata as ad

    if label_key not in adata.obs:
        raise KeyError(f"adata.obs has no {label_key!r}: pass the population column as label_key")
    if n_batches < 2:
        raise ValueError(f"n_batches must be at least 2, got {n_batches}")
    rng = np.random.default_rng(seed)
    X = adata.X if layer is None else adata.layers[layer]
    X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise ValueError("cytometry_batches needs finite values: transform the data first")
    centre = np.median(X, 0)
    iqr = np.subtract(*np.percentile(X, [75, 25], 0))
    iqr = np.where(iqr > 0, iqr, 1.0)
    labels = adata.obs[label_key].astype(str).to_numpy()
    types = np.unique(labels)
    batch = rng.integers(0, n_batches, adata.n_obs)
    gain = np.exp(rng.normal(0.0, scale_sd, (n_batches, X.shape[1])))
    offset = rng.normal(0.0, shift_sd, (n_batches, X.shape[1]))
    bend = rng.uniform(-warp, warp, (n_batches, X.shape[1])) * np.minimum(gain, 1.0) * iqr
    pop_shift = rng.normal(0.0, population_shift_sd, (n_batches, len(types), X.shape[1])) * iqr
    gain[0], offset[0], bend[0], pop_shift[0] = 1.0, 0.0, 0.0, 0.0
    code = np.searchsorted(types, labels)
    Y = (gain[batch] * X + offset[batch] + bend[batch] * np.tanh((X - centre) / iqr)
         + pop_shift[batch, code])
    result = ad.AnnData(Y.astype(np.float32), obs=adata.obs.copy(), var=adata.var[[]].copy())
    result.obs["batch"] = pd.Categorical([f"B{k}" for k in batch],
                                         categories=[f"B{k}" for k in range(n_batches)])
    result.uns["simulation"] = dict(kind="cytometry_batches", seed=seed, n_batches=n_batches,
                                    label_key=label_key, gain=gain, offset=offset, bend=bend,
                                    population_shift=pop_shift, populations=list(types))
    return result


# -- oracles: simulators whose exact posterior is known --------------------------------------
def linear_gaussian(n_cells: int = 2000, n_features: int = 12, *, n_latent: int = 3,
                    noise: float = 0.3, seed: int = 0):
    """Probabilistic PCA data, ``z ~ N(0, I)``, ``x = W z + b + ε``, ``ε ~ N(0, noise² I)``,
    with a random ``W`` (``n_features x n_latent``): the posterior of ``z`` (and of the
    noise-free signal ``W z + b``) given ``x`` is Gaussian in closed form
    (:func:`exact_posterior`), an oracle for the coverage of credible intervals.

    Returns:
        AnnData with ``X`` (``float32``), ``obsm["X_true"]`` (``z``), ``layers["signal"]``
        (``W z + b``) and ``uns["oracle"]`` (the simulator's parameters).
    """
    rng = np.random.default_rng(seed)
    return _linear_mixture(rng, n_cells, np.ones(1), np.zeros((1, n_latent)),
                           np.eye(n_latent)[None], n_features, noise,
                           dict(kind="linear_gaussian", seed=seed), label_key=None)


def gaussian_mixture(n_cells: int = 6000, n_features: int = 12, *, n_populations: int = 5,
                     n_latent: int = 3, separation: float = 1.0, noise: float = 0.3,
                     seed: int = 0):
    """Overlapping populations with an exact cluster posterior: ``c ~ Cat(π)``,
    ``z | c ~ N(μ_c, Σ_c)`` (random full covariances, standard deviations 0.6-1 along random
    axes; centres at least ``separation`` apart), seen through a random linear map to
    ``n_features`` markers plus ``N(0, noise²)`` noise. ``x | c`` is Gaussian, so ``p(c | x)``
    is exact (:func:`exact_posterior`); with the defaults about 15% of the cells are more
    likely to belong to another population than to their own (the Bayes classifier's
    accuracy is about 0.8-0.85), which makes over-confident probabilities show.

    Returns:
        AnnData as :func:`linear_gaussian`, with ``obs["population"]`` (categorical).
    """
    rng = np.random.default_rng(seed)
    means = _spread_points(rng, n_populations, n_latent, separation)
    covs = []
    for _ in range(n_populations):
        q, _ = np.linalg.qr(rng.normal(size=(n_latent, n_latent)))
        covs.append(q @ np.diag(rng.uniform(0.6, 1.0, n_latent) ** 2) @ q.T)
    weights = rng.dirichlet(np.full(n_populations, 5.0))
    return _linear_mixture(rng, n_cells, weights, means, np.asarray(covs), n_features, noise,
                           dict(kind="gaussian_mixture", separation=separation, seed=seed),
                           label_key="population")


def _linear_mixture(rng, n_cells, weights, means, covs, n_features, noise, info, label_key):
    import anndata as ad

    n_latent = means.shape[1]
    W = rng.normal(size=(n_features, n_latent))
    b = rng.normal(3.0, 1.0, n_features)  # positive, like transformed marker intensities
    pop = rng.choice(len(weights), size=n_cells, p=weights)
    chol = np.linalg.cholesky(covs)
    z = means[pop] + np.einsum("nij,nj->ni", chol[pop], rng.normal(size=(n_cells, n_latent)))
    signal = z @ W.T + b
    x = signal + noise * rng.normal(size=signal.shape)
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"marker{j}" for j in range(n_features)]
    if label_key:
        adata.obs[label_key] = pd.Categorical([f"p{c}" for c in pop])
    adata.obsm["X_true"] = z.astype(np.float32)
    adata.layers["signal"] = signal.astype(np.float32)
    adata.uns["oracle"] = dict(info, weights=weights, means=means, covariances=covs, W=W, b=b,
                               noise=float(noise), label_key=label_key or "")
    return adata


@dataclass(frozen=True)
class ExactPosterior:
    """The exact posterior of an oracle's cells (:func:`exact_posterior`).

    ``probs``: ``p(c | x)``, cells x populations; ``means``: ``E[z | x, c]``, cells x
    populations x latent; ``covariances``: ``Cov[z | x, c]``, populations x latent x latent
    (the same for every cell); ``W``, ``b``: the map from ``z`` to the signal.
    """

    probs: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    W: np.ndarray
    b: np.ndarray

    def sample_signal(self, n_samples: int, rng: np.random.Generator) -> np.ndarray:
        """Draws of the noise-free signal ``W z + b`` from ``p(z | x)``:
        ``n_samples x cells x features``."""
        n, k, d = self.means.shape
        u = rng.random((n_samples, n, 1))
        c = (u > np.cumsum(self.probs, 1)[None, :, :-1]).sum(-1)  # c ~ p(c | x)
        chol = np.linalg.cholesky(self.covariances)
        eps = rng.normal(size=(n_samples, n, d))
        z = self.means[np.arange(n)[None], c] + np.einsum("snij,snj->sni", chol[c], eps)
        return z @ self.W.T + self.b


def exact_posterior(adata) -> ExactPosterior:
    """The exact posterior of the cells of an oracle (:func:`linear_gaussian`,
    :func:`gaussian_mixture`; read from ``adata.uns["oracle"]``): per population ``c``,
    ``x | c ~ N(W μ_c + b, W Σ_c Wᵀ + σ² I)`` gives ``p(c | x)``, and
    ``z | x, c ~ N(S_c (Σ_c⁻¹ μ_c + Wᵀ (x - b) / σ²), S_c)`` with
    ``S_c = (Σ_c⁻¹ + Wᵀ W / σ²)⁻¹``."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    if "oracle" not in adata.uns:
        raise KeyError("adata.uns has no 'oracle': make the data with "
                       "cellvi.datasets.linear_gaussian or cellvi.datasets.gaussian_mixture")
    o = adata.uns["oracle"]
    W, b, s2 = np.asarray(o["W"]), np.asarray(o["b"]), float(o["noise"]) ** 2
    weights, mu, covs = (np.asarray(o[k], dtype=float) for k in ("weights", "means", "covariances"))
    x = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=float)
    eye = np.eye(W.shape[0])
    logp = np.stack([np.log(w) + multivariate_normal(W @ m + b, W @ c @ W.T + s2 * eye).logpdf(x)
                     for w, m, c in zip(weights, mu, covs, strict=True)], 1).reshape(len(x), -1)
    probs = np.exp(logp - logsumexp(logp, 1, keepdims=True))
    prec = np.linalg.inv(covs)
    S = np.linalg.inv(prec + W.T @ W / s2)
    means = np.einsum("kij,nkj->nki", S, (prec @ mu[:, :, None])[None, :, :, 0]
                      + ((x - b) @ W / s2)[:, None, :])
    return ExactPosterior(probs, means, S, W, b)


def _spread_points(rng: np.random.Generator, n: int, dim: int, min_dist: float) -> np.ndarray:
    """``n`` points in ``dim`` dimensions, pairwise at least ``min_dist`` apart (rejection
    sampling in a box that grows until they fit)."""
    width = min_dist * max(1.0, n ** (1.0 / dim))
    points: list[np.ndarray] = []
    tries = 0
    while len(points) < n:
        p = rng.uniform(-width, width, dim)
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
        tries += 1
        if tries % 1000 == 0:
            width *= 1.2
    return np.asarray(points)
