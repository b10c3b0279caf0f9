"""``dpelt <step>``: one subcommand per workflow step, plus the DeePMD-kit-style tools.

Every bad input ends in one line ``dpelt: error: <file> [<key>]: <what is wrong>`` and exit
status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from . import __version__
from .errors import DpeltError
from .interop.cli import add_interop_parsers
from .label.cli import TIMEOUT_HELP, add_label_parser, seconds_or_none


def _spec(text: str | None, what: str) -> dict:
    """A JSON mapping given on the command line (the workflow passes config sections this way)."""
    import json

    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DpeltError(f"--spec is not valid JSON: {exc}", key=what) from None
    if not isinstance(data, dict):
        raise DpeltError("--spec must be a JSON object", key=what)
    return data


def _default(value, key: str):
    """An option's value, else the run config schema's default of ``key`` (the one place defaults live)."""
    if value is not None:
        return value
    from .runconfig import schema_default

    return schema_default(key)


def _cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .train.config import load_train_config, parse_train_config
    from .train.loop import train

    if args.spec is not None:
        data = _spec(args.spec, "train")
        if args.systems:
            data.setdefault("training", {})
            data["training"]["training_data"] = dict(data["training"].get("training_data", {}), systems=list(args.systems))
        cfg = parse_train_config(data, source="--spec")
    elif args.config is not None:
        cfg = load_train_config(args.config)
        if args.systems:
            cfg = replace(cfg, training=replace(cfg.training, training_data=replace(cfg.training.training_data, systems=tuple(args.systems))))
    else:
        raise DpeltError("give a config file or --spec", key="config")
    t = cfg.training
    if args.steps is not None:
        t = replace(t, numb_steps=args.steps)
    if args.seed is not None:
        t = replace(t, seed=args.seed)
    cfg = replace(cfg, training=t)
    if args.start_lr is not None:
        cfg = replace(cfg, learning_rate=replace(cfg.learning_rate, start_lr=args.start_lr))
    train(cfg, args.output, init_model=args.init_model, restart=args.restart, threads=args.threads, timing=args.timing, resume=args.resume, refit_bias=args.refit_bias)


def _cmd_freeze(args: argparse.Namespace) -> None:
    from .model.serialize import freeze_model, load_model

    out = freeze_model(load_model(args.model), args.output)
    print(f"wrote {out}")


def _cmd_test(args: argparse.Namespace) -> None:
    from .evaluate import test_model
    from .model.serialize import load_model
    from .runtime import configure_torch

    configure_torch(args.threads)
    result = test_model(load_model(args.model), args.systems, out_json=args.output, plot=args.plot, compress=not args.no_compress)
    for s in result["systems"] + [{"system": "overall"} | result["overall"]]:
        line = (
            f"{s['system']}: {s['nframes']} frames  energy RMSE {s['energy_rmse_per_atom'] * 1000:.3f} meV/atom "
            f"(MAE {s['energy_mae_per_atom'] * 1000:.3f})  force RMSE {s['force_rmse'] * 1000:.2f} meV/Å (MAE {s['force_mae'] * 1000:.2f})"
        )
        if "virial_rmse_per_atom" in s:
            line += f"  virial RMSE {s['virial_rmse_per_atom'] * 1000:.3f} meV/atom"
        print(line)
    if args.output:
        print(f"wrote {args.output}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .data.io import read_systems, write_systems

    systems = read_systems(args.src, type_map=args.type_map, fmt=args.src_format)
    paths = write_systems(systems, args.dst, fmt=args.dst_format)
    nframes = sum(s.sizes["frame"] for s in systems)
    print(f"converted {len(systems)} systems, {nframes} frames -> {', '.join(map(str, paths))}")


def _load_frame(path: str, index: int | None, system: str | None = None, seed: int = 0):
    """A start frame as ase.Atoms: frame ``index`` counted over every system of the file, or
    (with ``system``) a frame of the system with that name drawn with ``seed``."""
    import numpy as np

    from .data.ase_io import frames_to_atoms
    from .data.io import read_systems

    systems = read_systems(path)
    if system is not None:
        named = [ds for ds in systems if ds.attrs.get("system") == system]
        if not named:
            raise DpeltError(f"no system named {system!r} (found {[ds.attrs.get('system') for ds in systems]})", path=path, key="system")
        ds = named[0]
        k = int(np.random.default_rng(seed).integers(ds.sizes["frame"])) if index is None else index
        return frames_to_atoms(ds.isel(frame=[k]))[0]
    index = index or 0
    for ds in systems:
        n = ds.sizes["frame"]
        if index < n:
            return frames_to_atoms(ds.isel(frame=[index]))[0]
        index -= n
    raise DpeltError("has fewer frames than the index asked for", path=path, key="frame")


#: ``dpelt explore`` options -> keys of the task spec (None: not given, the schema's default applies)
_EXPLORE_OPTIONS = {
    "temp": "temperature_K", "press": "pressure_bar", "nsteps": "nsteps", "ensemble": "ensemble", "trj_freq": "trj_freq",
    "dt": "dt_fs", "tau_t": "tau_t_fs", "tau_p": "tau_p_fs", "drive": "drive", "trust_lo": "trust_lo", "trust_hi": "trust_hi",
    "bias": "bias.kind", "bias_strength": "bias.strength", "bias_width": "bias.width", "bias_ceiling_kt": "bias.ceiling_kT",
    "min_distance": "guards.min_distance", "max_temperature_factor": "guards.max_temperature_factor",
    "max_volume_ratio": "guards.max_volume_ratio", "devi_ceiling": "guards.devi_ceiling", "devi_patience": "guards.devi_patience",
}  # fmt: skip


def explore_task_spec(given: dict) -> dict:
    """The full exploration task spec: ``given`` over the run config schema's defaults (explore
    section, its first stage's ensemble and trj_freq, the select section's trust levels)."""
    from .runconfig import resolved_section

    ex = resolved_section("explore", {})
    stage, sel = ex["stages"][0], resolved_section("select", {})
    spec = {k: ex[k] for k in ("dt_fs", "tau_t_fs", "tau_p_fs", "drive", "bias", "guards", "compress")}
    spec |= {"ensemble": stage["ensemble"], "trj_freq": stage["trj_freq"], "pressure_bar": None, "trust_lo": sel["trust_lo"], "trust_hi": sel["trust_hi"]}
    for key, value in given.items():
        spec[key] = spec[key] | value if key in ("bias", "guards") and isinstance(value, dict) else value
    return spec


def _task_from_spec(given: dict, name: str, seed: int, iteration: int):
    """An MDTask from a task spec (the workflow's JSON; keys left out take the schema's defaults)."""
    from dataclasses import replace

    from .config import parse_dataclass
    from .explore.bias import BiasConfig
    from .explore.guards import GuardConfig
    from .explore.md import MDTask

    spec = explore_task_spec(given)
    bias = parse_dataclass(BiasConfig, spec.pop("bias") | {"trust_lo": spec.pop("trust_lo"), "trust_hi": spec.pop("trust_hi")}, "explore.bias", "--spec")
    guards = parse_dataclass(GuardConfig, spec.pop("guards"), "explore.guards", "--spec")
    return replace(parse_dataclass(MDTask, spec | {"name": name, "seed": seed, "iteration": iteration}, "explore", "--spec"), bias=bias, guards=guards)


def _cmd_explore(args: argparse.Namespace) -> None:
    from .calculator import EnsembleCalculator
    from .explore.md import run_md

    name = args.name or Path(args.output).name
    if args.spec is not None:
        given = _spec(args.spec, "explore")
    else:
        if args.temp is None or args.nsteps is None:
            raise DpeltError("give --spec, or at least --temp and --nsteps", key="explore")
        given = {}
        for option, key in _EXPLORE_OPTIONS.items():
            if getattr(args, option) is not None:
                section, _, field = key.rpartition(".")
                (given.setdefault(section, {}) if section else given)[field] = getattr(args, option)
        if args.no_compress:
            given["compress"] = False
    task = _task_from_spec(given, name, args.seed, args.iteration)
    atoms = _load_frame(args.start, args.frame, args.system, args.seed)
    calc = EnsembleCalculator(args.models, drive=task.drive, bias=task.bias, threads=_default(args.threads, "threads.explore"), compress=task.compress)
    summary = run_md(task, atoms, calc, args.output, source=f"{args.start}:{args.system or args.frame}")
    print(f"{task.name}: {summary['status']}{' (' + summary['reason'] + ')' if summary['reason'] else ''}, {summary['frames']} frames, {summary['steps_done']} steps")


def _cmd_explore_batch(args: argparse.Namespace) -> None:
    import json

    from .explore.batched import explore_batch
    from .fileio import write_json_atomic

    try:
        items = json.loads(args.tasks)
    except json.JSONDecodeError as exc:
        raise DpeltError(f"--tasks is not valid JSON: {exc}", key="explore") from None
    if not isinstance(items, list) or not all(isinstance(x, dict) and {"name", "seed", "spec"} <= set(x) for x in items):
        raise DpeltError("--tasks must be a JSON list of {name, system, seed, spec}", key="explore")
    out = Path(args.output)
    tasks = [_task_from_spec(x["spec"], x["name"], int(x["seed"]), args.iteration) for x in items]
    starts = [_load_frame(args.start, None, x.get("system"), int(x["seed"])) for x in items]
    sources = [f"{args.start}:{x.get('system')}" for x in items]
    print(f"explore: batched, {len(tasks)} walkers × {len(args.models)} members in one process (explore.batched: true)")
    summaries = explore_batch(tasks, starts, args.models, [out / t.name for t in tasks], sources, threads=_default(args.threads, "threads.explore"))
    for s in summaries:
        print(f"{s['task']['name']}: {s['status']}{' (' + s['reason'] + ')' if s['reason'] else ''}, {s['frames']} frames, {s['steps_done']} steps")
    write_json_atomic(out / "batch.json", {"batched": True, "tasks": summaries})


def _cmd_select(args: argparse.Namespace) -> None:
    from .data.frames import frame_ids
    from .data.io import read_systems
    from .select import SelectConfig, select

    cfg = SelectConfig(
        trust_lo=args.trust_lo, trust_hi=args.trust_hi, v_trust_lo=args.v_trust_lo, v_trust_hi=args.v_trust_hi,
        max_labels=_default(args.max_labels, "select.max_labels"), spread=_default(args.spread, "select.spread"),
        adapt_numb_candi=args.adapt_numb_candi, adapt_perc_candi=_default(args.adapt_perc_candi, "select.adapt_perc_candi"),
        conv_accuracy=_default(args.conv_accuracy, "select.conv_accuracy"),
    )
    labelled = set()
    for p in args.labelled or []:
        for ds in read_systems(p):
            labelled.update(frame_ids(ds).tolist())
    if cfg.spread == "fps" and not args.model:  # refused before any work, however many candidates
        raise DpeltError("--spread fps measures frames with a model's descriptor: give it with -m MODEL", key="spread")
    model = None
    if args.model:  # only farthest-point spreading needs a model (and torch: ~2 s to import)
        from .model.serialize import load_model
        from .runtime import configure_torch

        configure_torch(_default(args.threads, "threads.evaluate"))

        model = load_model(args.model)
    r = select(args.frames, cfg, args.seed, args.output, model=model, iteration=args.iteration, labelled_ids=labelled)
    c = r["counts"]
    print(f"{r['frames']} frames: {c['accurate']} accurate, {c['candidate']} candidate, {c['failed']} failed; selected {r['selected']}; converged: {r['converged']}")
    for t in r["stopped_tasks"]:
        print(f"  stopped by a guard (not converged): {t['task']}: {t['reason']}")


def _cmd_init(args: argparse.Namespace) -> None:
    from .init_data import make_init, parse_init_spec
    from .runconfig import resolved_section
    from .runtime import configure_torch

    configure_torch(args.threads)
    if args.threads:  # the oracle's threads too (cp2k's default command), as the label rule sets them
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    spec = _spec(args.spec, "init")
    init = parse_init_spec(spec.get("init", {}), source="--spec")
    label = resolved_section("label", spec.get("label"), "--spec")
    s = make_init(init, label["oracle"], spec["type_map"], args.output, args.seed, args.workdir, max_force=label["max_force"], timeout=args.timeout)
    print("; ".join(f"{x['system']}: {x['frames']} frames of {x['natoms']} atoms" for x in s["systems"]) + (f"; {len(s['failures'])} failed labels" if s["failures"] else ""))


def _cmd_holdout(args: argparse.Namespace) -> None:
    from .init_data import OracleMDSpec, make_holdout, parse_init_spec
    from .runconfig import resolved_section
    from .runtime import configure_torch

    configure_torch(args.threads)
    if args.threads:  # the oracle's threads too (cp2k's default command), as the label rule sets them
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    spec = _spec(args.spec, "holdout")
    init = parse_init_spec(spec.get("init", {}), source="--spec")
    h = resolved_section("holdout", spec.get("holdout"), "--spec")
    md = OracleMDSpec(trj_freq=h["trj_freq"], dt_fs=h["dt_fs"], equilibration=h["equilibration"])
    label = resolved_section("label", spec.get("label"), "--spec")
    s = make_holdout(init, spec["systems"], spec["temperatures_K"], h["frames"], md, label["oracle"], spec["type_map"], args.output, args.seed, args.workdir, label["max_force"], timeout=args.timeout)
    print("; ".join(f"{x['system']}: {x['frames']} frames" for x in s["systems"]) + (f"; {len(s['failures'])} failed labels" if s["failures"] else ""))
    for failure in s["failures"]:
        print(f"  {failure['source_task']} step {failure['md_step']}: {failure['reason']}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_ensemble
    from .model.serialize import load_model
    from .runtime import configure_torch

    configure_torch(args.threads)
    models = [load_model(m) for m in args.models]
    r = evaluate_ensemble(models, args.systems or [], args.output, plot=args.plot)
    if args.calibration:
        from .calibration import calibration

        c = calibration(models, args.labelled or [], args.calibration)
        print(f"calibration on {c['nframes']} labelled frames: Spearman(max_devi_f, true max force error) = {c['spearman_devi_vs_true_max_f']}")
    if r["ensemble_mean"]:
        o = r["ensemble_mean"]
        print(f"{r['nframes']} frames: ensemble mean energy RMSE {o['energy_rmse_per_atom'] * 1000:.2f} meV/atom, force RMSE {o['force_rmse'] * 1000:.1f} meV/Å; mean max_devi_f {r['max_devi_f']['mean']:.3f} eV/Å")
    else:
        print("no held-out frames")


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    if len(args.stages) != len(args.iterations):
        raise DpeltError("give one stage per iteration", key="stages")
    s = write_report(args.iterations, [int(x) for x in args.stages], args.output, args.finished, args.n_stages)
    print(f"{s['iterations']} iterations, converged: {s['converged']}, labels: {s['labels_total']}, final held-out force RMSE: {s['final_holdout_force_rmse']}")


def _cmd_publish(args: argparse.Namespace) -> None:
    from .versioning import publish

    tags = publish(args.directory, iterations=None if args.all or not args.iterations else [int(i) for i in args.iterations], remote=args.remote, configfile=args.configfile)
    print(f"published {', '.join(tags)}" if tags else "nothing new to publish")


def _cmd_restore(args: argparse.Namespace) -> None:
    from .versioning import restore

    restore(args.directory, args.tag)


def _cmd_verify(args: argparse.Namespace) -> None:
    from .versioning import verify

    bad = verify(args.directory, args.tags or None)
    for tag, wrong in bad.items():
        print(f"{tag}: {'ok' if not wrong else str(len(wrong)) + ' files differ'}")
        for w in wrong:
            print(f"  {w}")
    if any(bad.values()):
        raise DpeltError("published files differ from their recorded sha256 (see above)")


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from .reproduce import format_table, reproduce

    r = reproduce(args.directory, args.tag, workdir=args.workdir, reuse_labels=args.reuse_labels, cores=args.cores, report=args.report, resume=args.resume, configfile=args.configfile)
    print(format_table(r))
    if not r["identical"]:
        raise SystemExit(1)


def _cmd_resume(args: argparse.Namespace) -> None:
    from .recovery import resume

    # --configfile=X: Snakemake's --configfile takes several values and would swallow targets
    extra = ([f"--configfile={args.configfile}"] if args.configfile else []) + (["--dry-run"] if args.dry_run else []) + list(args.snakemake_args or [])
    code = resume(args.directory, cores=args.cores, extra=extra, force=args.force)
    if code:
        raise SystemExit(code)


def _cmd_check_config(args: argparse.Namespace) -> None:
    from .runconfig import load_run_config

    load_run_config(args.config)
    print(f"{args.config}: valid")


def _cmd_example(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.directory), steps=args.steps, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpelt", description="Deep Potential models and the ELT concurrent-learning loop.")
    p.add_argument("--version", action="version", version=f"dpelt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a dpelt YAML or a DeePMD-kit input.json")
    t.add_argument("config", nargs="?", help="YAML or JSON with model / learning_rate / loss / training")
    t.add_argument("--spec", help="the same input as a JSON string (what the workflow passes)")
    t.add_argument("--systems", nargs="+", help="training systems (replace training.training_data.systems)")
    t.add_argument("--start-lr", type=float, help="override learning_rate.start_lr (warm starts)")
    t.add_argument("-o", "--output", default=".", help="output directory (model.pt, checkpoint.pt, lcurve.csv, input.json)")
    t.add_argument("--init-model", help="warm start: initialise weights and statistics from this model file")
    t.add_argument("--refit-bias", action="store_true", help="with --init-model: first refit the energy bias to this training data (least squares on the model's energy residuals; DeePMD-kit keeps it)")
    t.add_argument("--restart", help="resume from a checkpoint.pt written by an earlier run")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt if it was written for the same input (a killed job)")
    t.add_argument("--threads", type=int, help="torch threads (default: training.threads, $DPELT_THREADS or all)")
    t.add_argument("--seed", type=int, help="override training.seed")
    t.add_argument("--steps", type=int, help="override training.numb_steps")
    t.add_argument("--timing", help="write wall-clock figures (start-up, steps/s) as JSON to this file")
    t.set_defaults(func=_cmd_train)

    f = sub.add_parser("freeze", help="export a model file as TorchScript")
    f.add_argument("model")
    f.add_argument("-o", "--output", default="frozen_model.pth")
    f.set_defaults(func=_cmd_freeze)

    s = sub.add_parser("test", help="errors of a model on labelled systems (JSON + parity plot)")
    s.add_argument("-m", "--model", required=True)
    s.add_argument("-s", "--systems", required=True, nargs="+", help="deepmd/npy dirs, .nc or extxyz files")
    s.add_argument("-o", "--output", help="write the metrics as JSON here")
    s.add_argument("--plot", help="write a parity plot (PNG) here")
    s.add_argument("--threads", type=int)
    s.add_argument("--no-compress", action="store_true", help="evaluate the embedding nets themselves, not their tables (docs/compression.md)")
    s.set_defaults(func=_cmd_test)

    c = sub.add_parser("convert", help="convert frames between netcdf (.nc), deepmd/npy, extxyz and ASE formats")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--from", dest="src_format", help="netcdf | deepmd/npy | extxyz | ase:<format> (default: by path)")
    c.add_argument("--to", dest="dst_format", help="netcdf | deepmd/npy | extxyz | ase:<format> (default: by suffix)")
    c.add_argument("--type-map", nargs="+", help="element order, e.g. --type-map O H")
    c.set_defaults(func=_cmd_convert)

    x = sub.add_parser("explore", help="ensemble MD from one start frame, keeping frames and model deviations")
    # options left out take the run config schema's defaults (explore.*, select.trust_lo/hi)
    x.add_argument("-m", "--models", nargs="+", required=True, help="model files of the ensemble (the first drives)")
    x.add_argument("--start", required=True, help="frames file with the start configuration")
    x.add_argument("--frame", type=int, help="index of the start frame in --start (default: 0, or drawn with --seed when --system is given)")
    x.add_argument("--system", help="start from a frame of the system with this name in --start")
    x.add_argument("--spec", help="the task as JSON (temperature_K, pressure_bar, ensemble, nsteps, trj_freq, dt_fs, tau_t_fs, tau_p_fs, drive, bias, guards, trust_lo, trust_hi)")
    x.add_argument("-o", "--output", required=True, help="task directory (frames.nc, md.log, md.json)")
    x.add_argument("--name", help="task name recorded with every frame (default: output directory name)")
    x.add_argument("--ensemble", help="nvt (Langevin) | nvt-bussi | nvt-nh | nve | npt | npt-aniso | npt-tri")
    x.add_argument("--temp", type=float, help="temperature, K")
    x.add_argument("--press", type=float, help="pressure, bar (npt ensembles)")
    x.add_argument("--nsteps", type=int)
    x.add_argument("--trj-freq", type=int, help="keep a frame (and evaluate the ensemble) every N steps")
    x.add_argument("--dt", type=float, help="time step, fs")
    x.add_argument("--tau-t", type=float, help="thermostat time constant, fs")
    x.add_argument("--tau-p", type=float, help="barostat time constant, fs")
    x.add_argument("--seed", type=int, required=True)
    x.add_argument("--iteration", type=int, default=-1)
    x.add_argument("--drive", choices=["first", "mean"])
    x.add_argument("--no-compress", action="store_true", help="evaluate the embedding nets, not their tables (without --spec; with it, the spec's compress)")
    x.add_argument("--bias", choices=["none", "confidence", "udd"])
    x.add_argument("--bias-strength", type=float, help="confidence: α in [0,1); udd: well depth A, eV")
    x.add_argument("--bias-width", type=float, help="udd: width B, eV/Å")
    x.add_argument("--bias-ceiling-kt", type=float, help="confidence: ceiling above the start energy, in N k_B T")
    x.add_argument("--trust-lo", type=float, help="eV/Å (confidence bias weight)")
    x.add_argument("--trust-hi", type=float, help="eV/Å (confidence bias weight)")
    x.add_argument("--min-distance", type=float, help="guard: closest approach, Å")
    x.add_argument("--max-temperature-factor", type=float, help="guard: runaway above this × target T")
    x.add_argument("--max-volume-ratio", type=float, help="guard: cell volume change factor")
    x.add_argument("--devi-ceiling", type=float, help="guard: stop when max_devi_f stays above this (eV/Å)")
    x.add_argument("--devi-patience", type=int, help="guard: ... for this many kept frames in a row")
    x.add_argument("--threads", type=int, help="torch threads (default: threads.explore)")
    x.set_defaults(func=_cmd_explore)

    xb = sub.add_parser("explore-batch", help="all exploration tasks of an iteration in one process (one batched model evaluation per MD step)")
    xb.add_argument("-m", "--models", nargs="+", required=True, help="model files of the ensemble (the first drives)")
    xb.add_argument("--start", required=True, help="frames file with the start configurations")
    xb.add_argument("--tasks", required=True, help="JSON list of {name, system, seed, spec} (spec as for explore --spec)")
    xb.add_argument("-o", "--output", required=True, help="directory: OUTPUT/<name>/{frames.nc, md.json, md.log} per task, OUTPUT/batch.json last")
    xb.add_argument("--iteration", type=int, default=-1)
    xb.add_argument("--threads", type=int, help="torch threads (default: threads.explore)")
    xb.set_defaults(func=_cmd_explore_batch)

    se = sub.add_parser("select", help="classify explored frames by model deviation and pick candidates to label")
    se.add_argument("frames", nargs="+", help="exploration outputs (frames.nc)")
    se.add_argument("-o", "--output", required=True, help="directory for candidates.nc and report.json")
    se.add_argument("--trust-lo", type=float, required=True, help="eV/Å")
    se.add_argument("--trust-hi", type=float, required=True, help="eV/Å")
    se.add_argument("--v-trust-lo", type=float, help="eV/atom (virial, optional)")
    se.add_argument("--v-trust-hi", type=float, help="eV/atom (virial, optional)")
    se.add_argument("--max-labels", type=int, help="at most this many candidates are picked (default: select.max_labels of the run config schema)")
    se.add_argument("--seed", type=int, required=True)
    se.add_argument("--iteration", type=int)
    se.add_argument("--spread", choices=["random", "fps"], help="fps: farthest-point sampling in descriptor space (needs -m; default: select.spread)")
    se.add_argument("-m", "--model", help="model for descriptors (spread fps)")
    se.add_argument("--adapt-numb-candi", type=int, help="adaptive trust_lo: at least this many candidates")
    se.add_argument("--adapt-perc-candi", type=float, help="adaptive trust_lo: at least this fraction of the frames below trust_hi (default: select.adapt_perc_candi)")
    se.add_argument("--conv-accuracy", type=float, help="converged when the accurate ratio reaches this (default: select.conv_accuracy)")
    se.add_argument("--labelled", nargs="*", help="frames already labelled (never picked again)")
    se.add_argument("--threads", type=int, help="torch threads of the descriptor evaluation (spread fps; default: threads.evaluate)")
    se.set_defaults(func=_cmd_select)

    add_label_parser(sub)
    add_interop_parsers(sub)

    i = sub.add_parser("init", help="build the labelled initial data of a run (DP-GEN init_bulk)")
    i.add_argument("--spec", required=True, help="JSON: {type_map, init, label} sections of the run config")
    i.add_argument("-o", "--output", required=True, help="frames file (.nc), one group per system")
    i.add_argument("--workdir", default="work/init", help="directory for the oracle's task files")
    i.add_argument("--seed", type=int, required=True)
    i.add_argument("--threads", type=int, default=1)
    i.add_argument("--timeout", type=seconds_or_none, default=None, metavar="SECONDS", help=TIMEOUT_HELP)
    i.set_defaults(func=_cmd_init)

    h = sub.add_parser("holdout", help="build the held-out oracle MD frames of a run")
    h.add_argument("--spec", required=True, help="JSON: {type_map, init, holdout, label, systems, temperatures_K}")
    h.add_argument("-o", "--output", required=True)
    h.add_argument("--workdir", default="work/holdout")
    h.add_argument("--seed", type=int, required=True)
    h.add_argument("--threads", type=int, default=1)
    h.add_argument("--timeout", type=seconds_or_none, default=None, metavar="SECONDS", help=TIMEOUT_HELP)
    h.set_defaults(func=_cmd_holdout)

    ev = sub.add_parser("evaluate", help="errors of an ensemble (members and mean) on labelled frames")
    ev.add_argument("-m", "--models", nargs="+", required=True)
    ev.add_argument("-s", "--systems", nargs="*", default=[], help="labelled frames (none: an empty evaluation)")
    ev.add_argument("-o", "--output", required=True, help="metrics JSON")
    ev.add_argument("--plot", help="parity plot of the ensemble mean (PNG)")
    ev.add_argument("--labelled", help="the frames this ensemble's exploration had labelled (iter/NNN/label/frames.nc): deviation vs true error")
    ev.add_argument("--calibration", help="write that comparison (pipeline.calibration) as JSON here")
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(func=_cmd_evaluate)

    rp = sub.add_parser("report", help="summary, per-iteration table and plots of a run")
    rp.add_argument("--iterations", nargs="+", required=True, help="iteration directories in order")
    rp.add_argument("--stages", nargs="+", required=True, help="stage of each iteration")
    rp.add_argument("--n-stages", type=int, required=True)
    rp.add_argument("--finished", action="store_true", help="the last stage has ended")
    rp.add_argument("-o", "--output", default="reports")
    rp.set_defaults(func=_cmd_report)

    pb = sub.add_parser("publish", help="version finished iterations with DVC (dvc add, git commit, tag iter-NNN)")
    pb.add_argument("iterations", nargs="*", help="iteration numbers (default: every finished one)")
    pb.add_argument("--all", action="store_true", help="every finished, unpublished iteration")
    pb.add_argument("--remote", help="dvc push to this remote afterwards")
    pb.add_argument("-C", "--directory", default=".", help="run directory (a git repository)")
    pb.add_argument("--configfile", help="the run's config, recorded in the manifests (default config/config.yaml)")
    pb.set_defaults(func=_cmd_publish)

    rs = sub.add_parser("restore", help="bring back the datasets and models of a published iteration (iter-NNN)")
    rs.add_argument("tag")
    rs.add_argument("-C", "--directory", default=".")
    rs.set_defaults(func=_cmd_restore)

    vf = sub.add_parser("verify", help="recompute the sha256 of published datasets and models")
    vf.add_argument("tags", nargs="*", help="iter-NNN tags (default: all published)")
    vf.add_argument("-C", "--directory", default=".")
    vf.set_defaults(func=_cmd_verify)

    rr = sub.add_parser("reproduce", help="re-execute a published run up to TAG and compare every dataset and model with its manifest")
    rr.add_argument("tag", nargs="?", help="iter-NNN (default: the latest published)")
    rr.add_argument("--reuse-labels", action="store_true", help="take the oracle's labels of bit-identical frames from the published data instead of recomputing them")
    rr.add_argument("--workdir", help="fresh directory for the re-execution (default reproduce/TAG)")
    rr.add_argument("--report", help="JSON report (default: beside the work directory, named after it)")
    rr.add_argument("--configfile", help="the run's config, for manifests that do not name it (older publications)")
    rr.add_argument("--cores", default="all", help="snakemake --cores (results do not depend on it)")
    rr.add_argument("--resume", action="store_true", help="continue a killed reproduction in an existing work directory")
    rr.add_argument("-C", "--directory", default=".", help="the clone of the published run")
    rr.set_defaults(func=_cmd_reproduce)

    ru = sub.add_parser("resume", help="continue a run whose driver was killed: stop leftovers, unlock, rerun incomplete jobs (with -n/--dry-run: only show them)")
    ru.add_argument("-C", "--directory", default=".")
    ru.add_argument("--cores", default="all")
    ru.add_argument("--configfile", help="the run's config, if not config/config.yaml")
    ru.add_argument("-n", "--dry-run", action="store_true", help="only show the leftover jobs that would be stopped and what Snakemake would rerun; stop and unlock nothing")
    ru.add_argument("--force", action="store_true", help="resume although processes were recorded on another host or before a reboot, or the run used a cluster executor (after you checked / cancelled them)")
    ru.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="further Snakemake arguments (e.g. --configfile X.yaml)")
    ru.set_defaults(func=_cmd_resume)

    cc = sub.add_parser("check-config", help="validate a run configuration (schema and cross-field checks)")
    cc.add_argument("config")
    cc.set_defaults(func=_cmd_check_config)

    e = sub.add_parser("example", help="generate a small EMT copper data set, train on it and test the model")
    e.add_argument("directory", nargs="?", default="demo")
    e.add_argument("--steps", type=int, default=600)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_cmd_example)
    return p


def main(argv: list[str] | None = None) -> int:
    from .recovery import job_record

    args = build_parser().parse_args(argv)
    try:
        with job_record("."):  # a job of a Snakemake run records its PID for `dpelt resume`
            args.func(args)
    except DpeltError as exc:
        print(f"dpelt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpelt: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"dpelt: error: {exc.filename or ''}: no space left on device; nothing half-written was kept, free space and resume", file=sys.stderr)
            return 28
        # an output or input path the system refuses (missing directory, read-only, a directory
        # where a file should go): one line naming the path, no traceback
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        print(f"dpelt: error: {paths or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
