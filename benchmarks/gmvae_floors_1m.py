"""GMVAE at 1M resampled events: the default schedule vs the schedule without epoch floors.

Issue 22 asks for GMVAE discovery on 1M events within FlowSOM's wall-clock. On data above
about 111,000 cells an epoch is a random subset of ``epoch_cells`` (100,000) cells, and the
epoch floors of ``GMVAESchedule`` (5 warm-up, 25 mixture and 5 fine-tune epochs) then make
7,400 steps where the step budgets ask for about 1,600. This script measures what dropping
the floors (``GMVAESchedule(warmup_epochs=(1, 60), mixture_epochs=(1, 300),
tune_min_epochs=1)``) does to time and quality, with FlowSOM (10 x 10, 10 metaclusters) in the
same run:

- ``flowsom``: ``flowsom_68983`` (compensated logicle, 10 markers; 19,225 events), and
- ``spectre``: Spectre bone marrow (15 markers, 76k events, batch ignored),

each resampled with replacement to 1,000,000 events with N(0, 0.02) jitter, exactly as
``benchmarks/scaling.py`` does; F1 against the gates without the excluded labels
(``benchmarks/cytometry.py``). One thread per method, methods run one after another in one
process. Output: ``benchmarks/results/gmvae_floors_1m.{md,jsonl}``.

``--configs`` replaces the two cellvi arms by named ``tl.gmvae`` keyword sets (JSON; a
``schedule`` entry is a dict of ``GMVAESchedule`` fields), ``--stem`` names the output files.

Usage::

    python benchmarks/gmvae_floors_1m.py --data flowsom spectre --seeds 0 1 2
    python benchmarks/gmvae_floors_1m.py --stem gmvae_batch_1m \
        --configs '{"batch 512": {}, "batch 1024": {"batch_size": 1024}}'
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
logger = logging.getLogger("gmvae_floors_1m")
N = 1_000_000


def resampled(name: str) -> dict:
    import cytometry
    import scaling

    d = cytometry.load_input(name)
    rng = np.random.default_rng(scaling.DATA_SEED + N)
    idx = rng.integers(0, len(d["X"]), N)
    X = d["X"][idx] + rng.normal(0.0, scaling.JITTER_SD, (N, d["X"].shape[1])).astype(np.float32)
    out = dict(d)
    out.update(X=X.astype(np.float32), truth=d["truth"][idx], batch=None)
    return out


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import cytometry

    import cellvi
    from cellvi.models import GMVAESchedule

    cytometry.warm_up_torch()
    configs = json.loads(args.configs) if args.configs else {
        "default": {}, "no floors": dict(schedule=dict(warmup_epochs=(1, 60), mixture_epochs=(1, 300),
                                                       tune_min_epochs=1))}
    records = []
    out = Path(args.out) / f"{args.stem}.jsonl"
    for name in args.data:
        d = resampled(name)
        for seed in args.seeds:
            for config in ["FlowSOM", *configs]:
                if config == "FlowSOM":
                    if args.no_flowsom or (name != "flowsom" and not args.flowsom_all):
                        continue
                    labels, secs, _ = cytometry.run_flowsom(d, seed, ["default"], {})["default"]
                    epochs = None
                else:
                    a = cytometry.make_adata(d)
                    kw = dict(configs[config])
                    if "schedule" in kw:
                        kw["schedule"] = GMVAESchedule(**{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in kw["schedule"].items()})
                    t0 = time.perf_counter()
                    cellvi.tl.gmvae(a, seed=seed, verbose=False, **kw)
                    secs = time.perf_counter() - t0
                    labels = a.obs["gmvae"].astype(str).to_numpy()
                    epochs = len(a.uns["gmvae"]["history"]["epoch"])
                sc = cytometry.score(d, labels)
                rec = dict(data=name, seed=seed, config=config, seconds=round(secs, 1),
                           f1=round(sc["f1"], 4), ari=round(sc["ari"], 4),
                           clusters=sc["n_clusters"], epochs=epochs)
                logger.info("%s", rec)
                records.append(rec)
                with out.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    return records


def render(records: list[dict], header: str) -> str:
    lines = [header, "",
             "| data | seed | method | seconds | F1 | ARI | clusters | epochs |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['data']} | {r['seed']} | {r['config']} | {r['seconds']:.1f} | "
                     f"{r['f1']:.3f} | {r['ari']:.3f} | {r['clusters']} | {r['epochs'] or '-'} |")
    lines += ["", "Means over seeds:", "", "| data | method | seconds | F1 (min-max) |", "|---|---|---:|---|"]
    for data in dict.fromkeys(r["data"] for r in records):
        for config in dict.fromkeys(r["config"] for r in records):
            rs = [r for r in records if r["data"] == data and r["config"] == config]
            if rs:
                f1 = [r["f1"] for r in rs]
                lines.append(f"| {data} | {config} | {np.mean([r['seconds'] for r in rs]):.1f} | "
                             f"{np.mean(f1):.3f} ({min(f1):.3f}-{max(f1):.3f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", nargs="+", default=["flowsom", "spectre"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--flowsom-all", action="store_true", help="FlowSOM on every dataset")
    p.add_argument("--configs", help="JSON: {name: tl.gmvae keyword arguments} (default: the "
                   "default schedule and the one without epoch floors)")
    p.add_argument("--stem", default="gmvae_floors_1m", help="output file names")
    p.add_argument("--no-flowsom", action="store_true", help="leave FlowSOM out")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", metavar="JSONL", help="only write the markdown from a jsonl file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render:
        records = [json.loads(line) for line in open(args.render)]
    else:
        records = run(args)
    title = ("default schedule vs no epoch floors" if args.stem == "gmvae_floors_1m"
             else ", ".join(dict.fromkeys(r["config"] for r in records)))
    header = (f"# GMVAE at 1M resampled events: {title}\n\n"
              f"`python benchmarks/gmvae_floors_1m.py` ({platform.platform()}, one thread per "
              "method, 2-core machine shared with other jobs). Docstring of the script for the "
              "protocol.")
    (Path(args.out) / f"{args.stem}.md").write_text(render(records, header))


if __name__ == "__main__":
    main()
