"""Rewrite the generated tables of docs/science.md from the results JSON (not a test).

usage: python bench/science/tables.py [--doc docs/science.md]

Each block between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` in the document is
replaced by the table NAME built from bench/science/results/*.json; a results file that does
not exist yet gives a one-line note instead.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def energy_table() -> str:
    d = _load("energy_warmstart.json")
    if d is None:
        return "_(bench/science/results/energy_warmstart.json not measured yet)_"
    lines = [f"`{d['command']}` ({d['date']}; run `{Path(d['run']).name}`)", "",
             "| variant | normalize_prefactors | refit on warm start | change_bias_after_training | iteration | ensemble E RMSE (meV/atom) | member E RMSE (meV/atom) | member offsets (meV/atom) | ensemble F RMSE (eV/Å) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, rows in d["per_iteration"].items():
        flags = d["variants"][v]
        for r in rows:
            lines.append(f"| {v} | {flags['normalize_prefactors']} | {flags['refit_bias_on_warm_start']} | {flags['change_bias_after_training']} | {r['iteration']} | {r['ensemble_energy_rmse_per_atom'] * 1e3:.2f} | "
                         + ", ".join(f"{x * 1e3:.2f}" for x in r["member_energy_rmse_per_atom"]) + " | " + ", ".join(f"{x * 1e3:+.2f}" for x in r["member_energy_offset_per_atom"]) + f" | {r['ensemble_force_rmse']:.4f} |")
    return "\n".join(lines)


def study_table(scale: str = "quick") -> str:
    d = _load(f"study_{scale}.json")
    if d is None:
        return f"_(bench/science/results/study_{scale}.json not measured yet)_"
    lines = [f"`{d['command']}` ({d['date']}, {d['scale']} scale: {d['scale_settings']['numb_steps']} training steps, seeds {d['seeds']}; "
             f"{d['init_frames']} initial frames shared by every arm; held-out: {d['holdout_frames']} oracle-MD frames over {len(d['holdout_cells'])} composition × temperature cells)", "",
             "| arm | labels | force RMSE (eV/Å) mean ± std | energy RMSE (meV/atom) mean ± std | worst cell: force RMSE (eV/Å) |", "|---|---|---|---|---|"]
    for arm, rows in d["arms"].items():
        for r in rows:
            lines.append(f"| {arm} | {r['labels']} | {r['force_rmse_mean']:.4f} ± {r['force_rmse_std']:.4f} | {r['energy_rmse_mean'] * 1e3:.2f} ± {r['energy_rmse_std'] * 1e3:.2f} | {r['worst_cell']}: {r['worst_cell_force_rmse_mean']:.3f} |")
    need = d["labels_to_reach_target"]

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    reach = ", ".join(f"{a} {'not reached' if n is None else format(n, '.0f')}" for a, n in need.items())
    lines += ["", f"Labels needed to reach the ELT arm's final force RMSE ({d['target_force_rmse']:.4f} eV/Å): {reach}; "
              f"random/ELT = {fmt(d['ratio_random_over_elt'], '.2f')}, AIMD/ELT = {fmt(d['ratio_aimd_over_elt'], '.2f')}."]
    return "\n".join(lines)


TABLES = {"energy": energy_table, "study_quick": lambda: study_table("quick"), "study_full": lambda: study_table("full")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=HERE.parents[1] / "docs" / "science.md")
    args = ap.parse_args()
    text = args.doc.read_text()
    for name, make in TABLES.items():
        text = re.sub(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)", lambda m: m.group(1) + make() + "\n" + m.group(2), text, flags=re.S)
    args.doc.write_text(text)


if __name__ == "__main__":
    main()
