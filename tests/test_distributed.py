"""Data-parallel training (``cellvi.distributed``): 2 gloo processes under ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cellvi import distributed

WORKER = Path(__file__).with_name("_ddp_fit.py")


def _run(args: list[str], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_train_one_model_with_the_single_process_elbo(tmp_path):
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(tmp_path / "ddp"), "0"], tmp_path)
    for seed in (0, 1):
        _run([str(WORKER), str(tmp_path / f"single{seed}"), str(seed)], tmp_path)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = [json.loads((tmp_path / f"single{s}" / "rank0.json").read_text()) for s in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2] and [r["main"] for r in ranks] == [True, False]
    assert single[0]["size"] == 1
    # one model: identical weights and history on both processes
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["validation_elbo"] == ranks[1]["validation_elbo"]
    # the per-cell pass after training is split over the processes and gathered: every
    # process returns every cell, the same values
    assert ranks[0]["elbo_cells"] == ranks[0]["n_obs"] == ranks[1]["elbo_cells"]
    assert ranks[0]["elbo_hash"] == ranks[1]["elbo_hash"]
    # the same ELBO as one process, within the seed-to-seed spread of one process
    spread = abs(single[0]["elbo"] - single[1]["elbo"])
    lo, hi = min(s["elbo"] for s in single), max(s["elbo"] for s in single)
    assert lo - spread <= ranks[0]["elbo"] <= hi + spread, (ranks[0]["elbo"], single)
    assert ranks[0]["validation_elbo"][-1] > ranks[0]["validation_elbo"][0] + 5  # it trained


def test_gather_rows_undoes_shard_across_two_processes(tmp_path):
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(tmp_path / "g"), "0", "gather"], tmp_path)
    ranks = [json.loads((tmp_path / "g" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    assert all(r["equal"] and r["shape"] == [11, 3] for r in ranks), ranks


def test_without_a_launcher_nothing_changes():
    assert distributed.world() == (0, 1) and distributed.is_main_process()
    assert not distributed.active()
    idx = torch.arange(10)
    assert distributed.shard(idx) is idx
    rows = torch.ones(4, 2)
    assert distributed.gather_rows(rows, 4) is rows
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")


def test_two_gloo_processes_train_one_gmvae_equivalent_to_one_process(tmp_path):
    """The GMVAE's phases (warm-up, GMM start, M-steps and pruning after each epoch, merges)
    run on every process from the same weights and cells; rank 0's M-step is kept by all."""
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
          str(tmp_path / "ddp"), "0", "gmvae"], tmp_path)
    for seed in (0, 1):
        _run([str(WORKER), str(tmp_path / f"single{seed}"), str(seed), "gmvae"], tmp_path)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = [json.loads((tmp_path / f"single{s}" / "rank0.json").read_text()) for s in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    for key in ("weights", "n_components", "n_clusters", "merges", "validation_elbo",
                "elbo_hash"):
        assert ranks[0][key] == ranks[1][key], key  # one model on both processes
    assert ranks[0]["n_components"][0] == 30 and ranks[0]["n_components"][-1] < 10  # it pruned
    # an equivalent model: the populations found, the ELBO within the single runs' spread
    assert abs(ranks[0]["n_clusters"] - 5) <= 1 and ranks[0]["ari"] >= 0.9, ranks[0]
    spread = abs(single[0]["elbo"] - single[1]["elbo"])
    lo, hi = min(s["elbo"] for s in single), max(s["elbo"] for s in single)
    assert lo - max(spread, 0.05) <= ranks[0]["elbo"] <= hi + max(spread, 0.05), (ranks[0], single)
