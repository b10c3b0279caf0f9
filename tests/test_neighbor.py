"""Neighbour lists against a brute-force search."""

import numpy as np
import pytest

from conftest import random_system
from pipeline.model.neighbor import build_neighbor_list, displacements


def brute_force(pos, cell, pbc, rcut):
    """Set of (i, j, rounded rij) within rcut, over enough images."""
    n = len(pos)
    reach = [int(np.ceil(rcut / (abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[(a + 1) % 3], cell[(a + 2) % 3]))))) + 1 if pbc[a] else 0 for a in range(3)]
    out = set()
    for s in np.ndindex(*[2 * r + 1 for r in reach]):
        shift = (np.array(s) - reach) @ cell
        for i in range(n):
            for j in range(n):
                d = pos[j] + shift - pos[i]
                r = np.linalg.norm(d)
                if 0 < r < rcut:
                    out.add((i, j, tuple(np.round(d, 8))))
    return out


@pytest.mark.parametrize("pbc", [(True, True, True), (True, False, True), (False, False, False)])
@pytest.mark.parametrize("scale", [3.0, 6.0])  # 3.0: cell shorter than rcut, many images
def test_matches_brute_force(pbc, scale):
    pos, cell, atype = random_system(6, seed=11, cell_scale=scale)
    rcut, sel = 3.5, [200, 200]
    nl = build_neighbor_list(pos, cell, pbc, atype, rcut, sel)
    rij = displacements(pos, cell if any(pbc) else np.zeros((3, 3)), nl, rcut)
    np.testing.assert_allclose(nl.rij, rij, atol=1e-12)  # the search's own vectors agree
    assert nl.min_distance == min(np.linalg.norm(rij[nl.nlist >= 0], axis=-1))
    got = set()
    for i in range(len(pos)):
        for slot in range(sum(sel)):
            j = nl.nlist[i, slot]
            if j >= 0:
                got.add((i, int(j), tuple(np.round(rij[i, slot], 8))))
                assert atype[j] == (0 if slot < sel[0] else 1)  # type sections
    assert got == brute_force(pos, cell, pbc, rcut)
    assert len(got) > 0 and nl.max_overflow == 0


def test_sections_sorted_by_distance_and_overflow_counted():
    pos, cell, atype = random_system(12, seed=12)
    full = build_neighbor_list(pos, cell, (True,) * 3, atype, 4.0, [100, 100])
    counts = [(full.nlist[:, :100] >= 0).sum(1), (full.nlist[:, 100:] >= 0).sum(1)]
    sel = [int(counts[0].max()) - 2, int(counts[1].max())]
    nl = build_neighbor_list(pos, cell, (True,) * 3, atype, 4.0, sel)
    assert nl.overflow[:, 0].max() == 2 and nl.overflow[:, 1].max() == 0
    rij = displacements(pos, cell, nl, 4.0)
    r = np.linalg.norm(rij, axis=-1)
    for i in range(len(pos)):
        sec = r[i, : sel[0]][nl.nlist[i, : sel[0]] >= 0]
        assert np.all(np.diff(sec) >= 0)  # nearest kept first
    # empty slots sit beyond the cut-off
    assert np.all(r[nl.nlist < 0] > 4.0)
