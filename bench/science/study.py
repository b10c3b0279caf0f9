"""Label efficiency of the ELT loop against random selection and oracle MD (not a test).

usage: python bench/science/study.py RUN_DIR [--scale quick|full] [--seeds 1 2 3] [--jobs 2]
           [--bias-run RUN_DIR2] [--out bench/science/results/study_<scale>.json]

RUN_DIR is a loop run (``make run`` or ``snakemake`` on a config; finished or not: every
iteration with labels counts). For label budgets taken from the loop's own cumulative label
counts, it trains models **from scratch, with the same training procedure** (the run's
``train`` section; ``numb_steps`` and the model widths set by ``--scale``; the same seeds for
every arm) on the run's initial data plus the labels of one arm:

  elt     the frames the loop labelled up to iteration i (selected by model deviation);
  random  the same number of frames per iteration, drawn uniformly from the same exploration
          trajectories of those iterations (``iter/*/explore``), labelled by the run's oracle;
  aimd    oracle MD of every system at every explored temperature, from the initial
          structures: a budget of B labels is B oracle MD steps (every step costs an oracle
          call, as in AIMD), split evenly over the composition x temperature cells; a frame
          every ``trj_freq`` steps is trained on. Budgets: the ELT counts x ``--aimd-factors``.
  elt-bias  (with ``--bias-run``) the ELT labels of a second run that differs in explore.bias.

Every model is judged on the study's own held-out set: oracle MD over every composition x
temperature the run explores, from its own seed (independent of the loop and its held-out
set). Written: per arm, budget and seed the force RMSE (eV/Å) and energy RMSE (eV/atom),
overall and per cell; per arm and budget the mean and standard deviation over seeds; the
labels each arm needs to reach the ELT arm's final force RMSE (log-log interpolation); a
learning-curve plot. Scales:

  quick  numb_steps 1000, holdout 3 frames per cell, the ELT budgets of up to 2 iterations
  full   numb_steps = the run's, holdout 10 frames per cell, every iteration's budget

Timings on a shared machine are noisy; the JSON records the wall time and the scale.
"""

from __future__ import annotations

import argparse
import os
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCALES = {
    "quick": {"numb_steps": 1000, "holdout_frames": 3, "max_points": 2, "aimd_factors": (1, 10)},
    "full": {"numb_steps": None, "holdout_frames": 10, "max_points": None, "aimd_factors": (1, 3, 10, 30)},
}


def run_config(run: Path) -> dict:
    from pipeline.runconfig import load_run_config

    return load_run_config(run / "config" / "config.yaml")


def cells(cfg: dict) -> list[tuple[str, float]]:
    """Every (system, temperature K) the run's stages explore."""
    from pipeline.runconfig import stage_systems

    out = []
    for s, st in enumerate(cfg["explore"]["stages"]):
        for name in stage_systems(cfg, s):
            out += [(name, float(T)) for T in st["temps"] if (name, float(T)) not in out]
    return out


def label_iterations(run: Path) -> list[Path]:
    return sorted(p.parent.parent for p in (run / "iter").glob("*/label/frames.nc"))


def nframes_in(path: Path) -> int:
    from pipeline.data.netcdf import read_frames

    return sum(ds.sizes["frame"] for ds in read_frames(path))


def oracle_md_frames(cfg: dict, run: Path, system: str, T: float, steps: int, trj_freq: int, seed: int, equilibration: int, work: Path) -> list:
    """Labelled frames of ``steps`` oracle MD steps (after ``equilibration``) of ``system`` at T."""
    from pipeline.init_data import OracleMDSpec, build_structure, oracle_md, parse_init_spec
    from pipeline.label.oracles import make_oracle

    spec = {s.name: s for s in parse_init_spec(cfg["init"]).structures}
    rng = np.random.default_rng(seed)
    atoms = build_structure(spec[system], rng, run)
    md = OracleMDSpec(temperature_K=T, nsteps=steps, trj_freq=trj_freq, dt_fs=cfg["explore"]["dt_fs"], equilibration=equilibration)
    failures: list[str] = []
    kept = oracle_md(atoms, make_oracle(cfg["label"]["oracle"]), md, rng, work, cfg["label"].get("max_force", 50.0), f"study:{system}:T{T:g}", failures)
    for a in kept:
        a.info["system"] = system
    return kept


def write_images(images_by_system: dict, type_map, path: Path) -> None:
    from pipeline.data.ase_io import atoms_to_frames
    from pipeline.data.netcdf import write_frames

    systems = []
    for name, images in images_by_system.items():
        systems += [ds.assign_attrs(system=name) for ds in atoms_to_frames(images, type_map, source=f"study:{name}")]
    write_frames(path, systems)


def make_holdout(cfg: dict, run: Path, frames: int, out: Path) -> None:
    """The study's held-out set: ``frames`` oracle MD frames (every 20 steps after 200) per cell."""
    from pipeline.seeds import derive_seed

    if out.exists():
        return
    by = {}
    for system, T in cells(cfg):
        by.setdefault(f"{system}@{T:g}K", []).extend(oracle_md_frames(cfg, run, system, T, frames * 20, 20, derive_seed(cfg["seed"], "study-holdout", system, T), 200, out.parent / "work" / "holdout"))
    write_images(by, cfg["type_map"], out)


def random_labels(cfg: dict, run: Path, iters: list[Path], counts: list[int], seed: int, out: Path) -> None:
    """For each iteration (here: one), as many frames as the loop labelled there, drawn
    uniformly from that iteration's exploration frames; labelled by the run's oracle."""
    from pipeline.data.ase_io import frames_to_atoms
    from pipeline.data.netcdf import read_frames
    from pipeline.init_data import single_points
    from pipeline.label.oracles import make_oracle

    if out.exists():
        return
    oracle = make_oracle(cfg["label"]["oracle"])
    rng = np.random.default_rng(seed)
    by: dict[str, list] = {}
    for d, n in zip(iters, counts):
        pool = []
        for f in sorted((d / "explore").glob("*/frames.nc")):
            for ds in read_frames(f):
                pool += [(f.parent.name, a) for a in frames_to_atoms(ds)]
        pick = sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False).tolist())
        images = [pool[k][1] for k in pick]
        labelled, _ = single_points(images, oracle, out.parent / "work" / "random" / d.name, cfg["label"].get("max_force", 50.0))
        for k, a in zip(pick, labelled):
            by.setdefault(pool[k][0].split("_T")[0], []).append(a)
    write_images(by, cfg["type_map"], out)


def aimd_steps(budget: int, ncells: int, trj_freq: int) -> int:
    """Oracle MD steps a budget buys in all: an equal share per cell, at least one kept frame's worth."""
    return max(trj_freq, budget // ncells) * ncells


def aimd_labels(cfg: dict, run: Path, budget: int, trj_freq: int, out: Path) -> None:
    """Oracle MD of ``budget`` steps in all, split evenly over the cells; a frame every trj_freq steps."""
    from pipeline.seeds import derive_seed

    if out.exists():
        return
    cs = cells(cfg)
    per = aimd_steps(budget, len(cs), trj_freq) // len(cs)
    by: dict[str, list] = {}
    for system, T in cs:
        by.setdefault(system, []).extend(oracle_md_frames(cfg, run, system, T, per, trj_freq, derive_seed(cfg["seed"], "study-aimd", system, T), 0, out.parent / "work" / f"aimd{budget}"))
    write_images(by, cfg["type_map"], out)


def train_and_test(run: str, cfg: dict, data: list[str], seed: int, steps: int | None, out: str, holdout: str) -> dict:
    """Train from scratch on ``data`` with the run's training input; errors on the study's held-out set."""
    from pipeline.model.serialize import load_model
    from pipeline.runconfig import train_input
    from pipeline.train import loop
    from pipeline.train.config import parse_train_config

    out = Path(out)
    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    inp = train_input(cfg)
    inp["training"] = dict(inp["training"], seed=seed, training_data=dict(inp["training"].get("training_data", {}), systems=data))
    if steps is not None:
        inp["training"]["numb_steps"] = steps
    t = time.perf_counter()
    path = loop.train(parse_train_config(inp), out, threads=1, log=lambda s: None)
    result = holdout_errors(load_model(path).eval(), holdout) | {"wall_s": time.perf_counter() - t, "training_frames": sum(nframes_in(Path(p)) for p in data)}
    (out / "result.json").write_text(json.dumps(result))
    return result


def holdout_errors(model, holdout: str) -> dict:
    """Force RMSE (eV/Å) and energy RMSE (eV/atom) overall and per cell (the ``system``
    attribute of each held-out group: ``name@TK``)."""
    from pipeline.data.io import read_systems
    from pipeline.evaluate import predict

    cells_out, de_all, df_all = [], [], []
    for ds in read_systems(holdout, type_map=model.type_map, require_labels=True):
        p = predict(model, ds)
        de = (p["energy"] - ds["energy"].values) / ds.sizes["atom"]
        df = (p["force"] - ds["force"].values).ravel()
        de_all.append(de)
        df_all.append(df)
        cells_out.append({"cell": ds.attrs.get("system", ""), "nframes": int(len(de)), "force_rmse": float(np.sqrt(np.mean(df**2))), "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2)))})
    de, df = np.concatenate(de_all), np.concatenate(df_all)
    return {"force_rmse": float(np.sqrt(np.mean(df**2))), "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))), "cells": cells_out}


def labels_to_reach(counts: list[float], rmse: list[float], target: float) -> float | None:
    """Labels at which the (log-log interpolated) curve first reaches ``target``; None if never."""
    for k in range(len(counts)):
        if rmse[k] <= target:
            if k == 0:
                return float(counts[0])
            x0, x1, y0, y1 = map(math.log, (counts[k - 1], counts[k], rmse[k - 1], rmse[k]))
            return float(math.exp(x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0))) if y1 != y0 else float(counts[k])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--scale", choices=list(SCALES), default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, help="override the scale's training steps (a smoke test)")
    ap.add_argument("--arms", nargs="+", help="train only these arms (the others must be cached in --work)")
    ap.add_argument("--aimd-factors", type=float, nargs="+", help="AIMD budgets as multiples of the last ELT budget (default: the scale's)")
    ap.add_argument("--iterations", type=int, help="use the labels of at most this many loop iterations (default: the scale's)")
    ap.add_argument("--bias-run", type=Path, help="a second run differing in explore.bias: its ELT labels are arm elt-bias")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "study")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, default=HERE.parents[1] / "docs" / "img" / "science_learning_curves.png")
    args = ap.parse_args()
    from pipeline.fileio import write_text_atomic
    from pipeline.seeds import derive_seed

    t0 = time.perf_counter()
    sc = dict(SCALES[args.scale])
    if args.steps is not None:
        sc["numb_steps"] = args.steps
    if args.iterations is not None:
        sc["max_points"] = args.iterations
    if args.aimd_factors:
        sc["aimd_factors"] = tuple(args.aimd_factors)
    run = args.run.resolve()
    for name in ("work", "out", "plot", "holdout", "bias_run"):  # the run's relative paths (init structures) are read from inside it
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).resolve())
    os.chdir(run)
    cfg = run_config(run)
    work = args.work / args.scale
    work.mkdir(parents=True, exist_ok=True)
    holdout = work / "holdout.nc"
    make_holdout(cfg, run, sc["holdout_frames"], holdout)
    init = str(run / "data" / "init" / "frames.nc")
    iters = label_iterations(run)[: sc["max_points"]]
    per_iter = [nframes_in(d / "label" / "frames.nc") for d in iters]
    budgets = list(np.cumsum(per_iter))
    trj_freq = int(cfg["explore"]["stages"][0]["trj_freq"])
    arms: dict[str, list[tuple[int, list[str]]]] = {"elt": [], "random": [], "aimd": []}
    steps: dict[tuple, int] = {}  # labels actually spent where they differ from the nominal budget
    for k, d in enumerate(iters):
        arms["elt"].append((int(budgets[k]), [str(x / "label" / "frames.nc") for x in iters[: k + 1]]))
        rpath = work / "random" / f"{d.name}.nc"
        rpath.parent.mkdir(parents=True, exist_ok=True)
        random_labels(cfg, run, [d], [per_iter[k]], derive_seed(cfg["seed"], "study-random", d.name), rpath)
        arms["random"].append((int(budgets[k]), [str(work / "random" / f"{x.name}.nc") for x in iters[: k + 1]]))
    for b in sorted({int(budgets[-1] * f) for f in sc["aimd_factors"]} | {int(budgets[0])}):
        apath = work / "aimd" / f"{b}.nc"
        apath.parent.mkdir(parents=True, exist_ok=True)
        aimd_labels(cfg, run, b, trj_freq, apath)
        arms["aimd"].append((b, [str(apath)]))
        steps[("aimd", b)] = aimd_steps(b, len(cells(cfg)), trj_freq)
    if args.bias_run:
        bias_iters = label_iterations(args.bias_run.resolve())[: sc["max_points"]]
        bc = np.cumsum([nframes_in(d / "label" / "frames.nc") for d in bias_iters])
        arms["elt-bias"] = [(int(bc[k]), [str(x / "label" / "frames.nc") for x in bias_iters[: k + 1]]) for k in range(len(bias_iters))]
    if args.arms:
        arms = {a: pts for a, pts in arms.items() if a in args.arms}
    jobs = {(arm, b, s): (str(run), cfg, [init] + data, s, sc["numb_steps"], str(work / "train" / arm / str(b) / str(s)), str(holdout)) for arm, pts in arms.items() for b, data in pts for s in args.seeds}
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = {key: pool.submit(train_and_test, *job) for key, job in jobs.items()}
        res = {key: f.result() for key, f in futs.items()}
    summary: dict = {}
    for arm, pts in arms.items():
        rows = []
        for b, _ in pts:
            fs = [res[(arm, b, s)]["force_rmse"] for s in args.seeds]
            es = [res[(arm, b, s)]["energy_rmse_per_atom"] for s in args.seeds]
            cellw = {}
            for s in args.seeds:
                for c in res[(arm, b, s)]["cells"]:
                    cellw.setdefault(c["cell"], []).append(c["force_rmse"])
            rows.append({"labels": steps.get((arm, b), b), "budget": b, "force_rmse_mean": statistics.mean(fs), "force_rmse_std": statistics.pstdev(fs), "energy_rmse_mean": statistics.mean(es), "energy_rmse_std": statistics.pstdev(es),
                         "worst_cell_force_rmse_mean": max(statistics.mean(v) for v in cellw.values()), "worst_cell": max(cellw, key=lambda c: statistics.mean(cellw[c])), "per_seed": {str(s): res[(arm, b, s)] for s in args.seeds}})
        summary[arm] = rows
    target = summary["elt"][-1]["force_rmse_mean"]
    need = {arm: labels_to_reach([r["labels"] for r in rows], [r["force_rmse_mean"] for r in rows], target) for arm, rows in summary.items()}
    doc = {
        "what": "label efficiency: held-out force/energy RMSE of models trained from scratch on init data + each arm's labels, vs labels (mean and population std over seeds)",
        "command": "python bench/science/study.py " + " ".join(sys.argv[1:]),
        "run": str(run),
        "scale": args.scale,
        "scale_settings": sc,
        "seeds": args.seeds,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - t0,
        "init_frames": nframes_in(Path(init)),
        "holdout_cells": [{"system": s, "temperature_K": T} for s, T in cells(cfg)],
        "holdout_frames": nframes_in(holdout),
        "note": "a shared 2-core machine; the study's held-out set is oracle MD from its own seeds (independent of the loop); labels exclude the initial data, which every arm shares",
        "target_force_rmse": target,
        "labels_to_reach_target": need,
        "ratio_random_over_elt": None if not need.get("random") or not need.get("elt") else need["random"] / need["elt"],
        "ratio_aimd_over_elt": None if not need.get("aimd") or not need.get("elt") else need["aimd"] / need["elt"],
        "arms": summary,
    }
    out = args.out or HERE / "results" / f"study_{args.scale}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(doc, indent=2) + "\n")
    plot(doc, args.plot)
    print(json.dumps({k: doc[k] for k in ("target_force_rmse", "labels_to_reach_target", "ratio_random_over_elt", "ratio_aimd_over_elt")}, indent=1))


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in doc["arms"].items():
        x = [r["labels"] for r in rows]
        for ax, key, scale in ((axes[0], "force_rmse", 1.0), (axes[1], "energy_rmse", 1e3)):
            m = np.array([r[f"{key}_mean"] for r in rows]) * scale
            s = np.array([r[f"{key}_std"] for r in rows]) * scale
            ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=arm)
    axes[0].set_ylabel("held-out force RMSE (eV/Å)")
    axes[1].set_ylabel("held-out energy RMSE (meV/atom)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("labels (oracle calls beyond the initial data)")
        ax.legend()
    fig.suptitle(f"label efficiency ({doc['scale']} scale, {len(doc['seeds'])} seeds, mean ± std)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
