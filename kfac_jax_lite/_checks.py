"""Validation of the numeric hyperparameters, whatever their numeric type.

A concrete value (a Python number, a numpy scalar or 0-d array, a concrete
0-d ``jax.Array``) is checked at construction; NaN is always rejected. A
traced value (under ``optax.inject_hyperparams``) or a schedule cannot be
checked there: see :func:`kfac_jax_lite.scale_by_kfac` for what an invalid
traced damping does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_value(value: Any) -> float | None:
  """The value as a Python float, or ``None`` if traced, a schedule or ``None``.

  Raises:
    ValueError: for a non-scalar array or a non-numeric value.
  """
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise ValueError(f"expected a number, got the bool {value!r}")
  if isinstance(value, (int, float, np.number, np.ndarray, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(f"expected a scalar, got an array of shape {np.shape(value)}")
    return float(value)
  raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None,
                 low_open: bool = True, high: float | None = None,
                 high_open: bool = True, hint: str = "") -> None:
  """Raises ``ValueError`` if a concrete ``value`` is NaN or out of range.

  Args:
    name: the argument's name, for the message.
    value: the value (traced values and schedules pass unchecked).
    low: lower bound, or ``None``.
    low_open: whether ``low`` itself is excluded.
    high: upper bound, or ``None``.
    high_open: whether ``high`` itself is excluded.
    hint: a sentence on how to fix it.
  """
  try:
    x = concrete_value(value)
  except ValueError as e:
    raise ValueError(f"{name}: {e}.") from None
  if x is None:
    return
  below = low is not None and (x < low or (low_open and x == low))
  above = high is not None and (x > high or (high_open and x == high))
  if math.isnan(x) or below or above:
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    span = f"in {lo or '(-inf'}, {hi or 'inf)'}"
    raise ValueError(f"{name} must be {span}, got {value!r}. {hint}".rstrip())
