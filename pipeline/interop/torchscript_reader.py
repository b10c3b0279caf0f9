"""Frozen TorchScript ``.pth`` files of DeePMD-kit, read into the model tree of :mod:`.deepmd_format`.

A frozen ``.pth`` (TorchScript) is read without DeePMD-kit and without running code from it:
its pickled module tree is unpickled with a loader that builds only tensors and plain data
(every ``__torch__`` class becomes an inert attribute holder), and the module attributes and
tensors are mapped to the tree above.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError


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
