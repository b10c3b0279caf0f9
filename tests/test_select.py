"""Selection: trust levels, counts per condition, seeded picks, adaptive lower level, convergence."""

import json

import numpy as np
import pytest

from pipeline.data import make_frames
from pipeline.data.netcdf import read_frames, write_frames
from pipeline.errors import ConfigError
from pipeline.select import ACCURATE, CANDIDATE, FAILED, SelectConfig, adaptive_candidates, classify, farthest_point_order, select


def explored(devi, task="t0", T=300.0, seed=0):
    n = len(devi)
    rng = np.random.default_rng(seed)
    return make_frames(
        coord=rng.random((n, 3, 3)) * 3,
        cell=np.tile(np.eye(3) * 3, (n, 1, 1)),
        atom_type=[0, 0, 1],
        type_map=["Cu", "Au"],
        source_task=task,
        temperature_K=T,
        md_step=np.arange(n) * 10,
        max_devi_f=devi,
    )


def test_classify_with_force_and_virial_levels():
    f = np.array([0.01, 0.05, 0.10, 0.15, 0.30, np.nan])
    assert classify(f, 0.05, 0.15).tolist() == [ACCURATE, CANDIDATE, CANDIDATE, FAILED, FAILED, FAILED]
    v = np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert classify(f, 0.05, 0.15, v, 0.1, 0.4).tolist() == [FAILED, CANDIDATE, CANDIDATE, FAILED, FAILED, FAILED]
    v = np.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert classify(f, 0.05, 0.15, v, 0.1, 0.4)[0] == CANDIDATE


def test_counts_picks_and_report(tmp_path):
    rng = np.random.default_rng(1)
    write_frames(tmp_path / "a.nc", explored(rng.uniform(0, 0.3, 40), task="cold", T=300.0))
    write_frames(tmp_path / "b.nc", explored(rng.uniform(0, 0.3, 40), task="hot", T=900.0, seed=1))
    cfg = SelectConfig(trust_lo=0.05, trust_hi=0.15, max_labels=7)
    r = select([tmp_path / "b.nc", tmp_path / "a.nc"], cfg, seed=5, out_dir=tmp_path / "s1", iteration=3)
    devi = np.concatenate([read_frames(tmp_path / f)[0]["max_devi_f"].values for f in ("a.nc", "b.nc")])
    assert r["counts"] == {"accurate": int((devi < 0.05).sum()), "candidate": int(((devi >= 0.05) & (devi < 0.15)).sum()), "failed": int((devi >= 0.15).sum())}
    assert sum(r["ratios"].values()) == pytest.approx(1.0)
    assert [c["task"] for c in r["per_condition"]] == ["cold", "hot"] and r["per_condition"][1]["temperature_K"] == 900.0
    assert r["selected"] == 7 and r["iteration"] == 3 and r["converged"] is False
    (cand,) = read_frames(tmp_path / "s1" / "candidates.nc")
    assert cand.sizes["frame"] == 7
    assert ((cand["max_devi_f"].values >= 0.05) & (cand["max_devi_f"].values < 0.15)).all()
    assert json.loads((tmp_path / "s1" / "report.json").read_text())["selected"] == 7
    # same seed: same picks; another seed: others
    select([tmp_path / "a.nc", tmp_path / "b.nc"], cfg, seed=5, out_dir=tmp_path / "s2")
    select([tmp_path / "a.nc", tmp_path / "b.nc"], cfg, seed=6, out_dir=tmp_path / "s3")
    ids = [set(zip(read_frames(tmp_path / d / "candidates.nc")[0]["source_task"].values, read_frames(tmp_path / d / "candidates.nc")[0]["md_step"].values)) for d in ("s1", "s2", "s3")]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert (tmp_path / "s1" / "candidates.nc").read_bytes() == (tmp_path / "s2" / "candidates.nc").read_bytes()


def test_converged_and_nothing_to_label(tmp_path):
    write_frames(tmp_path / "a.nc", explored(np.full(20, 0.01)))
    r = select([tmp_path / "a.nc"], SelectConfig(trust_lo=0.05, trust_hi=0.15, conv_accuracy=0.9), seed=0, out_dir=tmp_path / "s")
    assert r["converged"] is True and r["selected"] == 0
    assert read_frames(tmp_path / "s" / "candidates.nc") == []


def test_already_labelled_frames_are_not_picked(tmp_path):
    from pipeline.data.frames import frame_ids

    ds = explored(np.full(10, 0.1))
    write_frames(tmp_path / "a.nc", ds)
    done = set(frame_ids(ds)[:6].tolist())
    r = select([tmp_path / "a.nc"], SelectConfig(trust_lo=0.05, trust_hi=0.15), seed=0, out_dir=tmp_path / "s", labelled_ids=done)
    assert r["selected"] == 4 and r["counts"]["candidate"] == 10


def test_adaptive_trust_lo():
    devi = np.array([0.01, 0.02, 0.03, 0.04, 0.2, 0.5])
    mask = adaptive_candidates(devi, hi=0.15, numb=2, perc=0.0)
    assert mask.tolist() == [False, False, True, True, False, False]
    assert adaptive_candidates(devi, hi=0.15, numb=1, perc=0.75).sum() == 3


def test_farthest_point_spreads_out():
    x = np.array([[0.0], [0.1], [0.2], [5.0], [10.0]])
    assert farthest_point_order(x, 0)[:3].tolist() == [0, 4, 3]


@pytest.mark.parametrize("kw", [{"trust_lo": 0.2, "trust_hi": 0.1}, {"trust_lo": 0.1, "trust_hi": 0.2, "v_trust_lo": 0.1}, {"trust_lo": 0.1, "trust_hi": 0.2, "max_labels": -1}, {"trust_lo": 0.1, "trust_hi": 0.2, "spread": "best"}])
def test_bad_settings(kw):
    with pytest.raises(ConfigError):
        SelectConfig(**kw)


def test_select_cli(tmp_path, capsys):
    from pipeline.cli import main

    write_frames(tmp_path / "a.nc", explored(np.linspace(0, 0.3, 30)))
    assert main(["select", str(tmp_path / "a.nc"), "-o", str(tmp_path / "s"), "--trust-lo", "0.05", "--trust-hi", "0.15", "--max-labels", "3", "--seed", "1"]) == 0
    assert "selected 3" in capsys.readouterr().out
    assert main(["select", str(tmp_path / "a.nc"), "-o", str(tmp_path / "s"), "--trust-lo", "0.2", "--trust-hi", "0.15", "--seed", "1"]) == 2
    assert "[trust_lo]: need 0 <= trust_lo < trust_hi" in capsys.readouterr().err


def test_select_cli_fps_needs_and_uses_a_model(tmp_path, capsys):
    """--spread fps with more candidates than max_labels: picks through the model's descriptor;
    without -m it is refused before any work (not only once candidates exceed max_labels)."""
    from conftest import tiny_model_config
    from pipeline.cli import main
    from pipeline.model.deeppot import DeepPot
    from pipeline.model.serialize import save_model

    from dataclasses import replace

    model = DeepPot(replace(tiny_model_config(), type_map=("Cu", "Au")))
    save_model(model, model.config, tmp_path / "m.pt")
    write_frames(tmp_path / "a.nc", explored(np.full(12, 0.1)))  # 12 candidates
    args = ["select", str(tmp_path / "a.nc"), "--trust-lo", "0.05", "--trust-hi", "0.15", "--max-labels", "3", "--seed", "1", "--spread", "fps"]
    assert main(args + ["-o", str(tmp_path / "none")]) == 2
    assert "[spread]" in capsys.readouterr().err and not (tmp_path / "none").exists()
    assert main(args + ["-o", str(tmp_path / "s"), "-m", str(tmp_path / "m.pt")]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["candidates_available"] == 12 and report["selected"] == 3


def test_fps_spread_through_the_workflow(tmp_path, finished_run):
    """select.spread: fps in a run config with more candidates than max_labels: the select rule
    passes a model and the pick is made in descriptor space."""
    import shutil

    import yaml

    from test_workflow import snakemake

    run = tmp_path / "fps"
    shutil.copytree(finished_run, run, symlinks=True)
    cfg = yaml.safe_load((run / "config" / "test.yaml").read_text())
    cfg["select"].update(spread="fps", max_labels=1)
    (run / "config" / "test.yaml").write_text(yaml.safe_dump(cfg))
    snakemake(run, "--cores", "1", "iter/000/select/report.json")  # the changed settings rerun select
    report = json.loads((run / "iter/000/select/report.json").read_text())
    assert report["spread"] == "fps" and report["candidates_available"] > report["selected"] == 1
    assert len(read_frames(run / "iter/000/select/candidates.nc")[0]["frame"]) == 1


def test_select_cli_defaults_come_from_the_run_config_schema(tmp_path, capsys):
    """Options left out take the schema's defaults (select.max_labels: 50), not argparse's own."""
    from pipeline.cli import main
    from pipeline.runconfig import schema_default

    write_frames(tmp_path / "a.nc", explored(np.full(80, 0.1)))  # 80 candidates
    assert main(["select", str(tmp_path / "a.nc"), "-o", str(tmp_path / "s"), "--trust-lo", "0.05", "--trust-hi", "0.15", "--seed", "1"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    for key in ("max_labels", "spread", "conv_accuracy"):
        assert report[key] == schema_default(f"select.{key}"), key
    assert report["selected"] == schema_default("select.max_labels") == 50
    library = SelectConfig(trust_lo=0.05, trust_hi=0.15)  # the library's dataclass: the same defaults
    for key in ("max_labels", "spread", "conv_accuracy", "adapt_perc_candi"):
        assert getattr(library, key) == schema_default(f"select.{key}"), key
