"""DeePMD-kit interoperability (issue 6): export/import of se_e2_a models.

DeePMD-kit is not importable in dpelt's venv. Every check that needs it runs DeePMD-kit 3.x in
ONE subprocess per test session, with the interpreter of its own venv: ``$DPELT_DEEPMD_PYTHON``,
else ``${XDG_CACHE_HOME:-~/.cache}/dpelt/deepmd-pt-venv/bin/python`` (``make deepmd-venv``, run
by ``.ci/run``, creates it with ``bench/deepmd/setup_venv.sh``): the module fixture ``deepmd``
prepares every model and frame on the dpelt side, runs the batch, and the tests compare. Tests
that need no DeePMD-kit (round trips, refusals, CLI) always run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import WATER, random_system, randomize_stats, run_model
from pipeline.errors import ModelFileError
from pipeline.interop.deepmd_export import deepmd_dict, export_deepmd
from pipeline.interop.deepmd_format import read_deepmd_file, write_deepmd_file
from pipeline.interop.deepmd_import import import_deepmd, model_from_deepmd_dict
from pipeline.model.config import parse_model_config
from pipeline.model.deeppot import DeepPot
from pipeline.model.neighbor import neighbor_counts
from pipeline.model.serialize import load_model, save_model
from pipeline.model.stats import EnvStatAccumulator, fit_energy_bias

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEEPMD_PYTHON = Path(os.environ.get("DPELT_DEEPMD_PYTHON") or CACHE / "dpelt" / "deepmd-pt-venv" / "bin" / "python")
RTOL = 1e-8

needs_deepmd = pytest.mark.skipif(
    not DEEPMD_PYTHON.exists(),
    reason=f"DeePMD-kit not installed: {DEEPMD_PYTHON} is absent (create it with `make deepmd-venv`, or set DPELT_DEEPMD_PYTHON)",
)

# --------------------------------------------------------------------------------------------
# models and frames (dpelt side)
# --------------------------------------------------------------------------------------------


def make_model(type_map, sel, *, type_one_side, resnet_dt, precision="float64", rcut=4.0, rcut_smth=0.5, seed=3) -> DeepPot:
    cfg = parse_model_config(
        {
            "type_map": list(type_map),
            "descriptor": {"type": "se_e2_a", "sel": list(sel), "rcut": rcut, "rcut_smth": rcut_smth, "neuron": [4, 8, 16], "axis_neuron": 4,
                           "type_one_side": type_one_side, "resnet_dt": resnet_dt, "precision": precision, "seed": seed},
            "fitting_net": {"neuron": [16, 16], "resnet_dt": True, "precision": precision, "seed": seed + 1},
        }
    )  # fmt: skip
    model = DeepPot(cfg)
    with torch.no_grad():  # timesteps away from their near-constant initial values
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("idt"):
                p.copy_(0.05 + 0.3 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def alloy_frames(nframes=3, n=16, seed=0):
    """Random periodic Cu/Au-like frames (triclinic cell shorter than 2 rcut: many images)."""
    frames = [random_system(n, seed=seed + k, cell_scale=6.0) for k in range(nframes)]
    return np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]), np.stack([f[2] for f in frames])


def water_frames(nframes=4):
    d = WATER / "data_3"
    atype = np.loadtxt(d / "type.raw", dtype=np.int64)
    coord = np.load(d / "set.000" / "coord.npy")[:nframes].astype(np.float64).reshape(nframes, -1, 3)
    cell = np.load(d / "set.000" / "box.npy")[:nframes].astype(np.float64).reshape(nframes, 3, 3)
    energy = np.load(d / "set.000" / "energy.npy")[:nframes].astype(np.float64)
    force = np.load(d / "set.000" / "force.npy")[:nframes].astype(np.float64).reshape(nframes, -1, 3)
    return coord, cell, np.broadcast_to(atype, (nframes, len(atype))).copy(), energy, force


def sel_for(coords, cells, atypes, rcut, ntypes, margin=4):
    counts = [neighbor_counts(c, b, (True,) * 3, a, rcut, ntypes).max(0) for c, b, a in zip(coords, cells, atypes)]
    return [int(c) + margin for c in np.max(counts, axis=0)]


def set_stats_from_frames(model: DeepPot, coords, cells, atypes, energies):
    """DeePMD-style statistics (one value per centre type over all slots) and energy bias."""
    from pipeline.model.inputs import frame_inputs

    acc = EnvStatAccumulator(model.ntypes)
    for c, b, a in zip(coords, cells, atypes):
        rij, _, _, _ = frame_inputs(c[None], b[None], (True,) * 3, a, model.rcut, model.sel, model.type_map)
        acc.add(rij, torch.from_numpy(a), model.descriptor.rcut_smth, model.rcut)
    davg, dstd = acc.result(model.descriptor.nnei, 0.01)
    counts = np.stack([np.bincount(a, minlength=model.ntypes) for a in atypes])
    with torch.no_grad():
        model.descriptor.davg.copy_(torch.from_numpy(davg))
        model.descriptor.dstd.copy_(torch.from_numpy(dstd))
        model.fitting.bias_atom_e.copy_(torch.from_numpy(fit_energy_bias(counts, energies)))
    return model


def dpelt_predict(model, coords, cells, atypes):
    outs = [run_model(model, c, b, a) for c, b, a in zip(coords, cells, atypes)]
    return {"energy": np.array([o["energy"] for o in outs]), "force": np.stack([o["force"] for o in outs]), "virial": np.stack([o["virial"] for o in outs])}


def write_npy_system(path: Path, type_map, atype, coord, cell, energy, force, virial=None):
    """A deepmd/npy system (read by both `dp test` and `dpelt test`)."""
    (path / "set.000").mkdir(parents=True)
    (path / "type.raw").write_text("\n".join(str(int(t)) for t in atype) + "\n")
    (path / "type_map.raw").write_text("\n".join(type_map) + "\n")
    nf = len(energy)
    np.save(path / "set.000" / "coord.npy", coord.reshape(nf, -1))
    np.save(path / "set.000" / "box.npy", cell.reshape(nf, 9))
    np.save(path / "set.000" / "energy.npy", energy)
    np.save(path / "set.000" / "force.npy", force.reshape(nf, -1))
    if virial is not None:
        np.save(path / "set.000" / "virial.npy", virial.reshape(nf, 9))


def max_rel(a, b) -> float:
    """max |a − b| / max |b| (the relative error of an array on its own scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def assert_same_prediction(dp: dict, ours: dict, rtol: float = RTOL, what: str = "") -> dict:
    rel = {k: max_rel(dp[k], ours[k]) for k in ("energy", "force", "virial")}
    assert all(v <= rtol for v in rel.values()), f"{what}: max relative differences {rel} exceed {rtol}"
    return rel


# --------------------------------------------------------------------------------------------
# the DeePMD-kit side: one subprocess, batched jobs described in spec.json
# --------------------------------------------------------------------------------------------

DEEPMD_SIDE = r'''
import copy, json, logging, sys, time, traceback
import numpy as np

spec = json.load(open(sys.argv[1]))
report = {"errors": {}, "timings": {}}
t0 = time.time()
import deepmd
from deepmd.dpmodel.model.model import get_model
from deepmd.dpmodel.utils.serialization import save_dp_model
from deepmd.entrypoints.convert_backend import convert_backend
from deepmd.infer import DeepPot
from deepmd.main import main as dp_main
report["deepmd_version"] = deepmd.__version__
report["timings"]["import"] = time.time() - t0


def randomize(ser, rng):
    """Non-trivial statistics, energy biases (both places) and timesteps."""
    v = ser["descriptor"]["@variables"]
    for t in range(v["davg"].shape[0]):
        v["davg"][t, :, 0] = rng.uniform(0.1, 0.3)
        v["davg"][t, :, 1:] = 0.0
        v["dstd"][t, :, 0] = rng.uniform(0.1, 0.3)
        v["dstd"][t, :, 1:] = rng.uniform(0.05, 0.2)
    nt = v["davg"].shape[0]
    ser["@variables"]["out_bias"][0, :, 0] = rng.uniform(-3.0, -1.0, nt)
    ser["fitting"]["@variables"]["bias_atom_e"][:, 0] = rng.uniform(-0.5, 0.5, nt)

    def walk(o):
        if isinstance(o, dict):
            if o.get("@class") == "Layer" and o["@variables"].get("idt") is not None:
                idt = o["@variables"]["idt"]
                o["@variables"]["idt"] = rng.uniform(0.05, 0.3, idt.shape).astype(idt.dtype)
            for x in o.values():
                walk(x)
        elif isinstance(o, list):
            for x in o:
                walk(x)
    walk(ser)


def timed(name, fn):
    t = time.time()
    try:
        fn()
    except BaseException:
        report["errors"][name] = traceback.format_exc()[-3000:]
    report["timings"][name] = time.time() - t


def make_native(job):
    model = get_model(copy.deepcopy(job["config"]))
    ser = model.serialize()
    if job.get("randomize"):
        randomize(ser, np.random.default_rng(job.get("seed", 0)))
    data = {"model": ser, "model_def_script": job["config"], "@variables": {}, "backend": "DPModel"}
    for out in job["out"]:
        save_dp_model(out, data)


models = {}


def evaluate(job):
    if job["model"] not in models:
        models[job["model"]] = DeepPot(job["model"])
    dp = models[job["model"]]
    fr = np.load(job["frames"])
    E, F, V = [], [], []
    for k in range(fr["coord"].shape[0]):
        e, f, v = dp.eval(fr["coord"][k].reshape(1, -1), fr["cell"][k].reshape(1, 9), fr["atype"][k].tolist())
        E.append(float(np.asarray(e).reshape(())))
        F.append(np.asarray(f, dtype=np.float64).reshape(-1, 3))
        V.append(np.asarray(v, dtype=np.float64).reshape(3, 3))
    np.savez(job["out"], energy=np.array(E), force=np.stack(F), virial=np.stack(V))


def dp_test(job):
    # what the `dp` console script runs: deepmd.main.main(["--pt", "test", ...])
    try:
        dp_main(["--pt", "test", "-m", job["model"], "-s", job["system"], "-n", "100000", "-l", job["log"]])
    finally:
        for h in list(logging.getLogger("deepmd").handlers):
            if isinstance(h, logging.FileHandler):
                logging.getLogger("deepmd").removeHandler(h)
                h.close()


def train_and_freeze(job):
    # `dp --pt train` then `dp --pt freeze`, in the job's own directory (checkpoints, lcurve.out)
    import os

    here = os.getcwd()
    os.makedirs(job["dir"], exist_ok=True)
    os.chdir(job["dir"])
    try:
        json.dump(job["input"], open("input.json", "w"))
        dp_main(["--pt", "train", "input.json", "--skip-neighbor-stat"])
        dp_main(["--pt", "freeze", "-o", job["out"]])
    finally:
        os.chdir(here)


for job in spec["native"]:
    timed("native:" + job["name"], lambda: make_native(job))
for src, dst in spec["convert"]:
    timed(f"convert:{src}->{dst}", lambda: convert_backend(INPUT=src, OUTPUT=dst))
for job in spec["train"]:
    timed("train:" + job["out"], lambda: train_and_freeze(job))
for job in spec["eval"]:
    timed("eval:" + job["out"], lambda: evaluate(job))
for job in spec["dp_test"]:
    timed("dp_test:" + job["log"], lambda: dp_test(job))
json.dump(report, open(sys.argv[2], "w"), indent=1)
'''

#: native DeePMD-kit models dpelt must refuse: (name, model section, key the error must name)
_BASE_DESC = {"type": "se_e2_a", "sel": [12, 12], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4, "seed": 1}
_BASE_FIT = {"type": "ener", "neuron": [8], "seed": 2}
BAD_NATIVE = [
    ("se_e2_r", {"descriptor": {"type": "se_e2_r", "sel": [12, 12], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "seed": 1}}, "model.descriptor.type"),
    ("dpa1", {"descriptor": {"type": "dpa1", "sel": 24, "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4, "attn": 8, "attn_layer": 1, "seed": 1}}, "model.descriptor.type"),
    ("exclude_types", {"descriptor": _BASE_DESC | {"exclude_types": [[0, 1]]}}, "model.descriptor.exclude_types"),
    ("gelu", {"descriptor": _BASE_DESC | {"activation_function": "gelu"}}, "model.descriptor.activation_function"),
    ("env_protection", {"descriptor": _BASE_DESC | {"env_protection": 0.01}}, "model.descriptor.env_protection"),
    ("fparam", {"fitting_net": _BASE_FIT | {"numb_fparam": 1}}, "model.fitting.numb_fparam"),
    ("aparam", {"fitting_net": _BASE_FIT | {"numb_aparam": 2}}, "model.fitting.numb_aparam"),
    ("fit_relu", {"fitting_net": _BASE_FIT | {"activation_function": "relu"}}, "model.fitting.activation_function"),
    ("pair_exclude", {"pair_exclude_types": [[0, 1]]}, "model.pair_exclude_types"),
    ("atom_exclude", {"atom_exclude_types": [1]}, "model.atom_exclude_types"),
    ("mixed_precision", {"fitting_net": _BASE_FIT | {"precision": "float32"}}, "model.fitting.precision"),
    ("dipole", {"fitting_net": {"type": "dipole", "neuron": [8], "seed": 2}}, "model.fitting.type"),
]


def trained_input(sel, system: Path) -> dict:
    """A DeePMD-kit training input: a small pair-net model, a few steps on ``system``."""
    desc = _BASE_DESC | {"sel": list(sel), "neuron": [4, 8], "type_one_side": False, "resnet_dt": True}
    return {
        "model": {"type_map": ["Cu", "Au"], "descriptor": desc, "fitting_net": _BASE_FIT | {"neuron": [8, 8], "resnet_dt": True}},
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 0.0001, "decay_steps": 5},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1, "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"training_data": {"systems": [str(system)], "batch_size": 1}, "numb_steps": 10, "seed": 3, "disp_file": "lcurve.out", "disp_freq": 5, "save_freq": 10},
    }


def _native_config(**override) -> dict:
    cfg = {"type_map": ["Cu", "Au"], "descriptor": dict(_BASE_DESC), "fitting_net": dict(_BASE_FIT)}
    cfg.update(copy.deepcopy(override))
    return cfg


@pytest.fixture(scope="module")
def deepmd(tmp_path_factory):
    """Everything DeePMD-kit computes for this module, in one subprocess."""
    if not DEEPMD_PYTHON.exists():
        pytest.skip(f"DeePMD-kit not installed: {DEEPMD_PYTHON} is absent (create it with `make deepmd-venv`, or set DPELT_DEEPMD_PYTHON)")
    w = tmp_path_factory.mktemp("deepmd")
    spec = {"native": [], "convert": [], "train": [], "eval": [], "dp_test": []}
    ctx: dict = {"dir": w, "models": {}, "frames": {}, "ours": {}}

    def add_frames(name, coord, cell, atype):
        np.savez(w / f"{name}.npz", coord=coord, cell=cell, atype=atype)
        ctx["frames"][name] = (coord, cell, atype)

    def add_eval(model_file, frames, tag):
        spec["eval"].append({"model": str(model_file), "frames": str(w / f"{frames}.npz"), "out": str(w / f"{tag}.npz")})

    # -- alloy: pair nets (type_one_side false), per-section statistics, float64 -------------
    coord, cell, atype = alloy_frames()
    add_frames("alloy", coord, cell, atype)
    rng = np.random.default_rng(5)
    c0, b0, a0 = random_system(16, seed=11, cell_scale=6.0)  # the system for `dp test`
    cs, bs, as_ = np.stack([c0 + rng.normal(0, 0.03, c0.shape) for _ in range(3)]), np.stack([b0] * 3), np.stack([a0] * 3)
    sel = sel_for(np.concatenate([coord, cs]), np.concatenate([cell, bs]), np.concatenate([atype, as_]), 4.0, 2)
    alloy = randomize_stats(make_model(["Cu", "Au"], sel, type_one_side=False, resnet_dt=True), seed=1)
    ctx["models"]["alloy"] = alloy
    export_deepmd(alloy, w / "alloy.yaml")
    export_deepmd(alloy, w / "alloy.dp")
    spec["convert"] += [[str(w / "alloy.yaml"), str(w / "alloy.pth")], [str(w / "alloy.pth"), str(w / "alloy_back.yaml")]]
    add_eval(w / "alloy.pth", "alloy", "alloy_pth")
    add_eval(w / "alloy.dp", "alloy", "alloy_dp")
    # -- the same alloy with one embedding per neighbour type, float32 -------------------------
    alloy32 = randomize_stats(make_model(["Cu", "Au"], sel, type_one_side=True, resnet_dt=False, precision="float32"), seed=2)
    ctx["models"]["alloy32"] = alloy32
    export_deepmd(alloy32, w / "alloy32.dp")
    spec["convert"] += [[str(w / "alloy32.dp"), str(w / "alloy32.pth")], [str(w / "alloy32.pth"), str(w / "alloy32_back.yaml")]]
    add_eval(w / "alloy32.pth", "alloy", "alloy32_pth")
    # -- dp test on the alloy (labels: dpelt's prediction + noise, with virials) -------------
    pred = dpelt_predict(alloy, cs, bs, as_)
    write_npy_system(w / "alloy_sys", ["Cu", "Au"], a0, cs, bs, pred["energy"] + rng.normal(0, 0.05, 3), pred["force"] + rng.normal(0, 0.1, pred["force"].shape), pred["virial"] + rng.normal(0, 0.1, (3, 3, 3)))
    spec["dp_test"].append({"model": str(w / "alloy.pth"), "system": str(w / "alloy_sys"), "log": str(w / "alloy_test.log")})
    # -- a model trained (a few steps on alloy_sys) and frozen by DeePMD-kit itself ------------
    spec["train"].append({"dir": str(w / "dp_train"), "input": trained_input(sel, w / "alloy_sys"), "out": str(w / "trained.pth")})
    add_eval(w / "trained.pth", "alloy", "trained_pth")
    # -- water: DeePMD's example data, one embedding per neighbour type, resnet_dt -----------
    if (WATER / "data_3" / "type.raw").exists():
        coord, cell, atype, energy, force = water_frames(4)
        add_frames("water", coord, cell, atype)
        wsel = sel_for(coord, cell, atype, 4.0, 2)
        water = set_stats_from_frames(make_model(["O", "H"], wsel, type_one_side=True, resnet_dt=True, seed=7), coord, cell, atype, energy)
        ctx["models"]["water"] = water
        export_deepmd(water, w / "water.dp")
        spec["convert"].append([str(w / "water.dp"), str(w / "water.pth")])
        add_eval(w / "water.pth", "water", "water_pth")
        write_npy_system(w / "water_sys", ["O", "H"], atype[0], coord, cell, energy, force)
        spec["dp_test"].append({"model": str(w / "water.pth"), "system": str(w / "water_sys"), "log": str(w / "water_test.log")})
    # -- models made by DeePMD-kit itself (random weights, randomised statistics) ------------
    pair_cfg = _native_config(descriptor=_BASE_DESC | {"sel": sel, "neuron": [4, 8, 16], "type_one_side": False, "resnet_dt": True}, fitting_net=_BASE_FIT | {"neuron": [16, 16]})
    one_cfg = _native_config(descriptor=_BASE_DESC | {"sel": sel, "neuron": [4, 8, 8], "type_one_side": True}, fitting_net=_BASE_FIT | {"neuron": [12, 12], "resnet_dt": False})
    spec["native"].append({"name": "pair", "config": pair_cfg, "out": [str(w / "native_pair.dp"), str(w / "native_pair.yaml")], "randomize": True, "seed": 3})
    spec["native"].append({"name": "one", "config": one_cfg, "out": [str(w / "native_one.yaml")], "randomize": True, "seed": 4})
    spec["convert"] += [[str(w / "native_pair.dp"), str(w / "native_pair.pth")], [str(w / "native_one.yaml"), str(w / "native_one.pth")]]
    add_eval(w / "native_pair.pth", "alloy", "native_pair_pth")
    add_eval(w / "native_one.pth", "alloy", "native_one_pth")
    for name, override, _key in BAD_NATIVE:
        spec["native"].append({"name": f"bad_{name}", "config": _native_config(**override), "out": [str(w / f"bad_{name}.dp")]})

    (w / "spec.json").write_text(json.dumps(spec, indent=1))
    (w / "side.py").write_text(DEEPMD_SIDE)
    env = dict(os.environ, OMP_NUM_THREADS="1", DP_INTRA_OP_PARALLELISM_THREADS="1", DP_INTER_OP_PARALLELISM_THREADS="1", DP_BACKEND="pytorch")
    t0 = time.perf_counter()
    proc = subprocess.run([str(DEEPMD_PYTHON), str(w / "side.py"), str(w / "spec.json"), str(w / "report.json")], cwd=w, env=env, capture_output=True, text=True, timeout=1800)
    ctx["seconds"] = time.perf_counter() - t0
    assert proc.returncode == 0, f"DeePMD-kit batch failed:\n{proc.stderr[-5000:]}"
    ctx["report"] = json.loads((w / "report.json").read_text())
    return ctx


def deepmd_result(ctx, tag):
    errors = {k: v for k, v in ctx["report"]["errors"].items() if tag in k}
    assert not errors, f"DeePMD-kit failed on {tag}:\n" + "\n".join(errors.values())
    with np.load(ctx["dir"] / f"{tag}.npz") as z:
        return {k: z[k] for k in z.files}


def report_line(ctx, what, rel):
    print(f"{what}: max relative difference " + ", ".join(f"{k} {v:.2e}" for k, v in rel.items()))


# --------------------------------------------------------------------------------------------
# exported models in DeePMD-kit
# --------------------------------------------------------------------------------------------


@needs_deepmd
def test_exported_alloy_equals_deepmd(deepmd):
    """type_one_side false (pair nets), resnet_dt, per-section statistics, small triclinic cell."""
    ours = dpelt_predict(deepmd["models"]["alloy"], *deepmd["frames"]["alloy"])
    report_line(deepmd, "alloy .yaml -> .pth", assert_same_prediction(deepmd_result(deepmd, "alloy_pth"), ours, what="alloy .pth"))
    dp_direct = deepmd["report"]["errors"].get(f"eval:{deepmd['dir'] / 'alloy_dp.npz'}")
    if dp_direct is None:  # DeePMD-kit's NumPy backend on the .dp itself
        direct = deepmd_result(deepmd, "alloy_dp")
        if np.isnan(direct["force"]).all():  # that backend has no autograd: energies only
            rel = {"energy": max_rel(direct["energy"], ours["energy"])}
            assert rel["energy"] <= RTOL, f"alloy .dp: max relative energy difference {rel} exceeds {RTOL}"
        else:
            rel = assert_same_prediction(direct, ours, what="alloy .dp")
        report_line(deepmd, "alloy .dp (dpmodel backend)", rel)


@needs_deepmd
def test_exported_water_equals_deepmd(deepmd):
    if "water" not in deepmd["models"]:
        pytest.skip(f"shared water data not found at {WATER}")
    ours = dpelt_predict(deepmd["models"]["water"], *deepmd["frames"]["water"])
    report_line(deepmd, "water .dp -> .pth", assert_same_prediction(deepmd_result(deepmd, "water_pth"), ours, what="water .pth"))


@needs_deepmd
def test_exported_float32_close_to_deepmd(deepmd):
    """float32 models: the same model, agreeing to float32 round-off only."""
    ours = dpelt_predict(deepmd["models"]["alloy32"], *deepmd["frames"]["alloy"])
    rel = assert_same_prediction(deepmd_result(deepmd, "alloy32_pth"), ours, rtol=1e-4, what="float32 alloy")
    report_line(deepmd, "alloy float32 .dp -> .pth", rel)


def _dp_test_log(path: Path) -> dict:
    """The last (weighted average) RMSEs `dp test` logged."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.search(r"(Energy|Force|Virial)\s+RMSE(/Natoms)?\s*:\s*([-+0-9.eE]+)", line)
        if m:
            out[m.group(1).lower() + ("_per_atom" if m.group(2) else "")] = float(m.group(3))
    return out


@needs_deepmd
@pytest.mark.parametrize("name", ["alloy", "water"])
def test_dp_test_rmse_equals_dpelt_test(deepmd, name, tmp_path, capsys):
    if name not in deepmd["models"]:
        pytest.skip(f"shared water data not found at {WATER}")
    from pipeline.cli import main as dpelt_main

    errors = {k: v for k, v in deepmd["report"]["errors"].items() if f"{name}_test" in k}
    assert not errors, "\n".join(errors.values())
    theirs = _dp_test_log(deepmd["dir"] / f"{name}_test.log")
    model_file = save_model(deepmd["models"][name], deepmd["models"][name].config, tmp_path / "m.pt")
    assert dpelt_main(["test", "-m", str(model_file), "-s", str(deepmd["dir"] / f"{name}_sys"), "-o", str(tmp_path / "t.json")]) == 0
    ours = json.loads((tmp_path / "t.json").read_text())["overall"]
    pairs = [("energy_per_atom", "energy_rmse_per_atom"), ("force", "force_rmse")] + ([("virial_per_atom", "virial_rmse_per_atom")] if name == "alloy" else [])
    for dp_key, our_key in pairs:
        assert dp_key in theirs, f"dp test reported no {dp_key}: {theirs}"
        assert theirs[dp_key] == pytest.approx(ours[our_key], rel=2e-6), (dp_key, theirs[dp_key], ours[our_key])  # dp prints 7 digits
    with capsys.disabled():
        print(f"\n{name}: dp test {theirs} | dpelt test " + ", ".join(f"{k} {ours[k]:.6e}" for _, k in pairs))


@needs_deepmd
def test_deepmd_reserialised_model_imports_identically(deepmd):
    """DeePMD-kit rebuilds the exported .pth from model_def_script + state (convert .pth -> .yaml):
    importing that gives dpelt's original arrays exactly."""
    for name in ("alloy", "alloy32"):
        errors = {k: v for k, v in deepmd["report"]["errors"].items() if f"{name}_back" in k}
        assert not errors, "\n".join(errors.values())
        back = import_deepmd(deepmd["dir"] / f"{name}_back.yaml")
        orig = deepmd["models"][name].state_dict()
        for key, value in back.state_dict().items():
            assert value.dtype == orig[key].dtype and torch.equal(value, orig[key]), (name, key)
        assert back.sel == deepmd["models"][name].sel and back.config.descriptor == deepmd["models"][name].config.descriptor


# --------------------------------------------------------------------------------------------
# models written by DeePMD-kit, imported into dpelt
# --------------------------------------------------------------------------------------------


def _same_tree(a, b, path="") -> list:
    """Differences between two model trees (arrays compared exactly, with dtype)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k} only in {'first' if k in a else 'second'}")
            else:
                out += _same_tree(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for k, (x, y) in enumerate(zip(a, b)) for d in _same_tree(x, y, f"{path}[{k}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        return [] if ok else [f"{path}: arrays differ"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@needs_deepmd
@pytest.mark.parametrize("source, tag", [("native_pair.dp", "native_pair_pth"), ("native_pair.yaml", "native_pair_pth"), ("native_pair.pth", "native_pair_pth"), ("native_one.yaml", "native_one_pth"), ("native_one.pth", "native_one_pth")])
def test_import_deepmd_model(deepmd, source, tag, tmp_path):
    """A model DeePMD-kit wrote (.dp/.yaml by its serializer, .pth by convert-backend): dpelt's
    energies, forces and virials equal DeePMD-kit's, and export gives back its arrays exactly."""
    errors = {k: v for k, v in deepmd["report"]["errors"].items() if source.split(".")[0] in k}
    assert not errors, "\n".join(errors.values())
    path = deepmd["dir"] / source
    model = import_deepmd(path)
    ours = dpelt_predict(model, *deepmd["frames"]["alloy"])
    report_line(deepmd, f"import {source}", assert_same_prediction(deepmd_result(deepmd, tag), ours, what=source))
    # through a dpelt model file (what `dpelt import` writes) and back out
    dpelt_file = save_model(model, model.config, tmp_path / "m.pt", metadata=model.metadata)
    export_deepmd(load_model(dpelt_file), tmp_path / "again.yaml")
    written_by_deepmd = {"native_pair.pth": "native_pair.dp", "native_one.pth": "native_one.yaml"}.get(source, source)
    original = read_deepmd_file(deepmd["dir"] / written_by_deepmd)
    again = read_deepmd_file(tmp_path / "again.yaml")
    for tree in (original, again):  # DeePMD-kit spells "no atom_ener" as None or [] depending on the writer
        if not any(tree["model"]["fitting"].get("atom_ener") or []):
            tree["model"]["fitting"]["atom_ener"] = []
    diffs = _same_tree(original["model"], again["model"])
    assert not diffs, diffs[:10]


@needs_deepmd
def test_import_model_trained_by_deepmd(deepmd):
    """A model trained (`dp --pt train`, a few steps) and frozen (`dp --pt freeze`) by DeePMD-kit:
    its own statistics, biases and weights, imported with the same predictions."""
    errors = {k: v for k, v in deepmd["report"]["errors"].items() if "trained" in k}
    assert not errors, "\n".join(errors.values())
    model = import_deepmd(deepmd["dir"] / "trained.pth")
    ours = dpelt_predict(model, *deepmd["frames"]["alloy"])
    report_line(deepmd, "trained water .pth", assert_same_prediction(deepmd_result(deepmd, "trained_pth"), ours, what="trained .pth"))


@needs_deepmd
@pytest.mark.parametrize("name, key", [(n, k) for n, _, k in BAD_NATIVE])
def test_unsupported_deepmd_models_refused(deepmd, name, key):
    err = deepmd["report"]["errors"].get(f"native:bad_{name}")
    if err is not None:
        pytest.skip(f"DeePMD-kit could not build this model: {err.strip().splitlines()[-1]}")
    with pytest.raises(ModelFileError) as exc:
        import_deepmd(deepmd["dir"] / f"bad_{name}.dp")
    assert f"[{key}]" in str(exc.value) or f"[{key}." in str(exc.value), str(exc.value)


@needs_deepmd
def test_deepmd_batch_timing(deepmd, capsys):
    with capsys.disabled():
        t = deepmd["report"]["timings"]
        print(f"\nDeePMD-kit {deepmd['report']['deepmd_version']} batch: {deepmd['seconds']:.1f} s wall (import {t['import']:.1f} s)")
    assert not deepmd["report"]["errors"] or all(k.startswith("native:bad_") or k.startswith("eval:") and "alloy_dp" in k for k in deepmd["report"]["errors"]), deepmd["report"]["errors"]


# --------------------------------------------------------------------------------------------
# without DeePMD-kit: round trips, refusals, CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture
def alloy_model():
    return randomize_stats(make_model(["Cu", "Au"], [20, 20], type_one_side=False, resnet_dt=True), seed=3)


@pytest.mark.parametrize("suffix, precision", [(".dp", "float64"), (".yaml", "float64"), (".yml", "float64"), (".dp", "float32")])
def test_export_import_round_trip_exact(tmp_path, suffix, precision):
    alloy_model = randomize_stats(make_model(["Cu", "Au"], [20, 20], type_one_side=precision == "float32", resnet_dt=True, precision=precision), seed=3)
    path = export_deepmd(alloy_model, tmp_path / f"m{suffix}")
    back = import_deepmd(path)
    a, b = alloy_model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back.config.descriptor == alloy_model.config.descriptor and back.config.fitting_net == alloy_model.config.fitting_net
    assert back.type_map == alloy_model.type_map and back.sel == alloy_model.sel
    # and out again: the same tree
    again = export_deepmd(back, tmp_path / f"again{suffix}")
    assert not _same_tree(read_deepmd_file(path), read_deepmd_file(again))
    pos, cell, atype = random_system(12, seed=4)
    assert run_model(back, pos, cell, atype)["energy"] == run_model(alloy_model, pos, cell, atype)["energy"]


def test_export_dp_is_reproducible(tmp_path, alloy_model):
    a = export_deepmd(alloy_model, tmp_path / "a.dp").read_bytes()
    b = export_deepmd(alloy_model, tmp_path / "b.dp").read_bytes()
    assert a == b


def test_export_layout(tmp_path, alloy_model):
    """DeePMD-kit's places: energy bias in the atomic model's out_bias, stats per slot, pair nets ti + tj*nt."""
    tree = deepmd_dict(alloy_model)
    m = tree["model"]
    np.testing.assert_array_equal(m["@variables"]["out_bias"][0, :, 0], alloy_model.fitting.bias_atom_e.numpy())
    np.testing.assert_array_equal(m["fitting"]["@variables"]["bias_atom_e"], np.zeros((2, 1)))
    assert m["descriptor"]["@variables"]["davg"].shape == (2, 40, 4)
    nets = m["descriptor"]["embeddings"]["networks"]
    # DeePMD-kit index 1 = (centre 1, neighbour 0) = dpelt embedding 1*2 + 0 = 2
    np.testing.assert_array_equal(nets[1]["layers"][0]["@variables"]["w"], alloy_model.descriptor.embeddings[2].layers[0].weight.detach().numpy())
    assert tree["model_def_script"]["descriptor"]["type"] == "se_e2_a"


def _mutated(tree, mutate):
    t = copy.deepcopy(tree)
    mutate(t)
    return t


def _set(path, value):
    def mutate(t):
        node = t
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return mutate


def _first_layer_idt(t):
    t["model"]["descriptor"]["embeddings"]["networks"][0]["layers"][0]["@variables"]["idt"] = np.ones(4)


REFUSED = [
    (_set(["model", "type"], "zbl"), "model.type"),
    (_set(["model", "descriptor", "type"], "se_e2_r"), "model.descriptor.type"),
    (_set(["model", "descriptor", "type"], "dpa2"), "model.descriptor.type"),
    (_set(["model", "descriptor", "activation_function"], "gelu"), "model.descriptor.activation_function"),
    (_set(["model", "descriptor", "exclude_types"], [[0, 1]]), "model.descriptor.exclude_types"),
    (_set(["model", "descriptor", "compress"], {"@variables": {}}), "model.descriptor.compress"),
    (_set(["model", "descriptor", "env_mat", "use_exp_switch"], True), "model.descriptor.env_mat.use_exp_switch"),
    (_set(["model", "descriptor", "type_embedding"], {"neuron": [8]}), "model.descriptor.type_embedding"),
    (_set(["model", "descriptor", "embeddings", "networks", 1, "layers", 2, "activation_function"], "relu"), "model.descriptor.embeddings.networks[1].layers[2].activation_function"),
    (_first_layer_idt, "model.descriptor.embeddings.networks[0].layers[0].@variables.idt"),
    (_set(["model", "fitting", "numb_fparam"], 2), "model.fitting.numb_fparam"),
    (_set(["model", "fitting", "atom_ener"], [1.0, None]), "model.fitting.atom_ener"),
    (_set(["model", "fitting", "type"], "polar"), "model.fitting.type"),
    (_set(["model", "fitting", "precision"], "float32"), "model.fitting.precision"),
    (_set(["model", "pair_exclude_types"], [[0, 0]]), "model.pair_exclude_types"),
    (_set(["model", "spin"], {"use_spin": [True, False]}), "model.spin"),
]


@pytest.mark.parametrize("mutate, key", REFUSED, ids=[k for _, k in REFUSED])
def test_unsupported_options_refused(alloy_model, mutate, key):
    tree = _mutated(deepmd_dict(alloy_model), mutate)
    with pytest.raises(ModelFileError) as exc:
        model_from_deepmd_dict(tree, "m.yaml")
    assert f"[{key}]" in str(exc.value), str(exc.value)


def test_statistics_varying_within_a_section_refused(alloy_model):
    with torch.no_grad():
        alloy_model.descriptor.davg[0, 3, 0] += 0.01
    with pytest.raises(ModelFileError, match="nearest first"):
        deepmd_dict(alloy_model)


def test_bad_files_refused(tmp_path, alloy_model):
    with pytest.raises(ModelFileError, match="dp convert-backend"):
        export_deepmd(alloy_model, tmp_path / "m.pth")
    with pytest.raises(ModelFileError, match="unknown suffix"):
        export_deepmd(alloy_model, tmp_path / "m.json")
    (tmp_path / "x.dp").write_bytes(b"not hdf5")
    with pytest.raises(ModelFileError, match="HDF5"):
        import_deepmd(tmp_path / "x.dp")
    (tmp_path / "x.pth").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="zip"):
        import_deepmd(tmp_path / "x.pth")
    with pytest.raises(ModelFileError, match="not found"):
        import_deepmd(tmp_path / "missing.yaml")
    # a TorchScript archive that is not a DeePMD-kit model (dpelt's own frozen model)
    from pipeline.model.serialize import freeze_model

    with pytest.raises(ModelFileError, match="model class"):
        import_deepmd(freeze_model(alloy_model, tmp_path / "dpelt_frozen.pth"))


def test_pth_with_code_objects_refused(tmp_path):
    """A .pth whose pickle names a non-TorchScript global is refused without importing it."""
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ModelFileError, match="refused"):
        import_deepmd(tmp_path / "evil.pth")


def test_cli_export_import(tmp_path, alloy_model, capsys):
    from pipeline.cli import build_parser

    parser = build_parser()  # the `dpelt` console script's parser
    model_file = save_model(alloy_model, alloy_model.config, tmp_path / "m.pt")
    args = parser.parse_args(["export", str(model_file), str(tmp_path / "m.dp")])
    args.func(args)
    assert "dp convert-backend" in capsys.readouterr().out
    args = parser.parse_args(["import", str(tmp_path / "m.dp"), str(tmp_path / "back.pt")])
    args.func(args)
    back = load_model(tmp_path / "back.pt")
    for k, v in alloy_model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.metadata["imported_from"].endswith("m.dp") and back.metadata["deepmd"]["software"] == "dpelt"
    # the imported file is a regular dpelt model: usable as a warm start and ensemble member
    from pipeline.model.serialize import model_from_dict, read_model_file

    model_from_dict(read_model_file(tmp_path / "back.pt"), "back.pt")
    args = parser.parse_args(["import", str(tmp_path / "m.dp"), str(tmp_path / "back.nc")])
    with pytest.raises(ModelFileError, match=r"\.pt"):
        args.func(args)


def test_yaml_and_dp_hold_the_same_tree(tmp_path, alloy_model):
    a = read_deepmd_file(export_deepmd(alloy_model, tmp_path / "m.dp"))
    b = read_deepmd_file(export_deepmd(alloy_model, tmp_path / "m.yaml"))
    assert not _same_tree(a, b)
    # a .dp keeps arrays as HDF5 datasets named in the JSON tree
    import h5py

    with h5py.File(tmp_path / "m.dp") as h5:
        tree = json.loads(h5.attrs["json"])
        assert tree["model"]["descriptor"]["@variables"]["davg"].startswith("/variable_")
    write_deepmd_file(a, tmp_path / "copy.dp")
    assert not _same_tree(read_deepmd_file(tmp_path / "copy.dp"), a)


def test_package_docstring_says_what_imports(tmp_path):
    """The package's summary lists exactly the importable suffixes; a .pt checkpoint is refused."""
    import pipeline.interop as interop
    from pipeline.interop.deepmd_format import IMPORT_SUFFIXES

    doc = interop.__doc__
    for suffix in IMPORT_SUFFIXES:
        assert f"``{suffix}``" in doc, suffix
    (tmp_path / "model.ckpt.pt").write_bytes(b"")
    with pytest.raises(ModelFileError, match="training checkpoint"):
        import_deepmd(tmp_path / "model.ckpt.pt")
    assert re.search(r"``\.pt`` training checkpoint is refused", doc)
