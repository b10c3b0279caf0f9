"""DeePMD-kit 3.x model files <-> dpelt se_e2_a models.

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

A frozen ``.pth`` (TorchScript) is read without DeePMD-kit and without running code from it:
its pickled module tree is unpickled with a loader that builds only tensors and plain data
(every ``__torch__`` class becomes an inert attribute holder), and the module attributes and
tensors are mapped to the tree above.

Anything dpelt cannot represent exactly is refused with a :class:`ModelFileError` naming the
option; a model is never silently changed.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..errors import ConfigError, ModelFileError
from ..fileio import atomic_path
from ..model.config import parse_model_config
from ..model.deeppot import DeepPot

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


# ----------------------------------------------------------------------------------------
# file level: .dp (HDF5 + JSON) and .yaml
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# frozen TorchScript .pth, read without DeePMD-kit and without executing code
# ----------------------------------------------------------------------------------------


class _ScriptObject:
    """An inert stand-in for a TorchScript object: it only records its pickled state."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def attrs(self) -> dict:
        state = self.__dict__.get("state")
        return state if isinstance(state, dict) else {}

    @property
    def cls(self) -> str:
        return type(self).qualname.rsplit(".", 1)[-1]


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _SafeScriptUnpickler(pickle.Unpickler):
    """Unpickles the ``data.pkl`` of a TorchScript archive into tensors, plain data and
    :class:`_ScriptObject` holders; any other global is refused (nothing is imported or run)."""

    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(fh)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.classes: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                self.classes[qual] = type(name, (_ScriptObject,), {"qualname": qual})
            return self.classes[qual]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, type_str=None: value
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda value: value
        raise ModelFileError(f"refused: the TorchScript archive pickles {module}.{name}, which dpelt does not load", path=self.source)

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise ModelFileError(f"unexpected storage record {str(pid)[:60]} in the TorchScript archive", path=self.source)
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise ModelFileError(f"storage {key} holds {flat.numel()} values, expected {numel}", path=self.source)
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


def _load_script_tree(path: Path) -> _ScriptObject:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ModelFileError("not a TorchScript .pth archive (not a zip file)", path=path) from None
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ModelFileError("not a TorchScript .pth archive (no data.pkl)", path=path)
        prefix = pkl[0].split("/")[0]
        try:
            root = _SafeScriptUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix, path).load()
        except ModelFileError:
            raise
        except Exception as exc:  # malformed pickle stream
            raise ModelFileError(f"cannot read the TorchScript archive: {exc}", path=path) from None
    if not isinstance(root, _ScriptObject):
        raise ModelFileError("the TorchScript archive does not hold a module", path=path)
    return root


def _child(obj: Any, name: str, path: Path, where: str) -> Any:
    if not isinstance(obj, _ScriptObject) or name not in obj.attrs():
        raise ModelFileError(f"no attribute {name!r} in {where}: not a DeePMD-kit se_e2_a energy model", path=path)
    return obj.attrs()[name]


def _np(t: Any) -> Any:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return t


def _module_list(obj: Any) -> list:
    items = {k: v for k, v in obj.attrs().items() if k.isdigit()}
    return [items[k] for k in sorted(items, key=int)]


def _script_network(net: _ScriptObject, network_class: str) -> dict:
    layers = []
    for layer in _module_list(net.attrs()["layers"]):
        a = layer.attrs()
        act = a.get("activate_name")
        layers.append(
            {
                "@class": "Layer",
                "activation_function": "none" if act in (None, "linear", "none", "None") else act,
                "bias": a.get("bias") is not None,
                "precision": a.get("precision"),
                "resnet": bool(a.get("resnet")),
                "use_timestep": bool(a.get("use_timestep")),
                "@variables": {"w": _np(a.get("matrix")), "b": _np(a.get("bias")), "idt": _np(a.get("idt"))},
            }
        )
    a = net.attrs()
    node = {
        "@class": network_class,
        "activation_function": a.get("activation_function"),
        "in_dim": a.get("in_dim"),
        "neuron": a.get("neuron"),
        "precision": a.get("precision"),
        "resnet_dt": a.get("resnet_dt"),
        "layers": layers,
    }
    if network_class == "EmbeddingNetwork":
        node["bias"] = a.get("bias", True)
    else:
        node["bias_out"] = a.get("bias_out", True)
        node["out_dim"] = a.get("out_dim")
    return node


def _script_collection(coll: _ScriptObject, network_type: str, network_class: str) -> dict:
    a = coll.attrs()
    nets = a.get("networks", a.get("_networks"))
    return {
        "@class": "NetworkCollection",
        "ndim": a.get("ndim"),
        "ntypes": a.get("ntypes"),
        "network_type": network_type,
        "networks": [None if n is None else _script_network(n, network_class) for n in _module_list(nets)],
    }


def read_torchscript(path: str | os.PathLike) -> dict:
    """The DeePMD-kit model tree of a frozen DeePMD-kit ``.pth`` (PyTorch backend).

    Only a standard se_e2_a + energy-fitting model is mapped; another model, atomic model,
    descriptor or fitting class is refused naming it.
    """
    path = Path(path)
    root = _load_script_tree(path)
    try:
        return _torchscript_tree(root, path)
    except (KeyError, AttributeError, TypeError, IndexError, ValueError) as exc:
        raise ModelFileError(f"not a DeePMD-kit se_e2_a energy model: unexpected module layout ({type(exc).__name__}: {exc})", path=path) from None


def _torchscript_tree(root: _ScriptObject, path: Path) -> dict:
    where = "the frozen model"
    if root.cls != "EnergyModel":
        raise ModelFileError(f"model class {root.qualname} is not supported: dpelt imports standard energy models (se_e2_a descriptor, ener fitting)", path=path, key="model.type")
    script = _child(root, "model_def_script", path, where)
    try:
        model_def_script = json.loads(script) if script else {}
    except (TypeError, ValueError):
        model_def_script = {}
    am = _child(root, "atomic_model", path, where)
    if not isinstance(am, _ScriptObject) or am.cls != "DPEnergyAtomicModel":
        name = am.qualname if isinstance(am, _ScriptObject) else type(am).__name__
        raise ModelFileError(f"atomic model {name} is not supported: dpelt imports the standard DP energy model (no ZBL, pair-table or linear combinations)", path=path, key="model.type")
    ama = am.attrs()
    desc = _child(am, "descriptor", path, "the atomic model")
    if not isinstance(desc, _ScriptObject) or desc.cls != "DescrptSeA":
        name = desc.qualname if isinstance(desc, _ScriptObject) else type(desc).__name__
        raise ModelFileError(f"descriptor {name} is not supported: dpelt implements se_e2_a", path=path, key="model.descriptor.type")
    sea = _child(desc, "sea", path, "the descriptor")
    s = sea.attrs()
    emask = s.get("emask")
    no_exclusion = emask.attrs().get("no_exclusion", True) if isinstance(emask, _ScriptObject) else True
    fit = _child(am, "fitting_net", path, "the atomic model")
    if not isinstance(fit, _ScriptObject) or fit.cls not in ("EnergyFittingNet", "EnergyFittingNetDirect", "InvarFitting"):
        name = fit.qualname if isinstance(fit, _ScriptObject) else type(fit).__name__
        raise ModelFileError(f"fitting {name} is not supported: dpelt fits energies (type 'ener')", path=path, key="model.fitting.type")
    f = fit.attrs()
    compress = bool(s.get("compress", False)) or bool(desc.attrs().get("compress", False))
    descriptor = {
        "@class": "Descriptor",
        "type": "se_e2_a",
        "rcut": s.get("rcut"),
        "rcut_smth": s.get("rcut_smth"),
        "sel": s.get("sel"),
        "neuron": s.get("neuron"),
        "axis_neuron": s.get("axis_neuron"),
        "resnet_dt": s.get("resnet_dt"),
        "trainable": s.get("trainable", True),
        "type_one_side": s.get("type_one_side"),
        "exclude_types": [] if no_exclusion else model_def_script.get("descriptor", {}).get("exclude_types", ["(set)"]),
        "env_protection": s.get("env_protection", 0.0),
        "set_davg_zero": s.get("set_davg_zero", False),
        "activation_function": s.get("activation_function"),
        "precision": s.get("precision"),
        "type_map": desc.attrs().get("type_map"),
        "env_mat": {"rcut": s.get("rcut"), "rcut_smth": s.get("rcut_smth"), "protection": s.get("env_protection", 0.0), "use_exp_switch": s.get("use_exp_switch", False)},
        "embeddings": _script_collection(s["filter_layers"], "embedding_network", "EmbeddingNetwork"),
        "@variables": {"davg": _np(s.get("mean")), "dstd": _np(s.get("stddev"))},
    }
    if compress:
        descriptor["compress"] = True
    fitting = {
        "@class": "Fitting",
        "type": "ener",
        "var_name": f.get("var_name", "energy"),
        "ntypes": f.get("ntypes"),
        "dim_descrpt": f.get("dim_descrpt"),
        "neuron": f.get("neuron"),
        "resnet_dt": f.get("resnet_dt"),
        "numb_fparam": f.get("numb_fparam", 0),
        "numb_aparam": f.get("numb_aparam", 0),
        "dim_case_embd": f.get("dim_case_embd", 0),
        "activation_function": f.get("activation_function"),
        "precision": f.get("precision"),
        "mixed_types": f.get("mixed_types", False),
        "exclude_types": f.get("exclude_types", []),
        "atom_ener": [] if f.get("remove_vaccum_contribution") is None else model_def_script.get("fitting_net", {}).get("atom_ener", ["(set)"]),
        "default_fparam": f.get("default_fparam"),
        "dim_out": f.get("dim_out", 1),
        "type_map": f.get("type_map"),
        "nets": _script_collection(f["filter_layers"], "fitting_network", "FittingNetwork"),
        "@variables": {"bias_atom_e": _np(f.get("bias_atom_e")), "case_embd": _np(f.get("case_embd"))},
    }
    model = {
        "@class": "Model",
        "type": "standard",
        "type_map": ama.get("type_map"),
        "descriptor": descriptor,
        "fitting": fitting,
        "atom_exclude_types": [] if ama.get("atom_excl") is None else model_def_script.get("atom_exclude_types", ["(set)"]),
        "pair_exclude_types": [] if ama.get("pair_excl") is None else model_def_script.get("pair_exclude_types", ["(set)"]),
        "@variables": {"out_bias": _np(ama.get("out_bias")), "out_std": _np(ama.get("out_std"))},
    }
    tree = {"software": "deepmd-kit", "backend": "PyTorch (frozen .pth)", "model": model, "model_def_script": model_def_script, "@variables": {}}
    mnd = root.attrs().get("min_nbor_dist")
    if isinstance(mnd, torch.Tensor) and mnd.numel() == 1:
        tree["@variables"]["min_nbor_dist"] = float(mnd)
    return tree


# ----------------------------------------------------------------------------------------
# DeePMD-kit tree -> dpelt model
# ----------------------------------------------------------------------------------------


class _Reader:
    """Checks a node of the tree against what dpelt implements; errors name the option."""

    def __init__(self, source: str):
        self.source = source

    def error(self, message: str, key: str) -> ModelFileError:
        return ModelFileError(message, path=self.source, key=key)

    def node(self, parent: dict, key: str, where: str, cls: str | None = None) -> dict:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise self.error("missing or not a mapping: not a DeePMD-kit model file", f"{where}.{key}" if where else key)
        if cls is not None and value.get("@class", cls) != cls:
            raise self.error(f"expected a {cls} node, found @class {value.get('@class')!r}", f"{where}.{key}" if where else key)
        return value

    def require(self, node: dict, key: str, allowed: tuple, where: str, default: Any = None, what: str = "") -> Any:
        """An option dpelt implements only at the values ``allowed`` (missing = ``default``)."""
        value = node.get(key, default)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        ok = any(value == a and type(value) is not bool or value is a for a in allowed) or (
            isinstance(value, (list, tuple)) and any(isinstance(a, list) and list(value) == a for a in allowed)
        )
        if isinstance(value, list) and value and all(v is None for v in value) and [] in allowed:
            ok = True  # e.g. atom_ener: [null, null] means "none set"
        if not ok:
            shown = " or ".join(repr(a) for a in allowed)
            raise self.error(f"dpelt does not implement this option{what}: it supports only {shown}, the file has {value!r}", f"{where}.{key}")
        return value

    def known(self, node: dict, keys: set, where: str) -> None:
        """Keys dpelt does not know are accepted only when they hold an "off" value."""
        for k, v in node.items():
            if k in keys or k.startswith("_"):
                continue
            if any(v is off or (type(v) is type(off) and v == off) for off in _OFF):
                continue
            raise self.error(f"option unknown to dpelt with value {str(v)[:60]!r}; refusing rather than ignoring it", f"{where}.{k}")

    def array(self, variables: dict, key: str, shape: tuple, where: str) -> np.ndarray:
        value = variables.get(key)
        if not isinstance(value, np.ndarray):
            raise self.error("missing array", f"{where}.@variables.{key}")
        if tuple(value.shape) != tuple(shape):
            raise self.error(f"shape {tuple(value.shape)} differs from the expected {tuple(shape)}", f"{where}.@variables.{key}")
        if value.dtype.kind != "f":
            raise self.error(f"expected floating-point values, found {value.dtype.name}", f"{where}.@variables.{key}")
        return value


_DESCRIPTOR_KEYS = {
    "@class", "@version", "type", "rcut", "rcut_smth", "sel", "neuron", "axis_neuron", "resnet_dt", "trainable",
    "type_one_side", "exclude_types", "env_protection", "set_davg_zero", "activation_function", "precision",
    "spin", "type_map", "embeddings", "env_mat", "@variables", "seed", "compress",
}  # fmt: skip
_FITTING_KEYS = {
    "@class", "@version", "type", "var_name", "ntypes", "dim_descrpt", "neuron", "resnet_dt", "numb_fparam",
    "numb_aparam", "dim_case_embd", "activation_function", "precision", "mixed_types", "rcond", "exclude_types",
    "trainable", "atom_ener", "layer_name", "use_aparam_as_mask", "spin", "tot_ener_zero", "type_map",
    "default_fparam", "dim_out", "nets", "@variables", "seed",
}  # fmt: skip
_MODEL_KEYS = {
    "@class", "@version", "type", "type_map", "descriptor", "fitting", "atom_exclude_types", "pair_exclude_types",
    "rcond", "preset_out_bias", "@variables", "data_stat_protect",
}  # fmt: skip


def _layers(r: _Reader, net: dict, where: str, n_in: int, widths: list, final: bool, resnet_dt: bool, precision: str) -> list:
    """(w, b, idt) of every layer of a network, checked against dpelt's layer rules."""
    layers = net.get("layers")
    n_layers = len(widths) + (1 if final else 0)
    if not isinstance(layers, list) or len(layers) != n_layers:
        raise r.error(f"expected {n_layers} layers, found {len(layers) if isinstance(layers, list) else layers!r}", f"{where}.layers")
    out = []
    width = n_in
    for li, layer in enumerate(layers):
        lw = f"{where}.layers[{li}]"
        if not isinstance(layer, dict) or layer.get("@class", "Layer") != "Layer":
            raise r.error("expected a Layer node", lw)
        hidden = li < len(widths)
        n_out = widths[li] if hidden else 1
        r.require(layer, "activation_function", ("tanh",) if hidden else ("none", "linear", None), lw, default="tanh" if hidden else "none")
        r.require(layer, "bias", (True,), lw, default=True)
        # "default" is DeePMD-kit's name of float64 (a network built without a precision says
        # "default" while its layers say "float64"): compare the dtypes, not the spellings
        if layer.get("precision") is not None and _PRECISIONS.get(layer["precision"], layer["precision"]) != _PRECISIONS.get(precision, precision):
            raise r.error(f"layer precision {layer.get('precision')!r} differs from the network's {precision!r}; dpelt uses one precision per model", f"{lw}.precision")
        shortcut = hidden and (n_out == width or n_out == 2 * width)
        theirs = bool(layer.get("resnet", False)) and (n_out == width or n_out == 2 * width)
        if theirs != shortcut:
            raise r.error(f"residual connection {'present' if theirs else 'absent'} where dpelt's network {'has none' if theirs else 'has one'}", f"{lw}.resnet")
        v = layer.get("@variables") or {}
        w = r.array(v, "w", (width, n_out), lw)
        b = r.array(v, "b", (n_out,), lw)
        idt = v.get("idt")
        wants_dt = bool(resnet_dt and shortcut)
        if (idt is not None) != wants_dt:
            raise r.error(
                f"timestep (idt) {'present' if idt is not None else 'absent'}, but dpelt uses one exactly on residual layers when resnet_dt is true",
                f"{lw}.@variables.idt",
            )
        if idt is not None:
            idt = r.array(v, "idt", (n_out,), lw)
        out.append((w, b, idt))
        width = n_out
    return out


def _collection(r: _Reader, coll: dict, where: str, ndim: int, ntypes: int, network_type: str, network_class: str) -> list:
    r.require(coll, "network_type", (network_type,), where, default=network_type)
    if coll.get("ndim") != ndim:
        raise r.error(f"expected ndim {ndim} (one network per {'type' if ndim == 1 else 'type pair'}), found {coll.get('ndim')!r}", f"{where}.ndim")
    if coll.get("ntypes", ntypes) != ntypes:
        raise r.error(f"ntypes {coll.get('ntypes')!r} differs from the type_map's {ntypes}", f"{where}.ntypes")
    nets = coll.get("networks")
    if not isinstance(nets, list) or len(nets) != ntypes**ndim:
        raise r.error(f"expected {ntypes**ndim} networks", f"{where}.networks")
    for k, net in enumerate(nets):
        if not isinstance(net, dict):
            raise r.error("network missing (excluded type pair?): dpelt needs every network", f"{where}.networks[{k}]")
        if net.get("@class", network_class) != network_class:
            raise r.error(f"expected a {network_class}, found {net.get('@class')!r}", f"{where}.networks[{k}]")
    return nets


def _precision(r: _Reader, value: Any, key: str) -> str:
    if value not in _PRECISIONS:
        raise r.error(f"precision {value!r} is not supported (dpelt: float64 or float32)", key)
    return "float32" if _PRECISIONS[value] == torch.float32 else "float64"


def _check_stats_per_section(davg: np.ndarray, dstd: np.ndarray, sel: list, key: str, source: str) -> None:
    """DeePMD-kit orders the neighbours of a type section nearest first, dpelt in search order:
    the same model only when davg/dstd do not vary across the slots of a section."""
    sec = np.concatenate([[0], np.cumsum(sel)])
    for name, a in (("davg", davg), ("dstd", dstd)):
        for t in range(len(sel)):
            block = a[:, sec[t] : sec[t + 1], :]
            if block.size and not np.array_equal(block, np.broadcast_to(block[:, :1, :], block.shape)):
                raise ModelFileError(
                    f"{name} varies across the slots of the neighbour section of type {t}: DeePMD-kit orders the "
                    "neighbours of a section nearest first and dpelt in search order, so the energies would differ",
                    path=source,
                    key=key,
                )


def model_from_deepmd_dict(data: dict, source: str = "<deepmd model>") -> DeepPot:
    """Build a dpelt :class:`DeepPot` from a DeePMD-kit model tree; refuse what dpelt cannot map."""
    r = _Reader(source)
    if not isinstance(data, dict):
        raise r.error("not a DeePMD-kit model file", "model")
    m = r.node(data, "model", "", cls="Model")
    mtype = m.get("type", "standard")
    if mtype != "standard":
        raise r.error(f"model type {mtype!r} is not supported: dpelt implements the standard DP model (se_e2_a + ener), not pair-table, ZBL, linear, spin or frozen combinations", "model.type")
    r.known(m, _MODEL_KEYS, "model")
    r.require(m, "atom_exclude_types", ([],), "model", default=[])
    r.require(m, "pair_exclude_types", ([],), "model", default=[])
    type_map = m.get("type_map")
    if not isinstance(type_map, list) or not type_map or not all(isinstance(t, str) for t in type_map):
        raise r.error("missing or not a list of element names", "model.type_map")
    nt = len(type_map)

    d = r.node(m, "descriptor", "model", cls="Descriptor")
    dtype = d.get("type")
    if dtype not in ("se_e2_a", "se_a"):
        raise r.error(f"descriptor type {dtype!r} is not supported: dpelt implements se_e2_a (DeepPot-SE) only", "model.descriptor.type")
    r.known(d, _DESCRIPTOR_KEYS, "model.descriptor")
    r.require(d, "activation_function", ("tanh",), "model.descriptor", default="tanh")
    r.require(d, "exclude_types", ([],), "model.descriptor", default=[])
    r.require(d, "env_protection", (0.0,), "model.descriptor", default=0.0)
    r.require(d, "spin", (None,), "model.descriptor")
    r.require(d, "compress", (None, False), "model.descriptor", what=" (a compressed model tabulates its embedding nets; import the uncompressed model)")
    if d.get("type_map") not in (None, type_map):
        raise r.error(f"descriptor type_map {d.get('type_map')} differs from the model's {type_map}", "model.descriptor.type_map")
    precision = _precision(r, d.get("precision", "float64"), "model.descriptor.precision")
    try:
        sel = [int(s) for s in d["sel"]]
        rcut, rcut_smth = float(d["rcut"]), float(d["rcut_smth"])
        neuron = [int(n) for n in d["neuron"]]
        axis_neuron = int(d.get("axis_neuron", 4))
        resnet_dt = bool(d.get("resnet_dt", False))
        type_one_side = bool(d.get("type_one_side", False))
    except (KeyError, TypeError, ValueError) as exc:
        raise r.error(f"missing or malformed descriptor hyper-parameter: {exc}", "model.descriptor") from None
    if len(sel) != nt:
        raise r.error(f"sel has {len(sel)} entries but type_map has {nt}", "model.descriptor.sel")
    env_mat = d.get("env_mat") or {}
    r.require(env_mat, "protection", (0.0,), "model.descriptor.env_mat", default=0.0)
    r.require(env_mat, "use_exp_switch", (False,), "model.descriptor.env_mat", default=False, what=" (dpelt uses DeePMD's polynomial switch)")
    for k, v in (("rcut", rcut), ("rcut_smth", rcut_smth)):
        if k in env_mat and float(env_mat[k]) != v:
            raise r.error(f"{env_mat[k]!r} differs from the descriptor's {k} {v!r}", f"model.descriptor.env_mat.{k}")
    nnei = sum(sel)
    dvars = d.get("@variables") or {}
    davg = r.array(dvars, "davg", (nt, nnei, 4), "model.descriptor")
    dstd = r.array(dvars, "dstd", (nt, nnei, 4), "model.descriptor")
    _check_stats_per_section(davg, dstd, sel, "model.descriptor.@variables", source)
    ndim = 1 if type_one_side else 2
    emb_where = "model.descriptor.embeddings"
    nets = _collection(r, r.node(d, "embeddings", "model.descriptor", cls="NetworkCollection"), emb_where, ndim, nt, "embedding_network", "EmbeddingNetwork")
    embeddings = []
    for k, net in enumerate(nets):
        w = f"{emb_where}.networks[{k}]"
        r.require(net, "activation_function", ("tanh",), w, default="tanh")
        r.require(net, "bias", (True,), w, default=True)
        if net.get("in_dim", 1) != 1:
            raise r.error(f"embedding input width {net.get('in_dim')!r}; se_e2_a embeds the scalar s(r)", f"{w}.in_dim")
        if list(net.get("neuron", neuron)) != neuron or bool(net.get("resnet_dt", resnet_dt)) != resnet_dt:
            raise r.error("network neuron/resnet_dt differ from the descriptor's", w)
        if net.get("precision", precision) not in (precision, "default" if precision == "float64" else precision):
            raise r.error(f"precision {net.get('precision')!r} differs from the descriptor's {precision!r}", f"{w}.precision")
        embeddings.append(_layers(r, net, w, 1, neuron, False, resnet_dt, net.get("precision", precision)))

    f = r.node(m, "fitting", "model", cls="Fitting")
    ftype = f.get("type", "ener")
    if ftype != "ener":
        raise r.error(f"fitting type {ftype!r} is not supported: dpelt fits energies (type 'ener')", "model.fitting.type")
    r.known(f, _FITTING_KEYS, "model.fitting")
    for key, allowed, default in (
        ("numb_fparam", (0,), 0),
        ("numb_aparam", (0,), 0),
        ("dim_case_embd", (0,), 0),
        ("activation_function", ("tanh",), "tanh"),
        ("mixed_types", (False,), False),
        ("exclude_types", ([],), []),
        ("atom_ener", ([], None), []),
        ("spin", (None,), None),
        ("default_fparam", (None,), None),
        ("dim_out", (1,), 1),
        ("var_name", ("energy",), "energy"),
        ("layer_name", (None,), None),
    ):
        r.require(f, key, allowed, "model.fitting", default=default)
    fprec = _precision(r, f.get("precision", "float64"), "model.fitting.precision")
    if fprec != precision:
        raise r.error(f"fitting precision {fprec!r} differs from the descriptor's {precision!r}; dpelt uses one precision per model", "model.fitting.precision")
    if f.get("type_map") not in (None, type_map):
        raise r.error(f"fitting type_map {f.get('type_map')} differs from the model's {type_map}", "model.fitting.type_map")
    dim_descrpt = neuron[-1] * axis_neuron
    if f.get("dim_descrpt", dim_descrpt) != dim_descrpt:
        raise r.error(f"dim_descrpt {f.get('dim_descrpt')!r} differs from neuron[-1]*axis_neuron = {dim_descrpt}", "model.fitting.dim_descrpt")
    try:
        fneuron = [int(n) for n in f["neuron"]]
        fresnet_dt = bool(f.get("resnet_dt", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise r.error(f"missing or malformed fitting hyper-parameter: {exc}", "model.fitting") from None
    fvars = f.get("@variables") or {}
    for key in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std", "case_embd"):
        if fvars.get(key) is not None and np.asarray(fvars[key]).size:
            raise r.error("frame/atomic parameters or case embeddings are not supported by dpelt", f"model.fitting.@variables.{key}")
    bias_fit = r.array(fvars, "bias_atom_e", (nt, 1), "model.fitting")
    fit_where = "model.fitting.nets"
    fnets = _collection(r, r.node(f, "nets", "model.fitting", cls="NetworkCollection"), fit_where, 1, nt, "fitting_network", "FittingNetwork")
    fittings = []
    for t, net in enumerate(fnets):
        w = f"{fit_where}.networks[{t}]"
        r.require(net, "activation_function", ("tanh",), w, default="tanh")
        r.require(net, "bias_out", (True,), w, default=True)
        r.require(net, "out_dim", (1,), w, default=1)
        if net.get("in_dim", dim_descrpt) != dim_descrpt:
            raise r.error(f"input width {net.get('in_dim')!r} differs from the descriptor's {dim_descrpt}", f"{w}.in_dim")
        if list(net.get("neuron", fneuron)) != fneuron or bool(net.get("resnet_dt", fresnet_dt)) != fresnet_dt:
            raise r.error("network neuron/resnet_dt differ from the fitting's", w)
        fittings.append(_layers(r, net, w, dim_descrpt, fneuron, True, fresnet_dt, net.get("precision", precision)))

    mvars = m.get("@variables") or {}
    out_bias = mvars.get("out_bias")
    if out_bias is None:
        out_bias = np.zeros((1, nt, 1))
    out_bias = np.asarray(out_bias)
    if out_bias.shape != (1, nt, 1):
        raise r.error(f"shape {out_bias.shape}, expected (1, {nt}, 1) (one energy output)", "model.@variables.out_bias")
    out_std = mvars.get("out_std")

    # dpelt configuration (DeePMD names), seeds and spellings from model_def_script when given
    mds = data.get("model_def_script") if isinstance(data.get("model_def_script"), dict) else {}
    mds_d = mds.get("descriptor", {}) if isinstance(mds.get("descriptor"), dict) else {}
    mds_f = mds.get("fitting_net", {}) if isinstance(mds.get("fitting_net"), dict) else {}

    def spelled(given: Any, resolved: str) -> str:
        return given if given in _PRECISIONS and _PRECISIONS[given] == _PRECISIONS[resolved] else resolved

    ftrain = f.get("trainable", True)
    config = {
        "type_map": list(type_map),
        "descriptor": {
            "type": "se_e2_a",
            "sel": sel,
            "rcut": rcut,
            "rcut_smth": rcut_smth,
            "neuron": neuron,
            "axis_neuron": axis_neuron,
            "resnet_dt": resnet_dt,
            "type_one_side": type_one_side,
            "precision": spelled(mds_d.get("precision"), precision),
            "trainable": bool(d.get("trainable", True)),
            "set_davg_zero": bool(d.get("set_davg_zero", False)),
        },
        "fitting_net": {
            "type": "ener",
            "neuron": fneuron,
            "resnet_dt": fresnet_dt,
            "precision": spelled(mds_f.get("precision"), precision),
            "trainable": bool(all(ftrain) if isinstance(ftrain, list) else ftrain),
        },
    }
    for section, given in (("descriptor", mds_d), ("fitting_net", mds_f)):
        if isinstance(given.get("seed"), int) and not isinstance(given.get("seed"), bool):
            config[section]["seed"] = given["seed"]
    if isinstance(f.get("rcond"), (int, float)) and not isinstance(f.get("rcond"), bool):
        config["fitting_net"]["rcond"] = float(f["rcond"])
    for key in ("data_stat_nbatch", "data_stat_protect"):
        if isinstance(mds.get(key), (int, float)) and not isinstance(mds.get(key), bool):
            config[key] = mds[key]
    try:
        cfg = parse_model_config(config, "model", source)
    except ConfigError as exc:
        raise ModelFileError(exc.message, path=source, key=exc.key) from None
    model = DeepPot(cfg, sel=sel)
    tdtype = cfg.dtype
    npdtype = np.float32 if tdtype == torch.float32 else np.float64

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=npdtype))

    state: dict[str, torch.Tensor] = {}
    for k, layers in enumerate(embeddings):
        # DeePMD-kit index ti + tj*ntypes (ndim 2) -> dpelt index ti*ntypes + tj
        mine = k if type_one_side else (k % nt) * nt + k // nt
        for li, (w, b, idt) in enumerate(layers):
            state[f"descriptor.embeddings.{mine}.layers.{li}.weight"] = tensor(w)
            state[f"descriptor.embeddings.{mine}.layers.{li}.bias"] = tensor(b)
            if idt is not None:
                state[f"descriptor.embeddings.{mine}.layers.{li}.idt"] = tensor(idt)
    for t, layers in enumerate(fittings):
        for li, (w, b, idt) in enumerate(layers):
            state[f"fitting.nets.{t}.layers.{li}.weight"] = tensor(w)
            state[f"fitting.nets.{t}.layers.{li}.bias"] = tensor(b)
            if idt is not None:
                state[f"fitting.nets.{t}.layers.{li}.idt"] = tensor(idt)
    ob = np.array(out_bias[0, :, 0], dtype=np.float64)
    fb = np.array(bias_fit[:, 0], dtype=np.float64)
    state["descriptor.davg"] = tensor(davg)
    state["descriptor.dstd"] = tensor(dstd)
    state["fitting.bias_atom_e"] = tensor(ob + fb)  # DeePMD-kit adds both to every atomic energy
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"weights do not fit the architecture: {exc}", path=source) from None
    extra: dict[str, Any] = {
        "software": str(data.get("software", "")),
        "version": str(data.get("version", "")),
        "out_bias": [float(x) for x in ob],
        "fitting_bias_atom_e": [float(x) for x in fb],
    }
    if isinstance(out_std, np.ndarray) and out_std.shape == (1, nt, 1):
        extra["out_std"] = [float(x) for x in out_std[0, :, 0]]
    if "atom_ener" in f and f["atom_ener"] != []:  # a "none set" spelling (None, [None, …]): kept for export
        extra["atom_ener"] = list(f["atom_ener"]) if isinstance(f["atom_ener"], (list, tuple, np.ndarray)) else None
    mnd = (data.get("@variables") or {}).get("min_nbor_dist")
    if mnd is not None and np.asarray(mnd).size == 1:
        extra["min_nbor_dist"] = float(np.asarray(mnd))
    model.metadata = {"imported_from": str(source), "deepmd": extra}  # type: ignore[attr-defined]
    return model.eval()


def import_deepmd(path: str | os.PathLike) -> DeepPot:
    """Read a DeePMD-kit se_e2_a energy model (``.dp``, ``.yaml``/``.yml`` or frozen ``.pth``).

    The returned model carries ``metadata`` (``imported_from`` and a ``deepmd`` record of the
    values dpelt keeps only for export); save it with
    ``save_model(model, model.config, out, metadata=model.metadata)``.
    """
    return model_from_deepmd_dict(read_deepmd_file(path), str(path))


# ----------------------------------------------------------------------------------------
# dpelt model -> DeePMD-kit tree
# ----------------------------------------------------------------------------------------


def _layer_node(layer: torch.nn.Module, precision: str, trainable: bool) -> dict:
    idt = None if layer.idt is None else _np(layer.idt)
    return {
        "@class": "Layer",
        "@version": 2,
        "activation_function": "tanh" if layer.activation else "none",
        "bias": True,
        "precision": precision,
        "resnet": bool(layer.activation),
        "trainable": trainable,
        "use_timestep": idt is not None,
        "@variables": {"w": _np(layer.weight), "b": _np(layer.bias), "idt": idt},
    }


def deepmd_dict(model: DeepPot) -> dict:
    """The DeePMD-kit model tree (arrays as numpy) of a dpelt model."""
    cfg = model.config
    d, f = cfg.descriptor, cfg.fitting_net
    desc = model.descriptor
    nt = model.ntypes
    type_map = list(model.type_map)
    precision = "float32" if model.model_dtype == torch.float32 else "float64"
    davg, dstd = _np(desc.davg), _np(desc.dstd)
    _check_stats_per_section(davg, dstd, model.sel, "stats", "<dpelt model>")
    neuron = [int(n) for n in d.neuron]
    fneuron = [int(n) for n in f.neuron]
    if desc.type_one_side:
        order = list(range(nt))
    else:  # DeePMD-kit position k = ti + tj*ntypes holds dpelt's net ti*ntypes + tj
        order = [(k % nt) * nt + k // nt for k in range(nt * nt)]
    embeddings = [
        {
            "@class": "EmbeddingNetwork",
            "@version": 2,
            "activation_function": "tanh",
            "bias": True,
            "in_dim": 1,
            "neuron": neuron,
            "precision": precision,
            "resnet_dt": bool(d.resnet_dt),
            "layers": [_layer_node(layer, precision, bool(d.trainable)) for layer in desc.embeddings[i].layers],
        }
        for i in order
    ]
    fit_nets = [
        {
            "@class": "FittingNetwork",
            "@version": 1,
            "activation_function": "tanh",
            "bias_out": True,
            "in_dim": desc.dim_out,
            "neuron": fneuron,
            "out_dim": 1,
            "precision": precision,
            "resnet_dt": bool(f.resnet_dt),
            "layers": [_layer_node(layer, precision, bool(f.trainable)) for layer in net.layers],
        }
        for net in model.fitting.nets
    ]
    # energy bias: DeePMD-kit's atomic-model out_bias (+ a zero fitting bias), unless the model
    # was imported and still holds the imported split. DeePMD-kit keeps these in float64 for
    # every model precision.
    bias = _np(model.fitting.bias_atom_e)
    extra = (getattr(model, "metadata", None) or {}).get("deepmd") or {}
    out_bias, fit_bias = bias.astype(np.float64), np.zeros(nt)
    try:
        ob = np.array(extra["out_bias"], dtype=np.float64)
        fb = np.array(extra["fitting_bias_atom_e"], dtype=np.float64)
        if ob.shape == fb.shape == (nt,) and np.array_equal((ob + fb).astype(bias.dtype), bias):
            out_bias, fit_bias = ob, fb
    except (KeyError, TypeError, ValueError):
        pass
    out_std = np.ones(nt)
    if isinstance(extra.get("out_std"), list) and len(extra["out_std"]) == nt:
        out_std = np.array(extra["out_std"], dtype=np.float64)
    descriptor = {
        "@class": "Descriptor",
        "type": "se_e2_a",
        "@version": 2,
        "rcut": float(d.rcut),
        "rcut_smth": float(d.rcut_smth),
        "sel": [int(s) for s in model.sel],
        "neuron": neuron,
        "axis_neuron": int(d.axis_neuron),
        "resnet_dt": bool(d.resnet_dt),
        "trainable": bool(d.trainable),
        "type_one_side": bool(d.type_one_side),
        "exclude_types": [],
        "env_protection": 0.0,
        "set_davg_zero": bool(d.set_davg_zero),
        "activation_function": "tanh",
        "precision": precision,
        "spin": None,
        "type_map": type_map,
        "embeddings": {
            "@class": "NetworkCollection",
            "@version": 1,
            "ndim": 1 if d.type_one_side else 2,
            "ntypes": nt,
            "network_type": "embedding_network",
            "networks": embeddings,
        },
        "env_mat": {"rcut": float(d.rcut), "rcut_smth": float(d.rcut_smth), "protection": 0.0, "use_exp_switch": False},
        "@variables": {"davg": davg, "dstd": dstd},
    }
    fitting = {
        "@class": "Fitting",
        "type": "ener",
        "@version": 4,
        "var_name": "energy",
        "ntypes": nt,
        "dim_descrpt": desc.dim_out,
        "neuron": fneuron,
        "resnet_dt": bool(f.resnet_dt),
        "numb_fparam": 0,
        "numb_aparam": 0,
        "dim_case_embd": 0,
        "activation_function": "tanh",
        "precision": precision,
        "mixed_types": False,
        "rcond": f.rcond,
        "exclude_types": [],
        "trainable": [bool(f.trainable)] * (len(fneuron) + 1),
        "atom_ener": extra.get("atom_ener", []),
        "layer_name": None,
        "use_aparam_as_mask": False,
        "spin": None,
        "tot_ener_zero": False,
        "type_map": type_map,
        "default_fparam": None,
        "dim_out": 1,
        "nets": {"@class": "NetworkCollection", "@version": 1, "ndim": 1, "ntypes": nt, "network_type": "fitting_network", "networks": fit_nets},
        "@variables": {
            "bias_atom_e": fit_bias.reshape(nt, 1),
            "fparam_avg": None,
            "fparam_inv_std": None,
            "aparam_avg": None,
            "aparam_inv_std": None,
            "case_embd": None,
        },
    }
    model_node = {
        "@class": "Model",
        "type": "standard",
        "@version": 2,
        "type_map": type_map,
        "descriptor": descriptor,
        "fitting": fitting,
        "atom_exclude_types": [],
        "pair_exclude_types": [],
        "rcond": None,
        "preset_out_bias": None,
        "@variables": {"out_bias": out_bias.reshape(1, nt, 1), "out_std": out_std.reshape(1, nt, 1)},
    }
    model_def_script = {
        "type_map": type_map,
        "descriptor": {
            "type": "se_e2_a",
            "sel": [int(s) for s in model.sel],
            "rcut": float(d.rcut),
            "rcut_smth": float(d.rcut_smth),
            "neuron": neuron,
            "axis_neuron": int(d.axis_neuron),
            "resnet_dt": bool(d.resnet_dt),
            "type_one_side": bool(d.type_one_side),
            "precision": precision,
            "activation_function": "tanh",
            "trainable": bool(d.trainable),
            "exclude_types": [],
            "env_protection": 0.0,
            "set_davg_zero": bool(d.set_davg_zero),
        },
        "fitting_net": {
            "type": "ener",
            "neuron": fneuron,
            "resnet_dt": bool(f.resnet_dt),
            "precision": precision,
            "activation_function": "tanh",
            "trainable": bool(f.trainable),
            "numb_fparam": 0,
            "numb_aparam": 0,
            "atom_ener": [],
            "rcond": f.rcond,
        },
        "data_stat_nbatch": int(cfg.data_stat_nbatch),
        "data_stat_protect": float(cfg.data_stat_protect),
    }
    for section, seed in (("descriptor", d.seed), ("fitting_net", f.seed)):
        if seed is not None:
            model_def_script[section]["seed"] = int(seed)
    tree: dict[str, Any] = {
        "software": "dpelt",
        "version": __version__,
        "backend": "dpelt",
        "model": model_node,
        "model_def_script": model_def_script,
        "@variables": {},
    }
    if isinstance(extra.get("min_nbor_dist"), float):
        tree["@variables"]["min_nbor_dist"] = extra["min_nbor_dist"]
    return tree


def export_deepmd(model: DeepPot, path: str | os.PathLike) -> Path:
    """Write ``model`` as a DeePMD-kit 3.x backend-independent model (``.dp`` or ``.yaml``).

    ``dp convert-backend OUT model.pth`` then gives the PyTorch model DeePMD-kit's ``DeepPot``,
    ``dp test``, ASE calculator and LAMMPS ``pair_style deepmd`` load.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PTH_SUFFIXES:
        raise ModelFileError(
            f"a DeePMD-kit .pth (TorchScript) can only be written by DeePMD-kit: export to {path.with_suffix('.dp').name} "
            f"and run `dp convert-backend {path.with_suffix('.dp').name} {path.name}`",
            path=path,
        )
    if suffix not in EXPORT_SUFFIXES:
        raise ModelFileError(f"unknown suffix {path.suffix!r}: DeePMD-kit's backend-independent model files are .dp (HDF5) or .yaml/.yml", path=path)
    return write_deepmd_file(deepmd_dict(model), path)
