import subprocess
import sys

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
    assert {p.name for p in out.iterdir()} == {"pbmc_demo_nbvae.h5ad", "umap_nbvae.png", "summary.txt"}
    summary = (out / "summary.txt").read_text()
    assert "ARI vs cell_type" in summary and "iLISI" in summary
    assert (out / "umap_nbvae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import anndata as ad

    adata = ad.read_h5ad(out / "pbmc_demo_nbvae.h5ad")
    assert {"X_nbvae", "X_umap"} <= set(adata.obsm) and "leiden_nbvae" in adata.obs
