"""The batch-size scaling study's fit (``benchmarks/batch_scaling_fit.py``)
against points generated from McCandlish et al.'s formula itself (no training)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from batch_scaling_fit import fit_critical_batch, halving_limit  # pylint: disable=wrong-import-position

SIZES = [8, 16, 32, 64, 128, 256, 512, 1024]


def _formula(s_min: float, b_crit: float, sizes: list[int]) -> list[float]:
  """``S(B) = S_min (1 + B_crit / B)`` (McCandlish et al. 2018)."""
  return [s_min * (1.0 + b_crit / b) for b in sizes]


@pytest.mark.parametrize("s_min,b_crit", [(120.0, 50.0), (30.0, 700.0), (400.0, 3.0)])
def test_fit_recovers_the_formula_exactly(s_min: float, b_crit: float) -> None:
  fit = fit_critical_batch(SIZES, _formula(s_min, b_crit, SIZES))
  assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
  assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
  assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-9)


def test_fit_is_stable_under_relative_noise_and_skips_unreached_points() -> None:
  steps = np.array(_formula(100.0, 64.0, SIZES))
  noisy = list(steps * (1.0 + 0.05 * np.array([1, -1, 1, -1, -1, 1, -1, 1])))
  noisy[1] = None  # not reached: left out
  fit = fit_critical_batch(SIZES, noisy)
  assert fit["b_crit"] == pytest.approx(64.0, rel=0.2)
  assert fit["s_min"] == pytest.approx(100.0, rel=0.1)


def test_fit_needs_two_points_and_matching_lengths() -> None:
  assert fit_critical_batch([8, 16], [10.0, None]) is None
  with pytest.raises(ValueError, match="same length"):
    fit_critical_batch([8, 16], [10.0])


def test_halving_limit_is_where_the_formula_says() -> None:
  # S(B)/S(2B) = 2(B + B_crit)/(2B + B_crit) < 1.5  <=>  B > B_crit / 2.
  assert halving_limit(SIZES, _formula(10.0, 50.0, SIZES)) == 32
  assert halving_limit(SIZES, _formula(10.0, 200.0, SIZES)) == 128
  # Perfect scaling everywhere, or a gap of unreached points: no limit found.
  assert halving_limit([8, 16, 32], [400.0, 200.0, 100.0]) is None
  assert halving_limit([8, 16, 32], [400.0, None, 390.0]) is None
