"""Global settings: device resolution and logging verbosity; seeded blocks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("cellvi")


@dataclass
class _Settings:
    """Package-wide defaults. Change them through ``cellvi.settings``."""

    device: str = "auto"
    #: identical results for identical seeds on one machine at any thread count: fit and
    #: transform then run on one thread with torch's deterministic algorithms (slower)
    deterministic: bool = False

    @property
    def verbosity(self) -> int:
        return logger.level

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logger.setLevel(level)
        if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s cellvi: %(message)s"))
            logger.addHandler(handler)


settings = _Settings()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` into CUDA, then MPS, then CPU; pass anything else through.

    Raises a clear error when a requested accelerator is not available.
    """
    if device is None or device == "auto":
        device = settings.device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but CUDA is not available here; "
            "use device='auto' or device='cpu'."
        )
    return dev


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside the block without changing the caller's global RNG state.

    Uses :func:`torch.random.fork_rng`, so the global torch (CPU and the used CUDA device)
    state is restored on exit. NumPy's global state is never touched: code inside cellvi
    uses ``np.random.default_rng(seed)``.
    """
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, enabled=True):
        if seed is not None:
            torch.manual_seed(seed)
        yield



@contextlib.contextmanager
def deterministic_block() -> Iterator[None]:
    """With ``settings.deterministic``: one torch thread, one BLAS/OpenMP thread and torch's
    deterministic algorithms inside the block, the caller's settings restored after."""
    if not settings.deterministic:
        yield
        return
    from threadpoolctl import threadpool_limits

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
