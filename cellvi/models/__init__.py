"""User-facing model classes, one file per model on a shared base.

- :class:`NBVAE` (``nbvae.py``): negative-binomial VAE for scRNA-seq counts;
- :class:`GMVAE` (``gmvae.py``): Gaussian-mixture-prior VAE for cytometry, trained in named
  phases (``_gmvae_phases.py``) whose budgets are a :class:`GMVAESchedule`;
- :class:`Model` (``_base.py``): the AnnData edge, ``fit`` orchestration, ``get_latent``,
  safe save/load.

The clustering heuristics the GMVAE uses live in :mod:`cellvi.clustering`.
"""

from ..clustering import bimodality, merge_components
from ._base import Model
from .gmvae import DISCOVERY_COMPONENTS, GMVAE, GMVAEOutput, GMVAESchedule
from .nbvae import NBVAE, NBVAEOutput, batch_log_ratios

__all__ = ["Model", "NBVAE", "NBVAEOutput", "GMVAE", "GMVAEOutput", "GMVAESchedule",
           "DISCOVERY_COMPONENTS", "batch_log_ratios", "merge_components", "bimodality"]
