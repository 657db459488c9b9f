"""When periodic work is due, and how it is spread over steps (Ba et al. 2017, §3)."""

from __future__ import annotations

from typing import Any, Callable

import jax

from kfac_jax_lite.curvature.specs import spec_for
from kfac_jax_lite.tagging.layers import TaggedLoss


def factor_costs(tagged: TaggedLoss) -> dict[tuple[str, str], int]:
  """(layer name, factor name) -> the cost of inverting that factor: ``d^3``
  for a matrix, its size for a diagonal factor or a diagonal Fisher."""
  return {(l.name, k): c for l in tagged.factored for k, c in spec_for(l).costs().items()}


def inversion_costs(tagged: TaggedLoss) -> dict[str, int]:
  """Layer name -> the cost of inverting all its factors (``d_A^3 + d_G^3``)."""
  out: dict[str, int] = {}
  for (name, _), cost in factor_costs(tagged).items():
    out[name] = out.get(name, 0) + cost
  return out


def balanced_groups(costs: dict[Any, int], num_groups: int) -> list[tuple[Any, ...]]:
  """Splits layers (or factors) into groups of about equal inversion cost.

  Greedy longest-processing-time assignment (each layer, costliest first,
  goes to the least loaded group).

  Args:
    costs: layer name (or factor key) -> cost (see :func:`inversion_costs`,
      :func:`factor_costs`).
    num_groups: number of groups (some may be empty).

  Returns:
    ``num_groups`` tuples of layer names (or factor keys).
  """
  groups: list[list[Any]] = [[] for _ in range(num_groups)]
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
