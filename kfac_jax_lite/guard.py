"""Commit only finite numbers: non-finite estimates never poison the state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
  """True if every leaf of ``tree`` is finite (a traced boolean)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))
