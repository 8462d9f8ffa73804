"""Data-parallel training (``cellvi.distributed``): 2 gloo processes under ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cellvi
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
    # the same ELBO as one process, within the seed-to-seed spread of one process
    spread = abs(single[0]["elbo"] - single[1]["elbo"])
    lo, hi = min(s["elbo"] for s in single), max(s["elbo"] for s in single)
    assert lo - spread <= ranks[0]["elbo"] <= hi + spread, (ranks[0]["elbo"], single)
    assert ranks[0]["validation_elbo"][-1] > ranks[0]["validation_elbo"][0] + 5  # it trained


def test_without_a_launcher_nothing_changes():
    assert distributed.world() == (0, 1) and distributed.is_main_process()
    assert not distributed.active()
    idx = torch.arange(10)
    assert distributed.shard(idx) is idx
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")


def test_the_gmvae_refuses_a_data_parallel_launch(monkeypatch):
    adata = cellvi.datasets.synthetic_cytometry(300, n_markers=5, seed=0)
    model = cellvi.models.GMVAE(adata, n_components=3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cellvi.errors.InvalidInputError, match="one process"):
        model.fit(max_epochs=1, verbose=False)
