import subprocess
import sys

import pytest

from cellvi.cli import build_parser, main


def test_help_lists_commands(capsys):
    out = subprocess.run([sys.executable, "-m", "cellvi.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    args = build_parser().parse_args(["demo"])
    assert args.out == "cellvi-demo" and args.device == "auto"


def test_demo_writes_outputs(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-epochs", "3", "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "pbmc_demo_nbvae.h5ad", "umap_nbvae.png", "summary.txt", "flow_demo_gmvae.h5ad",
        "umap_gmvae.png", "heatmap_gmvae.png", "cluster_medians_gmvae.csv"}
    summary = (out / "summary.txt").read_text()
    assert "ARI vs cell_type" in summary and "iLISI" in summary
    assert "GMVAE population discovery on flowsom_68983" in summary
    assert "Hungarian mean F1" in summary and "leaving out ['Unlabeled']" in summary
    for png in ("umap_nbvae.png", "umap_gmvae.png", "heatmap_gmvae.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "umap_nbvae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import anndata as ad

    adata = ad.read_h5ad(out / "pbmc_demo_nbvae.h5ad")
    assert {"X_nbvae", "X_umap"} <= set(adata.obsm) and "leiden_nbvae" in adata.obs


def test_cluster_on_fcs_files_with_metadata(tmp_path, data_dir):
    import anndata as ad
    import pandas as pd

    files = sorted((data_dir / "fcs").glob("*.fcs"))
    out = tmp_path / "cl"
    assert main(["cluster", *map(str, files), "--out", str(out), "--metadata",
                 str(data_dir / "fcs" / "metadata.csv"), "--batch-key", "batch",
                 "--max-epochs", "3", "--quiet"]) == 0
    adata = ad.read_h5ad(out / "clusters.h5ad")
    assert adata.n_obs == 6000 and adata.obs["sample"].nunique() == 6
    assert adata.obs["batch"].nunique() == 3 and "gmvae" in adata.obs
    assert adata.uns["gmvae"]["settings"]["batch_keys"] == ["batch"]
    summary = (out / "summary.txt").read_text()
    assert "arcsinh, cofactor 5" in summary  # mass cytometry: no spillover matrix
    markers = list(adata.uns["gmvae"]["markers"])
    assert "CD3" in markers and not {"Time", "DNA1", "BC1", "beadDist"} & set(markers)
    medians = pd.read_csv(out / "cluster_medians_gmvae.csv", index_col=0)
    assert list(medians.columns) == markers


def test_cluster_compensates_flow_files(tmp_path, data_dir):
    import anndata as ad

    src = ad.read_h5ad(data_dir / "flowsom_68983_mouse_flow_gated.h5ad")[:3000].copy()
    src.write_h5ad(tmp_path / "flow.h5ad")
    out = tmp_path / "fl"
    assert main(["cluster", str(tmp_path / "flow.h5ad"), "--out", str(out), "--transform",
                 "logicle", "--n-components", "6", "--truth", "cell_type", "--exclude",
                 "Unlabeled", "--max-epochs", "3", "--quiet"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "compensated with the files' spillover matrix; logicle" in summary
    assert "clusters: 6 (given)" in summary and "Hungarian mean F1" in summary
    merges = ad.read_h5ad(out / "clusters.h5ad").uns["gmvae"]["merges"]
    assert f"merges: {len(merges)} in " in summary and "uns['gmvae']['merges']" in summary


def test_cluster_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        main(["cluster", str(tmp_path / "missing.fcs"), "--out", str(tmp_path / "o")])
