"""Where the loop's own training and exploration steps spend their time (not a test).

usage: python bench/loop_profile.py [--threads 1] [--steps 200] [--profile-steps 40]

The regime of config/config.yaml: 32-atom fcc Cu and Au cells (EMT frames), its model (se_e2_a,
neuron [8, 16, 32], axis_neuron 8, type_one_side, fitting [64, 64, 64], resnet_dt, sel [96, 96],
rcut 6), 1 thread, 4 ensemble members. Models are built with their statistics but not trained
(speed does not depend on the weights).

* training: one training step as `dpelt train` takes it (forward, forces with create_graph,
  loss backward, Adam) on a batch of 1 frame (batch_size auto for 32 atoms), timed over --steps
  steps, then --profile-steps steps under torch.profiler: self CPU time per aten op and the
  number of ops per step. For comparison, the same step on a batch of 4 frames (what one step of
  4 stacked members would have to process at least).
* exploration: run_md with the 4-member EnsembleCalculator (deviations every trj_freq = 8 steps,
  2 fs, 300 K), timed and profiled the same way; for comparison one energy+forces+virial
  evaluation of 1 model on 1 frame, of the 4 members on 1 frame, and of 1 model on 4 frames
  (what batched walkers would evaluate per call).

"overhead" is the share of a profiled step's wall time outside every profiled op's self time
(Python, ASE, NumPy, the interpreter between ops); "us_per_op" is the ops' self time per aten op. Writes bench/results/loop_profile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

MEMBERS = 4
TOP = 12


def run_config() -> dict:
    """config/config.yaml's train section (the model and the schedule of the default run)."""
    import yaml

    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def build(work: Path, threads: int):
    """The default run's model config, EMT Cu + Au training systems, 4 members with statistics."""
    import pipeline  # noqa: F401  (dpelt's OpenMP environment first)
    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames
    from pipeline.model.deeppot import DeepPot
    from pipeline.runtime import configure_torch
    from pipeline.train import loop
    from pipeline.train.config import parse_train_config
    from pipeline.train.data import TrainSystem

    configure_torch(threads)
    cfg_all = run_config()
    frames = work / "frames.nc"
    if not frames.exists():
        write_frames(frames, [emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=6, seed=1),
                              emt_bulk_frames("Au", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=6, seed=2)])
    spec = {k: v for k, v in cfg_all["train"].items() if k in ("model", "learning_rate", "loss", "training")}
    spec = json.loads(json.dumps(spec))
    spec["model"]["type_map"] = cfg_all["type_map"]
    spec["training"]["training_data"]["systems"] = [str(frames)]
    cfg = parse_train_config(spec, base=work)
    raw = loop.load_systems(cfg.training.training_data, cfg.model.type_map, "training.training_data")
    sel = loop.resolve_sel(cfg.model, raw)
    systems = [TrainSystem(ds, src, cfg.model.type_map, cfg.model.descriptor.rcut, sel) for ds, src in raw]
    members = []
    for k in range(MEMBERS):
        m = DeepPot(cfg.model, sel=sel, seed=k + 1)
        loop.compute_statistics(m, cfg.model, systems, 1)
        members.append(m)
    return cfg, systems, members, cfg_all


def profile(fn, steps: int) -> dict:
    """fn() ``steps`` times under torch.profiler: top ops by self CPU, ops and overhead per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    t = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    events = list(prof.key_averages())  # self times do not overlap: their sum is the time inside ops
    total_self = sum(e.self_cpu_time_total for e in events) / 1e3 / steps  # ms per step
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / steps
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP]
    return {"profiled_wall_ms_per_step": wall_ms, "aten_self_ms_per_step": total_self, "ops_per_step": calls,
            "overhead_share": max(0.0, 1 - total_self / wall_ms), "us_per_op": 1e3 * total_self / max(calls, 1),
            "top_ops": [{"name": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "share": e.self_cpu_time_total / 1e3 / steps / wall_ms, "calls_per_step": e.count / steps} for e in top]}


def timed(fn, steps: int) -> float:
    """ms per call of fn over ``steps`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) * 1e3 / steps


def training_part(cfg, systems, model, steps: int, prof_steps: int) -> dict:
    import torch

    from pipeline.model.embedding_kernel import parameter_gradients_only
    from pipeline.train import loop
    from pipeline.train.loss import energy_loss, prefactors

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_adam(params, 1e-3)
    pref = prefactors(cfg.loss, 1e-3, 1e-3)
    state = {"i": 0}

    def step(nframes: int = 1) -> None:
        sys_ = systems[state["i"] % len(systems)]
        frames = [(state["i"] + j) % sys_.nframes for j in range(nframes)]
        state["i"] += 1
        b = sys_.batch(frames)
        with parameter_gradients_only():
            pred = model.forward_rij(b.rij, b.nlist, b.atype, True, True, True, b.partner)
        loss, _ = energy_loss(pred, b.energy, b.force, b.virial, b.natoms, pref)
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss, inputs=params)
        opt.step()

    one = timed(step, steps)
    four = timed(lambda: step(4), max(steps // 4, 10))
    return {"ms_per_step": one, "ms_per_step_batch4": four, "batch4_over_batch1": four / one, **profile(step, prof_steps)}


def exploration_part(cfg_all, model_cfg, members, systems, work: Path, threads: int, steps: int, prof_steps: int) -> dict:
    from ase.build import bulk

    from pipeline.calculator import DeepPotCalculator, EnsembleCalculator
    from pipeline.explore.guards import GuardConfig
    from pipeline.explore.md import MDTask, run_md
    from pipeline.model.serialize import save_model

    paths = []
    for k, m in enumerate(members):
        paths.append(save_model(m.eval(), model_cfg, work / f"model{k}.pt"))
    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    ex = cfg_all["explore"]
    loose = GuardConfig(min_distance=0.0, max_temperature_factor=1e9, max_volume_ratio=1e9, min_cell_angle_deg=0.0)

    def md(nsteps: int, tag: str) -> float:
        calc = EnsembleCalculator(paths, threads=threads)
        task = MDTask(name=tag, temperature_K=300.0, nsteps=nsteps, trj_freq=ex["stages"][0]["trj_freq"], dt_fs=ex["dt_fs"], seed=7, guards=loose)
        t = time.perf_counter()
        summary = run_md(task, start, calc, work / tag)
        return (time.perf_counter() - t) * 1e3 / max(summary["steps_done"], 1)

    md(10, "warmup")
    ms = md(steps, "timed")
    prof = profile_md(md, prof_steps)
    single = DeepPotCalculator(paths[0], threads=threads)
    ens = EnsembleCalculator(paths, threads=threads)
    evals = {}
    for name, calc in (("one_model_one_frame", single), ("four_models_one_frame", ens)):
        atoms = start.copy()
        atoms.calc = calc
        evals[name] = timed(lambda a=atoms: (a.positions.__iadd__(1e-4), a.get_forces(), a.get_stress()), 50)
    evals["one_model_four_frames"] = batch_eval_ms(members[0], systems, 4)
    evals["one_model_one_frame_tensor"] = batch_eval_ms(members[0], systems, 1)
    return {"ms_per_md_step": ms, **prof, "eval_ms": evals}


def profile_md(md, prof_steps: int) -> dict:
    """Profile one run_md of ``prof_steps`` steps (start-up included, spread over the steps)."""
    holder = {}

    def once():
        holder["ms"] = md(prof_steps, "profiled")

    p = profile(once, 1)
    scale = 1.0 / prof_steps
    p["profiled_wall_ms_per_step"] *= scale
    p["aten_self_ms_per_step"] *= scale
    p["ops_per_step"] *= scale
    for o in p["top_ops"]:
        o["self_ms_per_step"] *= scale
        o["calls_per_step"] *= scale
    return p


def batch_eval_ms(model, systems, nframes: int) -> float:
    """Energy+forces+virial of ``nframes`` frames in one call of the model (no neighbour search)."""
    sys_ = systems[0]
    b = sys_.batch(list(range(nframes)))
    model.eval()
    return timed(lambda: model.forward_rij(b.rij, b.nlist, b.atype, True, True, False, b.partner), 30)


def implications(result: dict) -> list[str]:
    """What the measured figures imply for stacked training and batched walkers (from the findings)."""
    f = result["findings"]
    top = max(o["share"] for o in result["profiles"]["training"]["top_ops"])
    return [
        f"a training step runs {f['training_aten_ops_per_step']:.0f} aten ops of {f['training_us_per_aten_op']:.1f} us each on average, "
        f"the largest taking {100 * top:.0f} % of the step: per-op cost (dispatch, autograd, Python), not arithmetic, sets the time",
        f"a 4-frame batch costs {f['training_batch4_over_batch1']:.2f}x a 1-frame step: 4 members trained as one stacked step "
        f"(same op count, 4x the rows) could cost about that instead of 4x, i.e. ~{4 / f['training_batch4_over_batch1']:.1f}x faster ensemble training",
        f"an MD step with 4 members runs {f['md_aten_ops_per_step']:.0f} aten ops; 4 members cost {f['eval_4_members_over_1']:.2f}x one model "
        f"and one model on 4 frames {f['eval_4_frames_over_1_frame']:.2f}x one frame: batching walkers (tasks x members in one call) "
        f"would amortise the per-op cost the same way",
        "faster arithmetic alone (e.g. tabulated embedding nets) cannot pay much here: the arithmetic is a minor part of each op's cost",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="timed steps of each part")
    ap.add_argument("--profile-steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=harness.RESULTS / "loop_profile.json")
    args = ap.parse_args()
    result = harness.new_result("loop_profile", " ".join(["python", "bench/loop_profile.py"] + sys.argv[1:]), args.threads,
                                what="a training step and an MD step (4 members) of config/config.yaml's regime: time and torch.profiler ops")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg, systems, members, cfg_all = build(work, args.threads)
        result["profiles"] = {"training": training_part(cfg, systems, members[0], args.steps, args.profile_steps)}
        result["profiles"]["exploration"] = exploration_part(cfg_all, cfg.model, members, systems, work, args.threads, args.steps, args.profile_steps)
    tr, ex = result["profiles"]["training"], result["profiles"]["exploration"]
    result["findings"] = {
        "training_ms_per_step": tr["ms_per_step"],
        "training_aten_ops_per_step": tr["ops_per_step"],
        "training_us_per_aten_op": tr["us_per_op"],
        "training_overhead_share": tr["overhead_share"],
        "training_batch4_over_batch1": tr["batch4_over_batch1"],
        "md_ms_per_step_4_members": ex["ms_per_md_step"],
        "md_aten_ops_per_step": ex["ops_per_step"],
        "md_overhead_share": ex["overhead_share"],
        "eval_4_members_over_1": ex["eval_ms"]["four_models_one_frame"] / ex["eval_ms"]["one_model_one_frame"],
        "eval_4_frames_over_1_frame": ex["eval_ms"]["one_model_four_frames"] / ex["eval_ms"]["one_model_one_frame_tensor"],
    }
    result["implications"] = implications(result)
    print(json.dumps(result["findings"], indent=1))
    harness.write_result(args.out, result)


if __name__ == "__main__":
    main()
