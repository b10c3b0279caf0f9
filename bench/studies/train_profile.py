"""Which training ops scale with threads: torch.profiler self-CPU time per op at 1 and 2 threads (not a test).

usage: python bench/train_profile.py [--steps 80] [--data ../shared/data/water]

Trains the water example (bench/water_seeds.py's input, seed 1) for --steps steps under
torch.profiler, once with 1 thread and once with 2, one after the other, and writes
bench/results/train_profile.json: per op (the 20 largest at 1 thread) the self CPU time in ms at
1 and 2 threads and their ratio (2 would be perfect scaling). Profiler overhead is included in
the times; read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent  # bench/studies
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ for water_seeds

from pipeline.fileio import write_text_atomic  # noqa: E402


def worker(threads: int, steps: int, data: Path, out: Path) -> None:
    import torch

    from water_seeds import seeded_input

    from pipeline.train.config import parse_train_config
    from pipeline.train.loop import train

    cfg = seeded_input(data, steps, 1)
    cfg["training"] |= {"disp_freq": steps, "save_freq": steps}
    cfg = parse_train_config(cfg, base=Path("."))
    with tempfile.TemporaryDirectory() as tmp, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(cfg, Path(tmp) / "run", threads=threads, log=lambda s: None)
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    write_text_atomic(out, json.dumps(ops) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_profile.json")
    ap.add_argument("--worker", nargs=2, metavar=("THREADS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.data.resolve()
    if not (data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    if args.worker:
        worker(int(args.worker[0]), args.steps, data, Path(args.worker[1]))
        return
    per_threads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (1, 2):
            out = Path(tmp) / f"ops{threads}.json"
            subprocess.run([sys.executable, __file__, "--worker", str(threads), str(out), "--steps", str(args.steps), "--data", str(data)], check=True)
            per_threads[threads] = json.loads(out.read_text())
    one, two = per_threads[1], per_threads[2]
    top = sorted(one, key=lambda k: -one[k])[:20]
    rows = {k: {"ms_1_thread": one[k], "ms_2_threads": two.get(k), "scaling": one[k] / two[k] if two.get(k) else None} for k in top}
    result = {
        "what": "water example training under torch.profiler: self CPU time per op at 1 and 2 threads",
        "command": f"python bench/train_profile.py --steps {args.steps}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "total_ms": {"1": sum(one.values()), "2": sum(two.values())},
        "ops": rows,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for k, r in rows.items():
        print(f"{k[:45]:45s} {r['ms_1_thread']:9.0f} {r['ms_2_threads'] or float('nan'):9.0f}  x{r['scaling'] or float('nan'):.2f}")


if __name__ == "__main__":
    main()
