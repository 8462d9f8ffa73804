"""Training checkpoints: one safetensors file per run, written atomically.

A checkpoint holds everything :func:`cellvi.train.train` needs to continue as if it had
never stopped: the module's weights, the optimiser's state, the torch random state, the
best weights of early stopping, the step and epoch counters, the learning rate and the
history. Tensors go into the file's tensors, the rest into its JSON metadata (no pickle).
It is written to ``<name>.tmp`` and renamed over the old file (``os.replace``), so a kill
at any moment leaves either the old or the new checkpoint, never half of one.

A ``fingerprint`` (the model's settings, the data's size, the training settings) is stored
with it; resuming with a different one is refused, so a checkpoint is never continued on
other data or settings by mistake.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError

__all__ = ["Checkpointer"]

_META = "cellvi_checkpoint"


@dataclass
class Checkpointer:
    """Where and how often :func:`cellvi.train.train` saves its state.

    Args:
        directory: folder of the checkpoint files (created when needed).
        every: save after every ``every`` epochs (and always at the end).
        resume: continue from the checkpoint in ``directory`` when there is one.
        name: file stem (one per training run: the GMVAE's phases each have their own).
        fingerprint: what must match to resume (JSON-able); set by the models' ``fit``.
    """

    directory: str | Path
    every: int = 1
    resume: bool = False
    name: str = "train"
    fingerprint: Any = None

    def __post_init__(self):
        self.directory = Path(self.directory)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InvalidInputError(f"checkpoint_every must be a positive integer, got {self.every!r}")

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.safetensors"

    def child(self, name: str) -> Checkpointer:
        """The same settings for another run (file ``name``)."""
        return Checkpointer(self.directory, self.every, self.resume, name, self.fingerprint)

    def due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0

    def save(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
        """Write the run's state (``state``: JSON-able counters and history)."""
        from safetensors.torch import save_file

        tensors = {f"module/{k}": v for k, v in module.state_dict().items()}
        if best_state is not None:
            tensors.update({f"best/{k}": v for k, v in best_state.items()})
        opt = optimizer.state_dict()
        for i, entry in opt["state"].items():
            for key, value in entry.items():
                tensors[f"optim/{i}/{key}"] = torch.as_tensor(value)
        tensors["rng/cpu"] = torch.random.get_rng_state()
        device = next(module.parameters()).device
        if device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        meta = dict(state, param_groups=opt["param_groups"], fingerprint=self.fingerprint)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta, default=str)})
        os.replace(tmp, self.path)

    def load(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Restore a saved run into ``module`` and ``optimizer`` (and the torch random
        state): ``(state, best_state)``, or ``None`` when there is nothing to resume."""
        from safetensors import safe_open

        if not (self.resume and self.path.exists()):
            return None
        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if json.dumps(meta["fingerprint"], default=str) != json.dumps(self.fingerprint, default=str):
            raise InvalidInputError(
                f"the checkpoint {self.path} was written for other data or settings; resume "
                "with the same data and settings, or pass another checkpoint_dir (or "
                "resume=False to start over)")
        device = next(module.parameters()).device
        module.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("module/")})
        best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best/")} or None
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, i, key = k.split("/", 2)
                opt_state.setdefault(int(i), {})[key] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})
        torch.random.set_rng_state(tensors["rng/cpu"])
        if "rng/cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], device)
        return meta, best
