"""cellvi: amortized variational inference for single-cell and cytometry data.

The public namespaces are imported lazily so that ``import cellvi`` stays fast and does not
pull in scanpy, pyro or umap:

- :mod:`cellvi.tl` -- scanpy-style entry points (``cellvi.tl.nbvae``, ``cellvi.tl.gmvae``)
- :mod:`cellvi.pp` -- cytometry preprocessing (compensation, arcsinh, logicle)
- :mod:`cellvi.io` -- FCS reading
- :mod:`cellvi.models` -- model classes (``cellvi.models.NBVAE``, ``cellvi.models.GMVAE``)
- :mod:`cellvi.datasets` -- data registry and simulators
- :mod:`cellvi.metrics` -- clustering and batch-mixing metrics
- :mod:`cellvi.clustering` -- torch-free merging of mixture components, bimodality veto
- :mod:`cellvi.data`, :mod:`cellvi.device` -- AnnData -> validated arrays -> device tensors
- :mod:`cellvi.distributions`, :mod:`cellvi.nn`, :mod:`cellvi.posteriors`,
  :mod:`cellvi.priors`, :mod:`cellvi.decoders`, :mod:`cellvi.vae`, :mod:`cellvi.objectives`,
  :mod:`cellvi.train` -- the tensor-level VAE core
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "clustering",
    "data",
    "datasets",
    "decoders",
    "device",
    "diagnostics",
    "distributions",
    "errors",
    "inference",
    "io",
    "metrics",
    "models",
    "nn",
    "objectives",
    "posteriors",
    "pp",
    "priors",
    "settings",
    "tl",
    "train",
    "vae",
)

logging.getLogger("cellvi").addHandler(logging.NullHandler())


def __getattr__(name: str):
    if name in _SUBMODULES:
        mod = importlib.import_module(f".{name if name != 'settings' else '_settings'}", __name__)
        if name == "settings":
            mod = mod.settings
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'cellvi' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])


__all__ = ["__version__", *_SUBMODULES]
