"""Model files: round trip, TorchScript, refusal of bad files."""


import numpy as np
import pytest
import torch

from conftest import random_system, run_model
from pipeline.errors import ModelFileError
from pipeline.model.serialize import freeze_model, load_model, model_to_dict, save_model


def test_save_load_round_trip(tmp_path, tiny_model):
    path = save_model(tiny_model, tiny_model.config, tmp_path / "m.pt", {"seed": 3})
    loaded = load_model(path)
    pos, cell, atype = random_system(10, seed=1)
    a, b = run_model(tiny_model, pos, cell, atype), run_model(loaded, pos, cell, atype)
    assert a["energy"] == b["energy"]
    np.testing.assert_array_equal(a["force"], b["force"])
    assert loaded.metadata["seed"] == 3 and loaded.type_map == ["A", "B"]
    # the file is loadable with weights_only=True (no code inside)
    data = torch.load(path, weights_only=True)
    assert set(data) >= {"format_version", "config", "type_map", "state_dict", "stats"}


def test_save_is_deterministic(tmp_path, tiny_model):
    a = save_model(tiny_model, tiny_model.config, tmp_path / "a.pt").read_bytes()
    b = save_model(tiny_model, tiny_model.config, tmp_path / "b.pt").read_bytes()
    assert a == b


def test_torchscript_equals_eager(tmp_path, tiny_model):
    path = freeze_model(tiny_model, tmp_path / "frozen.pth")
    scripted = torch.jit.load(str(path))
    pos, cell, atype = random_system(10, seed=2)
    from pipeline.model.neighbor import build_neighbor_list

    nl = build_neighbor_list(pos, cell, (True,) * 3, atype, tiny_model.rcut, tiny_model.sel)
    args = (
        torch.from_numpy(pos)[None],
        torch.from_numpy(atype),
        torch.from_numpy(nl.nlist)[None],
        torch.from_numpy(nl.shift.astype(np.float64) @ cell)[None],
    )
    eager = tiny_model(*args)
    frozen = scripted(*args)
    for key in ("energy", "force", "virial", "atom_energy"):
        torch.testing.assert_close(frozen[key], eager[key], rtol=0, atol=1e-12)
    ref = run_model(tiny_model, pos, cell, atype)
    np.testing.assert_allclose(eager["force"][0].detach().numpy(), ref["force"], atol=1e-12)


def test_unknown_version_refused(tmp_path, tiny_model):
    data = model_to_dict(tiny_model, tiny_model.config)
    data["format_version"] = 99
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(ModelFileError, match="unsupported format_version 99"):
        load_model(tmp_path / "future.pt")


def test_pickle_with_code_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format_version": 1, "kind": "dpelt-model", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="refused"):
        load_model(tmp_path / "evil.pt")


def test_truncated_and_foreign_files(tmp_path, tiny_model):
    good = save_model(tiny_model, tiny_model.config, tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFileError, match="not a readable torch file"):
        load_model(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="format_version"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="file not found"):
        load_model(tmp_path / "missing.pt")
