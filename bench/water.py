"""dpelt vs DeePMD-kit on DeePMD-kit's water example, in one run (not a test).

usage: python bench/water.py [--steps 1500] [--threads 2] [--data ../shared/data/water]
                             [--venv bench/work/deepmd-venv] [--skip-deepmd]
                             [--speed-rounds 3] [--round-steps 300]

Both codes train the example's se_e2_a model (rcut 6.0, rcut_smth 0.5, sel [46, 92],
neuron [25, 50, 100], axis_neuron 16, fitting [240, 240, 240], resnet_dt, start_lr 1e-3 →
stop_lr 3.51e-8, pref_e 0.02→1, pref_f 1000→1) from the *same* input.json on data_0–2, validate
on data_3, for the same number of steps with the same threads; DeePMD-kit is installed from
PyPI into its own virtual environment (bench/deepmd/setup_venv.sh) beside torch 2.13.0.

Reported (bench/results/water.json): training steps/s (steady state, validation included as
both codes do it), start-up time, accuracy on data_3 after the same steps (dpelt test / dp test),
energy+force+virial evaluations × atoms per second and ASE MD atom·steps/s on the 192-atom box,
peak RSS — each with the ratio dpelt / DeePMD-kit. Absolute times on a shared 2-core machine are
noisy (the same code measures ±10 % apart in runs an hour apart), so after the main run both
codes repeat their speed measurements --speed-rounds times, interleaved (inference and MD on the
trained models, a --round-steps training run); "speed" in the JSON holds every measurement and
the ratios of the best and of the median of each code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "deepmd-water-se_e2_a.input.json"


def water_input(data: Path, steps: int) -> dict:
    """The example input, pointed at DATA, with its lr schedule compressed to ``steps``."""
    cfg = json.loads(REFERENCE.read_text())
    t = cfg["training"]
    t["training_data"]["systems"] = [str(data / f"data_{k}") for k in range(3)]
    t["validation_data"]["systems"] = [str(data / "data_3")]
    t["numb_steps"] = steps
    t["disp_freq"] = min(100, steps)
    t["save_freq"] = steps
    t["seed"] = 10
    cfg["learning_rate"]["decay_steps"] = max(1, round(steps * 5000 / 1e6))
    return cfg


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS kB of the child)."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v"] + cmd if Path("/usr/bin/time").exists() else cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    rss = 0
    for line in log.read_text().splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.split(":")[1])
    return wall, rss


def run_dpelt(data: Path, work: Path, steps: int, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(water_input(data, steps), indent=2))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DPELT_THREADS=str(threads))
    dpelt = str(Path(sys.executable).parent / "dpelt")
    wall, rss = timed([dpelt, "train", "input.json", "-o", "out", "--threads", str(threads), "--timing", "timing.json"], work, env, work / "train.log")
    timing = json.loads((work / "timing.json").read_text())
    subprocess.run([dpelt, "test", "-m", "out/model.pt", "-s", str(data / "data_3"), "-o", "test.json", "--plot", "parity.png", "--threads", str(threads)], cwd=work, env=env, check=True, capture_output=True)
    test = json.loads((work / "test.json").read_text())["overall"]
    subprocess.run([sys.executable, str(HERE / "dpelt_infer.py"), "out/model.pt", str(data / "data_3"), "infer.json", "--threads", str(threads)], cwd=work, env=env, check=True, capture_output=True)
    infer = json.loads((work / "infer.json").read_text())
    return {
        "train_steps_per_s": timing["steady_steps_per_s"],
        "train_startup_s": timing["launch_to_first_step_s"],
        "train_wall_s": wall,
        "train_peak_rss_kb": rss,
        "test_rmse_e_per_atom_eV": test["energy_rmse_per_atom"],
        "test_mae_e_per_atom_eV": test["energy_mae_per_atom"],
        "test_rmse_f_eV_per_A": test["force_rmse"],
        "test_mae_f_eV_per_A": test["force_mae"],
        "infer_atom_evals_per_s": infer["atom_evals_per_s"],
        "md_atom_steps_per_s": infer["md_atom_steps_per_s"],
        "md_energy_drift_eV_per_atom": infer["md_energy_drift_eV_per_atom"],
        "infer_peak_rss_kb": infer["peak_rss_kb"],
        "fused_embedding_kernel": infer["fused_embedding_kernel"],
    }


def run_deepmd(data: Path, work: Path, steps: int, threads: int, venv: Path) -> dict:
    if not (venv / "bin" / "dp").exists():
        subprocess.run(["bash", str(HERE / "deepmd" / "setup_venv.sh"), str(venv)], check=True)
    out = work / "deepmd.json"
    cmd = [str(venv / "bin" / "python"), str(HERE / "deepmd" / "run_deepmd.py"), "--data", str(data), "--steps", str(steps), "--work", str(work), "--out", str(out), "--threads", str(threads)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def dpelt_speed_round(data: Path, work: Path, model: Path, threads: int, train_steps: int) -> dict:
    """One repeat of dpelt's speed measurements: inference/MD on MODEL, a short training run."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DPELT_THREADS=str(threads))
    subprocess.run([sys.executable, str(HERE / "dpelt_infer.py"), str(model), str(data / "data_3"), "infer.json", "--threads", str(threads)], cwd=work, env=env, check=True, capture_output=True)
    infer = json.loads((work / "infer.json").read_text())
    (work / "input.json").write_text(json.dumps(water_input(data, train_steps), indent=2))
    dpelt = str(Path(sys.executable).parent / "dpelt")
    subprocess.run([dpelt, "train", "input.json", "-o", "out", "--threads", str(threads), "--timing", "timing.json"], cwd=work, env=env, check=True, capture_output=True)
    timing = json.loads((work / "timing.json").read_text())
    return {"train_steps_per_s": timing["steady_steps_per_s"], "infer_atom_evals_per_s": infer["atom_evals_per_s"], "md_atom_steps_per_s": infer["md_atom_steps_per_s"]}


def deepmd_speed_round(data: Path, work: Path, model: Path, threads: int, train_steps: int, venv: Path) -> dict:
    """One repeat of DeePMD-kit's speed measurements (run_deepmd.py --mode infer, --mode train)."""
    work.mkdir(parents=True, exist_ok=True)
    py, script = str(venv / "bin" / "python"), str(HERE / "deepmd" / "run_deepmd.py")
    common = ["--data", str(data), "--threads", str(threads)]
    subprocess.run([py, script, *common, "--mode", "infer", "--model", str(model), "--steps", "1", "--work", str(work / "infer"), "--out", str(work / "infer.json")], check=True, capture_output=True)
    subprocess.run([py, script, *common, "--mode", "train", "--steps", str(train_steps), "--work", str(work / "train"), "--out", str(work / "train.json")], check=True, capture_output=True)
    infer = json.loads((work / "infer.json").read_text())
    train = json.loads((work / "train.json").read_text())
    return {"train_steps_per_s": train["train_steps_per_s"], "infer_atom_evals_per_s": infer["infer_atom_evals_per_s"], "md_atom_steps_per_s": infer["md_atom_steps_per_s"]}


SPEEDS = ("train_steps_per_s", "infer_atom_evals_per_s", "md_atom_steps_per_s")


def speed_summary(result: dict, rounds: list[dict]) -> dict:
    """Per code and speed: every measurement (main run first, then the rounds), its best and median;
    the ratios dpelt / DeePMD-kit of the bests and of the medians."""
    out: dict = {}
    for code in ("dpelt", "deepmd"):
        out[code] = {}
        for key in SPEEDS:
            vals = [result[code][key]] + [r[code][key] for r in rounds]
            out[code][key] = {"all": vals, "best": max(vals), "median": statistics.median(vals)}
    out["ratio_of_best"] = {k: out["dpelt"][k]["best"] / out["deepmd"][k]["best"] for k in SPEEDS}
    out["ratio_of_median"] = {k: out["dpelt"][k]["median"] / out["deepmd"][k]["median"] for k in SPEEDS}
    return out


RATIOS = {  # key: True when larger is better
    "train_steps_per_s": True,
    "infer_atom_evals_per_s": True,
    "md_atom_steps_per_s": True,
    "train_startup_s": False,
    "train_peak_rss_kb": False,
    "infer_peak_rss_kb": False,
    "test_rmse_e_per_atom_eV": False,
    "test_rmse_f_eV_per_A": False,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--venv", type=Path, default=HERE / "work" / "deepmd-venv")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "water")
    ap.add_argument("--skip-deepmd", action="store_true", help="only dpelt (no ratios)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "water.json")
    ap.add_argument("--speed-rounds", type=int, default=3, help="extra interleaved speed repeats of both codes")
    ap.add_argument("--round-steps", type=int, default=300, help="training steps of a speed repeat")
    ap.add_argument("--rounds-only", action="store_true", help="add speed repeats to an existing --out of the same --steps (its trained models are reused)")
    args = ap.parse_args()
    if not (args.data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    work = args.work / f"steps{args.steps}"
    if args.rounds_only:
        result = json.loads(args.out.read_text())
        if result.get("steps") != args.steps or "deepmd" not in result:
            sys.exit(f"{args.out} is not a finished run with --steps {args.steps}")
        speed_rounds(args, work, result, earlier_rounds(result))
        write_result(args.out, result)
        return
    if work.exists():
        shutil.rmtree(work)
    result = {
        "what": "dpelt vs DeePMD-kit (PyTorch backend), water se_e2_a example input, same steps and threads, run back to back",
        "command": f"python bench/water.py --steps {args.steps} --threads {args.threads} --speed-rounds {args.speed_rounds} --round-steps {args.round_steps}",
        "steps": args.steps,
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"dpelt: training {args.steps} steps ...", flush=True)
    result["dpelt"] = run_dpelt(args.data, work / "dpelt", args.steps, args.threads)
    print(json.dumps(result["dpelt"], indent=2), flush=True)
    if not args.skip_deepmd:
        print(f"DeePMD-kit: training {args.steps} steps ...", flush=True)
        result["deepmd"] = run_deepmd(args.data, work / "deepmd", args.steps, args.threads, args.venv)
        result["ratio_dpelt_over_deepmd"] = {k: result["dpelt"][k] / result["deepmd"][k] for k in RATIOS if result["deepmd"].get(k)}
        print(json.dumps(result["ratio_dpelt_over_deepmd"], indent=2))
        speed_rounds(args, work, result)
    write_result(args.out, result)


def earlier_rounds(result: dict) -> list[dict]:
    """The speed rounds already in a result (files written before rounds were kept: from the lists)."""
    speed = result.get("speed")
    if not speed:
        return []
    if "rounds" in speed:
        return list(speed["rounds"])
    n = len(speed["dpelt"][SPEEDS[0]]["all"]) - 1
    return [{code: {k: speed[code][k]["all"][i + 1] for k in SPEEDS} for code in ("dpelt", "deepmd")} for i in range(n)]


def speed_rounds(args, work: Path, result: dict, earlier: list[dict] | None = None) -> None:
    """--speed-rounds interleaved repeats of both codes' speed measurements into result["speed"],
    after the ``earlier`` rounds (--rounds-only adds to them)."""
    rounds = list(earlier or [])
    dates = list(result.get("speed", {}).get("rounds_dates", [])) if earlier else []
    for r in range(len(rounds), len(rounds) + args.speed_rounds):  # alternate which code goes first
        print(f"speed round {r + 1}/{len(rounds) + args.speed_rounds} ...", flush=True)
        one = {}
        for code in (("dpelt", "deepmd") if r % 2 else ("deepmd", "dpelt")):
            rdir = work / f"round{r}" / code
            if rdir.exists():
                shutil.rmtree(rdir)
            if code == "dpelt":
                one[code] = dpelt_speed_round(args.data, rdir, work / "dpelt" / "out" / "model.pt", args.threads, args.round_steps)
            else:
                one[code] = deepmd_speed_round(args.data, rdir, work / "deepmd" / "model.pth", args.threads, args.round_steps, args.venv)
        rounds.append(one)
        print(json.dumps(one), flush=True)
    dates.append(time.strftime("%Y-%m-%d %H:%M"))
    result["speed"] = speed_summary(result, rounds)
    result["speed"]["rounds"] = rounds
    result["speed"]["round_train_steps"] = args.round_steps
    result["speed"]["rounds_dates"] = dates
    print(json.dumps({k: result["speed"][k] for k in ("ratio_of_best", "ratio_of_median")}, indent=2))


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
