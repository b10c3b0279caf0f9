"""Training: it learns, it is reproducible bit for bit, it resumes exactly; DeePMD-kit inputs."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.data.netcdf import write_frames
from pipeline.errors import ConfigError, ModelFileError
from pipeline.examples import emt_bulk_frames
from pipeline.train.config import LearningRateConfig, LossConfig, load_train_config, parse_train_config
from pipeline.train.loop import adam_update_size, train
from pipeline.train.loss import prefactors
from pipeline.train.lr import ExpDecay

REFERENCE_INPUT = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "deepmd-water-se_e2_a.input.json"


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("emt")
    write_frames(d / "train.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=12, seed=1))
    write_frames(d / "valid.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(600,), frames_per_temperature=6, seed=2))
    return d


def tiny_config(data: Path, steps: int = 60, seed: int = 10, **training):
    return parse_train_config(
        {
            "model": {
                "type_map": ["Cu"],
                "descriptor": {"sel": "auto", "rcut": 4.5, "rcut_smth": 2.0, "neuron": [4, 8], "axis_neuron": 4, "type_one_side": True},
                "fitting_net": {"neuron": [16, 16]},
            },
            "learning_rate": {"start_lr": 2e-2, "stop_lr": 1e-4, "decay_steps": 10},
            "loss": {"start_pref_v": 0.02, "limit_pref_v": 1.0},
            "training": {
                "training_data": {"systems": [str(data / "train.nc")]},
                "validation_data": {"systems": [str(data / "valid.nc")], "numb_btch": 3},
                "numb_steps": steps,
                "seed": seed,
                "disp_freq": 20,
                "save_freq": 20,
                "threads": 2,
            }
            | training,
        }
    )


def read_lcurve(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    return [dict(zip(cols, map(float, line.split(",")))) for line in lines[1:]]


def test_training_lowers_validation_error(tmp_path, emt_data):
    model = train(tiny_config(emt_data, steps=120), tmp_path, log=lambda s: None)
    rows = read_lcurve(tmp_path / "lcurve.csv")
    assert [r["step"] for r in rows] == [1, 20, 40, 60, 80, 100, 120]
    assert rows[-1]["rmse_f_val"] < 0.7 * rows[0]["rmse_f_val"]
    assert rows[-1]["rmse_e_val"] < rows[0]["rmse_e_val"]
    assert "rmse_v_val" in rows[0]
    assert model.exists() and (tmp_path / "checkpoint.pt").exists() and (tmp_path / "lcurve.out").exists()
    resolved = json.loads((tmp_path / "input.json").read_text())
    assert isinstance(resolved["model"]["descriptor"]["sel"], list)  # 'auto' resolved


def test_same_seed_gives_identical_model_bytes(tmp_path, emt_data):
    a = train(tiny_config(emt_data, steps=30), tmp_path / "a", log=lambda s: None).read_bytes()
    b = train(tiny_config(emt_data, steps=30), tmp_path / "b", log=lambda s: None).read_bytes()
    c = train(tiny_config(emt_data, steps=30, seed=11), tmp_path / "c", log=lambda s: None).read_bytes()
    assert a == b
    assert a != c


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, emt_data):
    full = train(tiny_config(emt_data, steps=60), tmp_path / "full", log=lambda s: None)
    # run the first 40 steps of the same schedule: stop after the checkpoint at step 40
    part_dir = tmp_path / "part"
    cfg = tiny_config(emt_data, steps=60)
    import pipeline.train.loop as loop

    class Stop(Exception):
        pass

    real = loop._checkpoint

    def stop_at_40(path, model, cfg_, opt, step, *args):
        real(path, model, cfg_, opt, step, *args)
        if step == 40:
            raise Stop

    loop._checkpoint = stop_at_40
    try:
        with pytest.raises(Stop):
            train(cfg, part_dir, log=lambda s: None)
    finally:
        loop._checkpoint = real
    assert not (part_dir / "model.pt").exists()
    resumed = train(cfg, part_dir, restart=part_dir / "checkpoint.pt", log=lambda s: None)
    assert resumed.read_bytes() == full.read_bytes()
    assert (part_dir / "lcurve.csv").read_text() == (tmp_path / "full" / "lcurve.csv").read_text()


def test_resuming_a_finished_run_rewrites_its_outputs(tmp_path, emt_data):
    """Snakemake deletes a job's outputs before rerunning it; a resume that finds the final
    checkpoint takes no step but must still write model.pt and lcurve.csv (was: lcurve missing,
    so Snakemake then deleted the model too)."""
    out = tmp_path / "run"
    train(tiny_config(emt_data, steps=20), out, log=lambda s: None)
    model, lcurve = (out / "model.pt").read_bytes(), (out / "lcurve.csv").read_text()
    (out / "model.pt").unlink()
    (out / "lcurve.csv").unlink()
    train(tiny_config(emt_data, steps=20), out, log=lambda s: None, resume=True)
    assert (out / "model.pt").read_bytes() == model
    assert (out / "lcurve.csv").read_text() == lcurve


def test_warm_start_starts_from_the_old_model(tmp_path, emt_data):
    first = train(tiny_config(emt_data, steps=120), tmp_path / "first", log=lambda s: None)
    cold = read_lcurve(tmp_path / "first" / "lcurve.csv")[0]
    train(tiny_config(emt_data, steps=1), tmp_path / "warm", init_model=first, log=lambda s: None)
    warm = read_lcurve(tmp_path / "warm" / "lcurve.csv")[0]
    assert warm["rmse_f_val"] < 0.8 * cold["rmse_f_val"]
    other = replace(tiny_config(emt_data, steps=1), model=replace(tiny_config(emt_data).model, type_map=("Au",)))
    with pytest.raises((ModelFileError, Exception)):
        train(other, tmp_path / "bad", init_model=first, log=lambda s: None)


def test_learning_rate_and_prefactors_follow_deepmd():
    lr = ExpDecay.from_config(LearningRateConfig(start_lr=1e-3, stop_lr=1e-7, decay_steps=100), numb_steps=1000)
    assert lr(0) == 1e-3 and lr(99) == 1e-3
    assert lr(100) == pytest.approx(1e-3 * (1e-4) ** 0.1)
    assert lr(1000) == pytest.approx(1e-7)
    p = prefactors(LossConfig(start_pref_e=0.02, limit_pref_e=1.0, start_pref_f=1000, limit_pref_f=1.0), lr=1e-3, start_lr=1e-3)
    assert (p.e, p.f) == pytest.approx((0.02, 1000))
    p = prefactors(LossConfig(start_pref_e=0.02, limit_pref_e=1.0, start_pref_f=1000, limit_pref_f=1.0), lr=0.0, start_lr=1e-3)
    assert (p.e, p.f) == pytest.approx((1.0, 1.0))
    # decay_steps longer than the run is shortened so the rate still decays to stop_lr
    short = ExpDecay.from_config(LearningRateConfig(start_lr=1e-3, stop_lr=1e-7, decay_steps=5000), numb_steps=300)
    assert short(300) == pytest.approx(1e-7)


def test_normalized_loss_has_deepmd_weights_and_a_constant_scale():
    """normalize_prefactors divides L by p_e + p_f + p_v: same relative weights, same reported rmse."""
    import torch

    from pipeline.train.loss import energy_loss

    deepmd = LossConfig(start_pref_v=0.5, limit_pref_v=2.0)
    ours = LossConfig(start_pref_v=0.5, limit_pref_v=2.0, normalize_prefactors=True)
    assert deepmd == LossConfig(start_pref_v=0.5, limit_pref_v=2.0, normalize_prefactors=False)  # the default: a DeePMD-kit input trains as in DeePMD-kit
    gen = torch.Generator().manual_seed(0)
    pred = {k: torch.randn(*shape, generator=gen, dtype=torch.float64) for k, shape in (("energy", (2,)), ("force", (2, 5, 3)), ("virial", (2, 9)))}
    label = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in pred.items()}
    for lr in (1e-3, 1e-5, 1e-8):
        p0 = prefactors(deepmd, lr, 1e-3)
        p1 = prefactors(ours, lr, 1e-3)
        assert p0.norm == 1.0 and (p1.e, p1.f, p1.v) == (p0.e, p0.f, p0.v)
        assert p1.norm == pytest.approx(p0.e + p0.f + p0.v)
        l0, m0 = energy_loss(pred, label["energy"], label["force"], label["virial"], 5, p0)
        l1, m1 = energy_loss(pred, label["energy"], label["force"], label["virial"], 5, p1)
        assert l1.item() == pytest.approx(l0.item() / p1.norm, rel=1e-14)
        assert m1 == m0  # lcurve's rmse is DeePMD-kit's √L, not normalised
    assert prefactors(ours, 1e-3, 1e-3).norm / prefactors(ours, 1e-8, 1e-3).norm > 200  # what it takes out


def test_normalized_loss_changes_nothing_when_the_prefactors_are_constant(tmp_path, emt_data):
    """Adam is blind to a constant loss scale: with start = limit prefactors both losses train alike."""
    import torch

    loss = {"start_pref_e": 1.0, "limit_pref_e": 1.0, "start_pref_f": 10.0, "limit_pref_f": 10.0, "start_pref_v": 0.0, "limit_pref_v": 0.0}
    models = []
    for flag in (True, False):
        cfg = tiny_config(emt_data, steps=20)
        cfg = replace(cfg, loss=replace(cfg.loss, **loss, normalize_prefactors=flag))
        models.append(torch.load(train(cfg, tmp_path / str(flag), log=lambda s: None), weights_only=True)["state_dict"])
    for k, v in models[0].items():
        # not bit-equal: Adam's ε (1e-8) weighs a little more against the smaller gradients
        # (entries of saturated tanh units, |g| ~ 1e-9, move less); 1e-3 of a tensor's norm
        assert float((v - models[1][k]).norm()) <= 3e-3 * float(v.norm()), k
    assert not all(torch.equal(v, models[1][k]) for k, v in models[0].items())
    curves = [read_lcurve(tmp_path / str(flag) / "lcurve.csv")[-1] for flag in (True, False)]
    assert curves[0]["rmse_f_val"] == pytest.approx(curves[1]["rmse_f_val"], rel=1e-3)
    assert curves[0]["rmse_e_val"] == pytest.approx(curves[1]["rmse_e_val"], rel=1e-2)


def test_normalized_loss_keeps_adams_steps_on_the_learning_rate_schedule(tmp_path, emt_data):
    """With DeePMD-kit's scale a short run's 500x prefactor decay starves Adam: its last update
    m̂/(√v̂+ε) (in units of lr) is small, because v̂ remembers the early, larger gradients."""
    import torch

    def last_update_in_lr_units(flag: bool) -> float:
        cfg = tiny_config(emt_data, steps=120)
        cfg = replace(cfg, loss=replace(cfg.loss, normalize_prefactors=flag))
        train(cfg, tmp_path / str(flag), log=lambda s: None)
        return adam_update_size(torch.load(tmp_path / str(flag) / "checkpoint.pt", weights_only=True)["optimizer"])

    ours, deepmd = last_update_in_lr_units(True), last_update_in_lr_units(False)
    assert ours > 0.05 and ours > 3 * deepmd, (ours, deepmd)


def test_deepmd_input_json_is_accepted(tmp_path):
    if not REFERENCE_INPUT.exists():
        pytest.skip(f"{REFERENCE_INPUT} not found (../shared is beside the checkout)")
    cfg = load_train_config(REFERENCE_INPUT)
    d = cfg.model.descriptor
    assert (d.rcut, d.rcut_smth, list(d.sel), list(d.neuron), d.axis_neuron, d.type_one_side) == (6.0, 0.5, [46, 92], [25, 50, 100], 16, True)
    assert list(cfg.model.fitting_net.neuron) == [240, 240, 240] and cfg.model.fitting_net.resnet_dt
    assert cfg.training.numb_steps == 1000000 and cfg.loss.start_pref_f == 1000
    assert cfg.training.training_data.system_list[0].endswith("data/data_0")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model": {"descriptor": {"rcutt": 6.0}}}, r"\[model.descriptor.rcutt\]: unknown key"),
        ({"model": {"descriptor": {"type": "se_atten"}}}, r"\[model.descriptor.type\]: descriptor type 'se_atten' is not supported"),
        ({"model": {"descriptor": {"exclude_types": [[0, 1]]}}}, r"\[model.descriptor.exclude_types\]: dpelt does not implement"),
        ({"model": {"descriptor": {"activation_function": "gelu"}}}, r"\[model.descriptor.activation_function\]: dpelt does not implement"),
        ({"model": {"fitting_net": {"numb_fparam": 2}}}, r"\[model.fitting_net.numb_fparam\]"),
        ({"model": {"descriptor": {"sel": [10]}}}, r"\[model.descriptor.sel\]: sel has 1 entries but type_map has 2"),
        ({"model": {"descriptor": {"rcut_smth": 7.0}}}, r"\[model.descriptor.rcut_smth\]: need 0 <= rcut_smth < rcut"),
        ({"model": {"descriptor": {"neuron": "big"}}}, r"\[model.descriptor.neuron\]: expected list of int"),
        ({"learning_rate": {"type": "cosine"}}, r"\[learning_rate.type\]"),
        ({"loss": {"start_pref_f": -1}}, r"\[loss.start_pref_f\]: prefactors must be >= 0"),
        ({"training": {"numb_steps": "many"}}, r"\[training.numb_steps\]: expected int"),
        ({"loss": {"normalize_prefactors": "yes"}}, r"\[loss.normalize_prefactors\]: expected bool"),
        ({"training": {"training_data": {"batch_size": "huge"}}}, r"\[training.training_data.batch_size\]"),
        ({"training": {"training_data": {"batch_size": 0}}}, r"\[training.training_data.batch_size\]: batch_size must be an integer >= 1"),
        ({"training": {"training_data": {"batch_size": -2}}}, r"\[training.training_data.batch_size\]"),
        ({"training": {"training_data": {"batch_size": "auto:x"}}}, r"\[training.training_data.batch_size\]"),
        ({"training": {"training_data": {"batch_size": [1, 0]}}}, r"\[training.training_data.batch_size\]"),
        ({"training": {"training_data": {"batch_size": []}}}, r"\[training.training_data.batch_size\]"),
        # an error inside an optional section names the inner key, not the whole section
        ({"training": {"validation_data": {"systems": ["v"], "numb_btch": 0}}}, r"\[training.validation_data.numb_btch\]: must be >= 1"),
        ({"training": {"validation_data": {"systems": ["v"], "bogus": 1}}}, r"\[training.validation_data.bogus\]: unknown key"),
        ({"model": {"descriptor": {"rcut": float("inf")}}}, r"\[model.descriptor.rcut\]: rcut must be a finite cut-off > 0"),
        ({"model": {"descriptor": {"rcut": -5.0}}}, r"\[model.descriptor.rcut\]: rcut must be a finite cut-off > 0"),
        ({"model": {"descriptor": {"rcut": float("nan")}}}, r"\[model.descriptor.rcut\]"),
        ({"model": {"descriptor": {"sel": "auto:0"}}}, r"\[model.descriptor.sel\]: the factor of 'auto:0' must be a number >= 1"),
        ({"learning_rate": {"start_lr": 1e-3, "stop_lr": 1.0}}, r"\[learning_rate.stop_lr\]: stop_lr \(1\) must not exceed start_lr"),
        (
            {"loss": {k: 0 for k in ("start_pref_e", "limit_pref_e", "start_pref_f", "limit_pref_f")}},
            r"\[loss.start_pref_e\]: every prefactor is 0",
        ),
    ],
)
def test_bad_training_inputs_name_the_key(patch, message):
    base = {
        "model": {"type_map": ["O", "H"], "descriptor": {"sel": [4, 8]}, "fitting_net": {}},
        "learning_rate": {},
        "loss": {},
        "training": {"training_data": {"systems": ["x"]}},
    }

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    with pytest.raises(ConfigError, match=message):
        parse_train_config(merge(base, patch), source="input.json")


def test_train_cli_then_test_cli(tmp_path, emt_data, capsys):
    import yaml

    from pipeline.cli import main

    cfg = {
        "model": {"type_map": ["Cu"], "descriptor": {"sel": [60], "rcut": 4.5, "rcut_smth": 2.0, "neuron": [4, 8], "axis_neuron": 4}, "fitting_net": {"neuron": [8]}},
        "training": {"training_data": {"systems": ["train.nc"]}, "numb_steps": 5, "disp_freq": 5, "save_freq": 5, "threads": 1},
    }
    for name in ("train.nc", "valid.nc"):
        (tmp_path / name).write_bytes((emt_data / name).read_bytes())
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "in.yaml"), "-o", str(tmp_path / "out")]) == 0
    assert main(["test", "-m", str(tmp_path / "out/model.pt"), "-s", str(tmp_path / "valid.nc"), "-o", str(tmp_path / "t.json"), "--plot", str(tmp_path / "p.png")]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    o = result["overall"]
    assert o["nframes"] == 6 and o["force_rmse"] > 0 and "virial_rmse_per_atom" in o
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "energy RMSE" in capsys.readouterr().out
    # a bad input gives one line naming file and key, exit status 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg | {"model": cfg["model"] | {"descriptor": {"rcutt": 1}}}))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml [model.descriptor.rcutt]: unknown key" in err and "Traceback" not in err


def test_sel_too_small_for_training_data_is_refused(tmp_path, emt_data):
    from pipeline.errors import NeighborOverflowError

    cfg = tiny_config(emt_data, steps=1)
    cfg = replace(cfg, model=replace(cfg.model, descriptor=replace(cfg.model.descriptor, sel=(5,))))
    with pytest.raises(NeighborOverflowError, match=r"train\.nc frame 0: atom \d+ has \d+ neighbours of type Cu"):
        train(cfg, tmp_path, log=lambda s: None)


def test_deepmd_water_example_trains_as_is(tmp_path, water_dir):
    """The DeePMD-kit water input (1.01 M parameters) runs unchanged on the real data for two steps."""
    if not REFERENCE_INPUT.exists():
        pytest.skip(f"{REFERENCE_INPUT} not found")
    data = json.loads(REFERENCE_INPUT.read_text())
    data["training"]["training_data"]["systems"] = [str(water_dir / "data_0")]
    data["training"]["validation_data"]["systems"] = [str(water_dir / "data_3")]
    data["training"]["validation_data"]["numb_btch"] = 1
    data["training"] |= {"numb_steps": 2, "disp_freq": 1, "save_freq": 2}
    (tmp_path / "input.json").write_text(json.dumps(data))
    logs = []
    model_path = train(load_train_config(tmp_path / "input.json"), tmp_path / "out", threads=2, log=logs.append)
    assert any("1014182 parameters" in line for line in logs)  # the same network size as DeePMD-kit
    rows = read_lcurve(tmp_path / "out" / "lcurve.csv")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["rmse_f_val"] < 2.0
    from pipeline.model.serialize import load_model

    assert load_model(model_path).sel == [46, 92]


def _energy_offset(model_path: Path, data: Path) -> float:
    """Mean (model − label) energy per atom over the frames of ``data`` (eV/atom)."""
    from pipeline.data.io import read_systems
    from pipeline.evaluate import predict
    from pipeline.model.serialize import load_model

    model = load_model(model_path).eval()
    (ds,) = read_systems(data, type_map=model.type_map, require_labels=True)
    return float(((predict(model, ds)["energy"] - ds["energy"].values) / ds.sizes["atom"]).mean())


@pytest.fixture(scope="session")
def shifted_emt_data(emt_data, tmp_path_factory):
    """emt_data's training frames with every energy 0.05 eV/atom higher (forces unchanged):
    the new data's energy zero differs from the one a warm-start model was fitted to."""
    from pipeline.data.io import read_systems

    d = tmp_path_factory.mktemp("shifted")
    (ds,) = read_systems(emt_data / "train.nc", require_labels=True)
    write_frames(d / "train.nc", ds.assign(energy=ds["energy"] + 0.05 * ds.sizes["atom"]))
    return d


def test_warm_start_refit_bias_moves_the_energy_zero_to_the_new_data(tmp_path, emt_data, shifted_emt_data):
    first = train(tiny_config(emt_data, steps=60), tmp_path / "first", log=lambda s: None)
    cfg = replace(tiny_config(shifted_emt_data, steps=0), training=replace(tiny_config(shifted_emt_data).training, numb_steps=0, validation_data=None))
    kept = train(cfg, tmp_path / "kept", init_model=first, log=lambda s: None)
    refit = train(cfg, tmp_path / "refit", init_model=first, refit_bias=True, log=lambda s: None)
    data = shifted_emt_data / "train.nc"
    assert _energy_offset(kept, data) == pytest.approx(_energy_offset(first, data))  # DeePMD-kit's --init-model: the old zero
    assert abs(_energy_offset(kept, data)) > 0.01
    assert abs(_energy_offset(refit, data)) < 1e-9  # one element: the least-squares shift zeroes the mean residual
    from pipeline.data.io import read_systems
    from pipeline.evaluate import predict
    from pipeline.model.serialize import load_model

    (ds,) = read_systems(data, require_labels=True)
    fa, fb = (predict(load_model(p).eval(), ds)["force"] for p in (kept, refit))
    assert abs(fa - fb).max() < 1e-12  # a per-element constant has no force


def test_change_bias_after_training_zeroes_the_mean_energy_residual_and_resumes_exactly(tmp_path, emt_data):
    data = emt_data / "train.nc"
    plain = train(tiny_config(emt_data, steps=40), tmp_path / "plain", log=lambda s: None)
    cfg = tiny_config(emt_data, steps=40, change_bias_after_training=True)
    after = train(cfg, tmp_path / "after", log=lambda s: None)
    assert abs(_energy_offset(plain, data)) > 1e-5
    assert abs(_energy_offset(after, data)) < 1e-9
    # the final checkpoint is written before the refit: resuming from it refits once, as the run did
    again = train(cfg, tmp_path / "after", restart=tmp_path / "after" / "checkpoint.pt", log=lambda s: None)
    assert again.read_bytes() == after.read_bytes()
