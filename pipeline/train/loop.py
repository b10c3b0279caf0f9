"""The training loop: plain functions, no framework.

``train(cfg, out_dir)`` writes ``model.pt`` (final model), ``checkpoint.pt`` (every
``save_freq`` steps: model, Adam state, sampler state, learning curve so far),
``lcurve.csv`` and ``input.json`` (the resolved input). Same seed + same thread count
give bit-identical files; resuming from a checkpoint gives the same final model as an
uninterrupted run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..config import to_dict
from ..data.io import read_systems
from ..data.netcdf import content_sha256
from ..errors import ConfigError, ModelFileError
from ..fileio import write_json_atomic, write_text_atomic
from ..model.config import ModelConfig
from ..model.deeppot import DeepPot
from ..model.embedding_kernel import parameter_gradients_only
from ..model.serialize import FORMAT_VERSION, model_from_dict, model_to_dict, plain, read_model_file, save_model, save_torch
from ..model.stats import EnvStatAccumulator, auto_sel, fit_energy_bias
from ..runtime import configure_torch
from .config import DataConfig, TrainConfig
from .data import Batch, BatchSampler, TrainSystem, max_neighbor_counts, resolve_batch_size
from .loss import energy_loss, prefactors
from .lr import ExpDecay

CHECKPOINT_KIND = "dpelt-checkpoint"


def make_adam(params: list, lr: float) -> torch.optim.Optimizer:
    """Adam with torch's fused CPU kernel: one kernel per parameter instead of a dozen Python
    level ops (~2 ms a step for small models), deterministic (element-wise)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a device or torch build without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def adam_update_size(opt_state: dict) -> float:
    """Mean |m̂/(√v̂ + ε)| over every parameter entry of an Adam ``state_dict``: the step Adam
    takes, in units of the learning rate (1 on its first step; small when the recent gradients
    are smaller than the ones v̂ remembers)."""
    (b1, b2), eps = opt_state["param_groups"][0]["betas"], opt_state["param_groups"][0]["eps"]
    total = count = 0.0
    for st in opt_state["state"].values():
        t = float(st["step"])
        u = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)
        total += float(u.abs().sum())
        count += u.numel()
    return total / count


def load_systems(data: DataConfig, type_map: Sequence[str], key: str) -> list[tuple]:
    """[(dataset, source)] for every system under the configured paths (labels required)."""
    out = []
    for i, path in enumerate(data.system_list):
        if not Path(path).exists():
            raise ConfigError("no such file or directory", path=path, key=f"{key}.systems[{i}]")
        systems = read_systems(path, type_map=type_map, require_labels=True)
        for k, ds in enumerate(systems):
            out.append((ds, path if len(systems) == 1 else f"{path}#{k}"))
    if not out:
        raise ConfigError("no systems found", key=f"{key}.systems")
    return out


def resolve_sel(cfg: ModelConfig, systems: list[tuple]) -> list[int]:
    sel = cfg.descriptor.sel
    if not isinstance(sel, str):
        return list(sel)
    factor = float(sel.split(":", 1)[1]) if ":" in sel else 1.1
    return auto_sel(max_neighbor_counts(systems, cfg.descriptor.rcut, cfg.ntypes), factor)


def compute_statistics(model: DeepPot, cfg: ModelConfig, systems: Sequence[TrainSystem], seed: int) -> None:
    """Set davg/dstd from up to ``data_stat_nbatch`` frames per system and the energy bias from all."""
    acc = EnvStatAccumulator(model.ntypes)
    rng = np.random.default_rng([seed, 31337])
    for s in systems:
        n = min(s.nframes, cfg.data_stat_nbatch)
        frames = np.sort(rng.choice(s.nframes, size=n, replace=False))
        b = s.batch(frames)
        acc.add(b.rij, b.atype, cfg.descriptor.rcut_smth, cfg.descriptor.rcut)
    davg, dstd = acc.result(sum(model.sel), cfg.data_stat_protect)
    if cfg.descriptor.set_davg_zero:
        davg[:] = 0.0
    counts = np.concatenate([np.tile(np.bincount(s.atype.numpy(), minlength=model.ntypes), (s.nframes, 1)) for s in systems])
    energies = np.concatenate([s.energy.numpy() for s in systems])
    bias = fit_energy_bias(counts, energies, cfg.fitting_net.rcond)
    dtype = model.model_dtype
    with torch.no_grad():
        model.descriptor.davg.copy_(torch.as_tensor(davg, dtype=dtype))
        model.descriptor.dstd.copy_(torch.as_tensor(dstd, dtype=dtype))
        model.fitting.bias_atom_e.copy_(torch.as_tensor(bias, dtype=dtype))


def energy_residuals(model: DeepPot, systems: Sequence[TrainSystem], chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(element counts [nframes, ntypes], label − model energy [nframes] eV) over every training frame."""
    from ..model.serialize import inference_model

    frozen = inference_model(model, compress=False)  # a copy when ``model`` is training
    counts, res = [], []
    with torch.no_grad():
        for s in systems:
            for start in range(0, s.nframes, chunk):
                b = s.batch(np.arange(start, min(start + chunk, s.nframes)))
                pred = frozen.forward_rij(b.rij, b.nlist, b.atype, False, False, False, b.partner)["energy"]  # [nf] eV
                res.append((b.energy - pred).numpy())
            counts.append(np.tile(np.bincount(s.atype.numpy(), minlength=frozen.ntypes), (s.nframes, 1)))
    return np.concatenate(counts), np.concatenate(res)


def refit_energy_bias(model: DeepPot, systems: Sequence[TrainSystem], rcond: float | None = None) -> np.ndarray:
    """Add to the per-element energy bias the least-squares shift (eV) that best explains the
    model's energy residuals on the training frames, and return it. Forces do not change: a
    per-element constant in the atomic energy has no gradient. This is DeePMD-kit's
    ``change_bias_after_training`` / ``dp change-bias`` (change-by-statistic)."""
    counts, res = energy_residuals(model, systems)
    shift = fit_energy_bias(counts, res, rcond)
    with torch.no_grad():
        model.fitting.bias_atom_e.add_(torch.as_tensor(shift, dtype=model.fitting.bias_atom_e.dtype))
    return shift


def _lcurve_columns(has_valid: bool, has_virial: bool) -> list[str]:
    cols = ["step"]
    parts = ["rmse", "rmse_e", "rmse_f"] + (["rmse_v"] if has_virial else [])
    for p in parts:
        cols += ([f"{p}_val"] if has_valid else []) + [f"{p}_trn"]
    return cols + ["lr"]


def _write_lcurve(out_dir: Path, cfg: TrainConfig, rows: list[dict], columns: list[str]) -> None:
    lines = [",".join(columns)]
    for r in rows:
        lines.append(",".join(str(r["step"]) if c == "step" else f"{r.get(c, float('nan')):.6e}" for c in columns))
    write_text_atomic(out_dir / "lcurve.csv", "\n".join(lines) + "\n")
    disp = cfg.training.disp_file
    if disp and not disp.endswith(".csv"):
        head = "#" + " ".join(f"{c:>12s}" for c in columns)
        body = [" ".join(f"{r['step']:12d}" if c == "step" else f"{r.get(c, float('nan')):12.4e}" for c in columns) for r in rows]
        write_text_atomic(out_dir / Path(disp).name, "\n".join([head] + body) + "\n")


def evaluate_batches(model: DeepPot, batches: Sequence[Batch], pref) -> dict:
    """Mean squared errors over fixed validation batches -> RMSEs."""
    sums: dict[str, float] = {}
    for b in batches:
        pred = model.forward_rij(b.rij, b.nlist, b.atype, True, b.virial is not None, False, b.partner)
        _, m = energy_loss(pred, b.energy, b.force, b.virial, b.natoms, pref)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * v
    return {k: float(np.sqrt(v / len(batches))) for k, v in sums.items()}


class _Progress:
    """A rich progress bar on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, log: Callable[[str], None]):
        self.log = log
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def advance(self, step: int, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fingerprint(cfg: TrainConfig, train_raw: list, init_model, threads: int) -> str:
    """What a checkpoint must match to be resumed: config, data content, warm-start model, threads."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    for ds, _ in train_raw:
        h.update(content_sha256(ds).encode())
    if init_model is not None:
        h.update(Path(init_model).read_bytes())
    h.update(str(threads).encode())
    return h.hexdigest()


def _checkpoint(path: Path, model: DeepPot, cfg: TrainConfig, opt: torch.optim.Optimizer, step: int, sampler: BatchSampler, rows: list, meta: dict, fingerprint: str = "") -> None:
    data = {
        "fingerprint": fingerprint,
        "format_version": FORMAT_VERSION,
        "kind": CHECKPOINT_KIND,
        "model": model_to_dict(model, cfg.model, meta),
        "optimizer": opt.state_dict(),
        "step": int(step),
        "sampler": sampler.state(),
        "lcurve": plain(rows),
    }
    save_torch(data, path)


def _check_same_model(model: DeepPot, model_cfg: ModelConfig, want: ModelConfig, path, what: str) -> None:
    """A checkpoint or warm-start model must have the config's type_map and architecture (sel and seeds aside)."""
    if list(model.type_map) != list(want.type_map):
        raise ModelFileError(f"type_map {model.type_map} differs from the config's {list(want.type_map)}; {what} needs the same elements in the same order", path=path, key="type_map")
    if to_dict(model_cfg.descriptor) | {"sel": None, "seed": None} != to_dict(want.descriptor) | {"sel": None, "seed": None} or to_dict(model_cfg.fitting_net) | {"seed": None} != to_dict(want.fitting_net) | {"seed": None}:
        raise ModelFileError(f"architecture differs from the config's model section; {what} needs the same descriptor and fitting_net", path=path, key="config")


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    init_model: str | os.PathLike | None = None,
    restart: str | os.PathLike | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    timing: str | os.PathLike | None = None,
    resume: bool = False,
    refit_bias: bool = False,
) -> Path:
    """Train a model as configured; returns the path of ``model.pt``.

    ``refit_bias`` (with ``init_model``): before the first step, shift the warm-start model's
    energy bias to the least-squares fit of its energy residuals on this training data
    (:func:`refit_energy_bias`) — new data or compositions then start from the right energy
    zero instead of the one fitted to the data of the model's first training. DeePMD-kit's
    ``--init-model`` keeps the bias (the default here too).

    ``timing``: write wall-clock figures (start-up, steps/s between displays) as JSON there
    (kept out of ``out_dir``'s reproducible files).
    """
    t_launch = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = configure_torch(threads if threads is not None else cfg.training.threads)
    seed = cfg.seed
    type_map = list(cfg.model.type_map)
    train_raw = load_systems(cfg.training.training_data, type_map, "training.training_data")
    valid_raw = load_systems(cfg.training.validation_data, type_map, "training.validation_data") if cfg.training.validation_data else []
    for data, loaded, key in ((cfg.training.training_data, train_raw, "training_data"), (cfg.training.validation_data, valid_raw, "validation_data")):
        if data is not None and isinstance(data.batch_size, tuple) and len(data.batch_size) != len(loaded):
            raise ConfigError(f"batch_size lists {len(data.batch_size)} values for {len(loaded)} systems (one per system, in order)", key=f"training.{key}.batch_size")

    fingerprint = _fingerprint(cfg, train_raw, init_model, threads) + ("+refit" if refit_bias and init_model is not None else "")
    if resume and restart is None and (out_dir / "checkpoint.pt").exists():
        try:
            found = read_model_file(out_dir / "checkpoint.pt", kind=CHECKPOINT_KIND)
        except ModelFileError as exc:
            log(f"ignoring unreadable checkpoint: {exc}")
        else:
            if found.get("fingerprint") == fingerprint:
                restart = out_dir / "checkpoint.pt"
            else:
                log("the checkpoint in the output directory is from another input; starting afresh")
    ckpt = None
    if restart is not None:
        ckpt = read_model_file(restart, kind=CHECKPOINT_KIND)
        model, ckpt_cfg = model_from_dict(ckpt["model"], str(restart))
        _check_same_model(model, ckpt_cfg, cfg.model, restart, "restart")
        sel = model.sel
    elif init_model is not None:
        init = read_model_file(init_model)
        model, init_cfg = model_from_dict(init, str(init_model))
        _check_same_model(model, init_cfg, cfg.model, init_model, "warm start")
        sel = model.sel
    else:
        sel = resolve_sel(cfg.model, train_raw)
        model = DeepPot(cfg.model, sel=sel, seed=seed)
    t0 = time.perf_counter()
    systems = [TrainSystem(ds, src, type_map, cfg.model.descriptor.rcut, sel) for ds, src in train_raw]
    valid = [TrainSystem(ds, src, type_map, cfg.model.descriptor.rcut, sel) for ds, src in valid_raw]
    log(f"data: {len(systems)} training systems ({sum(s.nframes for s in systems)} frames), {len(valid)} validation systems; sel {sel}; neighbour lists in {time.perf_counter() - t0:.1f} s")
    if restart is None and init_model is None:
        compute_statistics(model, cfg.model, systems, seed)
    elif restart is None and refit_bias:
        shift = refit_energy_bias(model, systems, cfg.model.fitting_net.rcond)
        log(f"warm start: energy bias shifted by {np.array2string(shift * 1e3, precision=3)} meV per atom of {type_map} (least squares on the training frames)")
    model.train()

    numb_steps = cfg.training.numb_steps
    if numb_steps == 0:
        log("warning: training.numb_steps is 0: no training step is taken; model.pt holds the initial model")
    lr_sched = ExpDecay.from_config(cfg.learning_rate, numb_steps)
    batch_sizes = [resolve_batch_size(cfg.training.training_data.batch_size, s.natoms, k) for k, s in enumerate(systems)]
    sampler = BatchSampler(systems, batch_sizes, seed, cfg.training.training_data.auto_prob)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_adam(params, lr_sched(0))
    rows: list[dict] = []
    start = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sampler.load_state(ckpt["sampler"])
        rows = list(ckpt["lcurve"])
        start = int(ckpt["step"])
        log(f"restart from {restart} at step {start}")

    valid_batches: list[Batch] = []
    if valid:
        vcfg = cfg.training.validation_data
        vbs = [resolve_batch_size(vcfg.batch_size, s.natoms, k) for k, s in enumerate(valid)]
        vsampler = BatchSampler(valid, vbs, seed + 1, vcfg.auto_prob)
        valid_batches = [valid[k].batch(f) for k, f in (vsampler.next(i) for i in range(vcfg.numb_btch))]
    has_virial = any(s.virial is not None for s in systems)
    columns = _lcurve_columns(bool(valid_batches), has_virial)
    meta = {
        "dpelt_version": __version__,
        "torch_version": str(torch.__version__),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "seed": seed,
        "numb_steps": numb_steps,
        "training_data_sha256": [content_sha256(ds) for ds, _ in train_raw],
        "init_model": None if init_model is None else "warm start",
    }
    write_json_atomic(out_dir / "input.json", to_dict(cfg) | {"model": to_dict(cfg.model) | {"descriptor": to_dict(cfg.model.descriptor) | {"sel": list(sel)}}})

    progress = _Progress(numb_steps, start, log)
    log(f"start training: {numb_steps} steps, {threads} threads, {sum(p.numel() for p in params)} parameters, {time.perf_counter() - t_launch:.1f} s after launch")
    t_last, step_last = time.perf_counter(), start
    t_loop = t_last
    marks: list[tuple[int, float]] = []
    try:
        for step in range(start, numb_steps):
            lr = lr_sched(step)
            for group in opt.param_groups:
                group["lr"] = lr
            pref = prefactors(cfg.loss, lr, cfg.learning_rate.start_lr)
            k, frames = sampler.next(step)
            b = systems[k].batch(frames)
            with parameter_gradients_only():  # the loss is differentiated with respect to the parameters only
                pred = model.forward_rij(b.rij, b.nlist, b.atype, True, b.virial is not None and pref.v > 0, True, b.partner)
            loss, trn = energy_loss(pred, b.energy, b.force, b.virial if pref.v > 0 else None, b.natoms, pref)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step + 1} (system {systems[k].source}); lower start_lr or check the data")
            opt.zero_grad(set_to_none=True)
            # only the parameters: a plain backward would also push the loss gradient through
            # the force graph back to the displacements (a leaf), ~6 % of a step, for nothing
            torch.autograd.backward(loss, inputs=params)
            opt.step()
            done = step + 1
            if done == 1 or done % cfg.training.disp_freq == 0 or done == numb_steps:
                row = {"step": done, "lr": lr}
                row.update({f"{k2}_trn": v for k2, v in trn.items()})
                if valid_batches:
                    row.update({f"{k2}_val": v for k2, v in evaluate_batches(model, valid_batches, pref).items()})
                rows.append(row)
                _write_lcurve(out_dir, cfg, rows, columns)
                now = time.perf_counter()
                marks.append((done, now))
                rate = (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                which = "val" if valid_batches else "trn"
                info = f"rmse_e_{which} {row[f'rmse_e_{which}']:.3e} eV/atom  rmse_f_{which} {row[f'rmse_f_{which}']:.3e} eV/Å  lr {lr:.2e}  {rate:.2f} steps/s"
                if progress.bar is None:
                    log(f"step {done}/{numb_steps}  {info}")
                progress.advance(done, info)
            else:
                progress.advance(done)
            if done % cfg.training.save_freq == 0 and done < numb_steps:
                _checkpoint(out_dir / "checkpoint.pt", model, cfg, opt, done, sampler, rows, meta, fingerprint)
    finally:
        progress.close()
    model.eval()
    _checkpoint(out_dir / "checkpoint.pt", model, cfg, opt, numb_steps, sampler, rows, meta, fingerprint)
    if cfg.training.change_bias_after_training:  # after the checkpoint: resuming from it refits once, as here
        # on the model as saved, freshly built: the trained module gave wrong energies here
        # (2-element default model; a stale inference state, not yet isolated — see docs/science.md)
        model, _ = model_from_dict(model_to_dict(model, cfg.model, meta), str(out_dir / "checkpoint.pt"))
        model.eval()
        shift = refit_energy_bias(model, systems, cfg.model.fitting_net.rcond)
        log(f"change_bias_after_training: energy bias shifted by {np.array2string(shift * 1e3, precision=3)} meV per atom of {type_map}")
    path = save_model(model, cfg.model, out_dir / "model.pt", meta)
    _write_lcurve(out_dir, cfg, rows, columns)  # always: a resumed run that takes no step still has its lcurve (Snakemake deleted it)
    t_end = time.perf_counter()
    log(f"wrote {path} ({t_end - t_launch:.1f} s in all)")
    if timing:
        steady = [m for m in marks if m[0] > 1]
        rate = (steady[-1][0] - marks[0][0]) / (steady[-1][1] - marks[0][1]) if marks and steady else None
        write_json_atomic(timing, {"launch_to_first_step_s": t_loop - t_launch, "steps": numb_steps - start, "steady_steps_per_s": rate, "total_s": t_end - t_launch, "threads": threads})
    return path
