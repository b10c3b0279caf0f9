"""The CP2K water example, judged: O–O radial distribution function of a DP MD (the run's final
model) against a CP2K MD of the same box, the held-out errors, and the wall time by step.

usage: python bench/studies/water_cp2k_rdf.py RUN_DIR [--cp2k-steps 200] [--dp-steps 4000]
           [--out docs/water_cp2k_rdf.png] [--json bench/studies/results/water_cp2k.json]

RUN_DIR is a (finished, or else the latest trained iteration is used) `snakemake --configfile config/examples/water-cp2k.yaml` directory. The
CP2K MD uses the run's own oracle settings through dpelt's labeling code (each step a cached
task under RUN_DIR/work/rdf_cp2k: an interrupted run continues where it stopped); both MDs are
Langevin at 300 K with 0.5 fs (DP) and 1 fs (CP2K) steps from config/examples/water8.xyz.
g(r) counts O–O pairs of all periodic images up to 6 Å (the box is 6.21 Å: beyond L/2 the
periodic copies are part of what is counted), averaged over the frames after the first
quarter. The CP2K MD frames (another trajectory than any the loop labelled) also serve as a
held-out set: errors of each member of the latest ensemble and of its mean on them. Not a test:
minutes of CP2K.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import ase.io
import numpy as np
from ase.neighborlist import neighbor_list

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def oo_rdf(frames: list, rmax: float = 6.0, nbins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """g_OO(r) averaged over ``frames`` (ase.Atoms): bin centres (Å) and g."""
    edges = np.linspace(0.0, rmax, nbins + 1)
    hist = np.zeros(nbins)
    norm = 0.0
    for a in frames:
        o = a[[s == "O" for s in a.get_chemical_symbols()]]
        d = neighbor_list("d", o, rmax)
        hist += np.histogram(d, edges)[0]
        norm += len(o) * len(o) / a.get_volume()
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return 0.5 * (edges[1:] + edges[:-1]), hist / (norm * shell)


def cp2k_md(run: Path, steps: int) -> list:
    """CP2K Langevin MD at 300 K (1 fs) with the run's oracle, every step kept."""
    from pipeline.init_data import OracleMDSpec, oracle_md
    from pipeline.label.oracles import make_oracle
    from pipeline.runconfig import load_run_config

    cfg = load_run_config(run / "config/examples/water-cp2k.yaml")
    oracle = make_oracle(cfg["label"]["oracle"])
    atoms = ase.io.read(run / "config/examples/water8.xyz")
    failures: list = []
    with oracle.session() as session:
        frames = oracle_md(atoms, session, OracleMDSpec(temperature_K=300.0, nsteps=steps, trj_freq=1, dt_fs=1.0), np.random.default_rng(7), run / "work/rdf_cp2k", cfg["label"]["max_force"], "rdf:cp2k", failures, cfg["label"]["timeout"])
    if failures:
        print("CP2K MD stopped:", failures, file=sys.stderr)
    return frames


def dp_md(model: Path, steps: int) -> list:
    """DP Langevin MD at 300 K (0.5 fs) with one member of the final ensemble, every 10th step kept."""
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from ase.units import fs

    from pipeline.calculator import DeepPotCalculator

    atoms = ase.io.read(ROOT / "config/examples/water8.xyz")
    atoms.calc = DeepPotCalculator(str(model))
    rng = np.random.default_rng(7)
    thermalize_momenta(atoms, temperature_K=300.0, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep=0.5 * fs, temperature_K=300.0, friction=0.01, fixcm=False, rng=rng)
    frames = []
    for _ in dyn.irun(steps):
        if atoms.get_temperature() > 5 * 300.0:  # a runaway (the explore guard's default): the rest is not water
            print(f"DP MD ran away at step {dyn.nsteps} ({atoms.get_temperature():.0f} K)", file=sys.stderr)
            break
        if dyn.nsteps % 10 == 0:
            frames.append(atoms.copy())
    return frames


def errors_on(frames: list, models: list[Path]) -> dict:
    """RMSE of each model and of the ensemble mean on CP2K-labelled ``frames``: energy per atom
    (eV/atom, after removing the mean offset as DeePMD's held-out tests do not: both given) and
    force components (eV/Å)."""
    from pipeline.calculator import DeepPotCalculator

    e_ref = np.array([a.get_potential_energy() for a in frames])
    f_ref = np.stack([a.get_forces() for a in frames])
    n = len(frames[0])
    preds = []
    for m in models:
        calc = DeepPotCalculator(str(m))
        e, f = [], []
        for a in frames:
            b = a.copy()
            b.calc = calc
            e.append(b.get_potential_energy())
            f.append(b.get_forces())
        preds.append((np.array(e), np.stack(f)))
    out = {}
    for name, (e, f) in [(m.parent.name, p) for m, p in zip(models, preds)] + [("mean", (np.mean([p[0] for p in preds], 0), np.mean([p[1] for p in preds], 0)))]:
        de = (e - e_ref) / n
        out[name] = {"rmse_e_per_atom": float(np.sqrt(np.mean(de**2))), "rmse_e_per_atom_offset_removed": float(np.std(de)), "rmse_f": float(np.sqrt(np.mean((f - f_ref) ** 2)))}
    out["frames"] = len(frames)
    out["force_std_cp2k"] = float(np.std(f_ref))
    return out


def wall_times(run: Path) -> dict[str, float]:
    """Seconds by kind of job from Snakemake's benchmarks/ files (s column)."""
    out: dict[str, float] = {}
    for tsv in sorted((run / "benchmarks").rglob("*.tsv")):
        kind = tsv.relative_to(run / "benchmarks").parts[0].split(".")[0]
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        out[kind] = out.get(kind, 0.0) + sum(float(r["s"]) for r in rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--cp2k-steps", type=int, default=200)
    p.add_argument("--dp-steps", type=int, default=4000)
    p.add_argument("--out", type=Path, default=ROOT / "docs/water_cp2k_rdf.png")
    p.add_argument("--json", type=Path, default=ROOT / "bench/studies/results/water_cp2k.json")
    args = p.parse_args()
    run = args.run.resolve()
    summary_path = run / "reports/summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None  # None: the run has not finished
    model = sorted(run.glob("iter/*/train/0/model.pt"))[-1]  # member 0 of the latest trained iteration
    members = sorted(model.parent.parent.glob("*/model.pt"))
    dp = dp_md(model, args.dp_steps)
    cp = cp2k_md(run, args.cp2k_steps)
    r, g_dp = oo_rdf(dp[len(dp) // 4:]) if len(dp) >= 4 else (None, None)
    r, g_cp = oo_rdf(cp[len(cp) // 4:])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(r, g_cp, "k-", label=f"CP2K MD ({len(cp)} fs)")
    if len(dp) >= 4:
        ax.plot(r, g_dp, "C1--", label=f"DP MD ({len(dp) * 10 * 0.5:.0f} fs, {model.relative_to(run)})")
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("g$_{OO}$(r)")
    ax.set_title("8 H$_2$O, 6.21 Å box, 300 K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    result = {
        "what": "CP2K-labelled water example (config/examples/water-cp2k.yaml), one run on a shared 2-core machine",
        "summary": summary,
        "wall_s": wall_times(run),
        "rdf": {"r": r.tolist(), "g_cp2k": g_cp.tolist(), "g_dp": None if g_dp is None else g_dp.tolist(), "cp2k_frames": len(cp), "dp_frames": len(dp), "model": str(model.relative_to(run))},
        "cp2k_md_errors": errors_on(cp, members),
        "rdf_first_peak": {"cp2k": [float(r[np.argmax(g_cp)]), float(g_cp.max())], "dp": None if g_dp is None else [float(r[np.argmax(g_dp)]), float(g_dp.max())]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("wall_s", "rdf_first_peak", "cp2k_md_errors")}, indent=1))


if __name__ == "__main__":
    main()
