"""DeePMD-kit (CPU; PyTorch or TensorFlow backend) half of the water se_e2_a side-by-side benchmark.

Run with the python of the venv made by bench/deepmd/setup_venv.sh (``--backend pt``) or
bench/deepmd/setup_tf_venv.sh (``--backend tf``):

    VENV/bin/python bench/deepmd/run_deepmd.py --data DIR --steps N --work WORKDIR --out OUT.json \
        [--backend pt|tf] [--threads 2] [--infer-calls 100] [--md-steps 100]

DIR holds the DeePMD-kit water systems data_0..data_3 (deepmd/npy, 192 atoms per frame).
Steps, all with OMP_NUM_THREADS = DP_INTRA_OP_PARALLELISM_THREADS = --threads and
DP_INTER_OP_PARALLELISM_THREADS = 1:

1. WORKDIR/input.json: the examples/water/se_e2_a input with data_0..2 for training, data_3 for
   validation, numb_steps N and the learning-rate schedule compressed to N steps
   (decay_steps = max(1, round(N * 5000 / 1e6))).
2. `dp --pt train` (`dp --tf train`) under /usr/bin/time -v. Measured: process wall time (s), peak RSS (kB),
   start-up (s from process start to dp's "Start to train" / "start training" line and to the first "Batch 1" line)
   and steady training speed (steps/s between the first and the last logged batch, which
   includes dp's validation on 3 frames every disp_freq steps, as dp itself reports it).
3. `dp --pt freeze` (model.pth; TF: model.pb, then `dp --tf compress` to model-compressed.pb with
   its defaults: table step 0.01, extrapolate 5), then `dp test` of the frozen model on all frames
   of data_3: energy RMSE/MAE per atom (eV) and force RMSE/MAE (eV/A).
4. In this process, frame 0 of data_3: DeepPot.eval (energy, forces, virial), 5 warm-up calls
   then --infer-calls timed calls (evals/s, atom-evals/s); ASE VelocityVerlet NVE with
   deepmd.calculator.DP, dt 0.5 fs, 300 K Maxwell-Boltzmann start, 5 warm-up then --md-steps
   timed steps (steps/s, atom-steps/s); peak RSS of this process (kB).

   TF: step 4 runs on the frozen and on the compressed model (keys ``compressed_*``), and records
   the compressed - frozen force difference on that frame (``compress_force_diff_*``).

Everything is written to OUT.json (keys carry their unit); logs stay in WORKDIR.
``--mode train`` stops after step 2 (a training-speed repeat); ``--mode infer --model M`` runs
only step 4 on the frozen model M (an inference-speed repeat).
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# shared/ lies beside the repository (/work/main -> /work/shared)
EXAMPLE = (Path(__file__).resolve().parents[3] / "shared" / "reference"
           / "deepmd-water-se_e2_a.input.json")
TIME_BIN = "/usr/bin/time"
DP = str(Path(sys.executable).with_name("dp"))  # the dp next to this venv's python
WARMUP = 5
SEED = 10


def make_input(example: dict, data: Path, steps: int) -> dict:
    cfg = json.loads(json.dumps(example))  # deep copy
    cfg["model"]["descriptor"]["seed"] = 1
    cfg["model"]["fitting_net"]["seed"] = 1
    cfg["learning_rate"]["decay_steps"] = max(1, round(steps * 5000 / 1e6))
    tr = cfg["training"]
    tr["training_data"]["systems"] = [str(data / f"data_{i}") for i in range(3)]
    tr["validation_data"].update(systems=[str(data / "data_3")], batch_size=1, numb_btch=3)
    tr.update(numb_steps=steps, disp_freq=min(100, steps), save_freq=steps, seed=SEED)
    return cfg


def run_logged(cmd: list, work: Path, name: str, env: dict) -> dict:
    """Run cmd in work, tee its output to work/name.log with the time each line arrived.

    Returns wall time (s), peak RSS (kB), CPU share (%) and the [(t_since_start, line)] list.
    """
    time_file = work / f"{name}.time"
    have_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-v", "-o", str(time_file)] + cmd if have_time else cmd
    print("+", " ".join(cmd), flush=True)
    lines = []
    t0 = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(full, cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
            log.write(line)
        rc = proc.wait()
    wall = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}); see {work / (name + '.log')}")
    if have_time:
        text = time_file.read_text()
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
        cpu = float(re.search(r"Percent of CPU this job got: (\d+)%", text).group(1))
    else:  # max over all children waited for so far, not just this one
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cpu = None
    return {"wall_s": wall, "peak_rss_kb": rss, "cpu_percent": cpu, "lines": lines}


def first_time(lines, pattern: str):
    return next((t for t, line in lines if re.search(pattern, line)), None)


def train_speed(lines) -> dict:
    """Training speed from the per-disp_freq 'Batch N: total wall time' log lines."""
    batches = [(int(m.group(1)), t) for t, line in lines
               if (m := re.search(r"Batch\s+(\d+): total wall time", line))]
    out = {"train_logged_batches": [b for b, _ in batches]}
    if len(batches) >= 2:
        (b0, t0), (b1, t1) = batches[0], batches[-1]
        out["train_steps_per_s"] = (b1 - b0) / (t1 - t0)
        out["train_s_per_step"] = (t1 - t0) / (b1 - b0)
        out["train_steps_window"] = [b0, b1]
    avg = [m.group(1) for _, line in lines
           if (m := re.search(r"average training time: ([\d.]+) s/batch", line))]
    out["train_dp_reported_s_per_step"] = float(avg[-1]) if avg else None
    return out


def parse_test(lines) -> dict:
    text = "\n".join(line for _, line in lines)
    keys = {"test_rmse_e_per_atom_eV": r"Energy RMSE/Natoms\s*:\s*(\S+)",
            "test_mae_e_per_atom_eV": r"Energy MAE/Natoms\s*:\s*(\S+)",
            "test_rmse_f_eV_per_A": r"Force\s+RMSE\s*:\s*(\S+)",
            "test_mae_f_eV_per_A": r"Force\s+MAE\s*:\s*(\S+)",
            "test_frames": r"number of test data\s*:\s*(\d+)"}
    out = {k: float(re.findall(p, text)[-1]) for k, p in keys.items()}
    out["test_frames"] = int(out["test_frames"])
    return out


def bench_inference(model: Path, system: Path, n_calls: int, n_md: int) -> dict:
    import numpy as np
    import deepmd
    from ase import Atoms, units
    try:  # Maxwell-Boltzmann momenta; MaxwellBoltzmannDistribution is deprecated in ASE 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from deepmd.calculator import DP as DPCalculator
    from deepmd.infer import DeepPot

    coord = np.load(system / "set.000" / "coord.npy")[:1].astype(np.float64)
    box = np.load(system / "set.000" / "box.npy")[:1].astype(np.float64)
    atype = np.loadtxt(system / "type.raw", dtype=int)
    type_map = (system / "type_map.raw").read_text().split()
    natoms = len(atype)

    t = time.perf_counter()
    pot = DeepPot(str(model))
    load_s = time.perf_counter() - t
    for _ in range(WARMUP):
        pot.eval(coord, box, atype)
    t = time.perf_counter()
    for _ in range(n_calls):
        energy, force, virial = pot.eval(coord, box, atype)
    eval_s = time.perf_counter() - t

    atoms = Atoms([type_map[i] for i in atype], positions=coord.reshape(-1, 3),
                  cell=box.reshape(3, 3), pbc=True)
    atoms.calc = DPCalculator(str(model))
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(SEED))
    md = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    md.run(WARMUP)
    e_start = atoms.get_total_energy()
    t = time.perf_counter()
    md.run(n_md)
    md_s = time.perf_counter() - t

    return {
        "deepmd_version": deepmd.__version__,
        "deepmd_backend": model.suffix,
        "infer_natoms": natoms,
        "infer_model_load_s": load_s,
        "infer_calls": n_calls,
        "infer_s_per_eval": eval_s / n_calls,
        "infer_evals_per_s": n_calls / eval_s,
        "infer_atom_evals_per_s": n_calls * natoms / eval_s,
        "infer_frame0_energy_eV": float(energy.ravel()[0]),
        "md_steps": n_md,
        "md_timestep_fs": 0.5,
        "md_s_per_step": md_s / n_md,
        "md_steps_per_s": n_md / md_s,
        "md_atom_steps_per_s": n_md * natoms / md_s,
        "md_energy_drift_eV_per_atom": (atoms.get_total_energy() - e_start) / natoms,
        "md_final_temperature_K": atoms.get_temperature(),
        "infer_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="directory with data_0..data_3")
    ap.add_argument("--steps", type=int, required=True, help="training steps")
    ap.add_argument("--work", type=Path, required=True, help="work directory (created)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--infer-calls", type=int, default=100)
    ap.add_argument("--md-steps", type=int, default=100)
    ap.add_argument("--example", type=Path, default=EXAMPLE,
                    help="water se_e2_a example input.json (default: %(default)s)")
    ap.add_argument("--mode", choices=["all", "train", "infer"], default="all",
                    help="train: only step 2 (training speed); infer: only step 4 on --model")
    ap.add_argument("--model", type=Path, help="frozen model for --mode infer")
    ap.add_argument("--backend", choices=["pt", "tf"], default="pt", help="DeePMD-kit backend (the venv must have it)")
    args = ap.parse_args()
    data, work = args.data.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not shutil.which(DP):
        sys.exit(f"{DP} not found: run this script with the DeePMD-kit venv's python")

    threads = {"OMP_NUM_THREADS": str(args.threads),
               "DP_INTRA_OP_PARALLELISM_THREADS": str(args.threads),
               "DP_INTER_OP_PARALLELISM_THREADS": "1"}
    os.environ.update(threads)  # also for the in-process inference (set before importing torch/TF)
    env = dict(os.environ)

    if args.mode == "infer":  # a repeat of step 4 only, for interleaved timing rounds
        res = {"threads": args.threads, "loadavg_1min_before": os.getloadavg()[0]}
        res.update(bench_inference(args.model.resolve(), data / "data_3", args.infer_calls, args.md_steps))
        write_result(args.out, res)
        return

    cfg = make_input(json.loads(args.example.read_text()), data, args.steps)
    (work / "input.json").write_text(json.dumps(cfg, indent=2) + "\n")

    res = {"threads": args.threads, "backend": args.backend, "loadavg_1min_before": os.getloadavg()[0],
           "train_steps": args.steps,
           "train_decay_steps": cfg["learning_rate"]["decay_steps"],
           "train_disp_freq": cfg["training"]["disp_freq"]}
    flag = f"--{args.backend}"
    train = run_logged([DP, flag, "train", "input.json"], work, "train", env)
    lines = train["lines"]
    res.update(train_wall_s=train["wall_s"], train_peak_rss_kb=train["peak_rss_kb"],
               train_cpu_percent=train["cpu_percent"],
               train_startup_s=first_time(lines, r"Start to train|start training at lr"),
               train_to_first_batch_s=first_time(lines, r"Batch\s+1: total wall time"),
               train_neighbor_stat_done_s=first_time(lines, r"Neighbor statistics: training"))
    res.update(train_speed(lines))
    if args.mode == "train":
        write_result(args.out, res)
        return

    model = work / ("model.pth" if args.backend == "pt" else "model.pb")
    freeze = run_logged([DP, flag, "freeze", "-o", model.name], work, "freeze", env)
    res["freeze_wall_s"] = freeze["wall_s"]
    res.update(test_model(model, data, work, flag, env, ""))
    print("+ in-process DeepPot.eval and ASE MD timing", flush=True)
    res.update(bench_inference(model, data / "data_3", args.infer_calls, args.md_steps))
    if args.backend == "tf":
        compressed = work / "model-compressed.pb"
        comp = run_logged([DP, flag, "compress", "-i", model.name, "-o", compressed.name], work, "compress", env)
        res["compress_wall_s"] = comp["wall_s"]  # its accuracy is the frozen model's (compression_error)
        res.update(compression_error(model, compressed, data / "data_3"))
        print("+ in-process DeepPot.eval and ASE MD timing, compressed", flush=True)
        inf = bench_inference(compressed, data / "data_3", args.infer_calls, args.md_steps)
        res.update({f"compressed_{k}": v for k, v in inf.items()})

    res["loadavg_1min_after"] = os.getloadavg()[0]  # > threads means other jobs competed
    write_result(args.out, res)


def test_model(model: Path, data: Path, work: Path, flag: str, env: dict, prefix: str) -> dict:
    """`dp test` of MODEL on every frame of data_3: the parse_test keys, prefixed."""
    test = run_logged([DP, flag, "test", "-m", model.name, "-s", str(data / "data_3"),
                       "-n", "100000"], work, f"{prefix}test", env)
    out = {"test_wall_s": test["wall_s"], "test_peak_rss_kb": test["peak_rss_kb"], **parse_test(test["lines"])}
    return {prefix + k: v for k, v in out.items()}


def compression_error(frozen: Path, compressed: Path, system: Path) -> dict:
    """Compressed - frozen energy and forces on the first 10 frames of SYSTEM (eV, eV/A)."""
    import numpy as np
    from deepmd.infer import DeepPot

    coord = np.load(system / "set.000" / "coord.npy")[:10]
    box = np.load(system / "set.000" / "box.npy")[:10]
    atype = np.loadtxt(system / "type.raw", dtype=int)
    (e0, f0, _), (e1, f1, _) = (DeepPot(str(m)).eval(coord, box, atype)[:3] for m in (frozen, compressed))
    df = (np.asarray(f1) - np.asarray(f0)).ravel()
    return {"compress_energy_diff_max_eV": float(np.abs(np.asarray(e1) - np.asarray(e0)).max()),
            "compress_force_diff_rmse_eV_per_A": float(np.sqrt(np.mean(df ** 2))),
            "compress_force_diff_max_eV_per_A": float(np.abs(df).max())}


def write_result(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
