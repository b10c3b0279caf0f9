"""``dpelt <step>``: one subcommand per workflow step, plus the DeePMD-kit-style tools.

Every bad input ends in one line ``dpelt: error: <file> [<key>]: <what is wrong>`` and exit
status 2, never a bare traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import DpeltError


def _cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .train.config import load_train_config
    from .train.loop import train

    cfg = load_train_config(args.config)
    t = cfg.training
    if args.steps is not None:
        t = replace(t, numb_steps=args.steps)
    if args.seed is not None:
        t = replace(t, seed=args.seed)
    cfg = replace(cfg, training=t)
    train(cfg, args.output, init_model=args.init_model, restart=args.restart, threads=args.threads, timing=args.timing)


def _cmd_freeze(args: argparse.Namespace) -> None:
    from .model.serialize import freeze_model, load_model

    out = freeze_model(load_model(args.model), args.output)
    print(f"wrote {out}")


def _cmd_test(args: argparse.Namespace) -> None:
    from .evaluate import test_model
    from .model.serialize import load_model
    from .runtime import configure_torch

    configure_torch(args.threads)
    result = test_model(load_model(args.model), args.systems, out_json=args.output, plot=args.plot)
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


def _cmd_example(args: argparse.Namespace) -> None:
    from .quickstart import run_quickstart

    run_quickstart(Path(args.directory), steps=args.steps, threads=args.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpelt", description="Deep Potential models and the ELT concurrent-learning loop.")
    p.add_argument("--version", action="version", version=f"dpelt {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a dpelt YAML or a DeePMD-kit input.json")
    t.add_argument("config", help="YAML or JSON with model / learning_rate / loss / training")
    t.add_argument("-o", "--output", default=".", help="output directory (model.pt, checkpoint.pt, lcurve.csv, input.json)")
    t.add_argument("--init-model", help="warm start: initialise weights and statistics from this model file")
    t.add_argument("--restart", help="resume from a checkpoint.pt written by an earlier run")
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
    s.set_defaults(func=_cmd_test)

    c = sub.add_parser("convert", help="convert frames between netcdf (.nc), deepmd/npy, extxyz and ASE formats")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--from", dest="src_format", help="netcdf | deepmd/npy | extxyz | ase:<format> (default: by path)")
    c.add_argument("--to", dest="dst_format", help="netcdf | deepmd/npy | extxyz | ase:<format> (default: by suffix)")
    c.add_argument("--type-map", nargs="+", help="element order, e.g. --type-map O H")
    c.set_defaults(func=_cmd_convert)

    e = sub.add_parser("example", help="generate a small EMT copper data set, train on it and test the model")
    e.add_argument("directory", nargs="?", default="demo")
    e.add_argument("--steps", type=int, default=600)
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_cmd_example)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DpeltError as exc:
        print(f"dpelt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpelt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
