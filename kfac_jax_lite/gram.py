"""Gram matrices ``rows^T rows`` of rows that may be sharded over a mesh.

Statistics contract the batch axis. Under ``jax.jit`` on an Explicit-axis mesh
the batch is sharded, and JAX asks where the contraction's result lives; a
factor is always replicated (every device holds the whole matrix).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def _replicated_like(x: jax.Array) -> NamedSharding | None:
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  explicit = getattr(jax.sharding.AxisType, "Explicit", None)
  axis_types = getattr(sharding.mesh, "axis_types", ())
  if explicit is None or explicit not in tuple(axis_types):
    return None
  return NamedSharding(sharding.mesh, PartitionSpec())


def gram(rows: jax.Array) -> jax.Array:
  """``rows^T rows`` for ``rows`` of shape ``[n, d]``, replicated.

  Args:
    rows: float32 ``[n, d]``.

  Returns:
    ``[d, d]``.
  """
  return jnp.einsum("nd,ne->de", rows, rows, out_sharding=_replicated_like(rows))
