"""Model files: ``{format_version, kind, config, type_map, state_dict, stats, metadata}``.

Saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``: a model file
holds tensors and plain data only, so loading one never executes code from it. An unknown
``format_version`` or ``kind`` is refused with a message saying what was found.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import ModelFileError
from ..fileio import atomic_path
from .config import parse_model_config
from .deeppot import DeepPot

FORMAT_VERSION = 1
MODEL_KIND = "dpelt-model"
STAT_BUFFERS = {"davg": "descriptor.davg", "dstd": "descriptor.dstd", "bias_atom_e": "fitting.bias_atom_e"}


def model_config_dict(model: DeepPot, config) -> dict:
    """The model section with concrete ``sel`` (DeePMD-kit key names)."""
    data = to_dict(config)
    data["descriptor"]["sel"] = list(model.sel)
    data["type_map"] = list(model.type_map)
    return data


def plain(obj: Any) -> Any:
    """Reduce to types ``torch.load(weights_only=True)`` accepts: dict, list, str, int, float, bool, None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int) or (hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0 and obj.dtype.kind in "iu"):
        return int(obj)
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", 1) == 0 and obj.dtype.kind == "f"):
        return float(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a model file")


def model_to_dict(model: DeepPot, config, metadata: dict | None = None) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in STAT_BUFFERS.values()}
    stats = {name: model.state_dict()[key].detach().clone() for name, key in STAT_BUFFERS.items()}
    return {
        "format_version": FORMAT_VERSION,
        "kind": MODEL_KIND,
        "config": plain(model_config_dict(model, config)),
        "type_map": list(model.type_map),
        "state_dict": state,
        "stats": stats,
        "metadata": plain(dict(metadata or {})),
    }


def save_model(model: DeepPot, config, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a model file atomically."""
    return save_torch(model_to_dict(model, config, metadata), path)


def save_torch(data: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically and byte-for-byte reproducibly.

    (``torch.save`` names the archive after the file; saving through a buffer keeps the
    bytes independent of the temporary file name.)
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(data, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def read_model_file(path: str | os.PathLike, kind: str = MODEL_KIND) -> dict:
    """Load and check the raw dictionary of a model (or checkpoint) file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("is a directory, not a model file" if path.is_dir() else "file not found", path=path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise ModelFileError("not a readable torch file (truncated or another format: no torch.save archive)", path=path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"refused: the file holds objects other than tensors and plain data, and loading it could run code ({str(exc).splitlines()[0]})",
            path=path,
        ) from None
    except Exception as exc:
        raise ModelFileError(f"not a readable torch file (truncated or another format): {exc}", path=path) from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise ModelFileError("not a dpelt model file (no format_version)", path=path, key="format_version")
    if data.get("kind") != kind:
        raise ModelFileError(f"expected a {kind!r} file, found kind {data.get('kind')!r}", path=path, key="kind")
    if data["format_version"] != FORMAT_VERSION:
        raise ModelFileError(
            f"unsupported format_version {data['format_version']!r}; this dpelt reads version {FORMAT_VERSION}",
            path=path,
            key="format_version",
        )
    return data


def model_from_dict(data: dict, source: str = "<model>") -> tuple[DeepPot, Any]:
    """Rebuild (model, config) from a model dictionary."""
    for entry in ("config", "state_dict", "stats"):
        if entry not in data:
            raise ModelFileError("missing entry", path=source, key=entry)
    try:
        config = parse_model_config(data["config"], "config", source)
        model = DeepPot(config, sel=list(data["config"]["descriptor"]["sel"]))
        state = dict(data["state_dict"])
        for name, key in STAT_BUFFERS.items():
            state[key] = data["stats"][name]
        model.load_state_dict(state, strict=True)
    except ModelFileError:
        raise
    except KeyError as exc:
        raise ModelFileError(f"missing entry {exc}", path=source) from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"inconsistent model file: {exc}", path=source) from None
    for section in ("state_dict", "stats"):
        for name, value in data[section].items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ModelFileError("non-finite value (NaN or inf): the model would predict NaN", path=source, key=f"{section}.{name}")
    if "type_map" in data and list(data["type_map"]) != list(config.type_map):
        raise ModelFileError(f"type_map {list(data['type_map'])} differs from the config's {list(config.type_map)}", path=source, key="type_map")
    if not bool((data["stats"]["dstd"] > 0).all()):
        raise ModelFileError("every standard deviation must be > 0 (descriptor inputs are divided by it)", path=source, key="stats.dstd")
    return model, config


def load_model(path: str | os.PathLike) -> DeepPot:
    """Load a model file (weights_only) into a :class:`DeepPot` in eval mode."""
    data = read_model_file(path)
    model, config = model_from_dict(data, str(path))
    model.metadata = data.get("metadata", {})  # type: ignore[attr-defined]
    return model.eval()


def freeze_model(model: DeepPot, path: str | os.PathLike) -> Path:
    """Write a TorchScript version of ``model`` (same outputs as eager)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"type_map": " ".join(model.type_map), "rcut": str(model.rcut), "sel": " ".join(map(str, model.sel))})
    return path


def inference_model(model, compress: bool) -> DeepPot:
    """A model file or a loaded DeepPot, ready for inference: eval mode, no weight requiring a
    gradient, and the embedding nets tabulated when ``compress`` (:meth:`DeepPot.compress`). A
    loaded model that would change is copied first, so the caller's model (e.g. one being
    trained) is left exactly as it was."""
    if isinstance(model, (str, os.PathLike)):
        m = load_model(model)
    elif model.compressed or (not compress and not model.training and not any(p.requires_grad for p in model.parameters())):
        m = model  # ready as it is
    else:
        m = copy.deepcopy(model)
    m.requires_grad_(False).eval()
    if compress and not m.compressed:
        m.compress()
    elif not compress and m.compressed:
        raise ModelFileError("compress=False was asked for a model already compressed: pass the uncompressed model", key="compress")
    return m
