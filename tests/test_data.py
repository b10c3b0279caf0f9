"""Frames: formats, round trips, validation errors that name the file and the variable."""

import numpy as np
import pytest

from pipeline.data import make_frames, read_systems, write_systems
from pipeline.data.deepmd_npy import read_deepmd
from pipeline.data.netcdf import read_frames, write_frames
from pipeline.errors import DataError


def frames(nf=5, natoms=4, seed=0, virial=True, pbc=(True, True, True)):
    rng = np.random.default_rng(seed)
    return make_frames(
        coord=rng.random((nf, natoms, 3)) * 4,
        cell=np.tile(np.diag([4.0, 4.5, 5.0]), (nf, 1, 1)),
        atom_type=[0, 1, 1, 0][:natoms],
        type_map=["O", "H"],
        pbc=pbc,
        energy=rng.normal(size=nf),
        force=rng.normal(size=(nf, natoms, 3)),
        virial=(lambda v: v + v.transpose(0, 2, 1))(rng.normal(size=(nf, 3, 3))) if virial else None,
        source_iter=2,
        md_step=np.arange(nf) * 10,
        temperature_K=300.0,
    )


def assert_same(a, b, labels=("energy", "force", "virial")):
    np.testing.assert_array_equal(a["coord"].values, b["coord"].values)
    np.testing.assert_array_equal(a["cell"].values, b["cell"].values)
    np.testing.assert_array_equal(a["atom_type"].values, b["atom_type"].values)
    for v in labels:
        assert (v in a) == (v in b)
        if v in a:
            np.testing.assert_array_equal(a[v].values, b[v].values)


def test_netcdf_round_trip_with_provenance(tmp_path):
    ds = frames()
    write_frames(tmp_path / "f.nc", [ds, frames(seed=1, natoms=3)])
    a, b = read_frames(tmp_path / "f.nc")
    assert_same(a, ds)
    assert list(a["md_step"].values) == [0, 10, 20, 30, 40]
    assert a["temperature_K"].values[0] == 300.0 and a["source_iter"].values[0] == 2
    assert b.sizes["atom"] == 3


def test_netcdf_detects_a_flipped_byte(tmp_path):
    path = write_frames(tmp_path / "f.nc", frames(nf=50))
    data = bytearray(path.read_bytes())
    # flip one byte inside the coordinate array (float data of known values)
    needle = np.ascontiguousarray(frames(nf=50)["coord"].values).tobytes()[800:816]
    pos = bytes(data).find(needle)
    assert pos > 0
    data[pos + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        read_frames(path)


def test_truncated_netcdf(tmp_path):
    path = write_frames(tmp_path / "f.nc", frames())
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"f\.nc: cannot open"):
        read_frames(path)


def test_deepmd_npy_round_trip_several_sets(tmp_path):
    from pipeline.data.deepmd_npy import write_deepmd

    ds = frames(nf=7)
    write_deepmd(ds, tmp_path / "sys", set_size=3)
    assert sorted(p.name for p in (tmp_path / "sys").glob("set.*")) == ["set.000", "set.001", "set.002"]
    (back,) = read_deepmd(tmp_path / "sys")
    assert_same(back, ds)
    # without type_map.raw the caller names the types
    (tmp_path / "sys" / "type_map.raw").unlink()
    with pytest.raises(DataError, match="type_map"):
        read_deepmd(tmp_path / "sys")
    (named,) = read_deepmd(tmp_path / "sys", type_map=["O", "H"])
    assert_same(named, ds)


def test_deepmd_npy_without_virial_and_nopbc(tmp_path):
    ds = frames(virial=False, pbc=(False, False, False))
    write_systems(ds, tmp_path / "mol", fmt="deepmd/npy")
    assert (tmp_path / "mol" / "nopbc").exists() and not (tmp_path / "mol/set.000/box.npy").exists()
    (back,) = read_systems(tmp_path / "mol")
    assert "virial" not in back and not back["pbc"].values.any()
    np.testing.assert_array_equal(back["coord"].values, ds["coord"].values)


def test_several_systems_and_type_remap(tmp_path):
    write_systems([frames(natoms=4), frames(natoms=3, seed=2)], tmp_path / "many", fmt="deepmd/npy")
    systems = read_systems(tmp_path / "many", type_map=["H", "O"])
    assert [s.sizes["atom"] for s in systems] == [3, 4]  # sorted by directory name O1H2, O2H2
    o2h2 = systems[1]
    assert list(o2h2["atom_type"].values) == [1, 0, 0, 1]  # O is now type 1


def test_water_import(water_dir):
    systems = read_systems(water_dir)
    assert [s.sizes["frame"] for s in systems] == [80, 160, 80, 80]
    s = systems[1]  # data_1 has two sets
    assert s.sizes["atom"] == 192 and list(s["type_map"].values) == ["O", "H"]
    assert s["coord"].dtype == np.float64 and "virial" not in s


def test_extxyz_round_trip(tmp_path):
    ds = frames()
    write_systems(ds, tmp_path / "f.xyz")
    (back,) = read_systems(tmp_path / "f.xyz", type_map=["O", "H"])
    np.testing.assert_allclose(back["coord"].values, ds["coord"].values, atol=1e-7)
    np.testing.assert_allclose(back["force"].values, ds["force"].values, atol=1e-7)
    np.testing.assert_allclose(back["virial"].values, ds["virial"].values, atol=1e-6)
    assert list(back["md_step"].values) == [0, 10, 20, 30, 40]


def test_convert_cli(tmp_path, capsys):
    from pipeline.cli import main

    write_frames(tmp_path / "f.nc", frames())
    assert main(["convert", str(tmp_path / "f.nc"), str(tmp_path / "npy")]) == 0
    assert main(["convert", str(tmp_path / "npy"), str(tmp_path / "g.xyz")]) == 0
    assert main(["convert", str(tmp_path / "g.xyz"), str(tmp_path / "h.nc"), "--type-map", "O", "H"]) == 0
    (back,) = read_systems(tmp_path / "h.nc")
    np.testing.assert_allclose(back["energy"].values, frames()["energy"].values, atol=1e-7)


def _npy_system(tmp_path, coord_frames=3, energy_frames=3, natoms=2):
    d = tmp_path / "bad"
    (d / "set.000").mkdir(parents=True)
    (d / "type.raw").write_text("0\n1\n"[: 2 * natoms])
    (d / "type_map.raw").write_text("O\nH\n")
    np.save(d / "set.000/coord.npy", np.zeros((coord_frames, natoms * 3)))
    np.save(d / "set.000/box.npy", np.tile(np.eye(3).ravel() * 5, (coord_frames, 1)))
    np.save(d / "set.000/energy.npy", np.zeros(energy_frames))
    return d


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: np.save(d / "set.000/energy.npy", np.zeros(4)), r"energy\.npy \[energy\]: shape \(4,\), expected \[3\]"),
        (lambda d: np.save(d / "set.000/coord.npy", np.zeros((3, 5))), r"coord\.npy \[coord\]: shape"),
        (lambda d: np.save(d / "set.000/force.npy", np.zeros((2, 6))), r"force\.npy \[force\]: shape"),
        (lambda d: (d / "type.raw").write_text("0\nx\n"), r"type\.raw \[type\]"),
        (lambda d: (d / "type.raw").write_text("0\n5\n"), r"type index 5 outside type_map"),
        (lambda d: np.save(d / "set.000/box.npy", np.zeros((3, 9))), r"\[cell\]: periodic system with a degenerate cell"),
        (lambda d: np.save(d / "set.000/coord.npy", np.full((3, 6), np.nan)), r"\[coord\]: non-finite value"),
        (lambda d: (d / "set.000/coord.npy").unlink(), r"\[coord\]: missing coord\.npy"),
        (lambda d: (d / "set.000/coord.npy").write_bytes(b"garbage"), r"\[coord\]: cannot read \.npy"),
        # the offending (negative) index itself, not the largest valid one
        (lambda d: (d / "type.raw").write_text("0\n-1\n"), r"type\.raw \[type\]: type index -1 outside type_map .*line 2"),
        # a repeated element would silently make every H an O
        (lambda d: (d / "type_map.raw").write_text("O\nO\n"), r"type_map\.raw \[type_map\]: elements \['O'\] appear more than once"),
        # a NaN names the .npy file and the frame within it
        (lambda d: np.save(d / "set.000/energy.npy", np.array([0.0, np.nan, 0.0])), r"set\.000/energy\.npy \[energy\]: non-finite value .* frame 1 "),
    ],
)
def test_bad_deepmd_data_is_named(tmp_path, break_it, message):
    d = _npy_system(tmp_path)
    break_it(d)
    with pytest.raises(DataError, match=message) as info:
        read_systems(d)
    assert "bad" in str(info.value)  # the message names the file or directory


def test_missing_labels_when_required(tmp_path):
    ds = frames()
    write_frames(tmp_path / "u.nc", ds.drop_vars("force"))
    with pytest.raises(DataError, match=r"u\.nc \[force\]: missing label"):
        read_systems(tmp_path / "u.nc", require_labels=True)


def test_repeated_element_in_type_map_is_refused(tmp_path):
    from pipeline.data.frames import make_frames

    with pytest.raises(DataError, match=r"\[type_map\]: elements \['Cu'\] appear more than once"):
        make_frames(coord=np.zeros((1, 2, 3)), cell=np.eye(3) * 5, atom_type=[0, 1], type_map=["Cu", "Cu"], pbc=(True,) * 3, source="x")


def test_extxyz_with_labels_on_some_frames_only_is_refused(tmp_path):
    """Dropping the forces of the frames that have them would lose data silently."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    labelled = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], cell=[4, 4, 4], pbc=True)
    labelled.calc = SinglePointCalculator(labelled, energy=-1.0, forces=np.ones((2, 3)))
    bare = labelled.copy()
    bare.calc = SinglePointCalculator(bare, energy=-2.0)
    write(tmp_path / "mixed.xyz", [labelled, bare])
    with pytest.raises(DataError, match=r"mixed\.xyz \[force\]: structure 0 carries force but structure 1"):
        read_systems(tmp_path / "mixed.xyz")


def test_extxyz_with_stress_on_some_frames_only_drops_the_virial_with_a_warning(tmp_path):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    a = Atoms("Cu2", positions=[[0, 0, 0], [1.3, 1.3, 0]], cell=[4, 4, 4], pbc=True)
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.ones((2, 3)), stress=np.zeros(6))
    b = a.copy()
    b.calc = SinglePointCalculator(b, energy=-2.0, forces=np.ones((2, 3)))
    write(tmp_path / "s.xyz", [a, b])
    with pytest.warns(UserWarning, match="carry no stress"):
        (ds,) = read_systems(tmp_path / "s.xyz")
    assert "virial" not in ds and "force" in ds and ds.sizes["frame"] == 2
