"""Reading flow and mass cytometry FCS files into AnnData, and opening zarr stores with ``X``
left on disk (:func:`open_zarr`).

FCS parsing is done by `FlowIO <https://github.com/whitews/FlowIO>`_; this module only turns
its output into an :class:`~anndata.AnnData` (events x channels) and turns FlowIO's parser
errors into messages that say which file is at fault and what to do.

The spillover matrix an FCS file carries (``$SPILLOVER``, ``SPILL`` or ``$SPILL``) is kept in
``adata.uns["spillover"]`` in a form that survives ``write_h5ad``;
:func:`spillover_from_uns` gives it back as a DataFrame, which is what
:func:`cellvi.pp.compensate` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger("cellvi")

__all__ = ["read_fcs", "open_zarr", "spillover_from_uns", "parse_spillover", "per_sample_spillover"]

#: FCS keywords that may hold the spillover matrix, as FlowIO names them (lower case, ``$``
#: removed), in order of preference.
SPILLOVER_KEYWORDS = ("spillover", "spill")


# --------------------------------------------------------------------------------------------
# spillover matrices
# --------------------------------------------------------------------------------------------


def parse_spillover(text: str, *, source: str = "spillover keyword") -> pd.DataFrame:
    """Parse the FCS spillover keyword format into a DataFrame.

    The format (FCS 3.1 ``$SPILLOVER``, BD's ``SPILL``) is one comma-separated line: ``n``,
    then ``n`` channel names (``$PnN``), then the ``n x n`` values row by row. Row ``i`` is
    the spill of the dye read in channel ``i`` into every channel (the diagonal is 1).

    Args:
        text: the keyword value.
        source: where ``text`` came from, for error messages.

    Returns:
        A float64 DataFrame, channels x channels (index and columns are the channel names).

    Example:
        >>> parse_spillover("2,FL1-A,FL2-A,1,0.1,0.02,1")
               FL1-A  FL2-A
        FL1-A   1.00    0.1
        FL2-A   0.02    1.0
    """
    from flowutils.compensate import get_spill

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {source} is empty or not text ({text!r})")
    parts = text.split(",")
    try:
        n = int(parts[0])
    except ValueError:
        raise ValueError(
            f"the {source} does not start with the number of channels (got {parts[0][:30]!r}); "
            "expected 'n,name_1,...,name_n,value_11,...,value_nn'"
        ) from None
    if n <= 0 or len(parts) != 1 + n + n * n:
        raise ValueError(
            f"the {source} is malformed: it says {n} channels, so it needs 1 + {n} + {n}*{n} = "
            f"{1 + n + n * n} comma-separated fields, but it has {len(parts)}"
        )
    try:
        matrix, names = get_spill(text)
    except ValueError as err:
        raise ValueError(f"the {source} has values that are not numbers: {err}") from None
    return _spillover_frame(matrix, names, source)


def _spillover_frame(matrix: Any, channels: Sequence[str], source: str) -> pd.DataFrame:
    matrix = np.asarray(matrix, dtype=np.float64)
    channels = [str(c) for c in channels]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the {source} is not a square matrix (shape {matrix.shape})")
    if matrix.shape[0] != len(channels):
        raise ValueError(
            f"the {source} is {matrix.shape[0]} x {matrix.shape[1]} but names "
            f"{len(channels)} channels"
        )
    dup = sorted({c for c in channels if channels.count(c) > 1})
    if dup:
        raise ValueError(f"the {source} names channel(s) {dup} more than once")
    if not np.isfinite(matrix).all():
        raise ValueError(f"the {source} contains NaN or infinite values")
    return pd.DataFrame(matrix, index=channels, columns=channels)


def _spillover_to_uns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {"channels": np.asarray(frame.index, dtype=str), "matrix": frame.to_numpy(np.float64)}


def _spillover_from_entry(entry: Any, source: str) -> pd.DataFrame:
    if isinstance(entry, pd.DataFrame):
        return _spillover_frame(entry.to_numpy(), list(entry.index), source)
    if isinstance(entry, str):
        return parse_spillover(entry, source=source)
    if isinstance(entry, dict) and {"channels", "matrix"} <= set(entry):
        return _spillover_frame(entry["matrix"], list(np.asarray(entry["channels"]).ravel()),
                                source)
    raise ValueError(
        f"{source} is not a spillover matrix: expected a dict with 'channels' and 'matrix' "
        f"(as written by cellvi.io.read_fcs), got {type(entry).__name__}"
    )


def per_sample_spillover(entry: Any) -> tuple[str, dict[str, Any]] | None:
    """``(sample_key, {sample: matrix entry})`` if ``entry`` holds one matrix per sample.

    That layout is ``{"sample_key": obs column, sample: {"channels", "matrix"}, ...}``;
    anything else (one matrix) gives ``None``.
    """
    if not isinstance(entry, dict) or "channels" in entry or "matrix" in entry:
        return None
    samples = {str(k): v for k, v in entry.items() if isinstance(v, dict)}
    if not samples:
        return None
    return str(entry.get("sample_key", "") or ""), samples


def spillover_from_uns(adata: AnnData, *, sample: str | None = None) -> pd.DataFrame:
    """The spillover matrix stored in ``adata.uns``, as a DataFrame (channels x channels).

    Looks, in order, at:

    1. ``uns["spillover"]`` as written by :func:`read_fcs`: ``{"channels", "matrix"}``, or,
       for several files with different matrices, ``{"sample_key": obs column,
       sample: {"channels", "matrix"}, ...}`` (then pass ``sample``);
    2. ``uns["spillover_text"]``: the raw FCS ``SPILL`` keyword string;
    3. the ``$SPILLOVER`` / ``SPILL`` keyword in ``uns["fcs"]`` (one file's keywords).

    Args:
        adata: the AnnData.
        sample: which sample's matrix, when ``uns["spillover"]`` holds one per sample.

    Returns:
        A float64 DataFrame whose index and columns are the channel names (``$PnN``).

    Example:
        >>> adata = cellvi.io.read_fcs("sample.fcs")  # doctest: +SKIP
        >>> cellvi.io.spillover_from_uns(adata)  # doctest: +SKIP
    """
    uns = adata.uns
    if "spillover" in uns:
        entry = uns["spillover"]
        per_sample = per_sample_spillover(entry)
        if per_sample is not None:
            samples = per_sample[1]
            if sample is None:
                raise ValueError(
                    f"adata.uns['spillover'] holds one matrix per sample ({list(samples)[:10]}); "
                    "pass sample='<name>' (cellvi.pp.compensate uses each sample's own matrix)"
                )
            if sample not in samples:
                raise KeyError(
                    f"sample {sample!r} has no spillover matrix in adata.uns['spillover'] "
                    f"(samples with one: {list(samples)[:10]})"
                )
            return _spillover_from_entry(samples[sample], f"adata.uns['spillover'][{sample!r}]")
        return _spillover_from_entry(entry, "adata.uns['spillover']")
    if "spillover_text" in uns:
        return parse_spillover(str(uns["spillover_text"]), source="adata.uns['spillover_text']")
    fcs = uns.get("fcs")
    if isinstance(fcs, dict):
        for key in SPILLOVER_KEYWORDS:
            if isinstance(fcs.get(key), str):
                return parse_spillover(fcs[key], source=f"adata.uns['fcs'][{key!r}]")
    raise KeyError(
        "no spillover matrix in adata.uns (looked for 'spillover', 'spillover_text' and the "
        "SPILL/$SPILLOVER keyword in 'fcs'). Pass one explicitly, e.g. "
        "cellvi.pp.compensate(adata, spillover=df) with a channels x channels DataFrame or a "
        "CSV path. Mass cytometry data need no compensation."
    )


# --------------------------------------------------------------------------------------------
# FCS reading
# --------------------------------------------------------------------------------------------


def _as_paths(path_or_paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(path_or_paths, (str, Path)):
        items = [path_or_paths]
    elif isinstance(path_or_paths, Sequence):
        items = list(path_or_paths)
    else:
        raise TypeError(
            "read_fcs expects a path or a list of paths, got "
            f"{type(path_or_paths).__name__}"
        )
    if not items:
        raise ValueError("read_fcs got an empty list of paths")
    paths: list[Path] = []
    for item in items:
        if not isinstance(item, (str, Path)):
            raise TypeError(f"expected a file path, got {type(item).__name__}: {item!r}")
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".fcs" and f.is_file())
            if not found:
                raise FileNotFoundError(f"no .fcs files in the folder {p}")
            paths.extend(found)
        elif not p.exists():
            raise FileNotFoundError(f"FCS file not found: {p}")
        else:
            paths.append(p)
    return paths


def _read_one(path: Path, preprocess: bool) -> dict[str, Any]:
    """Parse one FCS file with FlowIO; returns events, channel table and keywords."""
    import flowio

    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head.startswith(b"FCS"):
        raise ValueError(
            f"{path} is not an FCS file (header does not start with 'FCS'): it starts with "
            f"{head!r}. Check the path; export the data from the instrument software as FCS."
        )
    damaged = (
        f"could not read {path}: the file looks damaged or truncated ({{}}). Copy it again "
        "from the instrument or re-export it."
    )
    try:
        fd = flowio.FlowData(path)
        events = fd.as_array(preprocess=preprocess)
    except flowio.exceptions.MultipleDataSetsError:
        raise ValueError(
            f"{path} holds several data sets; read_fcs reads files with one. Split it with "
            "flowio.read_multiple_data_sets and write each data set to its own file."
        ) from None
    except NotImplementedError as err:
        raise ValueError(f"{path} uses an FCS feature FlowIO does not support: {err}") from None
    except (flowio.exceptions.FCSParsingError, ValueError, KeyError, EOFError, IndexError,
            TypeError, OSError, UnicodeDecodeError) as err:
        raise ValueError(damaged.format(f"{type(err).__name__}: {err}")) from err
    if len(fd.pnn_labels) != fd.channel_count:
        raise ValueError(damaged.format(
            f"$PAR says {fd.channel_count} channels but the TEXT segment names "
            f"{len(fd.pnn_labels)} ($PnN)"
        ))
    if events.shape != (fd.event_count, fd.channel_count):
        raise ValueError(damaged.format(
            f"$TOT says {fd.event_count} events x {fd.channel_count} channels, the data "
            f"section holds {events.shape[0]} x {events.shape[1]}"
        ))
    return {
        "events": events,
        "pnn": [str(c) for c in fd.pnn_labels],
        "pns": [str(c or "").strip() for c in fd.pns_labels],
        "pnr": [float(r) for r in fd.pnr_values],
        "text": {str(k): str(v) for k, v in fd.text.items()},
    }


def _make_unique(names: Sequence[str]) -> list[str]:
    """anndata's ``make_unique`` rule: later duplicates get ``-1``, ``-2``, ..."""
    from anndata.utils import make_index_unique

    return list(make_index_unique(pd.Index([str(n) for n in names])))


def _uns_keywords(text: dict[str, str]) -> dict[str, str]:
    """FCS keywords made safe for h5ad ('/' is a group separator in HDF5)."""
    out = {}
    for k, v in text.items():
        key = k.replace("/", "_") or "_"
        out[key] = v
    return out


def _file_spillover(path: Path, text: dict[str, str]) -> pd.DataFrame | None:
    for key in SPILLOVER_KEYWORDS:
        value = text.get(key)
        if value is None or not value.strip() or value.strip() == "0":
            continue
        try:
            return parse_spillover(value, source=f"{key.upper()} keyword of {path.name}")
        except ValueError as err:
            logger.warning("ignoring the spillover matrix of %s: %s", path, err)
            return None
    return None


def _align_channels(paths: list[Path], parsed: list[dict[str, Any]]) -> None:
    """Put every file's channels in the first file's order (in place); refuse other channels.

    Also warns where a file's marker names (``$PnS``) differ from the first file's.
    """
    first, first_path = parsed[0], paths[0]
    for path, part in zip(paths[1:], parsed[1:], strict=True):
        if part["pnn"] == first["pnn"]:
            continue
        only_first = [c for c in first["pnn"] if c not in part["pnn"]]
        only_this = [c for c in part["pnn"] if c not in first["pnn"]]
        if only_first or only_this or len(part["pnn"]) != len(first["pnn"]):
            raise ValueError(
                f"the FCS files have different channels: {first_path.name} and {path.name} "
                f"differ (only in {first_path.name}: {only_first or 'none'}; only in "
                f"{path.name}: {only_this or 'none'}). Read them separately, or keep the "
                "channels they share: adata[:, shared].copy() on each, then anndata.concat."
            )
        order = [part["pnn"].index(c) for c in first["pnn"]]
        logger.info("%s has the channels in another order; reordered to %s's",
                    path.name, first_path.name)
        part["events"] = part["events"][:, order]
        part["pns"] = [part["pns"][i] for i in order]
        part["pnr"] = [part["pnr"][i] for i in order]
        part["pnn"] = list(first["pnn"])
    for path, part in zip(paths[1:], parsed[1:], strict=True):
        if part["pns"] != first["pns"]:
            diff = [f"{n}: {a!r} vs {b!r}" for n, a, b in
                    zip(first["pnn"], first["pns"], part["pns"], strict=True) if a != b]
            logger.warning("marker names ($PnS) of %s differ from %s's (%s); using %s's",
                           path.name, first_path.name, "; ".join(diff[:5]), first_path.name)


def _fcs_var(parsed: list[dict[str, Any]]) -> pd.DataFrame:
    """``var`` of the channel-aligned files: channel, marker and (largest) range."""
    first = parsed[0]
    names = [s if s else n for s, n in zip(first["pns"], first["pnn"], strict=True)]
    var = pd.DataFrame(
        {"channel": first["pnn"], "marker": first["pns"],
         "range": np.max([p["pnr"] for p in parsed], axis=0).astype(np.float64)},
        index=pd.Index(_make_unique(names)),
    )
    if len(set(names)) < len(names):
        logger.info("marker/channel names were not unique; made them unique: %s",
                    list(var.index))
    return var


def _fcs_obs(samples: list[str], parsed: list[dict[str, Any]],
             sample_key: str | None) -> pd.DataFrame:
    """``obs`` of the stacked files: ``"<stem>_<i>"`` names and the sample column."""
    obs_names = [f"{s}_{i}" for s, p in zip(samples, parsed, strict=True)
                 for i in range(p["events"].shape[0])]
    obs = pd.DataFrame(index=pd.Index(obs_names))
    if sample_key is not None:
        obs[sample_key] = pd.Categorical(
            np.repeat(samples, [p["events"].shape[0] for p in parsed]), categories=samples
        )
    return obs


def _store_fcs_uns(adata: AnnData, paths: list[Path], samples: list[str],
                   parsed: list[dict[str, Any]], sample_key: str | None) -> None:
    """Write ``uns["fcs"]`` (keywords) and ``uns["spillover"]`` (see :func:`read_fcs`)."""
    keywords = [_uns_keywords(p["text"]) for p in parsed]
    spills = [_file_spillover(path, p["text"]) for path, p in zip(paths, parsed, strict=True)]
    if len(paths) == 1:
        adata.uns["fcs"] = keywords[0]
        if spills[0] is not None:
            adata.uns["spillover"] = _spillover_to_uns(spills[0])
        return
    adata.uns["fcs"] = dict(zip(samples, keywords, strict=True))
    have = [(s, sp) for s, sp in zip(samples, spills, strict=True) if sp is not None]
    if not have:
        return
    ref = have[0][1]
    same = len(have) == len(samples) and all(
        sp.shape == ref.shape and list(sp.index) == list(ref.index)
        and np.array_equal(sp.to_numpy(), ref.to_numpy()) for _, sp in have
    )
    if same:
        adata.uns["spillover"] = _spillover_to_uns(ref)
        return
    if "sample_key" in samples:
        raise ValueError(
            "a file is named 'sample_key.fcs', a name read_fcs reserves; rename it"
        )
    per_sample = {s: _spillover_to_uns(sp) for s, sp in have}
    adata.uns["spillover"] = {**per_sample, "sample_key": sample_key or ""}
    if sample_key is None:
        logger.warning("the files have different spillover matrices; without a "
                       "sample_key, cellvi.pp.compensate cannot tell which applies")
    missing = [s for s, sp in zip(samples, spills, strict=True) if sp is None]
    if missing:
        logger.warning("no spillover matrix in sample(s) %s", missing)


def read_fcs(
    path_or_paths: str | Path | Sequence[str | Path],
    *,
    sample_key: str | None = "sample",
    preprocess: bool = True,
) -> AnnData:
    """Read one or several FCS files into one AnnData (events x channels).

    Parsing is FlowIO's. Values are the event data as FlowIO's ``as_array`` returns them
    (with ``preprocess=True``: gain, log-amplification and time-step scaling applied as the
    file's keywords say), stored as float32. Nothing is compensated or transformed: see
    :func:`cellvi.pp.compensate`, :func:`cellvi.pp.arcsinh`, :func:`cellvi.pp.logicle`.

    Args:
        path_or_paths: an FCS file, a folder (every ``*.fcs`` in it, sorted), or a list of
            files. Several files are stacked; they must have the same channels (``$PnN``);
            channels in another order are reordered to the first file's order.
        sample_key: obs column naming each event's file (its stem, e.g. ``"donor1"`` for
            ``donor1.fcs``); ``None`` adds no column.
        preprocess: apply gain / log / time scaling (FlowIO's ``preprocess``).

    Returns:
        AnnData with:

        - ``X``: float32 events x channels.
        - ``obs_names``: ``"<stem>_<i>"``, unique across files; ``obs[sample_key]``:
          categorical file stem (categories in file order; repeated stems get ``-1``, ...).
        - ``var_names``: the marker name ``$PnS`` where present and non-empty, else the
          channel name ``$PnN``; made unique like ``AnnData.var_names_make_unique``.
        - ``var["channel"]`` (``$PnN``), ``var["marker"]`` (``$PnS`` or ``""``),
          ``var["range"]`` (``$PnR``, float; the largest over the files).
        - ``uns["fcs"]``: the TEXT keywords as strings, keys as FlowIO gives them: lower case
          without ``$`` (``"p1n"``, ``"spillover"``, ``"cyt"``; a ``/`` in a key becomes
          ``_``). For several files, a dict of these keyed by sample.
        - ``uns["spillover"]`` (only if a file has ``$SPILLOVER``/``SPILL``/``$SPILL``):
          ``{"channels": str array, "matrix": float n x n}``. For several files the same
          form if all matrices are identical, else one per sample, keyed by sample:
          ``{sample: {"channels", "matrix"}, ..., "sample_key": sample_key}`` (the one
          string entry names the obs column; see :func:`per_sample_spillover`).
          :func:`spillover_from_uns` turns either into a DataFrame.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file is not an FCS file, is damaged or truncated, or the files'
            channels differ.

    Example:
        >>> adata = cellvi.io.read_fcs(["ctrl.fcs", "stim.fcs"])  # doctest: +SKIP
        >>> adata.obs["sample"].value_counts()  # doctest: +SKIP
        >>> cellvi.pp.arcsinh(adata, cofactor=5)  # doctest: +SKIP
    """
    paths = _as_paths(path_or_paths)
    samples = _make_unique([p.stem for p in paths])
    if len(set(p.stem for p in paths)) < len(paths):
        logger.warning("several files share a name stem; samples were named %s", samples)
    parsed = [_read_one(p, preprocess) for p in paths]
    _align_channels(paths, parsed)
    var = _fcs_var(parsed)
    X = np.concatenate([p["events"] for p in parsed], axis=0).astype(np.float32, copy=False)
    adata = AnnData(X=X, obs=_fcs_obs(samples, parsed, sample_key), var=var)
    _store_fcs_uns(adata, paths, samples, parsed, sample_key)
    logger.info("read %d events x %d channels from %d FCS file(s)", adata.n_obs, adata.n_vars,
                len(paths))
    return adata


# --------------------------------------------------------------------------------------------
# zarr stores, X on disk
# --------------------------------------------------------------------------------------------
def open_zarr(path: str | Path) -> AnnData:
    """An AnnData zarr store (``adata.write_zarr(path)``) with ``obs``, ``var`` and ``uns`` in
    memory and ``X`` left on disk, for ``cellvi.tl.nbvae`` and ``NBVAE`` to stream as they do a
    backed ``.h5ad``: row chunks read through anndata's own readers
    (``anndata.io.sparse_dataset`` for a CSR ``X``, the zarr array for a dense one), never
    the whole matrix. Layers and ``obsm`` are not read. Results are written into the returned
    object in memory; save them where you like (``obs``, ``obsm``).

    Raises:
        FileNotFoundError: no such store. ``InvalidInputError``: no ``X`` in the store, or a
        CSC ``X`` (rows are not contiguous; write it as CSR).

    Example:
        >>> adata = cellvi.io.open_zarr("big.zarr")
        >>> cellvi.tl.nbvae(adata, batch_key="batch")
    """
    import anndata
    import zarr

    from .errors import InvalidInputError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no zarr store at {path}")
    root = zarr.open_group(str(path), mode="r")
    if "X" not in root:
        raise InvalidInputError(f"the zarr store {path} has no X; write it with adata.write_zarr")
    node = root["X"]
    if isinstance(node, zarr.Group):
        encoding = node.attrs.get("encoding-type")
        if encoding == "csc_matrix":
            raise InvalidInputError(
                f"X of {path} is stored as CSC, whose rows are not contiguous on disk; write it "
                "as CSR: adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_zarr(path)")
        X = anndata.io.sparse_dataset(node)
    else:
        X = node
    read = anndata.io.read_elem
    obs = read(root["obs"]) if "obs" in root else None
    var = read(root["var"]) if "var" in root else None
    uns = read(root["uns"]) if "uns" in root else {}
    return AnnData(X=X, obs=obs, var=var, uns=uns)
