"""What differs between a published dataset or model and its re-execution.

Datasets (``*.nc``): per system and variable (data and coordinates), the maximum absolute
difference of numeric arrays (in the variable's unit: Å, eV, eV/Å, …), the number of
differing entries of text arrays, or why they cannot be compared (shape, presence).
Models and checkpoints (``*.pt``): the maximum absolute difference of every tensor, and for
model files the held-out errors of both (energy RMSE per atom, eV/atom; force RMSE, eV/Å).
Other results (``*.json`` metrics and reports, ``*.csv`` learning curves): per key or column.

:func:`file_class` sorts a run's files into what is compared (datasets, models, results) and
what records the execution itself (wall times in ``md.log`` and task results, cache counts in
the label summary, log files) or is a rendering (plots), which are listed but not compared.
"""

from __future__ import annotations

import csv
import fnmatch
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: files that record how the execution went (wall times, cache hits), not what it computed
EXECUTION_RECORDS = ("*/md.log", "*/label/summary.json", "*/label/tasks/*", "*.log", "*/started")
PLOTS = ("*.png",)


def file_class(rel: str) -> str:
    """``dataset`` | ``model`` | ``result`` (compared) or ``record`` | ``plot`` (listed only)."""
    if rel.endswith(".nc"):
        return "dataset"
    if rel.endswith(".pt"):
        return "model"
    if any(fnmatch.fnmatch(rel, p) for p in EXECUTION_RECORDS):
        return "record"
    if any(fnmatch.fnmatch(rel, p) for p in PLOTS):
        return "plot"
    return "result"


def _array_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """``{"max_abs": x}`` for numbers (inf where only one side is NaN), ``{"differing": n}``
    for text and booleans, or ``{"shape": ...}`` when they cannot be compared."""
    if a.shape != b.shape:
        return {"shape": f"{list(a.shape)} vs {list(b.shape)}"}
    if a.dtype.kind in "fiu" and b.dtype.kind in "fiu":
        if a.size == 0:
            return {"max_abs": 0.0}
        x, y = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.where((x == y) | (np.isnan(x) & np.isnan(y)), 0.0, np.abs(x - y))
        return {"max_abs": float(np.nan_to_num(diff, nan=np.inf).max())}
    return {"differing": int(np.count_nonzero(a.astype(str) != b.astype(str)))}


def _is_zero(d: dict) -> bool:
    return d.get("max_abs") == 0.0 or d.get("differing") == 0


def dataset_difference(published: Path, reproduced: Path) -> dict:
    """``{"variables": {name: difference}}`` of the variables that differ (``system_k/name`` when
    the file holds several systems), ``"equal_variables"``: how many are equal, or ``"error"``."""
    from ..data.netcdf import read_frames
    from ..errors import DpeltError

    try:
        a_sys = read_frames(published, verify=False)
        b_sys = read_frames(reproduced, verify=False)
    except DpeltError as exc:
        return {"error": str(exc)}
    if len(a_sys) != len(b_sys):
        return {"error": f"{len(a_sys)} systems published, {len(b_sys)} reproduced"}
    out: dict[str, Any] = {}
    equal = 0
    for k, (a, b) in enumerate(zip(a_sys, b_sys)):
        prefix = f"system_{k:03d}/" if len(a_sys) > 1 else ""
        for name in sorted(set(a.variables) | set(b.variables)):
            if name not in a.variables or name not in b.variables:
                out[prefix + name] = {"only_in": "published" if name in a.variables else "reproduced"}
                continue
            d = _array_difference(np.asarray(a[name].values), np.asarray(b[name].values))
            if _is_zero(d):
                equal += 1
            else:
                out[prefix + name] = d
        for key in sorted(set(a.attrs) | set(b.attrs)):  # (read_frames drops the content checksum)
            if str(a.attrs.get(key)) != str(b.attrs.get(key)):
                out[f"{prefix}@{key}"] = {"differing": 1}
    return {"variables": out, "equal_variables": equal}


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of every leaf of nested dicts / lists / tuples."""
    if isinstance(obj, dict):
        for k in obj:
            yield from _tensors(obj[k], f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def heldout_errors(model_path: Path, holdout: Path) -> dict:
    """Energy RMSE per atom (eV/atom) and force RMSE (eV/Å) of a model on held-out frames."""
    from ..evaluate import test_model
    from ..model.serialize import load_model

    o = test_model(load_model(model_path), [holdout])["overall"]
    return {"energy_rmse_per_atom": o["energy_rmse_per_atom"], "force_rmse": o["force_rmse"]}


def model_difference(published: Path, reproduced: Path, holdout: Path | None = None) -> dict:
    """``{"tensors": {path: difference}}`` of the tensors and values that differ,
    ``"equal_tensors"``, and for model files ``"heldout": {"published": …, "reproduced": …}``."""
    import torch

    try:
        a = torch.load(published, map_location="cpu", weights_only=True)
        b = torch.load(reproduced, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged archive: torch raises many types
        return {"error": f"cannot load: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    out: dict[str, Any] = {}
    equal = 0
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            out[name] = {"only_in": "published" if name in ta else "reproduced"}
            continue
        x, y = ta[name], tb[name]
        if torch.is_tensor(x) and torch.is_tensor(y):
            d = _array_difference(x.detach().numpy(), y.detach().numpy())
        elif _as_number(x) is not None and _as_number(y) is not None:  # e.g. a checkpoint's learning curve
            d = _array_difference(np.array([_as_number(x)]), np.array([_as_number(y)]))
        else:
            d = {"differing": int(x != y) if not (torch.is_tensor(x) or torch.is_tensor(y)) else 1}
        if _is_zero(d):
            equal += 1
        else:
            out[name] = d
    result: dict[str, Any] = {"tensors": out, "equal_tensors": equal}
    if holdout is not None and isinstance(a, dict) and a.get("kind") == "dpelt-model":
        result["heldout"] = {}
        for side, path in (("published", published), ("reproduced", reproduced)):
            try:
                result["heldout"][side] = heldout_errors(path, holdout)
            except Exception as exc:  # a damaged model must not stop the comparison of the others
                result["heldout"][side] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    return result


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of parsed JSON."""
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _leaves(obj[k], f"{prefix}{k}.")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def _columns(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return {}
    return {name: [r[c] if c < len(r) else "" for r in rows[1:]] for c, name in enumerate(rows[0])}


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def text_difference(published: Path, reproduced: Path) -> dict:
    """``{"values": {key or column: difference}}`` of a JSON or CSV result."""
    try:
        if published.suffix == ".json":
            a, b = dict(_leaves(json.loads(published.read_text()))), dict(_leaves(json.loads(reproduced.read_text())))
        elif published.suffix == ".csv":
            a, b = _columns(published), _columns(reproduced)
        else:
            return {"values": {"bytes": {"differing": 1}}}
    except (OSError, ValueError, csv.Error) as exc:
        return {"error": f"cannot parse: {exc}"}
    out = {}
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            out[key] = {"only_in": "published" if key in a else "reproduced"}
            continue
        x, y = a[key], b[key]
        xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
        nums = [(_as_number(u), _as_number(v)) for u, v in zip(xs, ys)]
        if len(xs) == len(ys) and all(u is not None and v is not None for u, v in nums):
            d = _array_difference(np.array([u for u, _ in nums]), np.array([v for _, v in nums]))
        else:
            d = {"differing": sum(u != v for u, v in zip(xs, ys)) + abs(len(xs) - len(ys))}
        if not _is_zero(d):
            out[key] = d
    return {"values": out}


def difference(rel: str, published: Path, reproduced: Path, holdout: Path | None) -> dict:
    """The difference of one file by kind (``.nc`` dataset, ``.pt`` model or checkpoint, JSON, CSV)."""
    if rel.endswith(".nc"):
        return dataset_difference(published, reproduced)
    if rel.endswith(".pt"):
        return model_difference(published, reproduced, holdout)
    return text_difference(published, reproduced)


def summary_line(diff: dict, top: int = 3) -> str:
    """The few largest differences of :func:`difference` in one line."""
    if "error" in diff:
        return diff["error"]
    entries = diff.get("variables", diff.get("tensors", diff.get("values", {})))
    if not entries:
        return "values equal; the file bytes differ (file format or library versions)"

    def rank(item: tuple[str, dict]) -> tuple[int, float]:
        d = item[1]  # what cannot be compared first, then text, then numbers by size
        return (0, 0.0) if "shape" in d or "only_in" in d else (1, 0.0) if "differing" in d else (2, -d["max_abs"])

    ranked = sorted(entries.items(), key=rank)
    parts = []
    for name, d in ranked[:top]:
        if "max_abs" in d:
            parts.append(f"{name} max|Δ| {d['max_abs']:.3g}")
        elif "shape" in d:
            parts.append(f"{name} shape {d['shape']}")
        elif "only_in" in d:
            parts.append(f"{name} only {d['only_in']}")
        else:
            parts.append(f"{name} {d['differing']} differ")
    if len(ranked) > top:
        parts.append(f"+{len(ranked) - top} more")
    line = "; ".join(parts)
    h = diff.get("heldout")
    if h and all("force_rmse" in h.get(s, {}) for s in ("published", "reproduced")):
        p, r = h["published"], h["reproduced"]
        df, de = r["force_rmse"] - p["force_rmse"], r["energy_rmse_per_atom"] - p["energy_rmse_per_atom"]
        line += f"; held-out force RMSE {p['force_rmse']:.6g} eV/Å (Δ {df:+.2g}), energy RMSE {p['energy_rmse_per_atom'] * 1000:.6g} meV/atom (Δ {de * 1000:+.2g})"
    return line
