"""Shared fixtures. Data-dependent tests use ``data_dir``: when ``CELLVI_DATA_DIR`` is not
set they skip locally but **fail** under CI (``CI`` set), so CI cannot go green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("CELLVI_DATA_DIR"):  # make it absolute for subprocesses with another cwd
    os.environ["CELLVI_DATA_DIR"] = str(Path(os.environ["CELLVI_DATA_DIR"]).resolve())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    value = os.environ.get("CELLVI_DATA_DIR")
    if not value or not Path(value).is_dir():
        msg = f"CELLVI_DATA_DIR is not set or not a folder ({value!r}); real-data tests need it"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(value)


@pytest.fixture(scope="session")
def sim_adata():
    """3 groups x 2 batches with a strong batch effect (session-wide, never modified)."""
    import cellvi

    return cellvi.datasets.synthetic_counts(1500, 300, n_groups=3, n_batches=2, seed=1)


@pytest.fixture
def small_adata():
    """A fresh small count AnnData per test (tests may modify it)."""
    import cellvi

    return cellvi.datasets.synthetic_counts(300, 60, n_groups=2, n_batches=2, seed=3)


@pytest.fixture(scope="session")
def fitted(sim_adata):
    """``cellvi.tl.nbvae`` on the simulated data (batch key 'batch'): (annotated copy, model)."""
    import cellvi

    return cellvi.tl.nbvae(sim_adata, batch_key="batch", copy=True,
                           return_model=True, verbose=False)


@pytest.fixture(scope="session")
def trained(fitted):
    return fitted[1]


def assert_close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * (1 + np.max(np.abs(b)))
