"""dpelt se_e2_a model -> DeePMD-kit model tree and file (the layout is described in
:mod:`.deepmd_format`): the bias goes to ``out_bias`` with a zero fitting bias, and values kept
in an imported model's metadata are written back, so import -> export gives the same arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import ModelFileError
from ..model.deeppot import DeepPot
from .deepmd_format import EXPORT_SUFFIXES, PTH_SUFFIXES, write_deepmd_file
from .deepmd_import import _check_stats_per_section
from .torchscript_reader import _np


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
