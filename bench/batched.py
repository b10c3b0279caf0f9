"""Batched exploration benchmark (not a test): one iteration's exploration jobs, per task vs batched.

usage: python bench/batched.py --run RUN [--iteration 0] [--rounds 3] [--steps N] [--out bench/results/batched.json]

RUN is a run directory of the default config (config/config.yaml) with data/init/frames.nc and
iter/NNN/train/*/model.pt of the iteration (e.g. `snakemake --cores 2 iter/000/train/{0,1,2,3}/model.pt`).
The iteration's tasks are built as the workflow builds them (stage 0's systems × temperatures,
seeds derived from the run seed and the task name). Each round runs, as the workflow's jobs
would (a fresh `dpelt` process each, start-up included):

* per task: one `dpelt explore` process per task, one after the other (explore.batched: false);
* batched: one `dpelt explore-batch` process for every task (explore.batched: true);

in alternating order (ABAB…: the machine is shared, so the pair of a round sees the same load).
Per mode: job time (wall seconds, the sum over jobs, what Snakemake's benchmark files add up)
and CPU seconds of the jobs (user + system of the children: less sensitive to other load),
best and median over rounds, and the batched / per-task ratio of each round. The frames of the
two modes are compared (same tasks, same seeds: equal up to rounding, which chaotic MD may
amplify over many steps) by frame counts and mean max_devi_f per task.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.netcdf import read_frames  # noqa: E402
from pipeline.fileio import write_text_atomic  # noqa: E402
from pipeline.runconfig import load_run_config, stage_systems, stage_trust  # noqa: E402
from pipeline.seeds import derive_seed  # noqa: E402

DPELT = str(Path(sys.executable).parent / "dpelt")


def iteration_tasks(cfg: dict, iteration: int, stage: int, nsteps: int | None) -> list[dict]:
    """[{name, system, seed, spec}] of the iteration, as rules/common.smk builds them."""
    st, ex = cfg["explore"]["stages"][stage], cfg["explore"]
    lo, hi = stage_trust(cfg, stage)
    tasks = []
    for system in stage_systems(cfg, stage):
        for T in st["temps"]:
            for P in st["press"]:
                name = f"{system}_T{float(T):g}" + ("" if P is None else f"_P{float(P):g}")
                spec = {
                    "temperature_K": float(T), "pressure_bar": P, "ensemble": st["ensemble"], "nsteps": nsteps or st["nsteps"],
                    "trj_freq": st["trj_freq"], "dt_fs": ex["dt_fs"], "tau_t_fs": ex["tau_t_fs"], "tau_p_fs": ex["tau_p_fs"],
                    "drive": ex["drive"], "bias": ex["bias"], "guards": ex["guards"], "trust_lo": lo, "trust_hi": hi,
                }
                tasks.append({"name": name, "system": system, "seed": derive_seed(int(cfg["seed"]), "explore", iteration, name), "spec": spec})
    return sorted(tasks, key=lambda t: t["name"])


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run one job; (wall s, CPU s of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_per_task(models, start, tasks, out: Path, iteration: int, threads: int) -> tuple[float, float]:
    wall = cpu = 0.0
    for t in tasks:
        cmd = [DPELT, "explore", "-m", *models, "--start", start, "--system", t["system"], "--spec", json.dumps(t["spec"]),
               "-o", str(out / t["name"]), "--name", t["name"], "--seed", str(t["seed"]), "--iteration", str(iteration), "--threads", str(threads)]
        w, c = timed(cmd, out / f"{t['name']}.log")
        wall, cpu = wall + w, cpu + c
    return wall, cpu


def run_batched(models, start, tasks, out: Path, iteration: int, threads: int) -> tuple[float, float]:
    cmd = [DPELT, "explore-batch", "-m", *models, "--start", start, "--tasks", json.dumps(tasks), "-o", str(out), "--iteration", str(iteration), "--threads", str(threads)]
    return timed(cmd, out / "batch.log")


def compare(a: Path, b: Path, tasks) -> dict:
    rows = {}
    for t in tasks:
        (da,), (db,) = read_frames(a / t["name"] / "frames.nc"), read_frames(b / t["name"] / "frames.nc")
        n = min(da.sizes["frame"], db.sizes["frame"])
        rows[t["name"]] = {
            "frames": [int(da.sizes["frame"]), int(db.sizes["frame"])],
            "mean_max_devi_f": [float(da["max_devi_f"].mean()), float(db["max_devi_f"].mean())],
            "max_coord_diff_first_10_frames_A": float(np.abs(da["coord"].values[:10] - db["coord"].values[:10]).max()),
            "max_coord_diff_A": float(np.abs(da["coord"].values[:n] - db["coord"].values[:n]).max()),
        }
    return rows


def stats(xs: list[float]) -> dict:
    return {"best": float(np.min(xs)), "median": float(np.median(xs)), "all": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--iteration", type=int, default=0)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, help="MD steps per task (default: the stage's nsteps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batched.json")
    args = ap.parse_args()
    run = args.run.resolve()
    cfg = load_run_config(run / "config" / "config.yaml", run / "config" / "schema.yaml")
    it = f"{args.iteration:03d}"
    models = [str(run / "iter" / it / "train" / str(k) / "model.pt") for k in range(int(cfg["numb_models"]))]
    start = str(run / "data" / "init" / "frames.nc")
    tasks = iteration_tasks(cfg, args.iteration, args.stage, args.steps)
    work = run / "bench_batched"
    shutil.rmtree(work, ignore_errors=True)
    res: dict[str, list[float]] = {k: [] for k in ("per_task_wall", "per_task_cpu", "batched_wall", "batched_cpu")}
    for r in range(args.rounds):
        order = ("per_task", "batched") if r % 2 == 0 else ("batched", "per_task")
        for mode in order:
            out = work / f"{mode}_{r}"
            out.mkdir(parents=True)
            w, c = (run_per_task if mode == "per_task" else run_batched)(models, start, tasks, out, args.iteration, args.threads)
            res[f"{mode}_wall"].append(w)
            res[f"{mode}_cpu"].append(c)
            print(f"round {r} {mode}: {w:.1f} s wall, {c:.1f} s CPU", flush=True)
    ratio_wall = [b / p for b, p in zip(res["batched_wall"], res["per_task_wall"])]
    ratio_cpu = [b / p for b, p in zip(res["batched_cpu"], res["per_task_cpu"])]
    steps = sum(t["spec"]["nsteps"] for t in tasks)
    result = {
        "what": "one iteration's exploration jobs of the default run: per task (dpelt explore × tasks) vs batched (one dpelt explore-batch)",
        "command": " ".join(["python", "bench/batched.py", "--run", "RUN", "--iteration", str(args.iteration), "--rounds", str(args.rounds)] + (["--steps", str(args.steps)] if args.steps else [])),
        "tasks": [t["name"] for t in tasks],
        "members": len(models),
        "md_steps_per_task": tasks[0]["spec"]["nsteps"],
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "job_time_s": {k: stats(v) for k, v in res.items()},
        "ms_per_md_step_per_task_wall": {"per_task": stats([1000 * x / steps for x in res["per_task_wall"]]), "batched": stats([1000 * x / steps for x in res["batched_wall"]])},
        "batched_over_per_task": {"wall": stats(ratio_wall), "cpu": stats(ratio_cpu)},
        "frames_compared_round0": compare(work / "per_task_0", work / "batched_0", tasks),
        "note": "2-core machine shared with other jobs during the measurement: absolute times are noisy; the paired ratios are the figure",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
