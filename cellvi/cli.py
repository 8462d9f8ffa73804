"""Command line: ``cellvi demo`` and friends. ``cellvi --help`` lists the commands."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

logger = logging.getLogger("cellvi")


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if args.only in (None, "nbvae"):
        lines += _demo_nbvae(args, out)
    if args.only in (None, "gmvae"):
        lines += [""] if lines else []
        lines += _demo_gmvae(args, out)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _demo_nbvae(args: argparse.Namespace, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    from tqdm.auto import tqdm

    from . import __version__, datasets, metrics, tl

    steps = ["load data", "train NB-VAE", "neighbors + UMAP + Leiden", "write outputs"]
    bar = tqdm(steps, desc="cellvi demo", disable=True if args.quiet else None)
    t0 = time.perf_counter()

    bar.set_postfix_str(steps[0])
    adata = datasets.load("kang2018_pbmc_ctrl_stim_small")
    bar.update(1)

    bar.set_postfix_str(steps[1])
    t_train = time.perf_counter()
    model = tl.nbvae(adata, batch_key="donor", max_epochs=args.max_epochs, seed=args.seed,
                     device=args.device, verbose=not args.quiet, return_model=True)
    t_train = time.perf_counter() - t_train
    bar.update(1)

    bar.set_postfix_str(steps[2])
    sc.pp.neighbors(adata, use_rep="X_nbvae", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    sc.tl.leiden(adata, key_added="leiden_nbvae", random_state=args.seed, flavor="igraph",
                 n_iterations=2, directed=False)
    bar.update(1)

    bar.set_postfix_str(steps[3])
    fig = sc.pl.umap(adata, color=["cell_type", "donor", "condition"], show=False, return_fig=True,
                     wspace=0.4)
    fig.savefig(out / "umap_nbvae.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    adata.write_h5ad(out / "pbmc_demo_nbvae.h5ad")
    z = adata.obsm["X_nbvae"]
    f1, _ = metrics.hungarian_f1(adata.obs["cell_type"], adata.obs["leiden_nbvae"])
    lines = [
        f"cellvi {__version__} demo: NB-VAE on kang2018_pbmc_ctrl_stim_small",
        f"cells x genes: {adata.n_obs} x {adata.n_vars}; batch key: donor ({adata.obs['donor'].nunique()} donors)",
        f"device: {model.train_settings['device']}; epochs trained: {model.train_settings['epochs_trained']}; "
        f"training time: {t_train:.1f} s",
        f"final validation ELBO per cell: {model.history['validation_elbo'][-1]:.2f}",
        f"Leiden on X_nbvae: {adata.obs['leiden_nbvae'].nunique()} clusters; "
        f"ARI vs cell_type {metrics.ari(adata.obs['cell_type'], adata.obs['leiden_nbvae']):.3f}, "
        f"NMI {metrics.nmi(adata.obs['cell_type'], adata.obs['leiden_nbvae']):.3f}, "
        f"Hungarian mean F1 {f1:.3f}",
        f"donor mixing in X_nbvae: iLISI (0-1) {metrics.ilisi(z, adata.obs['donor']):.3f}, "
        f"kBET acceptance {metrics.kbet_acceptance(z, adata.obs['donor']):.3f}",
        f"outputs: {out / 'pbmc_demo_nbvae.h5ad'}, {out / 'umap_nbvae.png'}",
        f"total time: {time.perf_counter() - t0:.1f} s",
    ]
    bar.update(1)
    bar.close()
    return lines


#: channels that are not markers of cell identity (barcodes, DNA, beads, event length)
_NOT_MARKERS = re.compile(r"^(bc\d+|dna\d*|beaddist|event_length|time|center|offset|width|"
                          r"residual|fsc.*|ssc.*)$", re.IGNORECASE)


def default_markers(adata) -> list[str]:
    """Channels for population discovery: those with a marker name (``var["marker"]``), less
    scatter, time, barcode, DNA and bead channels; all non-scatter/time channels when no
    channel has a marker name."""
    names = [str(v) for v in adata.var_names]
    marker = adata.var["marker"].astype(str).tolist() if "marker" in adata.var else [""] * len(names)
    channel = adata.var["channel"].astype(str).tolist() if "channel" in adata.var else names
    keep = [n for n, m, c in zip(names, marker, channel, strict=True)
            if m.strip() and not _NOT_MARKERS.match(m.strip()) and not _NOT_MARKERS.match(c.strip())]
    if not keep:
        keep = [n for n, c in zip(names, channel, strict=True) if not _NOT_MARKERS.match(c.strip())]
    return keep


def _merge_line(merges, threshold: float) -> str:
    """One summary line on the merges of components into clusters, with the close calls."""
    is_veto = merges["rule"].astype(str).str.startswith("vetoed")
    vetoed, merges = merges[is_veto], merges[~is_veto]
    veto_text = (f"; {len(vetoed)} entangled pair(s) kept apart (two modes in the markers)"
                 if len(vetoed) else "")
    if not len(merges):
        return "merges: none" + veto_text
    entangled = merges[merges["rule"] == "entangled"]
    close = entangled[entangled["score"] < threshold + 0.05]
    line = (f"merges: {len(merges)} in {merges['round'].nunique()} round(s), "
            f"{len(entangled)} by entanglement (score > {threshold:g})")
    if len(close):
        line += (f"; {len(close)} close call(s) (score < {threshold + 0.05:.3g}: "
                 + ", ".join(f"{v:.3f}" for v in sorted(close["score"])) + ")")
    return line + veto_text + "; table in uns['gmvae']['merges']"


def _marker_labels(adata, markers: list[str]) -> list[str]:
    if "marker" not in adata.var:
        return markers
    out = []
    for m in markers:
        label = str(adata.var.loc[m, "marker"]).strip()
        out.append(f"{label} ({m})" if label and label != m else m)
    return out


def _populations(adata, *, layer, markers, batch_key, args, out: Path, truth: str | None = None,
                 exclude=(), name: str = "clusters") -> list[str]:
    """tl.gmvae, neighbors + UMAP on its latent, the plots and the summary lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import scanpy as sc

    from . import metrics, tl

    t_train = time.perf_counter()
    model = tl.gmvae(adata, layer=layer, markers=markers, batch_key=batch_key,
                     n_components=args.n_components, max_epochs=args.max_epochs, seed=args.seed,
                     device=args.device, verbose=not args.quiet, return_model=True)
    t_train = time.perf_counter() - t_train
    sc.pp.neighbors(adata, use_rep="X_gmvae", random_state=args.seed)
    sc.tl.umap(adata, random_state=args.seed)
    colors = ["gmvae"] + ([truth] if truth else []) + ([batch_key] if batch_key else [])
    fig = sc.pl.umap(adata, color=colors, show=False, return_fig=True, wspace=0.4)
    fig.savefig(out / f"umap_{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    medians = adata.uns["gmvae"]["marker_medians"]
    sizes = adata.uns["gmvae"]["cluster_sizes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(markers), 1.0 + 0.35 * len(medians)))
    values = medians.to_numpy()
    span = np.ptp(values, axis=0)
    scaled = (values - values.min(0)) / np.where(span > 0, span, 1)  # 0..1 per marker
    im = ax.imshow(scaled, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(markers)), _marker_labels(adata, markers), rotation=90)
    ax.set_yticks(range(len(medians)), [f"{c} (n={n})" for c, n in zip(medians.index, sizes, strict=True)])
    ax.set_xlabel("marker (median, scaled 0-1 per marker)")
    ax.set_ylabel("gmvae cluster")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.savefig(out / f"heatmap_{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    medians.to_csv(out / f"cluster_medians_{name}.csv")

    lines = [
        f"cells x markers used: {adata.n_obs} x {len(markers)}"
        + (f"; batch key: {batch_key} ({adata.obs[batch_key].nunique()} categories)" if batch_key else ""),
        f"device: {model.train_settings['device']}; epochs trained: "
        f"{model.train_settings['epochs_trained']}; training time: {t_train:.1f} s",
        f"clusters: {model.n_clusters} ("
        + ("discovered, started from " + str(model.settings['n_start']) if model.settings["discover"]
           else "given") + "); sizes " + ", ".join(map(str, sizes)),
        f"mean confidence (max responsibility): {adata.obs['gmvae_confidence'].mean():.3f}",
        _merge_line(adata.uns["gmvae"]["merges"], model.settings["merge_threshold"]),
    ]
    if truth:
        keep = ~adata.obs[truth].astype(str).isin(list(exclude)).to_numpy()
        t, p = adata.obs[truth].to_numpy()[keep], adata.obs["gmvae"].to_numpy()[keep]
        f1, per = metrics.hungarian_f1(adata.obs[truth], adata.obs["gmvae"], exclude=exclude)
        lines += [
            f"against the gating ({truth}, leaving out {list(exclude)}): Hungarian mean F1 "
            f"{f1:.3f}, ARI {metrics.ari(t, p):.3f}, NMI {metrics.nmi(t, p):.3f}",
            "per population (cluster, F1): " + "; ".join(
                f"{k}: {v[0]}, {v[1]:.2f}" for k, v in per.items()),
        ]
    return lines


def _demo_gmvae(args: argparse.Namespace, out: Path) -> list[str]:
    from . import __version__, datasets, pp

    t0 = time.perf_counter()
    adata = datasets.load("flowsom_68983_mouse_flow_gated")
    markers = list(adata.var_names[adata.var["has_marker"].astype(bool)])
    # raw X is uncompensated: compensate with the file's SPILL keyword, then logicle
    pp.compensate(adata)
    pp.logicle(adata, layer="compensated", key_added="logicle", channels=markers)
    lines = [f"cellvi {__version__} demo: GMVAE population discovery on flowsom_68983 "
             "(cellvi.pp.compensate + cellvi.pp.logicle of the 10 fluorescence markers)"]
    lines += _populations(adata, layer="logicle", markers=markers, batch_key=None, args=args,
                          out=out, truth="cell_type", exclude=("Unlabeled",), name="gmvae")
    adata.write_h5ad(out / "flow_demo_gmvae.h5ad")
    lines += [f"outputs: {out / 'flow_demo_gmvae.h5ad'}, {out / 'umap_gmvae.png'}, "
              f"{out / 'heatmap_gmvae.png'}, {out / 'cluster_medians_gmvae.csv'}",
              f"total time: {time.perf_counter() - t0:.1f} s"]
    return lines


def _read_inputs(files: list[str], sample_key: str):
    import anndata as ad

    from . import io

    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"no such file: {p}")
    kinds = {p.suffix.lower() for p in paths}
    if kinds <= {".fcs"}:
        return io.read_fcs(paths, sample_key=sample_key)
    if kinds <= {".h5ad"}:
        if len(paths) == 1:
            return ad.read_h5ad(paths[0])
        return ad.concat({p.stem: ad.read_h5ad(p) for p in paths}, label=sample_key,
                         index_unique="_", merge="same")
    raise ValueError(f"give either .fcs or .h5ad files, not a mix ({sorted(kinds)})")


def _cluster(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from . import __version__, data, pp

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = _read_inputs(args.files, args.sample_key)
    if args.metadata:
        meta = pd.read_csv(args.metadata)
        key = meta.columns[0]
        meta[key] = meta[key].astype(str).map(lambda v: Path(v).stem)
        meta = meta.set_index(key)
        samples = adata.obs[args.sample_key].astype(str)
        unknown = sorted(set(samples) - set(meta.index))
        if unknown:
            raise ValueError(f"--metadata {args.metadata}: no row for samples {unknown[:5]} "
                             f"(its first column {key!r} must name the files)")
        for col in meta.columns:
            adata.obs[col] = pd.Categorical(meta.loc[samples, col].astype(str).to_numpy())
    markers = args.markers or default_markers(adata)
    layer = args.layer
    steps = []
    if layer is None and args.transform != "none":
        fluorescence = set(data.spillover_channels(adata))
        if fluorescence and not args.no_compensation:
            pp.compensate(adata)
            layer = "compensated"
            steps.append("compensated with the files' spillover matrix")
        cofactor = args.cofactor if args.cofactor else (150.0 if fluorescence else 5.0)
        if args.transform == "logicle":
            pp.logicle(adata, layer=layer, key_added="transformed", channels=markers)
            steps.append("logicle (T=262144, W=0.5, M=4.5, A=0)")
        else:
            pp.arcsinh(adata, layer=layer, key_added="transformed", channels=markers, cofactor=cofactor)
            steps.append(f"arcsinh, cofactor {cofactor:g}")
        layer = "transformed"
    if not args.markers:  # drop default channels that are constant in these files
        X = adata.layers[layer] if layer else adata.X
        cols = adata.var_names.get_indexer(markers)
        std = np.asarray(X[:, cols]).std(0)
        constant = [m for m, sd in zip(markers, std, strict=True) if not sd > 0]
        if constant:
            logger.warning("leaving out constant channels %s", constant)
            markers = [m for m in markers if m not in constant]
    lines = [f"cellvi {__version__} cluster: GMVAE population discovery on {len(args.files)} file(s): "
             + ", ".join(Path(f).name for f in args.files),
             "preprocessing: " + ("; ".join(steps) if steps else f"none (input {layer or 'X'} used as is)"),
             "markers: " + ", ".join(_marker_labels(adata, markers))]
    lines += _populations(adata, layer=layer, markers=markers, batch_key=args.batch_key, args=args,
                          out=out, truth=args.truth, exclude=tuple(args.exclude or ()), name="gmvae")
    adata.write_h5ad(out / "clusters.h5ad")
    lines += [f"outputs: {out / 'clusters.h5ad'}, {out / 'umap_gmvae.png'}, "
              f"{out / 'heatmap_gmvae.png'}, {out / 'cluster_medians_gmvae.csv'}, {out / 'summary.txt'}",
              f"total time: {time.perf_counter() - t0:.1f} s"]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cellvi", description="Amortized variational inference for single-cell and cytometry data."
    )
    parser.add_argument("--version", action="version", version=f"cellvi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the demos on the bundled PBMC and flow data",
                          description="(1) NB-VAE (batch_key='donor') on the bundled PBMC demo, then "
                          "neighbors/UMAP/Leiden on X_nbvae; (2) GMVAE population discovery on the "
                          "bundled flowsom_68983 flow file (compensation + logicle through "
                          "cellvi.pp), scored against the manual gating. Writes .h5ad files, UMAP "
                          "and heatmap PNGs, cluster medians and summary.txt.")
    demo.add_argument("--out", default="cellvi-demo", help="output folder (default: cellvi-demo/)")
    demo.add_argument("--only", choices=["nbvae", "gmvae"], default=None, help="run one demo only")
    demo.add_argument("--n-components", type=int, default=None,
                      help="GMVAE clusters (default: discovered)")
    _common(demo)
    demo.set_defaults(func=_demo)

    cluster = sub.add_parser(
        "cluster", help="discover cell populations in FCS or h5ad files",
        description="GMVAE population discovery. Several FCS files become one dataset with a "
        "sample column; files carrying a spillover matrix are compensated first; then arcsinh "
        "(cofactor 150 for flow, 5 for mass cytometry) or logicle. Writes clusters.h5ad, a UMAP "
        "coloured by cluster, a cluster x marker median heatmap, the medians as CSV and "
        "summary.txt.")
    cluster.add_argument("files", nargs="+", help=".fcs files (or .h5ad files)")
    cluster.add_argument("--out", required=True, help="output folder")
    cluster.add_argument("--markers", nargs="+", default=None,
                         help="channels to use (default: channels with a marker name, less "
                         "scatter/time/barcode/DNA/bead channels)")
    cluster.add_argument("--batch-key", default=None,
                         help="obs column to correct for, e.g. 'sample' or a --metadata column")
    cluster.add_argument("--sample-key", default="sample", help="obs column naming the file (default: sample)")
    cluster.add_argument("--metadata", default=None,
                         help="CSV with one row per file (first column: file name) whose other "
                         "columns are added to obs, e.g. batch")
    cluster.add_argument("--layer", default=None,
                         help="h5ad input: an already transformed layer to use as is")
    cluster.add_argument("--transform", choices=["arcsinh", "logicle", "none"], default="arcsinh")
    cluster.add_argument("--cofactor", type=float, default=None,
                         help="arcsinh cofactor (default: 150 if the files have a spillover "
                         "matrix, i.e. flow; else 5, mass cytometry)")
    cluster.add_argument("--no-compensation", action="store_true",
                         help="do not compensate even if a spillover matrix is present")
    cluster.add_argument("--n-components", type=int, default=None,
                         help="number of clusters (default: discovered)")
    cluster.add_argument("--truth", default=None, help="obs column with known labels to score against")
    cluster.add_argument("--exclude", nargs="*", default=None, help="labels of --truth left out of scoring")
    _common(cluster)
    cluster.set_defaults(func=_cluster)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-epochs", type=int, default=None, help="default: chosen from the data size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
