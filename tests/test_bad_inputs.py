"""Table of malformed inputs: each fails at load with one message naming the file and the key."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import DpeltError

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())


def _set(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        if p.endswith("]"):
            name, idx = p[:-1].split("[")
            node = node[name][int(idx)]
        else:
            node = node.setdefault(p, {})
    node[parts[-1]] = value
    return cfg


CONFIG_CASES = [
    ("numb_models", "four", "numb_models"),
    ("foo", 1, "foo"),
    ("select.trust_mid", 0.1, "trust_mid"),
    ("numb_models", -1, "numb_models"),
    ("numb_models", 1, "numb_models"),  # one model has no deviation: everything would look accurate
    ("explore.stages[0].nsteps", -5, "explore.stages[0].nsteps"),
    ("select.trust_lo", 0.9, "select.trust_lo"),
    ("type_map", ["Cu", "Zz"], "type_map"),
    ("explore.stages[0].systems", ["nowhere"], "explore.stages[0].systems"),
    ("explore.stages[0].ensemble", "npt", "explore.stages[0].press"),
    ("explore.stages[0].ensemble", "nvx", "explore.stages[0].ensemble"),
    ("init.structures[0].lattice", "quasicrystal", "init.structures[0].lattice"),
    ("train.model.descriptor.rcutt", 4.0, "train.model.descriptor.rcutt"),
    ("train.model.descriptor.type", "se_atten", "train.model.descriptor.type"),
    ("label.oracle.name", "nonexistent_code", "label.oracle.name"),
    ("label.max_failed_ratio", 1.5, "label.max_failed_ratio"),
    ("label.timeout", 0, "label.timeout"),
    ("label.timeout", "1h", "label.timeout"),
    ("init.structures[0].file", "x.cif", "init.structures[0]"),
    ("type_map", ["Cu", "Cu"], "type_map"),
    ("train.training.training_data", {"systems": ["a.nc"]}, "train.training.training_data.systems"),
    ("threads.train", 0, "threads.train"),
    # accepted before, then ignored or silently wrong
    ("explore.stages[0].press", [1.0], "explore.stages[0].press"),  # nvt: a pressure recorded, never applied
    ("explore.stages[0].trj_freq", 1000, "explore.stages[0].trj_freq"),  # > nsteps: only the start frame
    ("select.adapt_perc_candi", 0.1, "select.adapt_perc_candi"),  # without adapt_numb_candi: ignored
    ("train.warm_start_steps", 10, "train.warm_start_steps"),  # without warm_start: ignored
    ("label.oracle.kwargs", {"asap_cutof": True}, "label.oracle.kwargs"),  # an EMT typo kept the default
    # found only when the init job ran
    ("init.data", ["nowhere.nc"], "init.data[0]"),
    ("label.oracle", {"name": "pyscf"}, "label.oracle.name"),  # a molecular code for a periodic lattice
    ("train.training", {"training_data": {"batch_size": [1, 2]}}, "train.training.training_data.batch_size"),
    ("init.structures", [{"name": "cu", "file": "nowhere.xyz"}], "init.structures[0].file"),
]


@pytest.mark.parametrize("path, value, key", CONFIG_CASES, ids=[c[0] + "=" + str(c[1])[:12] for c in CONFIG_CASES])
def test_bad_run_config(tmp_path, path, value, key):
    from pipeline.runconfig import load_run_config

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(_set(BASE, path, value)))
    with pytest.raises(DpeltError) as info:
        load_run_config(f)
    msg = str(info.value)
    assert str(f) in msg and key in msg, msg
    assert "\n" not in msg.strip()  # one line


def test_unparsable_and_missing_config(tmp_path):
    from pipeline.runconfig import load_run_config

    f = tmp_path / "broken.yaml"
    f.write_text("seed: [1, 2\n")
    with pytest.raises(DpeltError, match=r"broken\.yaml: cannot parse YAML"):
        load_run_config(f)
    with pytest.raises(DpeltError, match=r"absent\.yaml: file not found"):
        load_run_config(tmp_path / "absent.yaml")


def _npy(tmp_path: Path, **arrays) -> Path:
    d = tmp_path / "sys"
    (d / "set.000").mkdir(parents=True)
    (d / "type.raw").write_text("0\n0\n")
    (d / "type_map.raw").write_text("Cu\n")
    base = {"coord": np.zeros((2, 6)) + np.array([0, 0, 0, 1.5, 0, 0.0]), "box": np.tile(np.eye(3).ravel() * 6, (2, 1)), "energy": np.zeros(2), "force": np.zeros((2, 6))}
    base.update(arrays)
    for k, v in base.items():
        np.save(d / "set.000" / f"{k}.npy", v)
    return d


def test_bad_data_files(tmp_path):
    from pipeline.data import read_systems, write_systems
    from pipeline.data.netcdf import read_frames
    from pipeline.examples import emt_bulk_frames

    cases = []
    cases.append((lambda: read_systems(tmp_path / "missing.nc"), "missing.nc", "not found"))
    nc = tmp_path / "good.nc"
    write_systems(emt_bulk_frames(frames_per_temperature=3, temperatures_K=(300,)), nc)
    cut = tmp_path / "cut.nc"
    cut.write_bytes(nc.read_bytes()[:2000])
    cases.append((lambda: read_frames(cut), "cut.nc", "cannot"))
    d = _npy(tmp_path / "a", energy=np.zeros(3))
    cases.append((lambda: read_systems(d), "energy.npy", "[energy]"))
    d2 = _npy(tmp_path / "b", force=np.full((2, 6), np.nan))
    cases.append((lambda: read_systems(d2), "sys", "[force]"))
    flipped = tmp_path / "flipped.nc"
    data = bytearray(nc.read_bytes())
    target = np.ascontiguousarray(read_frames(nc)[0]["force"].values).tobytes()[64:80]
    pos = bytes(data).find(target)
    data[pos + 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    cases.append((lambda: read_frames(flipped), "flipped.nc", "[content_sha256]"))
    xyz = tmp_path / "f.xyz"
    write_systems(emt_bulk_frames(frames_per_temperature=1, temperatures_K=(300,)), xyz)
    cases.append((lambda: read_systems(xyz, type_map=["Au"]), "f.xyz", "[type_map]"))
    for fn, where, key in cases:
        with pytest.raises(DpeltError) as info:
            fn()
        assert where in str(info.value) and key in str(info.value), str(info.value)


def test_bad_model_files(tmp_path):
    from conftest import randomize_stats, tiny_model_config

    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import load_model, model_to_dict, save_model
    from pipeline.train.config import parse_train_config
    from pipeline.train.loop import train

    model = randomize_stats(DeepPot(tiny_model_config()))
    good = save_model(model, model.config, tmp_path / "ab.pt")
    future = tmp_path / "future.pt"
    d = model_to_dict(model, model.config)
    d["format_version"] = 7
    torch.save(d, future)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format_version": 9, "kind": "dpelt-checkpoint"}, ckpt)
    text = tmp_path / "text.pt"
    text.write_text("not a model")

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code')",))

    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "kind": "dpelt-model", "payload": Evil()}, evil)
    for path, key in ((future, "[format_version]"), (text, "not a readable torch file"), (evil, "refused")):
        with pytest.raises(DpeltError) as info:
            load_model(path)
        assert path.name in str(info.value) and key in str(info.value)
    from pipeline.model.serialize import read_model_file

    with pytest.raises(DpeltError, match=r"ckpt\.pt \[format_version\]"):
        read_model_file(ckpt, kind="dpelt-checkpoint")
    # a model of another type_map as a warm start
    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames

    write_frames(tmp_path / "cu.nc", emt_bulk_frames(frames_per_temperature=2, temperatures_K=(300,)))
    cfg = parse_train_config(
        {
            "model": {"type_map": ["Cu"], "descriptor": {"sel": [40], "rcut": 4.0, "rcut_smth": 1.5, "neuron": [4, 8, 16], "axis_neuron": 4}, "fitting_net": {"neuron": [16, 16]}},
            "training": {"training_data": {"systems": [str(tmp_path / "cu.nc")]}, "numb_steps": 1},
        }
    )
    with pytest.raises(DpeltError) as info:
        train(cfg, tmp_path / "out", init_model=good, log=lambda s: None)
    assert "ab.pt" in str(info.value) and "[type_map]" in str(info.value)


def _cu_train_config(tmp_path: Path, **training):
    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames
    from pipeline.train.config import parse_train_config

    data = tmp_path / "cu.nc"
    if not data.exists():
        write_frames(data, emt_bulk_frames(frames_per_temperature=2, temperatures_K=(300,)))
    neuron = training.pop("neuron", [4, 8, 16])
    type_map = training.pop("type_map", ["Cu"])
    section = {"training_data": {"systems": [str(data)]}, "numb_steps": 1, "disp_freq": 1, "save_freq": 1}
    section.update(training)
    return parse_train_config(
        {
            "model": {"type_map": type_map, "descriptor": {"sel": [40] * len(type_map), "rcut": 4.0, "rcut_smth": 1.5, "neuron": neuron, "axis_neuron": 4}, "fitting_net": {"neuron": [16, 16]}},
            "training": section,
        }
    )


def test_restart_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    """--restart used to load any checkpoint and train it on the configured data."""
    from pipeline.train.loop import train

    train(_cu_train_config(tmp_path), tmp_path / "a", log=lambda s: None)
    ckpt = tmp_path / "a" / "checkpoint.pt"
    assert ckpt.exists()
    for changed, key in (({"neuron": [4, 8, 8]}, "[config]"), ({"type_map": ["Cu", "Au"]}, "[type_map]")):
        with pytest.raises(DpeltError) as info:
            train(_cu_train_config(tmp_path, numb_steps=2, **changed), tmp_path / "b", restart=ckpt, log=lambda s: None)
        assert "checkpoint.pt" in str(info.value) and key in str(info.value), str(info.value)
    train(_cu_train_config(tmp_path, numb_steps=2), tmp_path / "c", restart=ckpt, log=lambda s: None)  # the same model restarts


def test_training_inputs_checked_against_the_systems_found(tmp_path):
    from pipeline.train.loop import train

    with pytest.raises(DpeltError, match=r"nope \[training.training_data.systems\[0\]\]: no such file or directory"):
        train(_cu_train_config(tmp_path, training_data={"systems": [str(tmp_path / "nope")]}), tmp_path / "o", log=lambda s: None)
    cfg = _cu_train_config(tmp_path)
    cfg = _cu_train_config(tmp_path, training_data={"systems": list(cfg.training.training_data.system_list), "batch_size": [1, 1]})
    with pytest.raises(DpeltError, match=r"\[training.training_data.batch_size\]: batch_size lists 2 values for 1 systems"):
        train(cfg, tmp_path / "o", log=lambda s: None)
    assert not (tmp_path / "o" / "model.pt").exists()


@pytest.mark.parametrize("sel", ["auto", "fixed"])
def test_absurd_cutoff_or_cell_in_nm_is_refused_before_the_search(tmp_path, sel):
    """rcut 100 Å (or a cell written in nm) used to make the neighbour search list millions of
    pairs per frame for minutes, then run out of memory; now one error names file and key."""
    import time
    from dataclasses import replace

    from pipeline.data.netcdf import read_frames, write_frames
    from pipeline.train.loop import train

    cfg = _cu_train_config(tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, descriptor=replace(cfg.model.descriptor, rcut=100.0, sel="auto" if sel == "auto" else (40,))))
    t = time.perf_counter()
    with pytest.raises(DpeltError) as info:
        train(cfg, tmp_path / "o", log=lambda s: None)
    assert time.perf_counter() - t < 30
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "cu.nc")) and "[model.descriptor.rcut]" in msg and "rcut = 100 Å" in msg and "frame 0" in msg, msg
    assert not (tmp_path / "o" / "model.pt").exists()

    ds = read_frames(tmp_path / "cu.nc")[0]
    nm = ds.assign(coord=ds["coord"] * 0.1, cell=ds["cell"] * 0.1)  # positions and cell in nm
    write_frames(tmp_path / "nm.nc", nm)
    with pytest.raises(DpeltError, match=r"nm.nc \[model.descriptor.rcut\]: frame 0: rcut = 4 Å would put about .* Check rcut \(Å\) and that the cell is in Å"):
        train(_cu_train_config(tmp_path, training_data={"systems": [str(tmp_path / "nm.nc")]}), tmp_path / "p", log=lambda s: None)


def test_absurd_cutoff_refused_in_evaluation():
    from pipeline.model.inputs import frame_inputs
    from pipeline.model.neighbor import MAX_NEIGHBORS_PER_ATOM, check_neighbor_density

    cell = np.eye(3) * 3.6
    check_neighbor_density(4, cell, [True] * 3, 6.0)  # fcc copper, ~80 neighbours: fine
    check_neighbor_density(4, cell, [True, True, False], 1000.0)  # not fully periodic: bounded, not checked
    check_neighbor_density(4, cell * np.nan, [True] * 3, 6.0)  # a non-finite cell is reported by the data checks and MD guards
    with pytest.raises(DpeltError, match=r"cell of 0 Å³"):
        check_neighbor_density(4, np.zeros((3, 3)), [True] * 3, 6.0)
    with pytest.raises(DpeltError, match=r"\[model.descriptor.rcut\]: md frame 0: rcut = 60 Å would put about 7.\d+e\+04 atoms"):
        frame_inputs(np.zeros((1, 4, 3)) + np.arange(4)[None, :, None], cell[None], [True] * 3, np.zeros(4, dtype=np.int64), 60.0, [100], ["Cu"], where="md frame")
    assert MAX_NEIGHBORS_PER_ATOM >= 10000


@pytest.mark.parametrize("section, name, spoil, key", [
    ("state_dict", None, lambda t: t.fill_(float("nan")), "state_dict."),
    ("stats", "dstd", lambda t: t.mul_(0.0), "[stats.dstd]"),
    ("stats", "davg", lambda t: t.fill_(float("inf")), "[stats.davg]"),
])
def test_model_file_with_non_finite_or_zero_statistics_is_refused(tmp_path, section, name, spoil, key):
    from conftest import randomize_stats, tiny_model_config

    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import load_model, model_to_dict

    model = randomize_stats(DeepPot(tiny_model_config()))
    d = model_to_dict(model, model.config)
    spoil(d[section][name or sorted(d[section])[0]])
    torch.save(d, tmp_path / "spoilt.pt")
    with pytest.raises(DpeltError) as info:
        load_model(tmp_path / "spoilt.pt")
    assert "spoilt.pt" in str(info.value) and key in str(info.value), str(info.value)
    del d["state_dict"]
    torch.save(d, tmp_path / "nostate.pt")
    with pytest.raises(DpeltError, match=r"nostate\.pt \[state_dict\]: missing entry"):
        load_model(tmp_path / "nostate.pt")


def test_cli_reports_a_refused_path_in_one_line(tmp_path, capsys):
    """An output the system refuses (no such directory, a directory in its place) is one error line, no traceback."""
    from pipeline.cli import main
    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames

    src = tmp_path / "cu.nc"
    write_frames(src, emt_bulk_frames(frames_per_temperature=1, temperatures_K=(300,)))
    (tmp_path / "taken.nc").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    for dst in (tmp_path / "taken.nc", blocker / "sub" / "x.nc"):
        assert main(["convert", str(src), str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dpelt: error: ") and "\n" not in err and "Traceback" not in err, err


def test_md_task_errors_name_their_own_key():
    from pipeline.errors import ConfigError
    from pipeline.explore.md import MDTask

    for kwargs, key in (({"temperature_K": -300.0}, "[temperature_K]"), ({"dt_fs": 0.0}, "[dt_fs]"), ({"trj_freq": 0}, "[trj_freq]"), ({"nsteps": -1}, "[nsteps]")):
        args = {"name": "t", "temperature_K": 300.0, "nsteps": 10} | kwargs
        with pytest.raises(ConfigError) as info:
            MDTask(**args)
        assert key in str(info.value), str(info.value)


def test_model_file_type_map_must_match_its_config(tmp_path):
    from conftest import randomize_stats, tiny_model_config

    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import load_model, model_to_dict

    model = randomize_stats(DeepPot(tiny_model_config()))
    d = model_to_dict(model, model.config)
    d["type_map"] = list(reversed(d["type_map"]))
    torch.save(d, tmp_path / "swapped.pt")
    with pytest.raises(DpeltError, match=r"swapped\.pt \[type_map\]: type_map .* differs from the config's"):
        load_model(tmp_path / "swapped.pt")
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(DpeltError, match=r"adir\.pt: is a directory"):
        load_model(tmp_path / "adir.pt")


def test_ensemble_mismatch_names_the_model_file(tmp_path):
    from conftest import randomize_stats, tiny_model_config

    from pipeline.calculator import EnsembleCalculator
    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import save_model

    a = randomize_stats(DeepPot(tiny_model_config()))
    b = randomize_stats(DeepPot(tiny_model_config(sel=(20, 20))))
    pa, pb = save_model(a, a.config, tmp_path / "m0.pt"), save_model(b, b.config, tmp_path / "m1.pt")
    with pytest.raises(DpeltError, match=r"m1\.pt \[sel\]: ensemble member 1 .* member 0 \(.*m0\.pt\)"):
        EnsembleCalculator([pa, pb], threads=1)
    with pytest.raises(DpeltError, match="at least one model"):
        EnsembleCalculator([], threads=1)


def test_explore_spec_with_an_unknown_bias_key(tmp_path, capsys):
    from conftest import randomize_stats, tiny_model_config

    from pipeline.cli import main
    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import save_model

    m = randomize_stats(DeepPot(tiny_model_config()))
    path = save_model(m, m.config, tmp_path / "m.pt")
    spec = '{"temperature_K": 300, "nsteps": 2, "bias": {"foo": 1}}'
    assert main(["explore", "-m", str(path), str(path), "--start", str(tmp_path / "none.nc"), "--spec", spec, "-o", str(tmp_path / "e"), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "[explore.bias.foo]: unknown key" in err and "Traceback" not in err, err


def test_init_paths_checked_only_until_the_initial_data_exist(tmp_path, monkeypatch):
    """A moved init.data directory must not block resuming a run whose initial data exist."""
    from pipeline.runconfig import cross_check, validate_schema

    cfg = validate_schema(_set(BASE, "init.data", ["moved.nc"]), source="run.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DpeltError, match=r"init\.data\[0\]"):
        cross_check(cfg, "run.yaml")
    cross_check(cfg, "run.yaml", check_paths=False)


def test_explore_options_left_out_take_the_schemas_defaults(tmp_path, monkeypatch):
    """`dpelt explore` without --spec builds the same task as the workflow from the run config
    schema's defaults (argparse has none of its own): e.g. the time step is explore.dt_fs."""
    import numpy as np

    import pipeline.calculator
    import pipeline.explore.md
    from pipeline.cli import explore_task_spec, main
    from pipeline.data import make_frames
    from pipeline.data.netcdf import write_frames
    from pipeline.runconfig import resolved_section, schema_default

    explore = resolved_section("explore", {})  # the section with every default filled in
    tasks = []
    monkeypatch.setattr(pipeline.calculator, "EnsembleCalculator", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.explore.md, "run_md", lambda task, *a, **k: tasks.append(task) or {"status": "done", "reason": "", "frames": 0, "steps_done": 0})
    write_frames(tmp_path / "start.nc", make_frames(coord=np.random.default_rng(0).random((1, 2, 3)) * 3, cell=np.eye(3) * 3, atom_type=[0, 0], type_map=["Cu"]))
    common = ["explore", "-m", "m.pt", "--start", str(tmp_path / "start.nc"), "-o", str(tmp_path / "e"), "--seed", "1"]
    assert main(common + ["--temp", "300", "--nsteps", "20", "--bias", "udd"]) == 0
    task = tasks[-1]
    assert task.dt_fs == schema_default("explore.dt_fs") == 2.0 and task.tau_t_fs == schema_default("explore.tau_t_fs")
    assert task.bias.kind == "udd" and task.bias.width == explore["bias"]["width"]
    assert (task.bias.trust_lo, task.bias.trust_hi) == (schema_default("select.trust_lo"), schema_default("select.trust_hi"))
    assert task.guards.min_distance == explore["guards"]["min_distance"]
    # a --spec is completed from the same defaults; nested sections merge key by key
    assert main(common + ["--spec", '{"temperature_K": 300, "nsteps": 20, "bias": {"kind": "udd"}}']) == 0
    assert tasks[-1] == task
    assert explore_task_spec({"guards": {"devi_patience": 7}})["guards"]["min_distance"] == explore["guards"]["min_distance"]
