"""A fresh run of the golden configuration reproduces the checked-in loss curves, and each
deliberate regression in ``MUTATIONS`` moves its curve well past the tolerance."""

import json

import pytest

from tests.support.golden import CURVES, DTYPE, MUTATIONS, STEPS, VARIANTS, run_curves

GOLDEN = json.loads(CURVES.read_text())
# Float noise only (same code, data and seeds). Measured on an AMD EPYC (AVX-512): ATen's AVX-512,
# AVX2 and scalar kernels, with and without MKL's reproducible path, give curves equal to 5 decimals
# in float64 (tests/support/golden.py says why float64). The smallest mutation moves a curve by ~0.1.
ABS_TOL = 0.01
MUTATION_FACTOR = 3


def _worst(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def fresh_curves():
    return run_curves()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_curve_matches_golden(name, fresh_curves):
    assert GOLDEN["steps"] == STEPS and GOLDEN["dtype"] == str(DTYPE)
    fresh, golden = fresh_curves[name], GOLDEN["curves"][name]
    worst = _worst(fresh, golden)
    assert worst <= ABS_TOL, f"{name}: curve moved by up to {worst:.3f} (golden {golden[-1]}, fresh {fresh[-1]})"


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_moves_curve_past_tolerance(name, fresh_curves):
    base = MUTATIONS[name][0]
    worst = _worst(fresh_curves[name], GOLDEN["curves"][base])
    assert worst > MUTATION_FACTOR * ABS_TOL, f"{name} moved {base}'s curve by only {worst:.3f}"
