"""Cost of the neighbour-density check (refusing an absurd rcut) on one water frame (not a test).

usage: python bench/neighbor_check.py [--data ../shared/data/water]

Interleaves 8 rounds of 50 neighbour-list builds of the 192-atom water box (rcut 6 Å, sel
[46, 92]) with the check and with it switched off, times the check alone, and writes
bench/results/neighbor_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pipeline.model.neighbor as nb
from pipeline.data.io import read_systems
from pipeline.fileio import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "water")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "studies" / "results" / "neighbor_check.json")
    args = ap.parse_args()
    if not (args.data / "data_3" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    ds = read_systems(args.data / "data_3", type_map=["O", "H"])[0]
    coord, cell, atype = ds["coord"].values[0], ds["cell"].values[0], ds["atom_type"].values
    check = nb.check_neighbor_density

    def per_build(n: int = 50) -> float:
        t = time.perf_counter()
        for _ in range(n):
            nb.build_neighbor_list(coord, cell, [True] * 3, atype, 6.0, [46, 92])
        return (time.perf_counter() - t) / n

    with_check, without = [], []
    for _ in range(8):
        nb.check_neighbor_density = check
        with_check.append(per_build())
        nb.check_neighbor_density = lambda *a: None
        without.append(per_build())
    nb.check_neighbor_density = check
    t = time.perf_counter()
    for _ in range(10000):
        check(len(coord), cell, [True] * 3, 6.0)
    alone = (time.perf_counter() - t) / 10000
    result = {
        "what": "neighbour list of the 192-atom water box, median of 8 interleaved rounds of 50 builds",
        "command": "python bench/neighbor_check.py",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "build_ms_with_check": statistics.median(with_check) * 1e3,
        "build_ms_without_check": statistics.median(without) * 1e3,
        "check_alone_us": alone * 1e6,
        "check_share_of_build": alone / statistics.median(with_check),
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
