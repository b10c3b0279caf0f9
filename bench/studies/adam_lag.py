"""How far Adam's steps fall below the learning rate in a short schedule (not a test).

usage: python bench/adam_lag.py [--steps 1500] [--every 100] [--seed 1] [--data ../shared/data/water]

Trains the water example (bench/water_seeds.py's input, schedule compressed to --steps) twice
from the same seed, with ``loss.normalize_prefactors`` true (dpelt) and false (DeePMD-kit's
loss scale), one thread each, side by side. Every --every steps it reads Adam's state and
records the mean size of the update m̂/(√v̂ + ε) over all parameters: the step each parameter
takes, in units of the learning rate (1 when the recent gradients are as large as the ones v̂
remembers; Adam's first step is exactly 1). Writes bench/results/adam_lag.json: per step the
learning rate, both sizes, their ratio and the validation force RMSE of both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/studies
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ for water_seeds

from pipeline.fileio import write_text_atomic  # noqa: E402

FLAGS = {"normalized": True, "deepmd": False}


def worker(loss: str, seed: int, steps: int, every: int, data: Path, out: Path) -> None:
    from water_seeds import seeded_input

    from pipeline.train import loop
    from pipeline.train.config import parse_train_config

    cfg = seeded_input(data, steps, seed)
    cfg["training"] |= {"disp_freq": every, "save_freq": every}
    cfg = parse_train_config(cfg, base=Path("."))
    cfg = replace(cfg, loss=replace(cfg.loss, normalize_prefactors=FLAGS[loss]))
    sizes = {}
    write_checkpoint = loop._checkpoint

    def recording(path, model, c, opt, step, *rest, **kw):
        sizes[int(step)] = loop.adam_update_size(opt.state_dict())
        write_checkpoint(path, model, c, opt, step, *rest, **kw)

    loop._checkpoint = recording
    loop.train(cfg, out / "train", threads=1, log=lambda s: None)
    lcurve = [line.split(",") for line in (out / "train" / "lcurve.csv").read_text().splitlines()]
    cols = lcurve[0]
    rows = {int(float(r[0])): dict(zip(cols, map(float, r))) for r in lcurve[1:]}
    result = {str(s): {"lr": rows[s]["lr"], "update_in_lr_units": u, "rmse_f_val": rows[s]["rmse_f_val"]} for s, u in sorted(sizes.items()) if s in rows}
    write_text_atomic(out / "result.json", json.dumps(result) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "adam_lag")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "adam_lag.json")
    ap.add_argument("--worker", nargs=2, metavar=("LOSS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.data.resolve()
    if not (data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    if args.worker:
        worker(args.worker[0], args.seed, args.steps, args.every, data, Path(args.worker[1]))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", DPELT_THREADS="1")

    def run(loss: str) -> dict:
        out = args.work.resolve() / f"{loss}_seed{args.seed}_steps{args.steps}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log", "w") as log:
            cmd = [sys.executable, __file__, "--worker", loss, str(out), "--steps", str(args.steps), "--every", str(args.every), "--seed", str(args.seed), "--data", str(data)]
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        return json.loads((out / "result.json").read_text())

    with ThreadPoolExecutor(2) as pool:
        ours, theirs = pool.map(run, FLAGS)
    per_step = {
        s: {
            "lr": ours[s]["lr"],
            "update_in_lr_units_normalized": ours[s]["update_in_lr_units"],
            "update_in_lr_units_deepmd": theirs[s]["update_in_lr_units"],
            "ratio_normalized_over_deepmd": ours[s]["update_in_lr_units"] / theirs[s]["update_in_lr_units"],
            "rmse_f_val_normalized": ours[s]["rmse_f_val"],
            "rmse_f_val_deepmd": theirs[s]["rmse_f_val"],
        }
        for s in ours
    }
    result = {
        "what": "water example, Adam's mean update |m̂/(√v̂+ε)| in units of the learning rate, loss.normalize_prefactors true vs false, same seed, one thread per run",
        "command": f"python bench/adam_lag.py --steps {args.steps} --every {args.every} --seed {args.seed}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "per_step": per_step,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for s, r in per_step.items():
        print(s, f"lr {r['lr']:.2e}  update/lr normalised {r['update_in_lr_units_normalized']:.3f}  DeePMD-kit scale {r['update_in_lr_units_deepmd']:.3f}  "
              f"ratio {r['ratio_normalized_over_deepmd']:.1f}  F val {r['rmse_f_val_normalized']:.3f} / {r['rmse_f_val_deepmd']:.3f}")


if __name__ == "__main__":
    main()
