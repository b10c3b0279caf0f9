"""dpelt's normalised loss against DeePMD-kit's loss scale, same seeds, paired (not a test).

usage: python bench/loss_scale.py [--seeds 1 … 12] [--steps 1000 3000] [--jobs 2]

``loss.normalize_prefactors`` (default true) divides the loss by p_e + p_f + p_v so that Adam's
steps follow the learning rate when the prefactors move fast (see pipeline/train/loss.py);
``false`` is DeePMD-kit's loss. Both train the 32-atom EMT copper case of
bench/fitting_start.py (this project's default model: start_lr 5e-3 → 1e-5, decay_steps 100;
3000 steps is the default loop's numb_steps) from the same seed, so each seed gives a paired
difference. Each run uses one thread. Writes bench/results/loss_scale.json: per run the test
force and energy RMSE on 6 frames at 600 K, per step count the means, the ratio normalised /
DeePMD-kit, and on how many seeds the normalised loss gave the lower force RMSE. The water
example (DeePMD-kit vs dpelt, 15 seeds) is bench/water_seeds.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fitting_start import case_config, copper_data  # noqa: E402

from pipeline.fileio import write_text_atomic  # noqa: E402

LOSSES = {"normalized": True, "deepmd": False}


def worker(loss: str, seed: int, steps: int, data: Path, out: Path) -> None:
    from pipeline.evaluate import test_model
    from pipeline.model.serialize import load_model
    from pipeline.train import loop

    cfg, tests = case_config("copper", seed, steps, data)
    cfg = replace(cfg, loss=replace(cfg.loss, normalize_prefactors=LOSSES[loss]))
    t = time.perf_counter()
    path = loop.train(cfg, out / "train", threads=1, log=lambda s: None)
    overall = test_model(load_model(path).eval(), [str(p) for p in tests])["overall"]
    result = {"force_rmse": overall["force_rmse"], "energy_rmse_per_atom": overall["energy_rmse_per_atom"], "wall_s": time.perf_counter() - t}
    write_text_atomic(out / "result.json", json.dumps(result) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 13)))
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "loss_scale")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "loss_scale.json")
    ap.add_argument("--worker", nargs=4, metavar=("LOSS", "SEED", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work.resolve()
    data = copper_data(work / "copper_data")
    if args.worker:
        loss, seed, steps, out = args.worker
        worker(loss, int(seed), int(steps), data, Path(out))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", DPELT_THREADS="1")

    def run(loss: str, seed: int, steps: int) -> dict:
        out = work / f"steps{steps}" / f"{loss}_seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log", "w") as log:
            cmd = [sys.executable, __file__, "--worker", loss, str(seed), str(steps), str(out), "--work", str(work)]
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        return json.loads((out / "result.json").read_text())

    jobs = [(loss, seed, steps) for steps in args.steps for seed in args.seeds for loss in LOSSES]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run(*j), jobs))
    runs: dict = {}
    for (loss, seed, steps), r in zip(jobs, done):
        runs.setdefault(str(steps), {}).setdefault(loss, {})[str(seed)] = r
        print(steps, loss, seed, json.dumps(r), flush=True)
    summary: dict = {}
    for steps, by_loss in runs.items():
        ours, theirs = by_loss["normalized"], by_loss["deepmd"]
        row = {}
        for key in ("force_rmse", "energy_rmse_per_atom"):
            a = [ours[s][key] for s in ours]
            b = [theirs[s][key] for s in ours]
            row[key] = {"normalized_mean": statistics.fmean(a), "deepmd_mean": statistics.fmean(b), "ratio_of_means": statistics.fmean(a) / statistics.fmean(b),
                        "seeds_lower_with_normalized": sum(x < y for x, y in zip(a, b)), "seeds": len(a)}
        summary[steps] = row
    result = {
        "what": "EMT copper (32 atoms), test RMSE after the same steps with loss.normalize_prefactors true (normalized) and false (DeePMD-kit's loss scale), same seeds, one thread per run",
        "command": f"python bench/loss_scale.py --seeds {' '.join(map(str, args.seeds))} --steps {' '.join(map(str, args.steps))}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
