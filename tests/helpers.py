"""Small helpers shared by several test modules."""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import optax


def key_name(k: Any) -> Any:
  """The dict key, attribute name or sequence index of one path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  raise TypeError(f"unexpected key {k!r}")


def leaf_paths(tree: Any) -> list[tuple[Any, ...]]:
  """The path of every leaf of ``tree``, an ``nnx.Variable`` counted as a leaf
  (K-FAC names a layer by the path to the variable, not to its value, so that
  ``nnx.Optimizer``'s variables and plain values agree)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [p for p, _ in flat[0]]


def path_name(tree: Any, *keys: Any) -> str:
  """keystr of the unique leaf path of ``tree`` that starts with ``keys``.

  Args:
    tree: a parameter pytree.
    *keys: dict keys / attribute names / sequence indices, outermost first.

  Returns:
    ``jax.tree_util.keystr`` of that leaf's path (see :func:`leaf_paths`).
  """
  paths = [p for p in leaf_paths(tree) if tuple(key_name(k) for k in p[:len(keys)]) == keys]
  assert len(paths) == 1, (keys, [jax.tree_util.keystr(p) for p in paths])
  return jax.tree_util.keystr(paths[0])


def loss_before_and_after(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                          tx: optax.GradientTransformationExtraArgs,
                          steps: int) -> tuple[float, float]:
  """Trains ``steps`` full-batch steps of ``tx``; the loss before and after."""
  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return jax.tree.map(jnp.add, p, u), s

  before, state = float(loss_fn(params, batch)), tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return before, float(loss_fn(params, batch))
