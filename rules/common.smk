# Helpers of the workflow: config validation, seeds, the iteration schedule, input functions.
# Rules stay declarative; everything computed lives here.

import json
import math
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError

from pipeline.errors import ConfigError
from pipeline.runconfig import cross_check, stage_systems, stage_trust, train_input, validate_schema
from pipeline.seeds import derive_seed


# the file named in errors: the last --configfile, else the default config
CONFIG_SOURCE = str(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "config/config.yaml"
try:
    validate_schema(config, CONFIG_SOURCE)  # pipeline/schema.yaml; one line naming the key
    # the init inputs (init.data, structure files) only matter until the initial data exist
    cross_check(config, source=CONFIG_SOURCE, check_paths=not Path("data/init/frames.nc").exists())
except ConfigError as exc:
    raise WorkflowError(f"dpelt: invalid configuration: {exc}") from None

# label.timeout reaches `dpelt label`, `dpelt init` and `dpelt holdout` as their --timeout, through
# a job resource (rules use `resources: label_timeout=LABEL_TIMEOUT`): unlike a param, a resource
# is no rerun trigger, so a new or changed limit does not rerun finished steps. Whole seconds
# (rounded up), 0 for no limit: an integer, because a string resource must be equal across the
# jobs of a SLURM job group (the profile groups label with evaluate, which has no limit).
LABEL_TIMEOUT = 0 if config["label"]["timeout"] is None else math.ceil(float(config["label"]["timeout"]))


def _start_driver():
    """A real run (not a dry run, not --unlock, not a job process Snakemake spawned) holds the
    driver lock of this directory for its lifetime, records itself and exports
    DPELT_RUN_DRIVER to its jobs, so `dpelt resume` knows it is alive (from the lock) and which
    processes were its jobs (from their records), never from PIDs or command lines. Done at
    parse time, before Snakemake's own lock and DAG, and independent of --no-hooks."""
    import sys

    from snakemake_interface_executor_plugins.settings import ExecMode

    from pipeline.recovery import _executor, start_driver

    dry = bool(getattr(workflow.output_settings, "dryrun", False))
    if workflow.exec_mode != ExecMode.DEFAULT or dry or "--unlock" in sys.argv[1:]:
        return
    try:
        start_driver(".", executor=_executor(sys.argv[1:]) or "local")
    except BlockingIOError:
        raise WorkflowError("dpelt: `dpelt resume` or `dpelt restore` is working on this run directory (.dpelt/run/driver.lock); start the run when it has finished") from None


_start_driver()


onstart:
    # the executor is only known now: resume refuses a cluster run whose jobs may still be queued
    from pipeline.recovery import is_started_driver, record_driver

    if is_started_driver():
        record_driver(".", executor=workflow.executor_plugin.name if workflow.executor_plugin else "local")


wildcard_constraints:
    i=r"\d{3}",
    k=r"\d+",
    task=r"[A-Za-z0-9_.+-]+",


SEED = int(config["seed"])
NUMB_MODELS = int(config["numb_models"])
STAGES = config["explore"]["stages"]
THREADS = config["threads"]
INIT = "data/init/frames.nc"
HOLDOUT = "data/holdout/frames.nc"


def iter_dir(i):
    """The one place iteration directories are formatted: iter/000, iter/001, ..."""
    return f"iter/{int(i):03d}"


def spec_json(data):
    """A config section as compact, key-sorted JSON (passed to the dpelt CLI; tracked as a param)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- the iteration schedule


def select_report(i):
    """report.json of iteration i; Snakemake waits (re-evaluating the DAG) until it exists."""
    path = checkpoints.select.get(i=f"{int(i):03d}").output.report
    return json.loads(Path(path).read_text())


def schedule(until=None):
    """[(iteration, stage)] of the run so far, and whether the last stage has ended.

    Each finished iteration's report decides the next one's stage: a stage ends after
    `patience` converged iterations in a row or after its `max_iter` iterations; the run ends
    after the last stage or at config max_iter. With `until`, stop at iteration until-1
    without reading its own report (the stage of an iteration depends on earlier ones only).
    """
    its, stage, in_stage, streak = [], 0, 0, 0
    last = int(config["max_iter"]) if until is None else min(int(until), int(config["max_iter"]))
    for i in range(last):
        its.append((i, stage))
        if until is not None and i == until - 1:
            break
        rep = select_report(i)
        in_stage += 1
        streak = streak + 1 if rep["converged"] else 0
        if streak >= STAGES[stage]["patience"] or in_stage >= STAGES[stage]["max_iter"]:
            stage, in_stage, streak = stage + 1, 0, 0
            if stage == len(STAGES):
                return its, True
    return its, False


def earlier_select_reports(wc):
    """report.json of every iteration before {i}: they decide its stage. Declared as input so
    that a job run elsewhere (a SLURM job step) sees these checkpoints as finished too."""
    return [checkpoints.select.get(i=f"{j:03d}").output.report for j in range(int(wc.i))]


def stage_of(i):
    its, _ = schedule(until=int(i) + 1)
    if len(its) <= int(i):
        raise WorkflowError(f"iteration {int(i):03d} is not part of this run (it ended earlier)")
    return its[int(i)][1]


# ---------------------------------------------------------------- exploration tasks


def task_table(i):
    """{task name: (system, temperature K, pressure bar or None)} of iteration i's stage."""
    s = stage_of(i)
    st = STAGES[s]
    table = {}
    for system in stage_systems(config, s):
        for T in st["temps"]:
            for P in st["press"]:
                name = f"{system}_T{float(T):g}" + ("" if P is None else f"_P{float(P):g}")
                table[name] = (system, float(T), None if P is None else float(P))
    return table


def explore_outputs(wc):
    if config["explore"]["batched"]:  # the task files exist once the iteration's batch job ran
        checkpoints.explore_batch.get(i=wc.i)
    return [f"{iter_dir(wc.i)}/explore/{t}/frames.nc" for t in sorted(task_table(wc.i))]


def explore_batch_tasks(wc):
    """Every task of iteration {i} as JSON [{name, system, seed, spec}] (explore.batched)."""
    tasks = []
    for t in sorted(task_table(wc.i)):
        w = SimpleNamespace(i=wc.i, task=t)
        tasks.append({"name": t, "system": explore_system(w), "seed": explore_seed(w), "spec": json.loads(explore_spec(w))})
    return spec_json(tasks)


def explore_spec(wc):
    s = stage_of(wc.i)
    st = STAGES[s]
    system, T, P = task_table(wc.i)[wc.task]
    ex = config["explore"]
    lo, hi = stage_trust(config, s)
    return spec_json(
        {
            "temperature_K": T,
            "pressure_bar": P,
            "ensemble": st["ensemble"],
            "nsteps": st["nsteps"],
            "trj_freq": st["trj_freq"],
            "dt_fs": ex["dt_fs"],
            "tau_t_fs": ex["tau_t_fs"],
            "tau_p_fs": ex["tau_p_fs"],
            "drive": ex["drive"],
            "compress": ex["compress"],
            "bias": ex["bias"],
            "guards": ex["guards"],
            "trust_lo": lo,
            "trust_hi": hi,
        }
    )


def explore_system(wc):
    return task_table(wc.i)[wc.task][0]


# ---------------------------------------------------------------- data and models


def labels_before(wc):
    """Labels of every earlier iteration (ancient: publishing or restoring them never reruns a job)."""
    return [ancient(f"{iter_dir(j)}/label/frames.nc") for j in range(int(wc.i))]


def known_labels(wc):
    return [ancient(INIT)] + labels_before(wc)


def models_of(wc):
    return [f"{iter_dir(wc.i)}/train/{k}/model.pt" for k in range(NUMB_MODELS)]


def fps_model(wc):
    """The model whose descriptors spread the picked candidates (select.spread: fps), else none."""
    return models_of(wc)[:1] if config["select"]["spread"] == "fps" else []


def warm_start_model(wc):
    if config["train"]["warm_start"] and int(wc.i) > 0:
        return [ancient(f"{iter_dir(int(wc.i) - 1)}/train/{wc.k}/model.pt")]
    return []


def warm_start_args(wc):
    if not (config["train"]["warm_start"] and int(wc.i) > 0):
        return ""
    t = config["train"]
    args = f"--init-model {iter_dir(int(wc.i) - 1)}/train/{wc.k}/model.pt"
    if t["warm_start_steps"] is not None:
        args += f" --steps {t['warm_start_steps']}"
    if t["warm_start_start_lr"] is not None:
        args += f" --start-lr {t['warm_start_start_lr']}"
    if t["warm_start_refit_bias"]:
        args += " --refit-bias"
    return args


def holdout_input(wc=None):
    return [ancient(HOLDOUT)] if config["holdout"]["enabled"] else []


def oracle_label_spec():
    """What the init and holdout jobs use of the label section (the oracle, the force ceiling):
    changing anything else there (max_failed_ratio, retries) must not relabel their data."""
    return {k: config["label"][k] for k in ("oracle", "max_force") if k in config["label"]}


def holdout_spec():
    systems, temps = [], []
    for s in range(len(STAGES)):
        systems += [x for x in stage_systems(config, s) if x not in systems]
        temps += [float(T) for T in STAGES[s]["temps"] if float(T) not in temps]
    return spec_json({"type_map": config["type_map"], "init": config["init"], "holdout": config["holdout"], "label": oracle_label_spec(), "systems": systems, "temperatures_K": temps})


# ---------------------------------------------------------------- seeds of the jobs


def train_seed(wc):
    return derive_seed(SEED, "train", int(wc.i), int(wc.k))


def explore_seed(wc):
    return derive_seed(SEED, "explore", int(wc.i), wc.task)


def select_seed(wc):
    return derive_seed(SEED, "select", int(wc.i))


def label_attempt(wc, attempt):
    """The attempt number of a label job (1, then 2, … under snakemake --retries)."""
    return attempt


def retry_failed_labels(wc, resources):
    """On a retried label job (snakemake --retries), try the failed labels again too."""
    return "--retry-failed" if resources.label_attempt > 1 else ""


def select_trust_args(wc):
    lo, hi = stage_trust(config, stage_of(wc.i))
    return f"--trust-lo {lo} --trust-hi {hi}"


# ---------------------------------------------------------------- the report and publishing


def report_inputs(wc):
    its, _ = schedule()
    out = []
    for i, _ in its:
        d = iter_dir(i)
        out += [f"{d}/select/report.json", f"{d}/label/summary.json", f"{d}/eval/metrics.json", f"{d}/eval/parity.png", f"{d}/eval/calibration.json"]
        out += [f"{d}/train/{k}/lcurve.csv" for k in range(NUMB_MODELS)]
    return out


def report_args(wc):
    its, finished = schedule()
    return "--iterations " + " ".join(iter_dir(i) for i, _ in its) + " --stages " + " ".join(str(s) for _, s in its) + f" --n-stages {len(STAGES)}" + (" --finished" if finished else "")


def publish_finished_run():
    """After a successful run: publish finished iterations with DVC, if this is a git repository."""
    if not config["publish"]["auto"] or not Path(".git").exists():
        return
    remote = config["publish"]["remote"]
    shell(f"dpelt publish --all --configfile {shlex.quote(CONFIG_SOURCE)}" + (f" --remote {remote}" if remote else "") + " >> logs/publish.log 2>&1 || echo 'dpelt publish failed: see logs/publish.log'")
