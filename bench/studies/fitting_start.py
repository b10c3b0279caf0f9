"""Starting points for the fitting nets, tried against DeePMD-kit's random start (not a test).

usage: python bench/fitting_start.py [--seeds 1 2] [--cases water copper] [--water-steps 500]
                                    [--copper-steps 1000] [--starts ...] [--jobs 2] [--data ../shared/data/water]

dpelt starts every layer as DeePMD-kit does (weights of standard deviation 1/sqrt(n_in + n_out),
biases 1). The descriptor entries the fitting nets read are small and vary little between
atoms, so the first fitting layer starts bias-dominated. This script measures three
data-dependent starts that look like fixes, on two cases, each run on one thread:

* ``silent_output``: the output layer's weights start at 0 (the initial model predicts the
  least-squares energy bias and zero forces);
* ``standardised``: the first fitting layer is rescaled so that it sees every descriptor entry
  standardised over the statistics frames (W_j ← W_j/σ_j, b ← b − Σ_j μ_j W_j/σ_j), plus
  ``silent_output``;
* ``unit_rms``: the same with one scale per element, the root mean square of its descriptor
  entries, instead of σ_j, plus ``silent_output``;
* ``standardised_only``, ``unit_rms_only``: the same rescaling, output layer left random;
* ``residual_bias``: the energy bias is fitted to what the random nets leave unexplained
  (labels minus the nets' initial energies, on the first 10 frames of each system), so the
  initial model has no mean energy error;
* ``random_output_bias``: the output layers' biases start random, N(0, 1) eV, like the other
  layers' (DeePMD-kit's fitting nets do this; dpelt starts them at zero);
* ``centred``: only the mean is taken out (b ← b − Σ_j μ_j W_j), weights and output layer
  untouched, so the first layer's random offset W·μ is gone but its sensitivity is unchanged.

Cases: ``water`` (DeePMD-kit's water se_e2_a input, schedule compressed to --water-steps,
test on data_3) and ``copper`` (32-atom EMT copper at 300/900 K, this project's default run's
model: rcut 6, neuron [8, 16, 32], axis_neuron 8, fitting [64, 64, 64], start_lr 5e-3 → 1e-5
over --copper-steps, test on 6 frames at 600 K). Writes bench/results/fitting_start.json:
per run the test force and energy RMSE, and per case and start the mean ratio to DeePMD-kit's
start. (The variants are applied by wrapping the training loop's statistics step here; they
are not in the package, because none of them helps in both cases.)
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
from pathlib import Path

from pipeline.fileio import write_text_atomic

HERE = Path(__file__).resolve().parent  # bench/studies
ROOT = HERE.parents[1]
STARTS = ("deepmd", "silent_output", "standardised", "unit_rms", "standardised_only", "unit_rms_only", "centred", "residual_bias", "random_output_bias")


def copper_data(where: Path) -> Path:
    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames

    where.mkdir(parents=True, exist_ok=True)
    if not (where / "valid.nc").exists():
        write_frames(where / "train.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=12, seed=1))
        write_frames(where / "valid.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(600,), frames_per_temperature=6, seed=2))
    return where


def case_config(case: str, seed: int, steps: int, data: Path):
    """(TrainConfig, test systems) of one case."""
    from pipeline.train.config import parse_train_config

    if case == "water":
        sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ for water_seeds
        from water_seeds import seeded_input

        cfg = seeded_input(data, steps, seed)
        cfg["training"]["disp_freq"] = steps
        return parse_train_config(cfg, base=Path(".")), [data / "data_3"]
    cfg = {
        "model": {
            "type_map": ["Cu"],
            "descriptor": {"sel": "auto", "rcut": 6.0, "rcut_smth": 4.0, "neuron": [8, 16, 32], "axis_neuron": 8, "type_one_side": True, "seed": seed},
            "fitting_net": {"neuron": [64, 64, 64], "seed": seed},
        },
        "learning_rate": {"start_lr": 5e-3, "stop_lr": 1e-5, "decay_steps": 100},
        "loss": {"start_pref_v": 0.02, "limit_pref_v": 1.0},
        "training": {
            "training_data": {"systems": [str(data / "train.nc")]},
            "validation_data": {"systems": [str(data / "valid.nc")], "numb_btch": 3},
            "numb_steps": steps,
            "seed": seed,
            "disp_freq": steps,
            "save_freq": steps,
        },
    }
    return parse_train_config(cfg), [data / "valid.nc"]


def apply_start(model, systems, start: str) -> None:
    """Change the fitting nets' start after davg/dstd and the energy bias are set."""
    import torch

    if start == "deepmd":
        return
    if start == "random_output_bias":
        g = torch.Generator().manual_seed(int(model.fitting.nets[0].layers[0].weight.detach().abs().sum() * 1e6) % 2**31)  # from the seeded start
        with torch.no_grad():
            for net in model.fitting.nets:
                bias = net.layers[-1].bias
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype))
        return
    if start == "residual_bias":
        import numpy as np

        from pipeline.model.stats import fit_energy_bias

        counts, residual = [], []
        with torch.no_grad():
            model.fitting.bias_atom_e.zero_()
            for s in systems:
                frames = list(range(min(10, s.nframes)))
                b = s.batch(frames)
                e_net = model.forward_rij(b.rij, b.nlist, b.atype, False, False, False, b.partner)["energy"]  # [nf] eV
                counts.append(np.tile(np.bincount(s.atype.numpy(), minlength=model.ntypes), (len(frames), 1)))
                residual.append(s.energy.numpy()[frames] - e_net.numpy())
            bias = fit_energy_bias(np.concatenate(counts), np.concatenate(residual))
            model.fitting.bias_atom_e.copy_(torch.as_tensor(bias, dtype=model.fitting.bias_atom_e.dtype))
        print(f"initial net energy per atom {float(e_net.mean()) / s.natoms:.3f} eV; bias {bias}", file=sys.stderr)
        return
    with torch.no_grad():
        if start != "silent_output":
            rows = [[] for _ in range(model.ntypes)]
            for s in systems:
                b = s.batch(list(range(min(10, s.nframes))))  # the first 10 frames of each system
                d = model.descriptor(b.rij, b.atype, None, None).to(torch.float64)  # [nf, nloc, dim]
                for t in range(model.ntypes):
                    rows[t].append(d[:, b.atype == t].reshape(-1, d.shape[-1]))
            for t, net in enumerate(model.fitting.nets):
                if not rows[t]:
                    continue
                x = torch.cat(rows[t])  # [n, dim]
                mean = x.mean(0)
                if start.startswith("standardised"):
                    sd = x.std(0)
                    scale = torch.clamp(sd, min=1e-3 * float(sd.pow(2).mean().sqrt()))
                elif start == "centred":
                    scale = torch.ones_like(mean)
                else:
                    scale = torch.full_like(mean, float(x.pow(2).mean().sqrt()))
                layer = net.layers[0]
                layer.weight.div_(scale.to(layer.weight.dtype)[:, None])
                layer.bias.sub_(mean.to(layer.weight.dtype) @ layer.weight)
                print(f"type {t}: descriptor |mean| {float(mean.abs().mean()):.3g}, std {float(x.std(0).mean()):.3g}, rms {float(x.pow(2).mean().sqrt()):.3g}", file=sys.stderr)
        if start.endswith("_only") or start == "centred":
            return
        for net in model.fitting.nets:
            net.layers[-1].weight.zero_()
            net.layers[-1].bias.zero_()


def worker(case: str, start: str, seed: int, steps: int, data: Path, out: Path) -> None:
    from pipeline.evaluate import test_model
    from pipeline.train import loop

    cfg, tests = case_config(case, seed, steps, data)
    captured = {}
    statistics_step = loop.compute_statistics

    def with_start(model, mcfg, systems, s):
        statistics_step(model, mcfg, systems, s)
        apply_start(model, systems, start)
        captured["model"] = model

    loop.compute_statistics = with_start
    t = time.perf_counter()
    loop.train(cfg, out / "train", threads=1, log=lambda s: None)
    model = captured["model"].eval()
    overall = test_model(model, [str(p) for p in tests])["overall"]
    result = {"force_rmse": overall["force_rmse"], "energy_rmse_per_atom": overall["energy_rmse_per_atom"], "wall_s": time.perf_counter() - t}
    (out / "result.json").write_text(json.dumps(result) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cases", nargs="+", choices=["water", "copper"], default=["water", "copper"])
    ap.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS[:4]), help="starts to run (deepmd is always run: it is the reference)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--water-steps", type=int, default=500)
    ap.add_argument("--copper-steps", type=int, default=1000)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "fitting_start")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fitting_start.json")
    ap.add_argument("--worker", nargs=4, metavar=("CASE", "START", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work.resolve()
    cases = {"copper": (copper_data(work / "copper_data"), args.copper_steps)} if "copper" in args.cases else {}
    if "water" in args.cases and (args.data / "data_0" / "type.raw").exists():
        cases["water"] = (args.data.resolve(), args.water_steps)
    elif "water" in args.cases:
        print(f"water data not found at {args.data}: no water case", file=sys.stderr)
    if args.worker:
        case, start, seed, out = args.worker
        data, steps = cases[case]
        worker(case, start, int(seed), steps, data, Path(out))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", DPELT_THREADS="1")

    def run(case: str, start: str, seed: int) -> dict:
        out = work / case / f"{start}_seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log", "w") as log:
            worker_cmd = [sys.executable, __file__, "--worker", case, start, str(seed), str(out), "--data", str(args.data), "--work", str(work),
                          "--water-steps", str(args.water_steps), "--copper-steps", str(args.copper_steps)]
            subprocess.run(worker_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        return json.loads((out / "result.json").read_text())

    starts = ["deepmd"] + [s for s in args.starts if s != "deepmd"]
    jobs = [(c, s, seed) for c in cases for s in starts for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run(*j), jobs))
    runs: dict = {}
    for (c, s, seed), r in zip(jobs, done):
        runs.setdefault(c, {}).setdefault(s, {})[str(seed)] = r
        print(c, s, seed, json.dumps(r), flush=True)
    summary: dict = {}
    for c, by_start in runs.items():
        summary[c] = {}
        for s, by_seed in by_start.items():
            f = statistics.fmean(r["force_rmse"] for r in by_seed.values())
            e = statistics.fmean(r["energy_rmse_per_atom"] for r in by_seed.values())
            f0 = statistics.fmean(r["force_rmse"] for r in by_start["deepmd"].values())
            e0 = statistics.fmean(r["energy_rmse_per_atom"] for r in by_start["deepmd"].values())
            summary[c][s] = {"force_rmse_mean": f, "energy_rmse_per_atom_mean": e, "force_ratio_to_deepmd_start": f / f0, "energy_ratio_to_deepmd_start": e / e0}
    result = {
        "what": "test RMSE after the same steps from four starting points of the fitting nets (one thread per run)",
        "command": f"python bench/fitting_start.py --seeds {' '.join(map(str, args.seeds))} --cases {' '.join(args.cases)} --starts {' '.join(starts)} --water-steps {args.water_steps} --copper-steps {args.copper_steps}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
