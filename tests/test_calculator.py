"""The ASE calculator: forces and stress consistent with the energy; errors for unknown elements."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from conftest import randomize_stats, tiny_model_config
from pipeline.calculator import DeepPotCalculator
from pipeline.errors import DpeltError
from pipeline.model.deeppot import DeepPot


def he_model():
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True, sel=(40, 40))))
    model.type_map = ["H", "He"]
    return model


@pytest.fixture
def calc():
    return DeepPotCalculator(he_model(), threads=1)


def alloy(seed=0):
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 1))
    rng = np.random.default_rng(seed)
    atoms.set_chemical_symbols(["H" if x else "He" for x in rng.random(len(atoms)) < 0.5])
    atoms.rattle(0.05, rng=rng)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.03], [0.0, 0.0, 1.0]]), scale_atoms=True)
    return atoms


def test_forces_and_stress_match_numerical_derivatives(calc):
    atoms = alloy()
    atoms.calc = calc
    forces = atoms.get_forces()
    from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

    numeric = calculate_numerical_forces(atoms, eps=1e-5)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, numeric, atol=1e-7)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-5), atol=1e-8)
    assert atoms.get_potential_energy() == pytest.approx(atoms.get_potential_energies().sum(), abs=1e-10)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()


def test_unknown_element_and_free_cluster(calc, tmp_path):
    with pytest.raises(DpeltError, match=r"elements \['Xe'\] are not in the model's type_map"):
        Atoms("Xe2", positions=[[0, 0, 0], [0, 0, 2]], calculator=calc).get_potential_energy()
    from pipeline.model.serialize import save_model

    model = he_model()
    path = save_model(model, model.config, tmp_path / "he.pt")
    with pytest.raises(DpeltError, match=r"he\.pt \[type_map\]: elements \['Xe'\]"):  # names the model file
        Atoms("Xe2", positions=[[0, 0, 0], [0, 0, 2]], calculator=DeepPotCalculator(path, threads=1)).get_potential_energy()
    mol = Atoms("HHe", positions=[[0, 0, 0], [0, 0, 1.8]], calculator=calc)
    f = mol.get_forces()
    np.testing.assert_allclose(f.sum(0), 0.0, atol=1e-12)
    from ase.calculators.calculator import PropertyNotImplementedError

    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


def test_system_without_atoms():
    """No atoms: zero energy, forces [0, 3] and zero stress (not an autograd error)."""
    atoms = Atoms("", cell=np.eye(3) * 5.0, pbc=True)
    atoms.calc = DeepPotCalculator(randomize_stats(DeepPot(tiny_model_config())))
    assert atoms.get_potential_energy() == 0.0
    assert atoms.get_forces().shape == (0, 3)
    assert np.array_equal(atoms.get_stress(), np.zeros(6))


def test_compressed_by_default_and_one_switch_off(tmp_path):
    """Calculators tabulate the embedding nets unless compress=False; the caller's model is
    left as it was; a model file gives the same results either way (docs/compression.md)."""
    from pipeline.calculator import EnsembleCalculator

    model = he_model()
    on, off = DeepPotCalculator(model, threads=1), DeepPotCalculator(model, threads=1, compress=False)
    assert on.model.compressed and on.compressed and not off.compressed and not model.compressed
    atoms = alloy(3)
    f_on = on.get_forces(atoms.copy())
    f_off = off.get_forces(atoms.copy())
    np.testing.assert_allclose(f_on, f_off, rtol=0, atol=1e-8)
    assert np.abs(f_off).max() > 1e-3
    ens = EnsembleCalculator([model, he_model()], threads=1)
    assert ens.compressed and ens.ensemble.stack is not None
    assert not EnsembleCalculator([model, he_model()], threads=1, compress=False).compressed
