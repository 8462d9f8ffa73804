"""The scanpy signature contract, checked on every public entry point of ``cellvi.tl``."""

import inspect

import pytest

import cellvi

TL_FUNCS = [getattr(cellvi.tl, name) for name in cellvi.tl.__all__]


@pytest.mark.parametrize("func", TL_FUNCS, ids=lambda f: f.__name__)
def test_tl_signature_contract(func):
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "adata"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, "at most a few positional parameters"
    names = {p.name for p in params}
    assert {"key_added", "copy", "seed", "device", "verbose"} <= names
    copy = inspect.signature(func).parameters["copy"]
    assert copy.default is False and copy.kind == copy.KEYWORD_ONLY
    doc = inspect.getdoc(func)
    assert "Returns:" in doc and "Example" in doc
    assert "key_added" in doc.split("Returns:")[1], "Returns lists the fields written"


@pytest.mark.parametrize("name", ["tl", "models", "datasets", "metrics", "clustering", "train",
                                  "objectives", "priors", "posteriors", "decoders", "vae"])
def test_public_objects_are_documented(name):
    mod = getattr(cellvi, name)
    for attr in mod.__all__:
        obj = getattr(mod, attr)
        assert inspect.getdoc(obj), f"cellvi.{name}.{attr} has no docstring"


@pytest.mark.parametrize("func", TL_FUNCS, ids=lambda f: f.__name__)
def test_key_added_is_a_result_name(func):
    """One convention for every tl function: key_added names the result (obsm["X_" + name])."""
    default = inspect.signature(func).parameters["key_added"].default
    assert isinstance(default, str) and not default.startswith("X_")
    assert 'obsm["X_" + key_added]' in inspect.getdoc(func).split("Returns:")[1]


@pytest.mark.parametrize("name", ["NBVAE", "GMVAE"])
def test_models_share_one_public_interface(name):
    cls = getattr(cellvi.models, name)
    assert issubclass(cls, cellvi.models.Model)
    for method in ("fit", "transform", "get_latent", "save", "load"):
        assert inspect.getdoc(getattr(cls, method)), f"{name}.{method} is undocumented"
    fit = inspect.signature(cls.fit).parameters
    assert {"seed", "device", "verbose", "callbacks"} <= set(fit)
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for n, p in fit.items() if n != "self")
