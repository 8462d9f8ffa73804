"""Saving and loading a model folder: ``model.safetensors`` (weights, no pickle) and
``config.json`` (settings, features, categories, version, history).

Loading validates before it builds anything: the folder's two files must be plain files
inside it, the JSON must hold every required field with values in sane bounds, and the
shapes in the weights' header (read without loading the tensors) must be those the settings
give, checked on a module built on the ``meta`` device (no memory). A damaged or tampered
folder is refused with a :class:`cellvi.errors.ModelFileError` that names the problem.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ModelFileError

__all__ = ["WEIGHTS", "CONFIG", "save_folder", "read_config", "check_settings", "header_shapes",
           "check_shapes", "Check", "integer", "number", "choice", "flag", "text", "texts"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: fields of ``config.json`` every saved model has
REQUIRED = ("model", "settings", "var_names", "categories", "history")
#: a config larger than this is not cellvi's
MAX_CONFIG_BYTES = 256 * 2**20

#: a validator: returns the problem with the value, or ``None`` when it is fine
Check = Callable[[Any], "str | None"]


def integer(lo: int, hi: int, optional: bool = False) -> Check:
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= v <= hi:
            return f"must be an integer in [{lo}, {hi}]"
        return None
    return check


def number(lo: float, hi: float, optional: bool = False) -> Check:
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (
                math.isfinite(v) and lo <= v <= hi):
            return f"must be a number in [{lo:g}, {hi:g}]"
        return None
    return check


def choice(*options) -> Check:
    return lambda v: None if v in options else f"must be one of {list(options)}"


def flag(v) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def text(optional: bool = False) -> Check:
    return lambda v: None if isinstance(v, str) or (optional and v is None) else "must be a string"


def texts(max_len: int = 10_000_000, unique: bool = False) -> Check:
    def check(v):
        if not isinstance(v, list) or len(v) > max_len or not all(isinstance(x, str) for x in v):
            return f"must be a list of at most {max_len:,} strings"
        if unique and len(set(v)) != len(v):
            return "has duplicates"
        return None
    return check


def save_folder(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                overwrite: bool) -> None:
    """Write the weights and the config (``config`` gets the model's version)."""
    from safetensors.torch import save_file

    if (path / WEIGHTS).exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / WEIGHTS))
    config = dict(cellvi_version=__version__, **config)
    (path / CONFIG).write_text(json.dumps(config, indent=1, default=_json_default))


def _inside(path: Path, name: str) -> Path:
    """``path / name`` as a plain file inside ``path`` (no link leading elsewhere)."""
    file = path / name
    if not file.exists():
        raise FileNotFoundError(f"{path} does not hold a saved cellvi model ({CONFIG}, {WEIGHTS})")
    if file.is_symlink() or file.resolve().parent != path.resolve() or not file.is_file():
        raise ModelFileError(f"{file} is not a plain file inside {path}; refusing to read it "
                             "(save the model again with model.save)")
    return file


def read_config(path: Path, model: str) -> dict[str, Any]:
    """The checked ``config.json`` of a model folder for a model of class ``model``."""
    file = _inside(path, CONFIG)
    _inside(path, WEIGHTS)
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{file} is {file.stat().st_size:,} bytes, too large for a cellvi config")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{file} is not valid JSON ({err}); the folder is damaged") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{file} does not hold a cellvi model's settings")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ModelFileError(f"{file} lacks {missing}; it was not written by cellvi's save()")
    if config["model"] != model:
        raise ModelFileError(f"{path} holds a {config['model']} model, not {model}")
    if not isinstance(config["settings"], dict):
        raise ModelFileError(f"{file}: 'settings' must be an object")
    problem = texts(unique=True)(config["var_names"])
    if problem or not config["var_names"]:
        raise ModelFileError(f"{file}: 'var_names' {problem or 'is empty'}")
    return config


def check_settings(config: dict[str, Any], schema: dict[str, tuple[Check, Any]],
                   where: str) -> dict[str, Any]:
    """The settings of ``config`` checked against ``schema`` (name -> (check, default); a
    default of ``...`` means required); unknown keys are refused too."""
    settings = dict(config["settings"])
    missing = [k for k, (_, default) in schema.items() if k not in settings and default is ...]
    if missing:
        raise ModelFileError(f"{where}: settings lack {missing}")
    unknown = sorted(set(settings) - set(schema))
    if unknown:
        raise ModelFileError(f"{where}: unknown settings {unknown} (written by a newer cellvi?)")
    for key, (check, default) in schema.items():
        settings.setdefault(key, default)
        problem = check(settings[key])
        if problem:
            raise ModelFileError(f"{where}: setting {key}={settings[key]!r} {problem}")
    keys = settings.get("batch_keys", [])
    cats = config["categories"]
    if not isinstance(cats, dict) or sorted(cats) != sorted(keys) or not all(
            texts()(cats[k]) is None and cats[k] for k in keys):
        raise ModelFileError(f"{where}: 'categories' must give a list of names for each batch "
                             f"key {keys}")
    return settings


def header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{file} is not a readable safetensors file ({err}); the folder is "
                             "damaged or the file was replaced") from None


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                 file: Path) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{file} does not match the settings: missing tensors "
                             f"{missing[:5]}, unexpected tensors {extra[:5]}")
    wrong = [k for k in expected if expected[k] != found[k]]
    if wrong:
        k = wrong[0]
        raise ModelFileError(f"{file} does not match the settings: {len(wrong)} tensors have "
                             f"other shapes (e.g. {k}: {found[k]} in the file, {expected[k]} "
                             "from config.json)")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
