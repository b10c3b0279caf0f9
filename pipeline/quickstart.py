"""``dpelt example``: a self-contained first run (EMT copper, minutes on two cores).

Writes ``<dir>/data/train.nc`` and ``<dir>/data/valid.nc`` (EMT-labelled fcc Cu, 32 atoms,
Langevin MD at several temperatures), ``<dir>/input.yaml`` (a DeePMD-style training input),
trains into ``<dir>/train/`` and tests the model on the validation frames
(``<dir>/test.json``, ``<dir>/parity.png``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .data.netcdf import write_frames
from .evaluate import test_model
from .examples import emt_bulk_frames
from .fileio import write_text_atomic
from .model.serialize import load_model
from .train.config import load_train_config
from .train.loop import train

EXAMPLE_INPUT = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 5.0, "rcut_smth": 2.0, "neuron": [8, 16, 32], "axis_neuron": 8, "type_one_side": True, "seed": 1},
        "fitting_net": {"neuron": [64, 64, 64], "resnet_dt": True, "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 3e-3, "stop_lr": 1e-5, "decay_steps": 20},
    "loss": {"start_pref_e": 0.02, "limit_pref_e": 1.0, "start_pref_f": 1000, "limit_pref_f": 1.0, "start_pref_v": 0.02, "limit_pref_v": 1.0},
    "training": {
        "training_data": {"systems": ["data/train.nc"], "batch_size": "auto"},
        "validation_data": {"systems": ["data/valid.nc"], "batch_size": 1, "numb_btch": 4},
        "numb_steps": 600,
        "seed": 10,
        "disp_freq": 100,
        "save_freq": 200,
        "threads": 2,
    },
}


def run_quickstart(directory: Path, steps: int = 600, threads: int = 2) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    train_nc, valid_nc = directory / "data/train.nc", directory / "data/valid.nc"
    if not train_nc.exists():
        print("generating EMT-labelled copper frames (fcc, 32 atoms, 300/700/1100 K) ...")
        write_frames(train_nc, emt_bulk_frames("Cu", temperatures_K=(300, 700, 1100), frames_per_temperature=40, seed=1))
    if not valid_nc.exists():
        write_frames(valid_nc, emt_bulk_frames("Cu", temperatures_K=(500, 900), frames_per_temperature=10, seed=2))
    inp = directory / "input.yaml"
    config = dict(EXAMPLE_INPUT)
    config["training"] = dict(config["training"], numb_steps=steps, threads=threads)
    write_text_atomic(inp, yaml.safe_dump(config, sort_keys=False))
    model_path = train(load_train_config(inp), directory / "train")
    result = test_model(load_model(model_path), [valid_nc], out_json=directory / "test.json", plot=directory / "parity.png")
    o = result["overall"]
    print(
        f"validation ({o['nframes']} frames): energy RMSE {o['energy_rmse_per_atom'] * 1000:.2f} meV/atom, "
        f"force RMSE {o['force_rmse'] * 1000:.1f} meV/Å, virial RMSE {o.get('virial_rmse_per_atom', float('nan')) * 1000:.2f} meV/atom"
    )
    print(f"model: {model_path}; metrics: {directory / 'test.json'}; parity plot: {directory / 'parity.png'}")
    return result
