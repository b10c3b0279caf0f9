"""Energy offsets of a finished ELT run's members, and what refitting the energy bias would do (not a test).

usage: python bench/energy_refit.py RUN_DIR [--iteration 005] [--out bench/results/energy_refit.json]

Force training leaves a per-element constant in the atomic energy unconstrained; during a warm
start's force-dominated phase (p_e/p_f ~ 2e-5) it drifts. For each member of the iteration this
fits, by least squares over the member's training frames, the per-element shift of the energy
bias that best explains its energy residuals (as ``dp change-bias`` does), and reports the
held-out energy RMSE (data/holdout/frames.nc) before and after the shift. Forces and virials do
not change. Nothing in the run is modified.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.data.io import read_systems
from pipeline.evaluate import predict
from pipeline.fileio import write_text_atomic
from pipeline.model.serialize import load_model
from pipeline.model.stats import fit_energy_bias


def residuals(model, run: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(element counts [nframes, ntypes], label − predicted energy [nframes] eV) over ``paths``."""
    counts, res = [], []
    for p in paths:
        for ds in read_systems(run / p, type_map=model.type_map, require_labels=True):
            pred = predict(model, ds, source=str(run / p))
            atype = ds["atom_type"].values
            c = np.bincount(atype if atype.ndim == 1 else atype[0], minlength=len(model.type_map))
            counts.append(np.tile(c, (len(pred["energy"]), 1)))
            res.append(ds["energy"].values - pred["energy"])
    return np.concatenate(counts), np.concatenate(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--iteration", default=None, help="iteration directory name (default: the last)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "energy_refit.json")
    args = ap.parse_args()
    run = args.run.resolve()
    it = args.iteration or sorted(p.name for p in (run / "iter").iterdir() if (p / "train").is_dir())[-1]
    members = []
    for mdir in sorted((run / "iter" / it / "train").iterdir(), key=lambda p: int(p.name)):
        model = load_model(mdir / "model.pt").eval()
        systems = json.loads((mdir / "input.json").read_text())["training"]["training_data"]["systems"]
        c, r = residuals(model, run, systems)
        shift = fit_energy_bias(c, r)
        hc, hr = residuals(model, run, ["data/holdout/frames.nc"])

        def rmse(counts, res):
            return float(np.sqrt(np.mean((res / counts.sum(1)) ** 2)))

        row = {
            "member": int(mdir.name),
            "shift_eV_per_element": shift.tolist(),
            "train_energy_rmse_per_atom": [rmse(c, r), rmse(c, r - c @ shift)],
            "holdout_energy_rmse_per_atom": [rmse(hc, hr), rmse(hc, hr - hc @ shift)],
        }
        members.append(row)
        print(f"member {row['member']}: shift {np.round(shift * 1e3, 2)} meV/atom; training E RMSE {row['train_energy_rmse_per_atom'][0] * 1e3:.2f} -> "
              f"{row['train_energy_rmse_per_atom'][1] * 1e3:.2f}; held-out {row['holdout_energy_rmse_per_atom'][0] * 1e3:.2f} -> {row['holdout_energy_rmse_per_atom'][1] * 1e3:.2f} meV/atom")
    result = {"what": "per-member energy-bias refit on the training frames: RMSE [before, after] in eV/atom", "run": str(run), "iteration": it,
              "date": time.strftime("%Y-%m-%d %H:%M"), "members": members}
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
