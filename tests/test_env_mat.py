"""The smooth switch and the environment matrix."""

import numpy as np
import torch

from pipeline.model.env_mat import environment_matrix, smooth_switch

RS, RC = 1.5, 4.0


def sw(r):
    return smooth_switch(torch.tensor(r, dtype=torch.float64), RS, RC).item()


def test_switch_limits_and_range():
    assert sw(0.5) == 1.0 and sw(RS) == 1.0
    assert sw(RC) == 0.0 and sw(RC + 1.0) == 0.0
    r = np.linspace(RS, RC, 101)
    vals = smooth_switch(torch.tensor(r), RS, RC).numpy()
    assert np.all(np.diff(vals) <= 1e-15) and vals.min() >= 0.0 and vals.max() <= 1.0
    assert abs(sw((RS + RC) / 2) - 0.5) < 1e-12  # symmetric quintic


def _derivs(r0):
    """Value, first and second derivative just below and just above r0 (one-sided differences)."""
    h = 1e-4
    below = [sw(r0 - k * h) for k in range(3)]  # r0, r0-h, r0-2h
    above = [sw(r0 + k * h) for k in range(3)]
    d1 = ((below[0] - below[1]) / h, (above[1] - above[0]) / h)
    d2 = ((below[0] - 2 * below[1] + below[2]) / h**2, (above[2] - 2 * above[1] + above[0]) / h**2)
    return d1, d2


def test_switch_is_c2_at_both_ends():
    for r0 in (RS, RC):
        (d1_lo, d1_hi), (d2_lo, d2_hi) = _derivs(r0)
        assert abs(d1_lo - d1_hi) < 1e-3, (r0, d1_lo, d1_hi)
        assert abs(d2_lo - d2_hi) < 0.1, (r0, d2_lo, d2_hi)
    # and the slope in the middle is genuinely non-zero (the test above could not pass trivially)
    assert abs(sw(2.7) - sw(2.8)) > 1e-2


def test_environment_matrix_values():
    rij = torch.tensor([[[1.0, 2.0, 2.0]]], dtype=torch.float64)  # r = 3
    rr = environment_matrix(rij, RS, RC)[0, 0].numpy()
    s = sw(3.0) / 3.0
    np.testing.assert_allclose(rr, [s, s / 3, 2 * s / 3, 2 * s / 3], rtol=1e-14)
    far = environment_matrix(torch.tensor([[[RC + 0.5, 0.0, 0.0]]], dtype=torch.float64), RS, RC)
    assert torch.all(far == 0)
