"""Trace a loss to a jaxpr.

Only public ``jax`` / ``jax.extend`` APIs are used. The helpers here know
jaxprs and nothing of layers or optimizers.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from kfac_jax_lite.tagging.trainable import non_trainable
from kfac_jax_lite.tagging.unroll import unroll_scans


@dataclasses.dataclass(frozen=True)
class TracedLoss:
  """A loss traced once on abstract values.

  Attributes:
    jaxpr: the closed jaxpr of ``loss_fn(params, batch)``; its inputs are the
      flattened parameter leaves followed by the flattened batch leaves.
    param_paths: the key path of every parameter leaf, in flatten order.
    frozen: flat index -> collection of the non-trainable parameter leaves
      (see :mod:`kfac_jax_lite.tagging.trainable`).
  """

  jaxpr: jex_core.ClosedJaxpr
  param_paths: tuple[tuple[Any, ...], ...]
  frozen: dict[int, str] = dataclasses.field(default_factory=dict, hash=False, compare=False)

  @property
  def num_params(self) -> int:
    return len(self.param_paths)


def abstractify(tree: Any) -> Any:
  """Maps arrays (or ``ShapeDtypeStruct`` leaves) to ``ShapeDtypeStruct``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)),
      tree)


def _traceable(x: Any) -> Any:
  return x if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else abstractify(x)


def type_key(tree: Any) -> tuple[Any, ...]:
  """Hashable signature of a pytree's leaf types (shape, dtype, varying axes).

  Two trees with equal keys trace ``loss_fn`` to the same jaxpr.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(jax.numpy.shape(x)), str(jax.numpy.result_type(x)),
                         tuple(sorted(varying_axes(x)))) for x in leaves)


def varying_axes(x: Any) -> frozenset[str]:
  """The ``shard_map`` axes a value varies over (empty outside ``shard_map``)."""
  if not isinstance(x, jax.Array):
    return frozenset()
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def trace_loss(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
               batch: Any) -> TracedLoss:
  """Traces ``loss_fn(params, batch)`` on abstract values (no model is run).

  Args:
    loss_fn: a pure function of ``(params, batch)`` returning a scalar.
    params: parameter pytree of arrays or ``jax.ShapeDtypeStruct``.
    batch: batch pytree of arrays or ``jax.ShapeDtypeStruct``.

  Returns:
    The :class:`TracedLoss`, with scans over parameters unrolled (see
    :mod:`kfac_jax_lite.tagging.unroll`).
  """
  path_leaves, param_treedef = jax.tree_util.tree_flatten_with_path(params)
  batch_leaves, batch_treedef = jax.tree_util.tree_flatten(batch)
  # Arrays and tracers are passed as they are, so that their full type (e.g.
  # which shard_map axes they vary over) shapes the trace; nothing is run.
  batch_leaves = [_traceable(x) for x in batch_leaves]
  param_avals = [_traceable(leaf) for _, leaf in path_leaves]

  def flat_loss(*leaves):
    p = jax.tree_util.tree_unflatten(param_treedef, leaves[:len(param_avals)])
    b = jax.tree_util.tree_unflatten(batch_treedef, leaves[len(param_avals):])
    return loss_fn(p, b)

  closed = jax.make_jaxpr(flat_loss)(*param_avals, *batch_leaves)
  closed = unroll_scans(closed, [*param_avals, *batch_leaves], len(param_avals))
  if len(closed.out_avals) != 1 or closed.out_avals[0].shape != ():
    aux = (" For a loss with auxiliary outputs (jax.value_and_grad(..., has_aux=True)), give "
           "K-FAC lambda params, batch: loss_fn(params, batch)[0]."
           if len(closed.out_avals) > 1 and closed.out_avals[0].shape == () else "")
    raise ValueError("loss_fn(params, batch) must return a scalar loss, got outputs "
                     f"{closed.out_avals}.{aux}")
  return TracedLoss(jaxpr=closed, param_paths=leaf_paths(params), frozen=non_trainable(params))


def leaf_paths(params: Any) -> tuple[tuple[Any, ...], ...]:
  """The key path of every parameter leaf, in flatten order, without the
  key a ``flax.nnx.Variable`` adds for its value.

  ``nnx.Optimizer`` initializes the optimizer on a state of variables
  and updates it with their values (``nnx.as_pure``): both must name the
  layers alike, since the names key the optimizer state.
  """
  nnx = sys.modules.get("flax.nnx")  # not imported: no Variable can be here
  if nnx is not None:
    def is_variable(x: Any) -> bool:
      return isinstance(x, nnx.Variable)
    params = jax.tree.map(lambda v: _value(v) if is_variable(v) else v, params,
                          is_leaf=is_variable)
  return tuple(path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _value(variable: Any) -> Any:
  """A ``flax.nnx.Variable``'s value (``get_value`` from flax 0.12, else ``.value``)."""
  return variable.get_value() if hasattr(variable, "get_value") else variable.value
