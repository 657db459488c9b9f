"""Commit only finite numbers: non-finite estimates never poison the state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
  """True if every leaf of ``tree`` is finite (a traced boolean)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """``on_true`` where ``pred`` else ``on_false``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
