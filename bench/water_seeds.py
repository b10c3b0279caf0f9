"""Accuracy of dpelt vs DeePMD-kit on the water example over several seeds (not a test).

usage: python bench/water_seeds.py [--seeds 1 2 3] [--steps 1500] [--jobs 2] [--keep-earlier [CODE ...]] [--dpelt-first]
                                   [--data ../shared/data/water] [--venv bench/work/deepmd-venv]

One training run per code and seed, from the same input.json as bench/water.py (the DeePMD-kit
water se_e2_a example, lr schedule compressed to --steps) with ``descriptor.seed``,
``fitting_net.seed`` and ``training.seed`` all set to the seed; each run uses one thread and
--jobs runs go side by side (timings are not reported here: bench/water.py measures speed).
Each model is tested on every frame of data_3 (dpelt test / dp --pt test).

bench/results/water_seeds.json gets the per-seed energy and force RMSE of both codes, their
mean and sample standard deviation, and the ratio of the means dpelt / DeePMD-kit. One seed
per code cannot tell a 5 % difference from seed-to-seed spread; this can. Runs finished by an
earlier invocation (``result.json`` in their work directory) are reused, so adding seeds only
trains the new ones; dpelt's runs are reused only if dpelt's sources (sha256 of pipeline/)
are unchanged. ``--keep-earlier`` keeps every per-seed result already in --out (same steps),
whatever dpelt source produced it and whether or not its work directory is still there: each
keeps the source hash it was trained with, so the JSON says which code gave which seed.
``--keep-earlier deepmd`` keeps only DeePMD-kit's (dpelt's are trained again, or reused from
their work directories when dpelt's sources are unchanged).

The summary adds Welch's t statistic for the difference of the mean force RMSEs and a
bootstrap 90 % interval of the ratio of means (10 000 resamples of the seeds, fixed RNG seed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from water import water_input  # noqa: E402

from pipeline.fileio import write_text_atomic  # noqa: E402


def _deepmd_helpers():
    """bench/deepmd/run_deepmd.py (stdlib only at import): its test-output parser."""
    spec = importlib.util.spec_from_file_location("run_deepmd", HERE / "deepmd" / "run_deepmd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def seeded_input(data: Path, steps: int, seed: int) -> dict:
    cfg = water_input(data, steps)
    cfg["model"]["descriptor"]["seed"] = seed
    cfg["model"]["fitting_net"]["seed"] = seed
    cfg["training"]["seed"] = seed
    return cfg


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> None:
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")


def one_thread_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DPELT_THREADS="1", DP_INTRA_OP_PARALLELISM_THREADS="1", DP_INTER_OP_PARALLELISM_THREADS="1")


def dpelt_run(data: Path, work: Path, steps: int, seed: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(seeded_input(data, steps, seed), indent=2))
    dpelt = str(Path(sys.executable).parent / "dpelt")
    env = one_thread_env()
    t = time.perf_counter()
    _run([dpelt, "train", "input.json", "-o", "out", "--threads", "1"], work, env, work / "train.log")
    _run([dpelt, "test", "-m", "out/model.pt", "-s", str(data / "data_3"), "-o", "test.json", "--threads", "1"], work, env, work / "test.log")
    test = json.loads((work / "test.json").read_text())["overall"]
    return {"rmse_e_per_atom_eV": test["energy_rmse_per_atom"], "rmse_f_eV_per_A": test["force_rmse"], "wall_s": time.perf_counter() - t}


def deepmd_run(data: Path, work: Path, steps: int, seed: int, venv: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(seeded_input(data, steps, seed), indent=2))
    dp = str(venv / "bin" / "dp")
    env = one_thread_env()
    t = time.perf_counter()
    _run([dp, "--pt", "train", "input.json"], work, env, work / "train.log")
    _run([dp, "--pt", "freeze", "-o", "model.pth"], work, env, work / "freeze.log")
    _run([dp, "--pt", "test", "-m", "model.pth", "-s", str(data / "data_3"), "-n", "100000"], work, env, work / "test.log")
    lines = [(0.0, line) for line in (work / "test.log").read_text().splitlines()]
    test = _deepmd_helpers().parse_test(lines)
    return {"rmse_e_per_atom_eV": test["test_rmse_e_per_atom_eV"], "rmse_f_eV_per_A": test["test_rmse_f_eV_per_A"], "wall_s": time.perf_counter() - t}


def dpelt_source_sha256() -> str:
    """sha256 over dpelt's package sources: a dpelt run is reused only for the same code."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def reuse_or_run(work: Path, fn, identity: dict) -> dict:
    """A run's result.json when an earlier invocation finished it with the same ``identity``
    (steps are in the work path; dpelt's source hash here), else run it.

    More seeds can so be added to a finished study without repeating the old ones, and a
    change of dpelt's code retrains dpelt's runs (DeePMD-kit's are kept).
    """
    done = work / "result.json"
    if done.exists():
        old = json.loads(done.read_text())
        if all(old.get(k) == v for k, v in identity.items()):
            return old
    result = fn() | identity
    write_text_atomic(done, json.dumps(result) + "\n")
    return result


def summary(runs: dict) -> dict:
    out = {}
    for key in ("rmse_e_per_atom_eV", "rmse_f_eV_per_A"):
        vals = [r[key] for r in runs.values()]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "min": min(vals), "max": max(vals)}
    return out


def welch_t(a: list[float], b: list[float]) -> float:
    """Welch's t for mean(a) − mean(b) (no equal-variance assumption)."""
    se2 = statistics.variance(a) / len(a) + statistics.variance(b) / len(b)
    return (statistics.fmean(a) - statistics.fmean(b)) / se2**0.5


def bootstrap_ratio(a: list[float], b: list[float], level: float = 0.9, n: int = 10000, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of mean(a)/mean(b), resampling the seeds of each code."""
    rng = random.Random(seed)
    ratios = sorted(statistics.fmean(rng.choices(a, k=len(a))) / statistics.fmean(rng.choices(b, k=len(b))) for _ in range(n))
    lo = ratios[int((1 - level) / 2 * n)]
    hi = ratios[int((1 + level) / 2 * n) - 1]
    return [lo, hi]


def earlier_results(out: Path, steps: int) -> dict:
    """Per-seed results of an earlier invocation with the same steps, from its JSON."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    return old.get("per_seed", {}) if old.get("steps") == steps else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    ap.add_argument("--data", type=Path, default=harness.SHARED / "data" / "water")
    ap.add_argument("--venv", type=Path, default=HERE / "work" / "deepmd-venv")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "water_seeds")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "water_seeds.json")
    ap.add_argument("--dpelt-first", action="store_true", help="train dpelt's runs first (its sources may be edited once they are done)")
    ap.add_argument("--keep-earlier", nargs="*", choices=["dpelt", "deepmd"], default=None, metavar="CODE",
                    help="keep the per-seed results already in --out, of these codes (none named: both; see above)")
    args = ap.parse_args()
    if not (args.data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    if not (args.venv / "bin" / "dp").exists():
        subprocess.run(["bash", str(HERE / "deepmd" / "setup_venv.sh"), str(args.venv)], check=True)
    data = args.data.resolve()
    base = args.work.resolve() / f"steps{args.steps}"  # finished runs here are reused (see reuse_or_run)
    deepmd_jobs = [("deepmd", seed, lambda s=seed: deepmd_run(data, base / f"deepmd_seed{s}", args.steps, s, args.venv.resolve())) for seed in args.seeds]
    dpelt_jobs = [("dpelt", seed, lambda s=seed: dpelt_run(data, base / f"dpelt_seed{s}", args.steps, s)) for seed in args.seeds]
    # by default the slow DeePMD-kit runs first, so the two lanes finish together
    jobs = dpelt_jobs + deepmd_jobs if args.dpelt_first else deepmd_jobs + dpelt_jobs
    results: dict = {"dpelt": {}, "deepmd": {}}
    if args.keep_earlier is not None:
        keep = args.keep_earlier or ["dpelt", "deepmd"]
        for code, by_seed in earlier_results(args.out, args.steps).items():
            for seed, r in by_seed.items():
                if code in keep and int(seed) in args.seeds:
                    results[code][seed] = r
                    print(code, seed, "kept from", args.out, json.dumps(r), flush=True)
        jobs = [j for j in jobs if str(j[1]) not in results[j[0]]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        identity = {"dpelt": {"dpelt_source_sha256": dpelt_source_sha256()}, "deepmd": {}}
        futures = [(code, seed, pool.submit(reuse_or_run, base / f"{code}_seed{seed}", fn, identity[code])) for code, seed, fn in jobs]
        for code, seed, fut in futures:
            results[code][str(seed)] = fut.result()
            print(code, seed, json.dumps(results[code][str(seed)]), flush=True)
    results = {code: dict(sorted(by_seed.items(), key=lambda kv: int(kv[0]))) for code, by_seed in results.items()}
    result = {
        "what": "test RMSE on data_3 after the same steps, several seeds per code, water se_e2_a example input (one thread per run)",
        "command": f"python bench/water_seeds.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}" + ("" if args.keep_earlier is None else " --keep-earlier" + "".join(" " + c for c in args.keep_earlier)),
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "per_seed": results,
        "dpelt": summary(results["dpelt"]),
        "deepmd": summary(results["deepmd"]),
    }
    result["ratio_of_means_dpelt_over_deepmd"] = {
        k: result["dpelt"][k]["mean"] / result["deepmd"][k]["mean"] for k in ("rmse_e_per_atom_eV", "rmse_f_eV_per_A")
    }
    f_dpelt = [r["rmse_f_eV_per_A"] for r in results["dpelt"].values()]
    f_deepmd = [r["rmse_f_eV_per_A"] for r in results["deepmd"].values()]
    if min(len(f_dpelt), len(f_deepmd)) > 1:
        result["force_rmse_comparison"] = {
            "welch_t_dpelt_minus_deepmd": welch_t(f_dpelt, f_deepmd),
            "ratio_of_means_bootstrap_90pct": bootstrap_ratio(f_dpelt, f_deepmd),
        }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio_of_means_dpelt_over_deepmd"], indent=2))
    print(json.dumps(result.get("force_rmse_comparison"), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
