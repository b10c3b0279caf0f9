"""The loop's warm-start training chain replayed on a run's own data, with and without the
energy-bias fixes and the normalised loss (not a test).

usage: python bench/science/energy_warmstart.py RUN_DIR [--iterations 3] [--members 2] [--jobs 2]
           [--variants deepmd normalized ...] [--reuse-iteration0] [--out bench/science/results/energy_warmstart.json]

The loop trains member k of iteration 0 from scratch on the initial data and member k of
iteration i from member k of iteration i-1 on the initial data + the labels of iterations < i
(``train.warm_start``). This replays that chain on RUN_DIR's data (``data/init``,
``iter/*/label``) for each variant, with the run's own training input, warm-start steps and
start_lr, and the run's seeds per member: the data are held fixed, so the variants are paired.
Variants (``loss.normalize_prefactors``, refit of the energy bias before a warm start
(``--refit-bias``), ``training.change_bias_after_training``):

  deepmd          false, no,  no    DeePMD-kit / DP-GEN semantics
  normalized      true,  no,  no    dpelt's default before this study
  deepmd+refit    false, yes, no
  normalized+refit true, yes, no
  normalized+refit+after true, yes, yes
  deepmd+refit+after false, yes, yes

Reported per variant and iteration, on the run's held-out frames (data/holdout): each member's
energy RMSE (eV/atom) and its offset (mean of model − label per atom: the drift of the energy
zero), the ensemble mean's energy and force RMSE.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

VARIANTS = {
    "deepmd": (False, False, False),
    "normalized": (True, False, False),
    "deepmd+refit": (False, True, False),
    "normalized+refit": (True, True, False),
    "normalized+refit+after": (True, True, True),
    "deepmd+refit+after": (False, True, True),
}


def run_config(run: Path) -> dict:
    from pipeline.runconfig import load_run_config

    return load_run_config(run / "config" / "config.yaml")


def chain(run: str, variant: str, member: int, iterations: int, work: str, reuse: bool = False) -> list[str]:
    """Train member ``member``'s chain for ``variant``; returns the model path per iteration."""
    from pipeline.train import loop
    from pipeline.train.config import parse_train_config
    from pipeline.runconfig import train_input
    from pipeline.seeds import derive_seed

    run, work = Path(run), Path(work)
    norm, refit, after = VARIANTS[variant]
    cfg_run = run_config(run)
    t = cfg_run["train"]
    paths = []
    prev = None
    for i in range(iterations + 1):
        out = work / variant / f"{i:03d}" / str(member)
        seed = derive_seed(cfg_run["seed"], "train", i, member)  # the loop's seed of this member (rules/common.smk train_seed)
        inp = train_input(cfg_run)
        systems = [str(run / "data/init/frames.nc")] + [str(run / "iter" / f"{j:03d}" / "label" / "frames.nc") for j in range(i)]
        inp["training"] = dict(inp["training"], seed=seed, training_data=dict(inp["training"].get("training_data", {}), systems=systems))
        inp["loss"] = dict(inp["loss"], normalize_prefactors=norm)
        inp["training"]["change_bias_after_training"] = after
        cfg = parse_train_config(inp)
        if i > 0 and t["warm_start"]:
            if t["warm_start_steps"] is not None:
                cfg = replace(cfg, training=replace(cfg.training, numb_steps=t["warm_start_steps"]))
            if t["warm_start_start_lr"] is not None:
                cfg = replace(cfg, learning_rate=replace(cfg.learning_rate, start_lr=t["warm_start_start_lr"]))
        if i == 0 and reuse:  # the run's own iteration-0 member: the variants differ in the warm starts only
            prev = run / "iter" / "000" / "train" / str(member) / "model.pt"
            paths.append(str(prev))
            continue
        if not (out / "model.pt").exists():
            loop.train(cfg, out, init_model=prev if i > 0 and t["warm_start"] else None, threads=1, log=lambda s: None, refit_bias=refit)
        prev = out / "model.pt"
        paths.append(str(prev))
    return paths


def holdout_errors(models: list[str], holdout: Path) -> dict:
    from pipeline.data.io import read_systems
    from pipeline.evaluate import predict
    from pipeline.model.serialize import load_model

    ms = [load_model(p).eval() for p in models]
    per_member = [[] for _ in ms]  # (model − label) / N per frame
    mean_de, mean_df = [], []
    for ds in read_systems(holdout, type_map=ms[0].type_map, require_labels=True):
        n = ds.sizes["atom"]
        preds = [predict(m, ds) for m in ms]
        for k, p in enumerate(preds):
            per_member[k].append((p["energy"] - ds["energy"].values) / n)
        mean_de.append((np.mean([p["energy"] for p in preds], 0) - ds["energy"].values) / n)
        mean_df.append((np.mean([p["force"] for p in preds], 0) - ds["force"].values).ravel())
    de = [np.concatenate(x) for x in per_member]
    return {
        "member_energy_rmse_per_atom": [float(np.sqrt(np.mean(x**2))) for x in de],
        "member_energy_offset_per_atom": [float(np.mean(x)) for x in de],
        "ensemble_energy_rmse_per_atom": float(np.sqrt(np.mean(np.concatenate(mean_de) ** 2))),
        "ensemble_force_rmse": float(np.sqrt(np.mean(np.concatenate(mean_df) ** 2))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--iterations", type=int, default=3, help="warm-started iterations after iteration 0")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--holdout", type=Path, help="held-out frames (default: RUN_DIR/data/holdout/frames.nc)")
    ap.add_argument("--reuse-iteration0", action="store_true", help="start every variant's chain from the run's own iteration-0 members (cheaper: the variants then differ in the warm starts only)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "energy_warmstart")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "energy_warmstart.json")
    args = ap.parse_args()
    from pipeline.fileio import write_text_atomic

    run = args.run.resolve()
    for name in ("work", "out", "plot", "holdout", "bias_run"):  # the run's relative paths (init structures) are read from inside it
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).resolve())
    os.chdir(run)
    t0 = time.perf_counter()
    jobs = [(v, k) for v in args.variants for k in range(args.members)]
    with ProcessPoolExecutor(args.jobs) as pool:
        futs = {(v, k): pool.submit(chain, str(run), v, k, args.iterations, str(args.work), args.reuse_iteration0) for v, k in jobs}
        paths = {key: f.result() for key, f in futs.items()}
    results = {}
    memo: dict[tuple, dict] = {}
    for v in args.variants:
        per_iter = []
        for i in range(args.iterations + 1):
            models = tuple(paths[(v, k)][i] for k in range(args.members))
            if models not in memo:  # the shared iteration-0 members (--reuse-iteration0) are judged once
                memo[models] = holdout_errors(list(models), args.holdout or run / "data/holdout/frames.nc")
            r = dict(memo[models])
            r["iteration"] = i
            r["max_abs_member_offset_per_atom"] = max(abs(x) for x in r["member_energy_offset_per_atom"])
            per_iter.append(r)
            print(f"{v:24s} iter {i}: E ens {r['ensemble_energy_rmse_per_atom'] * 1e3:6.2f} meV/atom, members {[round(x * 1e3, 2) for x in r['member_energy_rmse_per_atom']]}, "
                  f"offsets {[round(x * 1e3, 2) for x in r['member_energy_offset_per_atom']]}, F ens {r['ensemble_force_rmse']:.4f}", flush=True)
        results[v] = per_iter
    summary = {
        v: {
            "final_ensemble_energy_rmse_per_atom": results[v][-1]["ensemble_energy_rmse_per_atom"],
            "mean_member_energy_rmse_per_atom_over_warm_iterations": statistics.mean(x for r in results[v][1:] for x in r["member_energy_rmse_per_atom"]) if len(results[v]) > 1 else None,
            "max_abs_member_offset_per_atom_over_warm_iterations": max((r["max_abs_member_offset_per_atom"] for r in results[v][1:]), default=None),
            "final_ensemble_force_rmse": results[v][-1]["ensemble_force_rmse"],
        }
        for v in args.variants
    }
    doc = {
        "what": "the loop's warm-start training chain replayed on a run's data (data fixed, paired seeds): held-out energy per member and ensemble, per variant and iteration",
        "command": "python bench/science/energy_warmstart.py " + " ".join(sys.argv[1:]),
        "run": str(run),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - t0,
        "note": "timings on a shared 2-core machine (noisy); one thread per training",
        "variants": {v: dict(zip(("normalize_prefactors", "refit_bias_on_warm_start", "change_bias_after_training"), VARIANTS[v])) for v in args.variants},
        "summary": summary,
        "per_iteration": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
