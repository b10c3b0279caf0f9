"""Speed under load: N copies of a water training (and of water MD) at T threads each, sharing the
cores, against one copy alone (not a test).

usage: python bench/oversubscription.py [--copies 2] [--threads 2] [--seconds 15] [--rounds 3]
                                        [--kinds train md] [--policies dpelt spin]

A copy is one process (``--worker``): the water example's model (bench/water_seeds.py's input,
seed 1; the same as bench/train_step_ab.py) built in-process, 3 warm-up steps, then as many
training steps (forward, forces, loss backward, Adam) -- or ASE VelocityVerlet MD steps on the
192-atom box through DeepPotCalculator -- as fit in --seconds. The copies of a case start their
timed window together (each waits for all to be warmed up), so they overlap for the whole window.

Policies (the OpenMP wait policy each copy's environment gets):
* ``dpelt``: nothing set; dpelt's own default applies (pipeline/runtime.py: OMP_WAIT_POLICY=PASSIVE);
* ``spin``: GOMP_SPINCOUNT=300000, libgomp's default, what dpelt ran with before;
* ``short-spin``: GOMP_SPINCOUNT=10000 (a compromise, for comparison).
``--kinds deepmd-tf-train`` adds DeePMD-kit's TF backend as the reference (N copies of a
`dp --tf train` of --tf-steps steps; it runs with its own threading, so policy ``own``).

Each round runs, for every policy and kind (order rotating between rounds), the copy alone and
then N copies side by side. Reported per case: steps/s alone, per copy, and their ratio
(per copy / alone; 1/N is fair sharing of fully used cores when N * T exceeds the CPUs), best
and median over rounds. The machine may carry other load: its load average is recorded per round.
Writes bench/results/oversubscription.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

POLICIES = {"dpelt": {}, "spin": {"GOMP_SPINCOUNT": "300000"}, "short-spin": {"GOMP_SPINCOUNT": "10000"}}
WARMUP = 3
SUMMARY_KEYS = ["alone_steps_per_s", "per_copy_steps_per_s", "ratio", "alone_cpu_ms_per_step", "per_copy_cpu_ms_per_step"]


def worker(kind: str, threads: int, seconds: float, ready: Path, copies: int, data: Path) -> dict:
    """One copy: build, warm up, wait for the other copies, then time steps for ``seconds``."""
    import pipeline  # noqa: F401  (first: dpelt's OpenMP environment, as in a job process)
    from train_step_ab import build

    cfg, model, systems, sampler, params, opt = build(data, threads)
    step = train_stepper(cfg, model, systems, sampler, params, opt) if kind == "train" else md_stepper(model, data, threads)
    for i in range(WARMUP):
        step(i)
    ready.mkdir(parents=True, exist_ok=True)
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < copies:
        time.sleep(0.005)
    t0, n, cpu0 = time.perf_counter(), 0, time.process_time()
    while time.perf_counter() - t0 < seconds:
        step(WARMUP + n)
        n += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # all threads of this process
    return {"steps": n, "steps_per_s": n / wall, "cpu_per_wall": cpu / wall, "cpu_ms_per_step": 1e3 * cpu / max(n, 1)}


def train_stepper(cfg, model, systems, sampler, params, opt):
    import torch

    from pipeline.model.embedding_kernel import parameter_gradients_only
    from pipeline.train.loss import energy_loss, prefactors

    pref = prefactors(cfg.loss, 1e-3, 1e-3)

    def step(i: int) -> None:
        k, frames = sampler.next(i)
        b = systems[k].batch(frames)
        with parameter_gradients_only():
            pred = model.forward_rij(b.rij, b.nlist, b.atype, True, False, True, b.partner)
        loss, _ = energy_loss(pred, b.energy, b.force, None, b.natoms, pref)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=params)
        opt.step()

    return step


def md_stepper(model, data: Path, threads: int):
    import numpy as np
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    from pipeline.calculator import DeepPotCalculator
    from pipeline.data.ase_io import frames_to_atoms
    from pipeline.data.io import read_systems

    (ds,) = read_systems(str(data / "data_3"))
    atoms = frames_to_atoms(ds.isel(frame=[0]))[0]
    atoms.calc = DeepPotCalculator(model.eval().requires_grad_(False), threads=threads)
    thermalize_momenta(atoms, temperature_K=300.0, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(atoms, timestep=0.5 * fs)
    return lambda i: dyn.run(1)


def deepmd_tf_case(copies: int, args, work: Path) -> list[dict]:
    """``copies`` DeePMD-kit TF trainings (`dp --tf train`, --tf-steps steps) side by side: steps/s
    between their first and last logged batch (start-up excluded; the copies start together, so
    their timed windows overlap for most of their length)."""
    tag = f"tf-{copies}-{time.monotonic_ns()}"
    cmds = [[str(args.tf_venv / "bin" / "python"), str(HERE / "deepmd" / "run_deepmd.py"), "--backend", "tf", "--mode", "train",
             "--data", str(args.data), "--steps", str(args.tf_steps), "--work", str(work / tag / str(i)), "--out", str(work / tag / f"{i}.json"),
             "--threads", str(args.threads), "--example", str(harness.SHARED / "reference" / "deepmd-water-se_e2_a.input.json")] for i in range(copies)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        tail = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"dp --tf train failed (exit {p.returncode}):\n{tail[-2000:]}")
    return [{"steps_per_s": json.loads((work / tag / f"{i}.json").read_text())["train_steps_per_s"]} for i in range(copies)]


def run_case(kind: str, policy: str, copies: int, args, work: Path) -> list[dict]:
    """``copies`` workers side by side; their results."""
    if kind == "deepmd-tf-train":
        return deepmd_tf_case(copies, args, work)
    ready = work / f"ready-{kind}-{policy}-{copies}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy], OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--seconds", str(args.seconds),
           "--ready", str(ready), "--copies", str(copies), "--data", str(args.data)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed (exit {p.returncode}):\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15.0, help="timed window of every copy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", nargs="+", default=["train", "md"], choices=["train", "md", "deepmd-tf-train"],
                    help="deepmd-tf-train: DeePMD-kit TF trainings of --tf-steps steps (its own threads; policies do not apply)")
    ap.add_argument("--tf-steps", type=int, default=100)
    ap.add_argument("--tf-venv", type=Path, default=Path("/root/.cache/dpelt/deepmd-tf-venv"))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--data", type=Path, default=harness.SHARED / "data" / "water")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "oversubscription")
    ap.add_argument("--out", type=Path, default=harness.RESULTS / "oversubscription.json")
    ap.add_argument("--worker", choices=["train", "md"], help=argparse.SUPPRESS)
    ap.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.data = args.data.resolve()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.seconds, args.ready, args.copies, args.data)))
        return
    if not (args.data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    cases = {}
    for kind in args.kinds:
        for policy in (args.policies if kind != "deepmd-tf-train" else ["own"]):
            def case(r, kind=kind, policy=policy):
                alone = run_case(kind, policy, 1, args, args.work)[0]
                shared = run_case(kind, policy, args.copies, args, args.work)
                per_copy = sum(c["steps_per_s"] for c in shared) / len(shared)
                print(f"  {kind}/{policy}: alone {alone['steps_per_s']:.3g} steps/s, per copy {per_copy:.3g} ({per_copy / alone['steps_per_s']:.2f}x)", flush=True)
                out = {"alone_steps_per_s": alone["steps_per_s"], "per_copy_steps_per_s": per_copy,
                       "ratio": per_copy / alone["steps_per_s"], "copies": shared, "alone": alone}
                if "cpu_ms_per_step" in alone:  # CPU burnt per step: spinning shows here whatever the load
                    out["alone_cpu_ms_per_step"] = alone["cpu_ms_per_step"]
                    out["per_copy_cpu_ms_per_step"] = sum(c["cpu_ms_per_step"] for c in shared) / len(shared)
                return out
            cases[f"{kind}/{policy}"] = case
    result = harness.new_result(
        "oversubscription", " ".join(["python", "bench/oversubscription.py"] + sys.argv[1:]), args.threads,
        what=f"{args.copies} copies x {args.threads} threads of a water training / MD on {harness.cpus_available()} CPUs against one alone",
        copies=args.copies, seconds=args.seconds, policies={p: POLICIES[p] for p in args.policies})
    rounds = harness.interleaved(cases, args.rounds)
    result["rounds"] = rounds
    result["summary"] = harness.summarise(rounds, SUMMARY_KEYS, smaller_is_better=("alone_cpu_ms_per_step", "per_copy_cpu_ms_per_step"))
    print(json.dumps(result["summary"], indent=1))
    harness.write_result(args.out, result)


if __name__ == "__main__":
    main()
