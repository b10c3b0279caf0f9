"""Inference speed of a dpelt model on one frame (run in its own process, for peak RSS).

usage: python bench/dpelt_infer.py MODEL SYSTEM_DIR OUT.json [--calls 100] [--md-steps 100] [--threads 2]

Measures, on frame 0 of SYSTEM_DIR (deepmd/npy):
* energy+forces+virial evaluations through the ASE calculator (neighbour list included,
  positions nudged every call so nothing is cached): evals/s and atom·evals/s;
* ASE VelocityVerlet NVE, dt 0.5 fs, 300 K Maxwell-Boltzmann start (seeded): MD steps/s and
  atom·steps/s, and the total-energy drift (eV/atom) over the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import thermalize_momenta
from ase.units import fs

from pipeline.calculator import DeepPotCalculator
from pipeline.model import embedding_kernel
from pipeline.data.ase_io import frames_to_atoms
from pipeline.data.io import read_systems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("system")
    ap.add_argument("out")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--md-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compress", action=argparse.BooleanOptionalAction, default=False, help="tabulated embedding nets (docs/compression.md); default: the nets")
    args = ap.parse_args()
    t0 = time.perf_counter()
    calc = DeepPotCalculator(args.model, threads=args.threads, compress=args.compress)
    load_s = time.perf_counter() - t0
    (ds,) = read_systems(args.system)
    atoms = frames_to_atoms(ds.isel(frame=[0]))[0]
    atoms.calc = calc
    n = len(atoms)
    rng = np.random.default_rng(0)
    for _ in range(5):
        atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
        atoms.get_forces(), atoms.get_stress()
    t = time.perf_counter()
    for _ in range(args.calls):
        atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
        atoms.get_forces(), atoms.get_stress()
    dt = (time.perf_counter() - t) / args.calls
    md_atoms = frames_to_atoms(ds.isel(frame=[0]))[0]
    md_atoms.calc = calc
    thermalize_momenta(md_atoms, temperature_K=300.0, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(md_atoms, timestep=0.5 * fs)
    dyn.run(5)
    e0 = md_atoms.get_total_energy()
    t = time.perf_counter()
    dyn.run(args.md_steps)
    md_dt = (time.perf_counter() - t) / args.md_steps
    drift = (md_atoms.get_total_energy() - e0) / n
    result = {
        "natoms": n,
        "threads": args.threads,
        "model_load_s": load_s,
        "eval_ms": dt * 1000,
        "evals_per_s": 1 / dt,
        "atom_evals_per_s": n / dt,
        "md_step_ms": md_dt * 1000,
        "md_steps_per_s": 1 / md_dt,
        "md_atom_steps_per_s": n / md_dt,
        "md_energy_drift_eV_per_atom": drift,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "fused_embedding_kernel": embedding_kernel.load_kernel() is not None,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
