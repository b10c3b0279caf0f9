"""DeePMD-kit 3.x model files: the tree, its ``.dp`` and ``.yaml`` forms, and the suffixes.

DeePMD-kit's backend-independent model format (what ``dp convert-backend`` reads and writes):

* the content is one tree of plain data (``model``, ``model_def_script``, ``@variables`` and
  informational keys ``software``, ``version``, ``backend``); numeric arrays sit under keys
  named ``@variables``;
* ``.dp`` is HDF5: every array is a dataset ``/variable_NNNN`` (numbered in tree order) and the
  tree, with each array replaced by its dataset name, is the JSON string in the root attribute
  ``json``;
* ``.yaml``/``.yml`` holds the tree directly, each array written as
  ``{"@class": "np.ndarray", "@is_variable": true, "@version": 1, "dtype": ..., "value": [...]}``.

The ``model`` node of a standard energy model (DeePMD-kit 3.2; ``@class``/``@version``):
``Model``/2 with ``type: standard``, ``type_map``, ``descriptor``, ``fitting``, the exclusion
lists and ``@variables: {out_bias [1, ntypes, 1], out_std [1, ntypes, 1]}``; the descriptor
``Descriptor``/2 (``type: se_e2_a``, ``rcut``, ``rcut_smth``, ``sel``, ``neuron``,
``axis_neuron``, ``resnet_dt``, ``type_one_side``, ``precision``, ``env_mat``, ``embeddings`` and
``@variables: {davg, dstd [ntypes, nnei, 4]}``); the fitting ``Fitting``/4 (``type: ener``,
``nets`` and ``@variables: {bias_atom_e [ntypes, 1], ...}``). Networks are a
``NetworkCollection`` (``ndim`` 1: one net per neighbour type; ``ndim`` 2: the net of centre
type ti and neighbour type tj at index ti + tj·ntypes) of ``EmbeddingNetwork`` /
``FittingNetwork``, made of ``Layer`` nodes with ``@variables: {w [n_in, n_out], b, idt}``.

DeePMD-kit adds both ``out_bias`` (the atomic model's output bias) and the fitting's
``bias_atom_e`` to every atomic energy (``out_std`` is not used for energies). dpelt's single
``fitting.bias_atom_e`` is their sum; on export it goes to ``out_bias`` with a zero fitting
bias, which is what DeePMD-kit itself writes after training. Values dpelt has no place for
(``out_std``, the split of the bias, ``min_nbor_dist``) are kept in the imported model's
metadata so that import -> export gives back the same arrays.

This module reads and writes the files (a ``.pth`` through :mod:`.torchscript_reader`);
:mod:`.deepmd_import` maps a tree to a dpelt model and :mod:`.deepmd_export` a model to a tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ModelFileError
from ..fileio import atomic_path
from .torchscript_reader import read_torchscript

DP_SUFFIXES = (".dp",)
YAML_SUFFIXES = (".yaml", ".yml")
PTH_SUFFIXES = (".pth",)
EXPORT_SUFFIXES = DP_SUFFIXES + YAML_SUFFIXES
IMPORT_SUFFIXES = EXPORT_SUFFIXES + PTH_SUFFIXES

#: array dtypes accepted in files (anything else is refused, never interpreted)
_ARRAY_DTYPES = {"float64", "float32", "float16", "int64", "int32", "bool"}
_PRECISIONS = {"float64": torch.float64, "default": torch.float64, "float32": torch.float32}
#: values an option dpelt does not know may hold: they all mean "off"
_OFF = (None, False, 0, 0.0, "", "none", "None", [], {})


def _map_variables(obj: Any, fn: Callable[[Any], Any], in_vars: bool = False) -> Any:
    """A copy of ``obj`` with every variable (a value under an ``@variables`` key, or a node
    marked ``@is_variable``) replaced by ``fn(value)``; ``None`` stays ``None``."""
    if isinstance(obj, dict):
        if obj.get("@is_variable", False):
            return fn(obj)
        return {k: _map_variables(v, fn, in_vars or k == "@variables") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_variables(v, fn, in_vars) for v in obj]
    if obj is None or not in_vars:
        return obj
    return fn(obj)


def _array_to_yaml(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"@class": "np.ndarray", "@is_variable": True, "@version": 1, "dtype": x.dtype.name, "value": x.tolist()}
    return x


def write_deepmd_file(data: dict, path: str | os.PathLike) -> Path:
    """Write a DeePMD-kit model tree (arrays as numpy) to ``.dp`` or ``.yaml`` atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DP_SUFFIXES:
        import h5py

        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                counter = iter(range(10**9))

                def store(x: Any) -> str:
                    return h5.create_dataset(f"variable_{next(counter):04d}", data=x, track_times=False).name

                tree = _map_variables(data, store)
                h5.attrs["json"] = json.dumps(tree, separators=(",", ":"))
    elif suffix in YAML_SUFFIXES:
        import yaml

        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        text = yaml.dump(_map_variables(data, _array_to_yaml), Dumper=dumper)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    else:
        raise ModelFileError(f"unknown suffix {path.suffix!r}: DeePMD-kit's backend-independent model files are .dp (HDF5) or .yaml/.yml", path=path)
    return path


def _array_from_yaml(node: Any, path: Path) -> Any:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return node  # a scalar variable (e.g. min_nbor_dist) is stored as a plain number
    if not (isinstance(node, dict) and node.get("@class") == "np.ndarray"):
        raise ModelFileError(f"a variable is not an np.ndarray node: {str(node)[:80]}", path=path)
    if node.get("dtype") not in _ARRAY_DTYPES:
        raise ModelFileError(f"unsupported array dtype {node.get('dtype')!r}", path=path)
    return np.asarray(node["value"], dtype=np.dtype(node["dtype"]))


def read_deepmd_file(path: str | os.PathLike) -> dict:
    """Read a DeePMD-kit model file into its tree (arrays as numpy).

    ``.dp``/``.yaml``/``.yml`` are read as stored; a frozen ``.pth`` is mapped to the same tree
    from its module attributes and tensors (see :func:`read_torchscript`).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("file not found", path=path)
    suffix = path.suffix.lower()
    if suffix in DP_SUFFIXES:
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                if "json" not in h5.attrs:
                    raise ModelFileError("not a DeePMD-kit .dp model file (no 'json' attribute in the HDF5 root)", path=path)
                tree = json.loads(h5.attrs["json"])

                def fetch(name: Any) -> Any:
                    if not isinstance(name, str) or name not in h5:
                        raise ModelFileError(f"variable {name!r} is missing from the HDF5 file", path=path)
                    value = h5[name][()]
                    if isinstance(value, np.ndarray) and value.dtype.name not in _ARRAY_DTYPES:
                        raise ModelFileError(f"unsupported array dtype {value.dtype.name!r} in {name}", path=path)
                    return value.copy() if isinstance(value, np.ndarray) else value

                return _map_variables(tree, fetch)
        except ModelFileError:
            raise
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"not a readable .dp (HDF5) model file: {exc}", path=path) from None
    if suffix in YAML_SUFFIXES:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            with open(path) as fh:
                tree = yaml.load(fh, Loader=loader)
        except yaml.YAMLError as exc:
            raise ModelFileError(f"not a readable YAML model file: {exc}", path=path) from None
        if not isinstance(tree, dict):
            raise ModelFileError("not a DeePMD-kit model file (top level is not a mapping)", path=path)
        return _map_variables(tree, lambda node: _array_from_yaml(node, path))
    if suffix in PTH_SUFFIXES:
        return read_torchscript(path)
    if suffix == ".pt":
        raise ModelFileError(
            "a .pt file is a training checkpoint (DeePMD-kit) or a dpelt model: freeze the DeePMD-kit checkpoint "
            "(`dp --pt freeze`) or convert it (`dp --pt convert-backend model.ckpt.pt model.dp`) and import that",
            path=path,
        )
    raise ModelFileError(f"unknown suffix {path.suffix!r}: dpelt imports DeePMD-kit models from .dp, .yaml/.yml and .pth files", path=path)
