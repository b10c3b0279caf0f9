"""``dpelt label``: label candidate frames with an oracle (registered by :func:`add_label_parser`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ConfigError


def _oracle_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--oracle-kwargs`` (a JSON object) or raise ConfigError naming the option."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"not valid JSON ({exc}): {text!r}", key="--oracle-kwargs") from None
    if not isinstance(value, dict):
        raise ConfigError(f"must be a JSON object like '{{\"basis\": \"sto-3g\"}}', got {text!r}", key="--oracle-kwargs")
    return value


TIMEOUT_HELP = "wall-clock limit of one calculation in seconds, or 'none' / 0 (the default: no limit): a longer one is stopped and recorded as failed"


def seconds_or_none(text: str) -> float | None:
    """``--timeout`` values: a positive number of seconds, or ``none`` / ``0`` (no limit); the
    workflow passes label.timeout this way (whole seconds, 0 when there is no limit)."""
    if text.strip().lower() in ("none", "null", "", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text!r}")
    return value


def _cmd_label(args: argparse.Namespace) -> None:
    from ..runconfig import schema_default
    from .run import label

    spec = {"name": args.oracle, "kwargs": _oracle_kwargs(args.oracle_kwargs)}
    log = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
    s = label(
        args.candidates,
        spec,
        args.output,
        max_failed_ratio=schema_default("label.max_failed_ratio") if args.max_failed_ratio is None else args.max_failed_ratio,
        known=args.known or (),
        max_force=schema_default("label.max_force") if args.max_force is None else args.max_force,
        retry_failed=args.retry_failed,
        log=log,
        timeout=args.timeout,
    )
    print(
        f"{s['oracle']}: {s['total']} candidates, {s['labelled']} labelled ({s['computed']} computed, {s['cached']} from earlier tasks), "
        f"{s['reused']} reused, {s['failed']} failed -> {args.output}/frames.nc"
    )


def add_label_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dpelt label CANDIDATES -o OUT_DIR --oracle NAME …`` on an argparse subparsers object."""
    p = subparsers.add_parser("label", help="label candidate frames with an oracle (EMT, xtb, PySCF, CP2K or any ASE calculator)")
    p.add_argument("candidates", help="frames file to label (e.g. iter/000/select/candidates.nc)")
    p.add_argument("-o", "--output", required=True, help="step directory: frames.nc, failures.json, summary.json, tasks/")
    p.add_argument("--oracle", default="emt", help="emt | xtb | pyscf | cp2k | dotted path of an ASE calculator class (default: emt)")
    p.add_argument("--oracle-kwargs", help='calculator arguments as a JSON object, e.g. \'{"basis": "def2-svp", "xc": "pbe"}\'')
    p.add_argument("--max-failed-ratio", type=float, help="fail the step when more than this fraction of labels fails (default: label.max_failed_ratio of the run config schema)")
    p.add_argument("--known", nargs="+", action="extend", metavar="FILE", help="already labelled frames files: their labels are reused, never recomputed")
    p.add_argument("--max-force", type=float, help="labels with any |F| at or above this are refused, eV/Å (default: label.max_force of the run config schema)")
    p.add_argument("--retry-failed", action="store_true", help="rerun tasks whose earlier result is a failure")
    p.add_argument("--timeout", type=seconds_or_none, default=None, metavar="SECONDS", help=TIMEOUT_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="one progress line per frame on stderr")
    p.set_defaults(func=_cmd_label)
    return p
