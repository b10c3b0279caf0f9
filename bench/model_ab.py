"""Paired A/B speed of two model variants: a water training step, 192-atom inference, MD (not a test).

usage: python bench/model_ab.py --a SPEC --b SPEC [--rounds 9] [--threads 2] [--out FILE]

SPEC = SOURCE[+compress]: SOURCE is a directory holding a ``pipeline`` package (a worktree) or
a git revision of this repository (extracted with ``git archive`` into a temporary
directory); ``+compress`` runs inference and MD on the tabulated embedding nets
(:meth:`DeepPot.compress`; a source without it refuses). Examples:

    python bench/model_ab.py --a main --b .                   # this tree against main
    python bench/model_ab.py --a . --b .+compress             # nets against tables

Each variant is one long-lived worker process (its own ``pipeline`` import) that builds the
water example's model (bench/water_seeds.py's input, seed 1, statistics from the data) and
answers timing requests: ``train`` (4 training steps: forward, forces with create_graph, loss
backward, Adam), ``infer`` (20 energy+forces+stress evaluations of the 192-atom frame through
the ASE calculator, positions nudged each call), ``md`` (20 velocity-Verlet steps). Rounds
alternate A and B (their order flips every round), so the machine's drift over minutes
cancels in the paired ratios B/A; reported: medians per variant, and the median and
quartiles of the paired ratio (> 1: A is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = {"train": 4, "infer": 20, "md": 20}


def source_dir(source: str, tmp: Path) -> Path:
    """A directory with the ``pipeline`` package of ``source`` (a directory or a git revision)."""
    p = Path(source)
    if (p / "pipeline").is_dir():
        return p.resolve()
    sha = subprocess.run(["git", "rev-parse", "--short", source], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    out = tmp / sha
    if not out.exists():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


class Worker:
    """One variant in its own process; ``ask(task)`` returns seconds per unit of work."""

    def __init__(self, spec: str, tmp: Path, threads: int, data: Path):
        source, _, option = spec.partition("+")
        self.spec = spec
        src = source_dir(source, tmp)
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--data", str(data)]
        if option == "compress":
            cmd.append("--compress")
        self.proc = subprocess.Popen(cmd, cwd=src, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._line())

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} died (see its stderr above)")
        return line

    def ask(self, task: str) -> float:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        return float(json.loads(self._line())["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker(threads: int, data: Path, compress: bool) -> None:
    """The worker loop: build, announce, then answer one timing request per input line."""
    sys.path.insert(0, str(HERE))
    import numpy as np
    import torch
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.units import fs
    import water
    from train_step_ab import build

    if not water.REFERENCE.exists():  # a worktree outside the main checkout: the shared folder beside the data
        water.REFERENCE = data.parent.parent / "reference" / water.REFERENCE.name

    from pipeline.calculator import DeepPotCalculator
    from pipeline.data.ase_io import frames_to_atoms
    from pipeline.data.io import read_systems
    from pipeline.model import embedding_kernel
    from pipeline.model.serialize import save_model
    from pipeline.train.loss import energy_loss, prefactors

    cfg, model, systems, sampler, params, opt = build(data, threads)
    pref = prefactors(cfg.loss, 1e-3, 1e-3)
    training_context = getattr(embedding_kernel, "parameter_gradients_only", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, cfg.model, Path(tmp) / "model.pt")
        calc = DeepPotCalculator(str(path), threads=threads, **({"compress": compress} if compress or _has_compress() else {}))
    (ds,) = read_systems(str(data / "data_0"))
    atoms = frames_to_atoms(ds.isel(frame=[0]))[0]
    atoms.calc = calc
    md_atoms = atoms.copy()
    md_atoms.calc = calc
    thermalize_momenta(md_atoms, temperature_K=300.0, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(md_atoms, timestep=0.5 * fs)
    rng = np.random.default_rng(0)
    count = {"step": 100}

    def train(n: int) -> None:
        for _ in range(n):
            k, frames = sampler.next(count["step"])
            count["step"] += 1
            b = systems[k].batch(frames)
            ctx = training_context() if training_context is not None else _null()
            with ctx:
                pred = model.forward_rij(b.rij, b.nlist, b.atype, True, False, True, b.partner)
            loss, _ = energy_loss(pred, b.energy, b.force, None, b.natoms, pref)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss, inputs=params)
            opt.step()

    def infer(n: int) -> None:
        for _ in range(n):
            atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
            atoms.get_forces(), atoms.get_stress()

    def md(n: int) -> None:
        dyn.run(n)

    run = {"train": train, "infer": infer, "md": md}
    for task in run:  # warm-up: kernel build/load, allocator
        run[task](2)
    print(json.dumps({"natoms": len(atoms), "compressed": bool(getattr(calc.model, "compressed", False))}), flush=True)
    for line in sys.stdin:
        task = line.strip()
        t = time.perf_counter()
        run[task](TASKS[task])
        print(json.dumps({"seconds": (time.perf_counter() - t) / TASKS[task]}), flush=True)


def _has_compress() -> bool:
    from pipeline.model.deeppot import DeepPot

    return hasattr(DeepPot, "compress")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="main")
    ap.add_argument("--b", default=".")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="train,infer,md")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DPELT_WATER_DATA", "/work/shared/data/water")), help="DeePMD-kit's water example (deepmd/npy systems data_0 …)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compress", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.data.resolve()
    if not (data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data} (--data)")
    if args.worker:
        worker(args.threads, data, args.compress)
        return
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        a = Worker(args.a, Path(tmp), args.threads, data)
        b = Worker(args.b, Path(tmp), args.threads, data)
        times = {t: {"a": [], "b": []} for t in tasks}
        for r in range(args.rounds):
            for t in tasks:
                order = [("a", a), ("b", b)] if r % 2 == 0 else [("b", b), ("a", a)]
                for key, w in order:
                    times[t][key].append(w.ask(t))
        info = {"a": a.info, "b": b.info}
        a.close()
        b.close()
    natoms = info["a"]["natoms"]
    results = {}
    for t in tasks:
        ta, tb = times[t]["a"], times[t]["b"]
        ratios = [y / x for x, y in zip(ta, tb)]
        per = natoms if t != "train" else 1
        results[t] = {
            "unit": "training steps/s" if t == "train" else ("atom·evals/s" if t == "infer" else "MD atom·steps/s"),
            "a_per_s_median": per / statistics.median(ta),
            "b_per_s_median": per / statistics.median(tb),
            "a_per_s_quartiles": sorted(per / x for x in quartiles(ta)),
            "b_per_s_quartiles": sorted(per / x for x in quartiles(tb)),
            "ratio_b_time_over_a_median": statistics.median(ratios),
            "ratio_quartiles": quartiles(ratios),
        }
    out = {
        "what": "paired A/B: water model (bench/water_seeds.py input, seed 1), 192-atom frame; ratio = B time / A time (> 1: A faster)",
        "command": " ".join(["python", "bench/model_ab.py"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "a": args.a,
        "b": args.b,
        "workers": info,
        "threads": args.threads,
        "rounds": args.rounds,
        "results": results,
        "note": "machine shared with other jobs while measured: single figures are noisy, the paired ratios less so",
    }
    text = json.dumps(out, indent=2) + "\n"
    if args.out:
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(text)
        os.replace(tmp_out, args.out)
    print(text)


if __name__ == "__main__":
    main()
