"""Real data: Kang et al. 2018 PBMC, 8 donors (needs CELLVI_DATA_DIR; fails under CI without it)."""

import numpy as np
import pytest

import cellvi
from cellvi.metrics import ari, ilisi


@pytest.fixture(scope="module")
def kang(data_dir):
    import scanpy as sc

    adata = cellvi.datasets.load("kang2018_pbmc_ctrl_8donors")
    adata.layers["counts"] = adata.X.copy()
    # 2,000 HVGs by seurat_v3 on counts; this file has 1,287 genes, so all are kept
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000, layer="counts")
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    cellvi.tl.nbvae(adata, layer="counts", batch_key="donor", max_epochs=80, verbose=False)
    return adata


def _kmeans(X, k):
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=0).fit_predict(X)


def test_latent_separates_cell_types_about_as_well_as_pca(kang):
    """Issue target: k-means/Leiden ARI on X_nbvae >= PCA's: a tie on k-means, not met on
    Leiden. With nbvae's default training over 12 seeds, k-means ARI is 0.531 (0.501-0.569)
    vs 0.529 for 50 PCs (benchmarks/results/celltypes_nbvae_peers.md; 0.528 in an earlier
    draw, celltypes_nbvae.md), and Leiden is below PCA (the latent splits the CD4 T label,
    celltypes_split.md); scVI is lower on both. This test trains 80 epochs to fit the CI
    budget, so it only holds the latent to PCA's k-means ARI within 0.05."""
    k = kang.obs["cell_type"].nunique()
    ari_vae = ari(kang.obs["cell_type"], _kmeans(kang.obsm["X_nbvae"], k))
    ari_pca = ari(kang.obs["cell_type"], _kmeans(kang.obsm["X_pca"], k))
    print(f"k-means ARI: NB-VAE {ari_vae:.3f}, PCA {ari_pca:.3f}")
    assert ari_vae >= ari_pca - 0.05
    assert ari_vae > 0.4


def test_neighbors_leiden_umap_on_more_than_8192_cells(kang):
    """scanpy 1.11 + pynndescent 0.7 broke sc.pp.neighbors from 8,192 cells on."""
    import scanpy as sc

    assert kang.n_obs >= 8192
    sc.pp.neighbors(kang, use_rep="X_nbvae", random_state=0)
    assert kang.obsp["connectivities"].shape == (kang.n_obs, kang.n_obs)
    sc.tl.leiden(kang, flavor="igraph", n_iterations=2, random_state=0, key_added="leiden_vae")
    sc.pp.neighbors(kang, use_rep="X_pca", random_state=0, key_added="pca")
    sc.tl.leiden(kang, flavor="igraph", n_iterations=2, random_state=0, neighbors_key="pca",
                 key_added="leiden_pca")
    a_vae = ari(kang.obs["cell_type"], kang.obs["leiden_vae"])
    a_pca = ari(kang.obs["cell_type"], kang.obs["leiden_pca"])
    print(f"Leiden ARI: NB-VAE {a_vae:.3f}, PCA {a_pca:.3f}")
    # Leiden (resolution 1) on X_nbvae scores below Leiden on PCA here (0.39-0.42 vs 0.50
    # measured); the ">= PCA" target is open. This floor checks real separation.
    assert a_vae > 0.35


def test_donors_are_mixed_in_the_latent(kang):
    mix_vae = ilisi(kang.obsm["X_nbvae"], kang.obs["donor"])
    mix_pca = ilisi(kang.obsm["X_pca"], kang.obs["donor"])
    print(f"iLISI: NB-VAE {mix_vae:.3f}, PCA {mix_pca:.3f}")
    assert mix_vae >= mix_pca - 0.02
    assert np.isfinite(kang.obsm["X_nbvae"]).all()
