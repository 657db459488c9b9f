"""When periodic work is due, and how it is spread over steps (Ba et al. 2017, §3)."""

from __future__ import annotations

from typing import Any, Callable

import jax

from kfac_jax_lite.tagging.layers import TaggedLoss


def balanced_groups(tagged: TaggedLoss, num_groups: int) -> list[tuple[str, ...]]:
  """Splits the Kronecker layers into groups of about equal inversion cost.

  Greedy longest-processing-time assignment by ``d_A^3 + d_G^3`` (the cost of
  an eigendecomposition or Cholesky factorization of each factor).

  Args:
    tagged: the tagged loss.
    num_groups: number of groups (some may be empty).

  Returns:
    ``num_groups`` tuples of layer names.
  """
  def cost(layer):
    return sum(s[0] ** 3 if len(s) == 2 else s[0] for s in layer.factor_shapes.values())

  groups: list[list[str]] = [[] for _ in range(num_groups)]
  loads = [0] * num_groups
  for layer in sorted(tagged.kron, key=cost, reverse=True):
    k = loads.index(min(loads))
    groups[k].append(layer.name)
    loads[k] += cost(layer)
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
