"""dpelt vs the fastest DeePMD-kit on DeePMD-kit's water example, in one run (not a test).

usage: python bench/water.py [--steps 1500] [--threads 2] [--rounds 3] [--round-steps 300]
                             [--backends tf] [--dpelt-compress] [--data ../shared/data/water]
                             [--tf-venv /root/.cache/dpelt/deepmd-tf-venv] [--pt-venv ...]

Every code trains the example's se_e2_a model (rcut 6.0, rcut_smth 0.5, sel [46, 92], neuron
[25, 50, 100], axis_neuron 16, fitting [240, 240, 240], resnet_dt, start_lr 1e-3 → stop_lr
3.51e-8, pref_e 0.02→1, pref_f 1000→1) from the *same* input.json on data_0–2, validates on data_3,
for --steps steps with --threads threads (the main run: accuracy on data_3, start-up, peak RSS).
DeePMD-kit runs in its own venvs (bench/deepmd/setup_tf_venv.sh, setup_venv.sh for --backends pt).

Columns (each a code and a model form):
* ``dpelt``: `dpelt train`, the model it writes evaluated by bench/dpelt_infer.py;
* ``dpelt-compressed`` (--dpelt-compress): the same model through dpelt's compressed
  (tabulated) inference: bench/dpelt_infer.py ``--compress`` (inference and MD only);
* ``deepmd-tf``: `dp --tf train` / freeze (the fastest DeePMD-kit on CPUs);
* ``deepmd-tf-compressed``: that model after `dp --tf compress` (inference and MD only);
* ``deepmd-pt`` (--backends tf pt): `dp --pt train` / freeze.

Speeds (training steps/s, energy+forces+virial atom·evals/s and ASE MD atom·steps/s on the
192-atom box) are measured again in --rounds interleaved rounds after the main run (inference
and MD on the main run's models, a --round-steps training run), the column order rotating; the
main run's figures count as one more measurement. Reported: best and median per column, and the
ratios dpelt / fastest DeePMD-kit of each figure: training against deepmd-tf, inference and MD
against deepmd-tf-compressed (and dpelt-compressed against it when present).
Writes bench/results/water.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

REFERENCE = harness.SHARED / "reference" / "deepmd-water-se_e2_a.input.json"
DEFAULT_VENVS = {"tf": Path("/root/.cache/dpelt/deepmd-tf-venv"), "pt": Path("/root/.cache/dpelt/deepmd-pt-venv")}
SETUP = {"tf": HERE / "deepmd" / "setup_tf_venv.sh", "pt": HERE / "deepmd" / "setup_venv.sh"}
#: bench/dpelt_infer.py's arguments selecting the uncompressed (False) or compressed (True) model form
DPELT_INFER_ARGS = {False: [], True: ["--compress"]}
SPEEDS = ["train_steps_per_s", "infer_atom_evals_per_s", "md_atom_steps_per_s"]
#: (numerator column, denominator column, figures): what "dpelt / fastest DeePMD-kit" compares
RATIOS = [("dpelt", "deepmd-tf", ["train_steps_per_s"]),
          ("dpelt", "deepmd-tf-compressed", ["infer_atom_evals_per_s", "md_atom_steps_per_s"]),
          ("dpelt-compressed", "deepmd-tf-compressed", ["infer_atom_evals_per_s", "md_atom_steps_per_s"]),
          ("dpelt", "deepmd-pt", SPEEDS)]


def water_input(data: Path, steps: int) -> dict:
    """The example input, pointed at DATA, with its lr schedule compressed to ``steps``."""
    cfg = json.loads(REFERENCE.read_text())
    t = cfg["training"]
    t["training_data"]["systems"] = [str(data / f"data_{k}") for k in range(3)]
    t["validation_data"]["systems"] = [str(data / "data_3")]
    t["numb_steps"] = steps
    t["disp_freq"] = min(100, steps)
    t["save_freq"] = steps
    t["seed"] = 10
    cfg["learning_rate"]["decay_steps"] = max(1, round(steps * 5000 / 1e6))
    return cfg


def dpelt_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), DPELT_THREADS=str(threads))


def dpelt_train(data: Path, work: Path, steps: int, threads: int) -> dict:
    """`dpelt train` for ``steps`` steps in WORK: speed, start-up, wall and peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "input.json").write_text(json.dumps(water_input(data, steps), indent=2))
    dpelt = str(Path(sys.executable).parent / "dpelt")
    cmd = [dpelt, "train", "input.json", "-o", "out", "--threads", str(threads), "--timing", "timing.json"]
    if Path("/usr/bin/time").exists():
        cmd = ["/usr/bin/time", "-v"] + cmd
    proc = harness.run(cmd, cwd=work, env=dpelt_env(threads), log=work / "train.log")
    timing = json.loads((work / "timing.json").read_text())
    rss = next((int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line), None)
    return {"train_steps_per_s": timing["steady_steps_per_s"], "train_startup_s": timing["launch_to_first_step_s"],
            "train_wall_s": timing["total_s"], "train_peak_rss_kb": rss}


def dpelt_infer(model: Path, data: Path, work: Path, threads: int, compress: bool) -> dict:
    """bench/dpelt_infer.py on MODEL (``--compress``: dpelt's tabulated embedding)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / ("infer-compressed.json" if compress else "infer.json")
    cmd = [sys.executable, str(HERE / "dpelt_infer.py"), str(model), str(data / "data_3"), str(out), "--threads", str(threads)]
    harness.run(cmd + DPELT_INFER_ARGS[compress], cwd=work, env=dpelt_env(threads))
    res = json.loads(out.read_text())
    return {"infer_atom_evals_per_s": res["atom_evals_per_s"], "md_atom_steps_per_s": res["md_atom_steps_per_s"],
            "md_energy_drift_eV_per_atom": res["md_energy_drift_eV_per_atom"], "infer_peak_rss_kb": res["peak_rss_kb"]}


def dpelt_test(model: Path, data: Path, work: Path, threads: int) -> dict:
    dpelt = str(Path(sys.executable).parent / "dpelt")
    harness.run([dpelt, "test", "-m", str(model), "-s", str(data / "data_3"), "-o", "test.json", "--threads", str(threads)], cwd=work, env=dpelt_env(threads))
    test = json.loads((work / "test.json").read_text())["overall"]
    return {"test_rmse_e_per_atom_eV": test["energy_rmse_per_atom"], "test_rmse_f_eV_per_A": test["force_rmse"]}


def deepmd_run(venv: Path, backend: str, mode: str, data: Path, work: Path, steps: int, threads: int, model: Path | None = None) -> dict:
    """bench/deepmd/run_deepmd.py in VENV (``mode`` all, train or infer)."""
    out = work / f"{mode}.json"
    cmd = [str(venv / "bin" / "python"), str(HERE / "deepmd" / "run_deepmd.py"), "--backend", backend, "--mode", mode,
           "--data", str(data), "--steps", str(steps), "--work", str(work / mode), "--out", str(out), "--threads", str(threads),
           "--example", str(REFERENCE)]
    harness.run(cmd + (["--model", str(model)] if model else []), log=work / f"{mode}.log")
    return json.loads(out.read_text())


def ensure_venv(backend: str, venv: Path) -> None:
    if not (venv / "bin" / "dp").exists():
        subprocess.run(["bash", str(SETUP[backend]), str(venv)], check=True)


class Columns:
    """The main run and the speed repeats of every column; models from the main run."""

    def __init__(self, args, work: Path):
        self.a, self.work = args, work
        self.names = ["dpelt"] + (["dpelt-compressed"] if args.dpelt_compress else [])
        for b in args.backends:
            self.names += [f"deepmd-{b}"] + (["deepmd-tf-compressed"] if b == "tf" else [])
        self.models: dict[str, Path] = {}

    def main_run(self) -> dict:
        a, out = self.a, {}
        print(f"dpelt: training {a.steps} steps ...", flush=True)
        d = self.work / "dpelt"
        out["dpelt"] = dpelt_train(a.data, d, a.steps, a.threads)
        self.models["dpelt"] = d / "out" / "model.pt"
        out["dpelt"].update(dpelt_test(self.models["dpelt"], a.data, d, a.threads))
        out["dpelt"].update(dpelt_infer(self.models["dpelt"], a.data, d, a.threads, False))
        if a.dpelt_compress:
            self.models["dpelt-compressed"] = self.models["dpelt"]
            out["dpelt-compressed"] = dpelt_infer(self.models["dpelt"], a.data, d, a.threads, True)
        for b in a.backends:
            print(f"DeePMD-kit {b}: training {a.steps} steps ...", flush=True)
            venv = a.tf_venv if b == "tf" else a.pt_venv
            ensure_venv(b, venv)
            res = deepmd_run(venv, b, "all", a.data, self.work / f"deepmd-{b}", a.steps, a.threads)
            keep = ("train_", "test_rmse", "infer_atom_evals_per_s", "md_atom_steps_per_s", "md_energy_drift", "infer_peak_rss_kb", "compress_")
            out[f"deepmd-{b}"] = {k: v for k, v in res.items() if k.startswith(keep) and not isinstance(v, list)}
            self.models[f"deepmd-{b}"] = self.work / f"deepmd-{b}" / "all" / ("model.pb" if b == "tf" else "model.pth")
            if b == "tf":
                out["deepmd-tf-compressed"] = {k[len("compressed_"):]: v for k, v in res.items() if k.startswith("compressed_") and not isinstance(v, list)}
                self.models["deepmd-tf-compressed"] = self.work / "deepmd-tf" / "all" / "model-compressed.pb"
        return out

    def speed_round(self, name: str, r: int) -> dict:
        """One repeat of NAME's speed measurements (a training run for trainable columns)."""
        a = self.a
        rdir = self.work / f"round{r}" / name
        if rdir.exists():
            shutil.rmtree(rdir)
        if name.startswith("dpelt"):
            res = dpelt_infer(self.models[name], a.data, rdir, a.threads, name == "dpelt-compressed")
            if name == "dpelt":
                res.update(dpelt_train(a.data, rdir / "train", a.round_steps, a.threads))
            return {k: res[k] for k in SPEEDS if k in res}
        b = "tf" if "-tf" in name else "pt"
        venv = a.tf_venv if b == "tf" else a.pt_venv
        res = deepmd_run(venv, b, "infer", a.data, rdir, 1, a.threads, self.models[name])
        if not name.endswith("compressed"):
            res.update(deepmd_run(venv, b, "train", a.data, rdir, a.round_steps, a.threads))
        return {k: res[k] for k in SPEEDS if k in res}


def check_dpelt_compress() -> None:
    """--dpelt-compress needs bench/dpelt_infer.py to know --compress (dpelt's tabulated inference)."""
    helptext = subprocess.run([sys.executable, str(HERE / "dpelt_infer.py"), "--help"], capture_output=True, text=True).stdout
    if "--compress" not in helptext:
        sys.exit("--dpelt-compress: bench/dpelt_infer.py has no --compress option (dpelt's compressed inference has not landed)")


def summarise(result: dict, rounds: list[dict], names: list[str]) -> None:
    """Best/median per column and figure (main run + rounds) and the dpelt / DeePMD-kit ratios."""
    every = [{n: result["main"][n] for n in names}] + rounds
    speed = {n: {k: harness.best_median([r[n][k] for r in every if k in r[n]]) for k in SPEEDS if any(k in r[n] for r in every)} for n in names}
    result["speed"] = speed
    result["ratios"] = {}
    for num, den, keys in RATIOS:
        if num in speed and den in speed:
            r = harness.ratios({num: {k: speed[num][k] for k in keys if k in speed[num]}, den: speed[den]}, num, den)
            if r:
                result["ratios"][f"{num} / {den}"] = r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the main run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed repeats after the main run")
    ap.add_argument("--round-steps", type=int, default=300, help="training steps of a speed repeat (>= 200: DeePMD-kit logs every 100)")
    ap.add_argument("--backends", nargs="*", default=["tf"], choices=["tf", "pt"], help="DeePMD-kit backends to compare with (none: dpelt only)")
    ap.add_argument("--dpelt-compress", action="store_true", help="add the dpelt-compressed column (dpelt_infer.py --compress)")
    ap.add_argument("--data", type=Path, default=harness.SHARED / "data" / "water")
    ap.add_argument("--tf-venv", type=Path, default=DEFAULT_VENVS["tf"])
    ap.add_argument("--pt-venv", type=Path, default=DEFAULT_VENVS["pt"])
    ap.add_argument("--work", type=Path, default=HERE / "work" / "water")
    ap.add_argument("--out", type=Path, default=harness.RESULTS / "water.json")
    args = ap.parse_args()
    args.data = args.data.resolve()
    if not (args.data / "data_0" / "type.raw").exists():
        sys.exit(f"water data not found at {args.data}")
    if args.dpelt_compress:
        check_dpelt_compress()
    work = args.work / f"steps{args.steps}"
    if work.exists():
        shutil.rmtree(work)
    cols = Columns(args, work)
    result = harness.new_result("water", " ".join(["python", "bench/water.py"] + sys.argv[1:]), args.threads,
                                what="dpelt vs DeePMD-kit (TF, TF compressed), water se_e2_a example input, same steps and threads",
                                steps=args.steps, round_steps=args.round_steps, columns=cols.names, speed_keys=SPEEDS)
    result["main"] = cols.main_run()
    print(json.dumps(result["main"], indent=1), flush=True)
    cases = {n: (lambda r, n=n: cols.speed_round(n, r)) for n in cols.names}
    rounds = harness.interleaved(cases, args.rounds)
    result["rounds"] = rounds
    summarise(result, [{n: r[n] for n in cols.names} for r in rounds], cols.names)
    print(json.dumps(result["ratios"], indent=1))
    harness.write_result(args.out, result)


if __name__ == "__main__":
    main()
