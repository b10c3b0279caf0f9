"""Shared pieces of the maintained benchmarks (bench/README.md): interleaved rounds, best/median,
machine and contention info, and the results-JSON writer.

Deliberately free of dpelt and torch imports: the DeePMD-kit halves run in other interpreters, and
the docs generator (bench/make_docs.py) must read results without the package.

Timing on a shared machine drifts by ±10-30 % between minutes, so every speed is measured in
*rounds*: each round runs every case once, the order rotating from round to round, and a figure
is reported as the best and the median over rounds (the best is the least disturbed measurement,
the median the typical one). Ratios are taken best/best and median/median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def _shared() -> Path:
    """The shared data directory beside the checkout ($DPELT_SHARED, else the first ``shared``
    with a ``reference`` folder in a parent: /work/main and /work/wt/NAME both find /work/shared)."""
    if os.environ.get("DPELT_SHARED"):
        return Path(os.environ["DPELT_SHARED"])
    for parent in ROOT.parents:
        if (parent / "shared" / "reference").is_dir():
            return parent / "shared"
    return ROOT.parent / "shared"


SHARED = _shared()
#: environment variables that decide how many threads a process uses and how its threads wait
THREAD_ENV = ("OMP_NUM_THREADS", "DPELT_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
              "DP_INTRA_OP_PARALLELISM_THREADS", "DP_INTER_OP_PARALLELISM_THREADS")


def rotated(names: list[str], r: int) -> list[str]:
    """The case order of round ``r``: rotated by one each round, so that no case always runs
    first (right after a quiet pause) or right after the same neighbour."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def interleaved(cases: dict[str, Callable[[int], dict]], rounds: int, log: Callable[[str], None] = print) -> list[dict]:
    """Run ``rounds`` rounds of every case; ``cases[name](r)`` returns a dict of measurements.
    Returns one ``{name: measurements}`` dict per round (with the round's start time and load)."""
    out = []
    names = list(cases)
    for r in range(rounds):
        one: dict = {"_started": time.strftime("%Y-%m-%dT%H:%M:%S"), "_load_1min": os.getloadavg()[0]}
        for name in rotated(names, r):
            log(f"round {r + 1}/{rounds}: {name} ...")
            one[name] = cases[name](r)
        out.append(one)
    return out


def best_median(values: list[float], larger_is_better: bool = True) -> dict:
    """``{"all", "best", "median"}`` of one figure over rounds."""
    vals = [float(v) for v in values]
    return {"all": vals, "best": max(vals) if larger_is_better else min(vals), "median": statistics.median(vals)}


def summarise(rounds: list[dict], keys: list[str], smaller_is_better: tuple[str, ...] = ()) -> dict:
    """Per case and key (those the case measured): best/median over rounds (the best of a key in
    ``smaller_is_better``, e.g. a time, is its minimum)."""
    names = [n for n in rounds[0] if not n.startswith("_")] if rounds else []
    out: dict = {}
    for name in names:
        out[name] = {k: best_median([r[name][k] for r in rounds], k not in smaller_is_better) for k in keys if k in rounds[0][name]}
    return out


def ratios(summary: dict, num: str, den: str) -> dict:
    """``{key: {"best": num_best / den_best, "median": ...}}`` for the keys both cases have."""
    out = {}
    for k in summary.get(num, {}):
        if k in summary.get(den, {}) and summary[den][k]["best"] and summary[den][k]["median"]:
            out[k] = {s: summary[num][k][s] / summary[den][k][s] for s in ("best", "median")}
    return out


def git_revision(root: Path = ROOT) -> str:
    """``git describe``-like revision of the checkout (with ``-dirty`` when files are modified)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict:
    """CPUs (all and those this process may use), platform, load averages, thread settings."""
    return {
        "cpus": os.cpu_count(),
        "cpus_available": cpus_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg": list(os.getloadavg()),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def new_result(benchmark: str, command: str, threads: int, **extra) -> dict:
    """The common head of every results file (``write_result`` adds the end time and the load after)."""
    return {"benchmark": benchmark, "command": command, "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git_revision": git_revision(), "machine": machine_info(), **extra}


def write_result(path: Path, result: dict) -> Path:
    """Write ``result`` (with the end time and the load after the run) to ``path`` atomically."""
    result = dict(result)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result.setdefault("machine", machine_info())["load_avg_after"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure stop with its command line and the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{tail}")
    return proc
