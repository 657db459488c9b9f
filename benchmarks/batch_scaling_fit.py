"""McCandlish et al.'s (2018) steps-vs-batch model fitted to measured points.

``S(B) = S_min (1 + B_crit / B)``: ``S_min`` the fewest steps any batch size
needs to reach the target, ``B_crit`` the critical batch size, where the
steps are twice the minimum; below it doubling the batch nearly halves the
steps, above it it hardly helps. Written ``S = S_min + E_min / B`` it is
linear in ``1 / B``, with ``B_crit = E_min / S_min`` (``E_min``: the fewest
examples, reached at small batches).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def fit_critical_batch(batch_sizes: Sequence[float], steps: Sequence[float | None]
                       ) -> dict[str, float] | None:
  """Fits ``S(B) = S_min + E_min / B`` (McCandlish et al. 2018, §2.2:
  ``(S / S_min − 1)(E / E_min − 1) = 1`` with ``E = B S`` examples).

  Least squares linear in ``(1, 1/B)``, each point weighted by ``1 / S(B)``
  (relative residuals). Points with ``steps`` None (not reached) are left out.

  Args:
    batch_sizes: the batch sizes ``B``.
    steps: steps to the target at each, or None.

  Returns:
    ``{"s_min", "e_min", "b_crit"}`` (``b_crit = E_min / S_min``), or None
    with fewer than two points.
  """
  if len(batch_sizes) != len(steps):
    raise ValueError(f"batch_sizes and steps must have the same length, got "
                     f"{len(batch_sizes)} and {len(steps)}.")
  pts = [(float(b), float(s)) for b, s in zip(batch_sizes, steps) if s is not None]
  if len(pts) < 2:
    return None
  b, s = np.array(pts).T
  design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
  (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
  return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(e_min / s_min)}


def halving_limit(batch_sizes: Sequence[int], steps: Sequence[float | None],
                  ratio: float = 1.5) -> int | None:
  """The first ``B`` whose doubling ``B -> 2B`` gives ``S(B) / S(2B) < ratio``.

  Only consecutive measured doublings count; None if every one kept the ratio
  (or a point was not reached).
  """
  table = dict(zip(batch_sizes, steps))
  for b in sorted(table):
    if 2 * b in table and table[b] is not None and table[2 * b] is not None:
      if table[b] / table[2 * b] < ratio:
        return b
  return None
