"""Exploration benchmarks (not tests): ensemble cost, MD throughput with deviation, biased sampling.

usage: python bench/explore.py [--steps 2000] [--threads 2] [--out bench/results/explore.json]

1. Ensemble cost: one evaluation of 4 stacked models (energies, forces, virials of all and the
   deviations) against one evaluation of a single model, on the same frame, through the ASE
   calculators: EMT-copper model (32 atoms, small nets) and, when ../shared/data/water is
   present, the DeePMD water-sized model (192 atoms).
2. MD throughput: Langevin MD driven by one model (DeepPotCalculator) against the exploration
   driver with a 4-model ensemble evaluated every 10 steps (run_md), atom·steps/s.
3. Sampling on EMT copper: an ensemble trained on 300 K EMT frames explores at 300 K (or
   --sample-temperature), plain and with each bias. Reported per mode: frames with max_devi_f ≥ trust_lo per MD step, distinct
   configurations per MD step (greedy leader clustering of frame fingerprints: a frame is new
   when its sorted-distance fingerprint lies farther than 0.05 Å RMS from every earlier new
   frame), and deviation percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.calculator import DeepPotCalculator, EnsembleCalculator  # noqa: E402
from pipeline.data.netcdf import read_frames, write_frames  # noqa: E402
from pipeline.examples import emt_bulk_frames  # noqa: E402
from pipeline.explore.bias import BiasConfig  # noqa: E402
from pipeline.explore.guards import GuardConfig  # noqa: E402
from pipeline.explore.md import MDTask, run_md  # noqa: E402
from pipeline.fileio import write_text_atomic  # noqa: E402
from pipeline.train.config import parse_train_config  # noqa: E402
from pipeline.train.loop import train  # noqa: E402
from pipeline.units import fs_to_ase_time  # noqa: E402

TRUST_LO, TRUST_HI = 0.05, 0.15


def train_ensemble(work: Path, data: Path, model: dict, steps: int, threads: int, n: int = 4) -> list[Path]:
    paths = []
    for k in range(n):
        cfg = parse_train_config(
            {
                "model": model,
                "learning_rate": {"start_lr": 5e-3, "stop_lr": 5e-5, "decay_steps": 20},
                "loss": {"start_pref_v": 0.02, "limit_pref_v": 1.0},
                "training": {"training_data": {"systems": [str(data)]}, "numb_steps": steps, "seed": 1000 + k, "disp_freq": steps, "save_freq": steps, "threads": threads},
            }
        )
        paths.append(train(cfg, work / f"m{k}", log=lambda s: None))
    return paths


def time_calls(fn, n: int) -> float:
    """Median seconds per call over 5 rounds of n calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) / n)
    return float(np.median(rounds))


def ensemble_cost(models: list[Path], atoms, threads: int, calls: int) -> dict:
    rng = np.random.default_rng(0)
    single = DeepPotCalculator(models[0], threads=threads)
    ens = EnsembleCalculator(models, threads=threads)
    a1, a4 = atoms.copy(), atoms.copy()
    a1.calc, a4.calc = single, ens

    def one():
        a1.positions += rng.normal(scale=1e-4, size=a1.positions.shape)
        a1.get_forces()

    def four():
        a4.positions += rng.normal(scale=1e-4, size=a4.positions.shape)
        ens.deviation_due = True
        a4.get_forces()

    t1, t4 = time_calls(one, calls), time_calls(four, calls)
    return {"natoms": len(atoms), "single_ms": t1 * 1e3, "ensemble4_ms": t4 * 1e3, "ratio": t4 / t1, "stacked": ens.ensemble.stacked}


def md_throughput(models: list[Path], atoms, threads: int, steps: int, work: Path) -> dict:
    plain = atoms.copy()
    plain.calc = DeepPotCalculator(models[0], threads=threads)
    thermalize_momenta(plain, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(plain, timestep=fs_to_ase_time(1.0), temperature_K=300, friction=0.01, fixcm=False, rng=np.random.default_rng(1))
    dyn.run(5)
    t = time.perf_counter()
    dyn.run(steps)
    t_plain = (time.perf_counter() - t) / steps
    calc = EnsembleCalculator(models, threads=threads)
    loose = GuardConfig(min_distance=0.0, max_temperature_factor=1e9, max_volume_ratio=1e9, min_cell_angle_deg=0.0)
    task = MDTask(name="throughput", temperature_K=300.0, nsteps=steps, trj_freq=10, dt_fs=1.0, seed=1, guards=loose)
    t = time.perf_counter()
    summary = run_md(task, atoms, calc, work / "throughput")
    t_ens = (time.perf_counter() - t) / max(summary["steps_done"], 1)
    n = len(atoms)
    return {
        "natoms": n,
        "plain_atom_steps_per_s": n / t_plain,
        "ensemble_devi_every_10_atom_steps_per_s": n / t_ens,
        "ratio": t_plain / t_ens,
    }


def fingerprint(coord: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Sorted nearest-neighbour distances of every atom (first 12), flattened and sorted (Å)."""
    from pipeline.model.neighbor import build_neighbor_list

    nl = build_neighbor_list(coord, cell, (True,) * 3, np.zeros(len(coord), dtype=np.int64), 4.0, [200])
    r = np.linalg.norm(nl.rij, axis=-1)
    r.sort(axis=1)
    return np.sort(r[:, :12], axis=0).ravel()


def _run_mode(models, threads, steps, work, temperature_K, name, bias) -> tuple[dict, np.ndarray]:
    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    calc = EnsembleCalculator(models, bias=bias, threads=threads)
    task = MDTask(name=name, temperature_K=temperature_K, nsteps=steps, trj_freq=10, dt_fs=2.0, seed=7, bias=bias)
    t = time.perf_counter()
    summary = run_md(task, start, calc, work / name)
    wall = time.perf_counter() - t
    frames = read_frames(work / name / "frames.nc")
    if not frames:
        return {"status": summary["status"], "reason": summary["reason"]}, np.zeros(0)
    ds = frames[0]
    devi = ds["max_devi_f"].values
    fps, distinct = [], 0
    for c, h in zip(ds["coord"].values, ds["cell"].values):
        f = fingerprint(c, h)
        if all(np.sqrt(np.mean((f - g) ** 2)) > 0.05 for g in fps):
            fps.append(f)
            distinct += 1
    done = max(summary["steps_done"], 1)
    return {
        "status": summary["status"],
        "reason": summary["reason"],
        "steps": done,
        "frames": int(len(devi)),
        "distinct_per_step": distinct / done,
        "devi_percentiles_10_50_90": [float(x) for x in np.percentile(devi, [10, 50, 90])],
        "mean_bias_energy_eV": float(ds["bias_energy"].values.mean()),
        "wall_s": wall,
    }, devi


def sampling(models: list[Path], threads: int, steps: int, work: Path, temperature_K: float) -> dict:
    """Plain MD first; trust_lo is then calibrated as the 80th percentile of its deviations
    (so that plain MD finds 20 % of its frames above it, and a 2x gain is possible at all), and
    trust_hi = trust_lo + 0.1 eV/Å. Both biases use these trust levels."""
    out = {}
    plain, devi_plain = _run_mode(models, threads, steps, work, temperature_K, "plain", BiasConfig())
    lo = float(np.percentile(devi_plain, 80)) if len(devi_plain) else TRUST_LO
    hi = lo + 0.1
    out["trust_lo_calibrated"], out["trust_hi"] = lo, hi
    results = {"plain": (plain, devi_plain)}
    for name, bias in {
        "confidence": BiasConfig(kind="confidence", strength=0.7, trust_lo=lo, trust_hi=hi),
        "udd": BiasConfig(kind="udd", strength=1.0, width=0.1, trust_lo=lo, trust_hi=hi),
    }.items():
        results[name] = _run_mode(models, threads, steps, work, temperature_K, name, bias)
    for name, (rec, devi) in results.items():
        if len(devi):
            rec["above_trust_lo_per_step"] = float((devi > lo).sum() / rec["steps"])
            rec["candidates_per_step"] = float(((devi > lo) & (devi < hi)).sum() / rec["steps"])
        out[name] = rec
    base = out["plain"].get("above_trust_lo_per_step") or 0.0
    for name in ("confidence", "udd"):
        if "above_trust_lo_per_step" in out[name] and base > 0:
            out[name]["above_trust_lo_gain_vs_plain"] = out[name]["above_trust_lo_per_step"] / base
            out[name]["distinct_gain_vs_plain"] = out[name]["distinct_per_step"] / max(out["plain"]["distinct_per_step"], 1e-12)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="MD steps per sampling mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--sample-temperature", type=float, default=300.0, help="K; the models were trained on 300 K frames")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "explore.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpelt-bench-explore-"))
    result = {"command": f"python bench/explore.py --steps {args.steps} --threads {args.threads} --sample-temperature {args.sample_temperature:g}", "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M")}
    write_frames(work / "cu300.nc", emt_bulk_frames("Cu", temperatures_K=(300.0,), frames_per_temperature=60, stride=10, seed=1))
    cu_model = {
        "type_map": ["Cu"],
        "descriptor": {"sel": "auto", "rcut": 5.0, "rcut_smth": 2.0, "neuron": [8, 16, 32], "axis_neuron": 8, "type_one_side": True},
        "fitting_net": {"neuron": [64, 64, 64]},
    }
    t = time.perf_counter()
    cu = train_ensemble(work / "cu", work / "cu300.nc", cu_model, 800, args.threads)
    result["cu_ensemble_training_s"] = time.perf_counter() - t
    cu_atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    cu_atoms.rattle(0.05, seed=1)
    result["ensemble_cost_cu32"] = ensemble_cost(cu, cu_atoms, args.threads, args.calls * 5)
    result["md_throughput_cu32"] = md_throughput(cu, cu_atoms, args.threads, 500, work)
    water = ROOT.parent / "shared" / "data" / "water"
    if (water / "data_3" / "type.raw").exists():
        from pipeline.data.ase_io import frames_to_atoms
        from pipeline.data.io import read_systems

        ref = json.loads((ROOT.parent / "shared" / "reference" / "deepmd-water-se_e2_a.input.json").read_text())["model"]
        (ds,) = read_systems(water / "data_0")
        write_frames(work / "w.nc", ds.isel(frame=slice(0, 10)))
        wm = train_ensemble(work / "water", work / "w.nc", ref, 2, args.threads)
        w_atoms = frames_to_atoms(read_systems(water / "data_3")[0].isel(frame=[0]))[0]
        result["ensemble_cost_water192"] = ensemble_cost(wm, w_atoms, args.threads, args.calls)
        result["md_throughput_water192"] = md_throughput(wm, w_atoms, args.threads, 100, work)
    result[f"sampling_cu32_{args.sample_temperature:g}K"] = sampling(cu, args.threads, args.steps, work, args.sample_temperature)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
