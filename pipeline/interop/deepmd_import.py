"""DeePMD-kit model tree -> dpelt se_e2_a model (the layout is described in :mod:`.deepmd_format`).

Anything dpelt cannot represent exactly is refused with a :class:`ModelFileError` naming the
option; a model is never silently changed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ModelFileError
from ..model.config import parse_model_config
from ..model.deeppot import DeepPot
from .deepmd_format import _OFF, _PRECISIONS, read_deepmd_file


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
