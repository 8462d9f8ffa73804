"""Model checking of cellvi's NB-VAE with a flow posterior (``posterior="iaf"``, ``n_flows=2``)
on held-out cells, by the protocol of ``benchmarks/model_checking.py``, and compared with that
script's diagonal-Gaussian results.

The protocol is that script's, reused from it (its ``load_dataset``, ``split`` and
``run_seed``): ``kang2018_pbmc_ctrl_8donors``, a seeded random 10% of the cells held out
(``--split-seed 0``), ``model.fit(seed=s, verbose=False)`` with the model's defaults, IWAE
``n_samples=1000``, ELBO ``n_samples=64``, refinement with R = 50 and 200 steps. The only
change is the model: ``cellvi.models.NBVAE(train, batch_key="donor", posterior="iaf",
n_flows=2)`` (``run_seed`` builds ``cellvi.models.NBVAE(train, batch_key=...)``; it is handed
a ``cellvi`` whose ``NBVAE`` has these two arguments bound).

Refinement (``cellvi.inference.refine``) fits a per-cell *diagonal Gaussian* started from the
flow's mean and (Monte Carlo) standard deviation, so for the flow the "refined" rows compare a
per-cell Gaussian against the amortized flow.

The comparison table reads the diagonal rows of ``--diagonal`` (default
``benchmarks/results/model_checking.json``, the seed given by ``--compare-seed``).

Usage::

    python benchmarks/model_checking_flow.py --seeds 0 --out benchmarks/results
    python benchmarks/model_checking_flow.py --max-epochs 2 --n-samples 50 --subsample 100 \\
        --out /tmp/mcf_smoke   # smoke test

Writes ``<out>/model_checking_flow.json`` and ``<out>/model_checking_flow.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _single_thread  # noqa: E402, F401  (pins thread pools; must come before numpy/torch)

# isort: split

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import model_checking as mc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import git_state, import_cellvi, log, versions  # noqa: E402

torch.set_num_threads(1)

REPO = mc.REPO
POSTERIOR = dict(posterior="iaf", n_flows=2)
LABEL = "IAF flow (n_flows=2)"
_STATE: dict = {}


def flow_cellvi(cellvi):
    """A stand-in for the ``cellvi`` package as ``mc.run_seed`` uses it (``models.NBVAE`` and
    ``diagnostics``), with ``NBVAE`` building the flow posterior."""
    def nbvae(*a, **k):
        model = cellvi.models.NBVAE(*a, **POSTERIOR, **k)
        got = {key: model.settings.get(key) for key in POSTERIOR}
        if got != POSTERIOR:
            raise RuntimeError(f"NBVAE built with {got}, wanted {POSTERIOR}")
        log(f"  model: NBVAE with {got} ({type(model.module.encoder).__name__})")
        return model

    return types.SimpleNamespace(models=types.SimpleNamespace(NBVAE=nbvae),
                                 diagnostics=cellvi.diagnostics)


def _partial_write(args, seed_res) -> None:
    """Replaces ``mc._partial_write`` (which would write ``model_checking.*``): writes this
    script's files with the seed in progress marked partial."""
    if not _STATE:
        return
    done = [r for r in _STATE["seeds"] if r["seed"] != seed_res["seed"]]
    _write(args, done + [dict(seed_res, partial=True)])


def _diagonal_row(path: Path, seed: int) -> dict | None:
    """The diagonal-Gaussian results of one seed from ``model_checking.json``."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    for r in d.get("seeds", []):
        if r["seed"] == seed:
            return dict(source=str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                        date=d.get("date"), command=d.get("command"), args=d.get("args"),
                        data=d.get("data"), seed=r)
    return None


def _comparison(flow: dict, diag: dict, refine_steps: list[int]) -> list[dict]:
    """Rows (quantity, diagonal, flow) of the headline means, nats/cell."""
    rows = []

    def add(name, f, d):
        rows.append(dict(quantity=name, diagonal=d, flow=f,
                         flow_minus_diagonal=None if f is None or d is None else f - d))

    def get(r, *keys):
        for k in keys:
            if not isinstance(r, dict) or k not in r:
                return None
            r = r[k]
        return r

    fc, dc = flow.get("calls", {}), diag.get("calls", {})
    add("MLL, amortized", get(fc, "mll_amortized", "stats", "mean"),
        get(dc, "mll_amortized", "stats", "mean"))
    for R in refine_steps:
        add(f"MLL, refined R={R}",
            get(flow, "per_refine_steps", str(R), "mll_refined", "stats", "mean"),
            get(diag, "per_refine_steps", str(R), "mll_refined", "stats", "mean"))
    add("ELBO, amortized", get(fc, "elbo_amortized", "stats", "mean"),
        get(dc, "elbo_amortized", "stats", "mean"))
    for R in refine_steps:
        add(f"ELBO, refined R={R}",
            get(flow, "per_refine_steps", str(R), "elbo_refined", "stats", "mean"),
            get(diag, "per_refine_steps", str(R), "elbo_refined", "stats", "mean"))
    for R in refine_steps:
        add(f"approximation gap R={R}",
            get(flow, "per_refine_steps", str(R), "amortization_gap_call", "approximation_gap",
                "mean"),
            get(diag, "per_refine_steps", str(R), "amortization_gap_call", "approximation_gap",
                "mean"))
    for R in refine_steps:
        add(f"amortization gap R={R}",
            get(flow, "per_refine_steps", str(R), "amortization_gap_call", "amortization_gap",
                "mean"),
            get(diag, "per_refine_steps", str(R), "amortization_gap_call", "amortization_gap",
                "mean"))
    add("MLL - ELBO, amortized (IWAE-K gap of q_enc)",
        None if get(fc, "mll_amortized") is None or get(fc, "elbo_amortized") is None else
        fc["mll_amortized"]["stats"]["mean"] - fc["elbo_amortized"]["stats"]["mean"],
        None if get(dc, "mll_amortized") is None or get(dc, "elbo_amortized") is None else
        dc["mll_amortized"]["stats"]["mean"] - dc["elbo_amortized"]["stats"]["mean"])
    for R in refine_steps:  # the gap of the amortized posterior itself, q_enc's family
        lp = [get(r, "per_refine_steps", str(R), "amortization_gap_call", "log_px", "mean")
              for r in (flow, diag)]
        el = [get(r, "calls", "elbo_amortized", "stats", "mean") for r in (flow, diag)]
        f, d = (None if a is None or b is None else a - b for a, b in zip(lp, el, strict=True))
        add(f"log p(x) (diagnostics, R={R}) - ELBO amortized", f, d)
    add("training epochs", flow.get("n_epochs"), diag.get("n_epochs"))
    add("training s", flow.get("train_s"), diag.get("train_s"))
    add("s MLL amortized", get(fc, "mll_amortized", "seconds"),
        get(dc, "mll_amortized", "seconds"))
    add("s ELBO amortized", get(fc, "elbo_amortized", "seconds"),
        get(dc, "elbo_amortized", "seconds"))
    for R in refine_steps:
        for key, name in (("mll_refined", "MLL"), ("elbo_refined", "ELBO"),
                          ("amortization_gap_call", "gaps")):
            add(f"s {name} refined R={R}",
                get(flow, "per_refine_steps", str(R), key, "seconds"),
                get(diag, "per_refine_steps", str(R), key, "seconds"))
    return rows


def write_markdown(res: dict, path: Path) -> None:
    a = res["args"]
    K, E, Rs = a["n_samples"], a["elbo_samples"], a["refine_steps"]
    r_max = max(Rs)
    _pm, _fmt = mc._pm, mc._fmt
    L = ["# Model checking: NB-VAE with a flow posterior (IAF), marginal likelihood and "
         "inference gaps on held-out cells\n"]
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Date: {res['date']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + "  ")
    g = res.get("git") or {}
    if g:
        L.append(f"cellvi code: git {g['head']}"
                 + (" with uncommitted changes under cellvi/" if g["cellvi_dirty"] else "")
                 + f", imported once at {g['time']}  ")
    L.append(f"Machine: {res['machine']}\n")
    if any(r.get("partial") for r in res["seeds"]) or not res["seeds"]:
        L.append("**Partial:** the run had not finished when this file was written; rows "
                 "missing below were not measured yet.\n")
    L.append("**Refinement fits a per-cell diagonal Gaussian.** `cellvi.inference.refine` "
             "starts each cell's Gaussian at the flow's moments (the mean: the flow's image of "
             "the base mean; the standard deviation: a 64-sample Monte Carlo estimate) and "
             "optimises its mean and log-scale. So for the flow posterior the \"refined\" rows "
             "compare a per-cell *diagonal Gaussian* against the amortized *flow*: the "
             "\"amortization gap\" ELBO(q_R) - ELBO(q_enc) mixes the amortization gap with the "
             "difference between the two families (it can be negative when the amortized flow "
             "beats the best per-cell Gaussian), and the \"approximation gap\" is that of the "
             "refined Gaussian, not of the flow family.\n")
    d = res["data"]
    sub = (f"a seeded subsample (seed {a['subsample_seed']}) of **{d['n_eval']} of the "
           f"{d['n_held']} held-out cells**" if d["n_eval"] < d["n_held"]
           else f"all {d['n_held']} held-out cells")
    L.append("## Protocol\n")
    L.append("The protocol of `benchmarks/model_checking.py` (its functions `load_dataset`, "
             "`split` and `run_seed` are imported and run unchanged); only the posterior "
             "differs.\n")
    L.append(
        f"- Data: `{res['dataset']}`, {d['n_obs']:,} cells x {d['n_vars']:,} genes "
        f"({d['genes']}), raw counts in `X`, batch `{mc.BATCH_KEY}` ({d['n_batches']} donors); "
        "loaded as in `benchmarks/scib_nbvae.py`.")
    L.append(f"- Split: a random {a['held_frac']:.0%} of the cells held out "
             f"(`numpy.random.default_rng({a['split_seed']}).permutation`), {d['n_train']:,} "
             f"training cells, {d['n_held']:,} held out. Evaluated on {sub}.")
    L.append(f"- Model: `cellvi.models.NBVAE(train, batch_key=\"{mc.BATCH_KEY}\", "
             "posterior=\"iaf\", n_flows=2)` with its other defaults (n_latent 10, diagonal "
             "Gaussian followed by 2 inverse autoregressive steps conditioned on the encoder's "
             "hidden state, `cellvi.posteriors.IAFEncoder`; N(0, I) prior; NB likelihood), "
             "`model.fit(seed=s, verbose=False)`"
             + ("" if a["max_epochs"] is None else f" with `max_epochs={a['max_epochs']}`")
             + "; training seeds " + ", ".join(str(s) for s in a["seeds"]) + ".")
    L.append(f"- MLL: `model.marginal_log_likelihood(held, n_samples={K})` (IWAE-{K} with the "
             "encoder's flow q as proposal) and with `refine_steps=R` (proposal: the per-cell "
             "refined Gaussian).")
    L.append(f"- ELBO: `model.elbo(held, n_samples={E})` and with `refine_steps=R`.")
    L.append(f"- Gaps: `cellvi.diagnostics.amortization_gap(model, held, n_samples={K}, "
             f"refine_steps=R, elbo_samples={E})`; approximation gap = log p(x) - ELBO(q_R) "
             "(log p(x): the larger of the IWAE bounds with the flow and the refined-Gaussian "
             "proposal), amortization gap = ELBO(q_R) - ELBO(q_enc). Means over cells, "
             "nats/cell.")
    L.append(f"- *Amortization gap before* = mean ELBO(q\\*) - ELBO(q_enc) from the "
             f"`model.elbo` calls, with q\\* the refined Gaussian for the largest R "
             f"(R = {r_max}); *fraction closed* by R = mean (ELBO(q_R) - ELBO(q_enc)) / "
             f"that gap (1 at R = {r_max} by construction).")
    L.append("- Refinement (`cellvi.inference.refine`): Adam, lr 0.05, 4 samples per step, "
             "on each cell's own Gaussian mean and log-scale, decoder fixed; all calls use "
             "`seed=0`.")
    L.append("- Seconds: wall-clock of each call, one thread (`OMP_NUM_THREADS=1`, "
             "`torch.set_num_threads(1)`), on a 2-core machine shared with other jobs "
             "(the diagonal run of `model_checking.py` ran at the same time).")
    L.append("- ± is the standard error of the mean over cells (cell-to-cell spread, not "
             "seed-to-seed).\n")

    for r in res["seeds"]:
        tag = " (in progress: partial)" if r.get("partial") else ""
        L.append(f"## Seed {r['seed']}{tag}\n")
        L.append(f"Trained {r['n_epochs']} epochs in {r['train_s']:.1f} s.\n")
        L.append(f"| posterior | R | MLL IWAE-{K} | ELBO | approximation gap | amortization gap "
                 "(diagnostics) | fraction of gap closed | s (MLL / ELBO / gaps) |")
        L.append("|---|---|---|---|---|---|---|---|")
        L += mc.seed_rows(r, Rs, "flow, amortized", "flow → Gaussian, refined")
        L.append("")
        if "amortization_gap_before" in r:
            b = r["amortization_gap_before"]["stats"]
            L.append(f"Amortization gap before (R = {r_max}): {_pm(b)} nats/cell "
                     f"(median {b['median']:.3f}, {b['frac_negative']:.1%} of cells < 0).  ")
            if b["mean"] < 0:
                L.append("It is negative: the refined per-cell Gaussian has a lower ELBO than "
                         "the amortized flow, so the \"fraction closed\" column (a ratio of "
                         "two negative numbers) carries no meaning here.  ")
        for R in Rs:
            dd = r.get("per_refine_steps", {}).get(str(R))
            if dd is None:
                continue
            ag = dd["amortization_gap_call"]
            L.append(f"R = {R}: MLL gain from refined proposal {_pm(dd['mll_gain'])}; ELBO gain "
                     f"{_pm(dd['elbo_gain'])}; cells with negative approximation gap "
                     f"{ag['approximation_gap']['frac_negative']:.1%}, negative amortization "
                     f"gap {ag['amortization_gap']['frac_negative']:.1%}; diagnostics log p(x) "
                     f"{_pm(ag['log_px'])}.  ")
        L.append("")

    cmp_ = res.get("comparison")
    if cmp_:
        dg = cmp_["diagonal_source"]
        L.append(f"## Flow vs diagonal Gaussian, seed {cmp_['seed']}\n")
        L.append(f"Diagonal row: seed {cmp_['seed']} of `{dg['source']}` (written "
                 f"{dg['date']}; command `{dg['command']}`). Same data, split, evaluated cells, "
                 "training defaults and evaluation calls; the diagonal run also refined with "
                 "R = 500, not used here. Means over cells, nats/cell (higher MLL / ELBO is "
                 "better). For the flow, \"refined\" is the per-cell diagonal Gaussian started "
                 "at the flow's moments (see the note at the top). *log p(x) - ELBO "
                 "amortized* is the approximation gap of the amortized posterior itself "
                 "(diagonal: the encoder's Gaussian; flow: the encoder's flow), log p(x) "
                 "being the diagnostics' best IWAE bound.\n")
        same = cmp_.get("same_cells")
        if same is False:
            L.append("**Warning:** the two runs evaluated different cells (see `data` in the "
                     "two JSON files); the rows are not comparable.\n")
        if cmp_.get("same_protocol") is False:
            L.append("**Warning:** the two runs used different settings (`args` in the two "
                     "JSON files: samples, split, subsample or max_epochs); the rows are not "
                     "comparable.\n")
        L.append("| quantity | diagonal | flow | flow − diagonal |")
        L.append("|---|---|---|---|")
        for row in cmp_["rows"]:
            nd = 1 if row["quantity"].startswith(("s ", "training s")) else (
                0 if row["quantity"] == "training epochs" else 3)

            def f(v, nd=nd):
                return "–" if v is None else f"{v:.{nd}f}"
            diff = row["flow_minus_diagonal"]
            sd = "–" if diff is None else f"{diff:+.{nd}f}"
            L.append(f"| {row['quantity']} | {f(row['diagonal'])} | {f(row['flow'])} | {sd} |")
        L.append("")
    elif res.get("comparison_note"):
        L.append(f"## Flow vs diagonal Gaussian\n\n{res['comparison_note']}\n")
    L.append(f"Run time: {res['total_s'] / 60:.1f} min.\n")
    path.write_text("\n".join(L))


def _write(args, seeds: list[dict]) -> None:
    st = _STATE
    res = dict(
        command=st["command"], date=time.strftime("%Y-%m-%d %H:%M %Z"),
        versions=versions(("cellvi", "torch", "anndata", "scanpy", "numpy")),
        git=st["git"],
        machine=f"{platform.platform()}, {os.cpu_count()} CPUs, single-threaded runs",
        threads=dict(OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
                     torch_num_threads=torch.get_num_threads()),
        dataset=mc.DATASET, data=st["data"],
        args={k: v for k, v in vars(args).items() if k not in ("out", "diagonal")},
        posterior=f"{LABEL}: NBVAE(posterior='iaf', n_flows=2); refinement fits a per-cell "
                  "diagonal Gaussian started at the flow's moments",
        seeds=seeds, summary=mc._summary(seeds, args.refine_steps),
        total_s=time.perf_counter() - st["t_start"])
    flow = next((r for r in seeds if r["seed"] == args.compare_seed), None)
    diag = _diagonal_row(Path(args.diagonal), args.compare_seed)
    if flow is not None and diag is not None:
        dd, fd = diag["data"] or {}, st["data"]
        same = all(dd.get(k) == fd.get(k) for k in ("n_obs", "n_vars", "n_train", "n_held",
                                                    "n_eval", "held_donor_counts"))
        da = diag["args"] or {}
        same_protocol = all(da.get(k) == getattr(args, k) for k in (
            "n_samples", "elbo_samples", "held_frac", "split_seed", "subsample",
            "subsample_seed", "max_epochs"))
        res["comparison"] = dict(
            seed=args.compare_seed, same_cells=same, same_protocol=same_protocol,
            diagonal_source={k: diag[k] for k in ("source", "date", "command")},
            rows=_comparison(flow, diag["seed"], args.refine_steps))
    else:
        res["comparison_note"] = (f"No diagonal seed {args.compare_seed} in {args.diagonal}"
                                  if diag is None else "Flow seed not run yet.")
    out = Path(args.out)
    (out / "model_checking_flow.json").write_text(json.dumps(res, indent=2, default=str))
    write_markdown(res, out / "model_checking_flow.md")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--refine-steps", nargs="+", type=int, default=[50, 200])
    p.add_argument("--n-samples", type=int, default=1000, help="IWAE samples (K)")
    p.add_argument("--elbo-samples", type=int, default=64)
    p.add_argument("--held-frac", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--subsample", type=int, default=None,
                   help="evaluate on a seeded subsample of this many held-out cells")
    p.add_argument("--subsample-seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="default: the model's own")
    p.add_argument("--compare-seed", type=int, default=0)
    p.add_argument("--diagonal", default=str(REPO / "benchmarks" / "results"
                                             / "model_checking.json"),
                   help="model_checking.py's JSON with the diagonal-Gaussian rows")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.refine_steps = sorted(set(args.refine_steps))
    warnings.filterwarnings("ignore")
    cmd_args = sys.argv[1:] if argv is None else list(argv)
    _STATE.update(command="python benchmarks/model_checking_flow.py "
                  + " ".join(shlex.quote(x) for x in cmd_args),
                  git=git_state(), t_start=time.perf_counter())
    mc._partial_write = _partial_write  # never write model_checking.* from here
    cellvi = import_cellvi()
    importlib.import_module("cellvi.diagnostics")
    importlib.import_module("cellvi.models")

    Path(args.out).mkdir(parents=True, exist_ok=True)
    adata, genes = mc.load_dataset()
    tr, ho = mc.split(adata.n_obs, args.held_frac, args.split_seed)
    train, held = adata[tr].copy(), adata[ho].copy()
    n_held = held.n_obs
    if args.subsample is not None and args.subsample < n_held:
        rng = np.random.default_rng(args.subsample_seed)
        held = held[np.sort(rng.choice(n_held, args.subsample, replace=False))].copy()
    _STATE["data"] = dict(genes=genes, n_obs=int(adata.n_obs), n_vars=int(adata.n_vars),
                          n_batches=int(adata.obs[mc.BATCH_KEY].nunique()),
                          n_train=int(train.n_obs), n_held=int(n_held), n_eval=int(held.n_obs),
                          held_donor_counts={str(k): int(v) for k, v in
                                             held.obs[mc.BATCH_KEY].value_counts().items()})
    log(f"{mc.DATASET}: {genes}; train {train.n_obs}, held out {n_held}, evaluated "
        f"{held.n_obs}; posterior {LABEL}")
    seeds: list[dict] = []
    _STATE["seeds"] = seeds
    fcv = flow_cellvi(cellvi)
    for seed in args.seeds:
        seeds.append(mc.run_seed(fcv, train, held, seed, args))
        _write(args, seeds)
        log(f"seed {seed} done; wrote {Path(args.out) / 'model_checking_flow.md'}")


if __name__ == "__main__":
    main()
