"""When periodic work is due, and how it is spread over steps (Ba et al. 2017, §3)."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from kfac_jax_lite.tagging.layers import TaggedLoss


def inversion_costs(tagged: TaggedLoss) -> dict[str, int]:
  """Layer name -> ``d_A^3 + d_G^3``, the cost of inverting its factors
  (a diagonal factor or a diagonal Fisher costs its size)."""
  return {l.name: sum(math.prod(s) if len(s) == 1 or k == "F" else s[0] ** 3
                      for k, s in l.factor_shapes.items()) for l in tagged.factored}


def balanced_groups(costs: dict[str, int], num_groups: int) -> list[tuple[str, ...]]:
  """Splits layers into groups of about equal inversion cost.

  Greedy longest-processing-time assignment (each layer, costliest first,
  goes to the least loaded group).

  Args:
    costs: layer name -> cost (see :func:`inversion_costs`).
    num_groups: number of groups (some may be empty).

  Returns:
    ``num_groups`` tuples of layer names.
  """
  groups: list[list[str]] = [[] for _ in range(num_groups)]
  loads = [0] * num_groups
  for name in sorted(costs, key=lambda n: (-costs[n], n)):
    k = loads.index(min(loads))
    groups[k].append(name)
    loads[k] += costs[name]
  return [tuple(g) for g in groups]


def every(period: int | jax.Array, count: jax.Array, due: Callable[[], Any],
           skip: Callable[[], Any]) -> Any:
  """``due()`` on steps where ``count % period == 0``, else ``skip()``.

  A static period of 1 calls ``due`` unconditionally, which lets XLA share the
  statistics pass's forward computation with the caller's gradient pass.
  """
  if isinstance(period, int) and period == 1:
    return due()
  return jax.lax.cond(count % period == 0, due, skip)
