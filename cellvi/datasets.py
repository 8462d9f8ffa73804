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

__all__ = ["available", "registry", "path", "load", "synthetic_counts", "DataNotFoundError"]


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
