"""What the training kernel and the padding shortcut each save per training step (not a test).

usage: python bench/train_step_ab.py [--threads 2] [--rounds 15] [--data ../shared/data/water]

Builds the water example's model (bench/water_seeds.py's input, seed 1) and times training
steps (forward, forces with create_graph, loss backward to the parameters, Adam) in one
process, two variants at a time, on the same frames: variant A, then variant B, 4 steps each,
alternating for --rounds rounds. Paired ratios cancel the machine's drift between minutes,
which moves single measurements by ±15 % here. Comparisons:

* ``training_kernel``: dpelt as is (A) against the embedding nets differentiated by autograd
  layer by layer (B: outside ``parameter_gradients_only``);
* ``padding_multiples``: padding sums as multiples of one row (A) against the per-slot suffix
  sums (B: ``_uniform_sections`` forced false).

Writes bench/results/train_step_ab.json: per comparison the median step time of A and B (ms)
and the median and quartiles of the paired ratio B/A (> 1: A is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from pipeline.fileio import write_text_atomic  # noqa: E402


def build(data: Path, threads: int):
    """The water model with statistics, its training systems, a sampler and Adam."""
    from water_seeds import seeded_input

    from pipeline.model.deeppot import DeepPot
    from pipeline.runtime import configure_torch
    from pipeline.train import loop
    from pipeline.train.config import parse_train_config
    from pipeline.train.data import BatchSampler, TrainSystem, resolve_batch_size

    configure_torch(threads)
    cfg = parse_train_config(seeded_input(data, 1500, 1), base=Path("."))
    raw = loop.load_systems(cfg.training.training_data, cfg.model.type_map, "training.training_data")
    sel = loop.resolve_sel(cfg.model, raw)
    model = DeepPot(cfg.model, sel=sel, seed=1)
    systems = [TrainSystem(ds, src, cfg.model.type_map, cfg.model.descriptor.rcut, sel) for ds, src in raw]
    loop.compute_statistics(model, cfg.model, systems, 1)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [resolve_batch_size(cfg.training.training_data.batch_size, s.natoms, k) for k, s in enumerate(systems)]
    return cfg, model, systems, BatchSampler(systems, sizes, 1, cfg.training.training_data.auto_prob), params, loop.make_adam(params, 1e-3)


def compare(use_a, use_b, threads: int, rounds: int, data: Path) -> dict:
    """Paired timing of variants A and B (each a function that sets the variant up)."""
    import torch

    from pipeline.model.embedding_kernel import parameter_gradients_only
    from pipeline.train.loss import energy_loss, prefactors

    cfg, model, systems, sampler, params, opt = build(data, threads)
    pref = prefactors(cfg.loss, 1e-3, 1e-3)
    state = {"kernel": True}

    def step(i: int) -> None:
        k, frames = sampler.next(i)
        b = systems[k].batch(frames)
        with parameter_gradients_only() if state["kernel"] else contextlib.nullcontext():
            pred = model.forward_rij(b.rij, b.nlist, b.atype, True, False, True, b.partner)
        loss, _ = energy_loss(pred, b.energy, b.force, None, b.natoms, pref)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=params)
        opt.step()

    def timed(setup, steps) -> float:
        setup(state)
        t = time.perf_counter()
        for i in steps:
            step(i)
        return (time.perf_counter() - t) / len(steps)

    for i in range(3):  # warm-up: kernel build/load, allocator
        timed(use_a, [i])
        timed(use_b, [i])
    ta, tb = [], []
    for r in range(rounds):
        steps = list(range(100 + 4 * r, 104 + 4 * r))
        ta.append(timed(use_a, steps))
        tb.append(timed(use_b, steps))
    use_a(state)
    ratios = [b / a for a, b in zip(ta, tb)]
    q = statistics.quantiles(ratios, n=4)
    return {"a_ms": 1e3 * statistics.median(ta), "b_ms": 1e3 * statistics.median(tb), "ratio_b_over_a_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[2]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "train_step_ab.json")
    args = ap.parse_args()
    data = args.data.resolve()
    if not (data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    from pipeline.model.descriptor import DescriptorSeA

    uniform = DescriptorSeA._uniform_sections_eager

    def kernel_on(state):
        state["kernel"] = True

    def kernel_off(state):
        state["kernel"] = False

    def multiples(state):
        state["kernel"] = True
        DescriptorSeA._uniform_sections_eager = uniform

    def suffix_sums(state):
        state["kernel"] = True
        DescriptorSeA._uniform_sections_eager = lambda self: [False] * self.ntypes

    results = {
        "training_kernel": compare(kernel_on, kernel_off, args.threads, args.rounds, data),
        "padding_multiples": compare(multiples, suffix_sums, args.threads, args.rounds, data),
    }
    out = {
        "what": "water training step (192 atoms, forces, 2 threads by default): paired A/B timings, B/A > 1 means A is faster",
        "command": " ".join(["python", "bench/train_step_ab.py"] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "rounds": args.rounds,
        "results": results,
    }
    write_text_atomic(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
