"""A layer's parameter leaves as the ``[d_in(+1), d_out]`` matrix K-FAC works with.

Each layer family (:mod:`.dense`, :mod:`.conv`) knows how its weight operand
is a ``[d_in, d_out]`` matrix; this module adds what all families share: the
parameter's view equations (a weight stored transposed or reshaped), the bias
row (``[W; b]`` is ``[d_in + 1, d_out]``, Martens & Grosse 2015, §A), the
slices of a scanned stack, and the way back from the preconditioned matrix to
the parameter leaves.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging import fused
from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.tagging.match import Part
from kfac_jax_lite.tagging.jaxpr import TYPE_ONLY, bind


Leaves = jax.Array | Sequence[jax.Array]


def _listed(leaves: Leaves) -> list[jax.Array]:
  return list(leaves) if isinstance(leaves, (list, tuple)) else [leaves]


def _leaf_to_matrix(layer: Layer, ws: Sequence[jax.Array]) -> jax.Array:
  joined = layer.match.weight_fused
  w = ws[0] if joined is None else fused.join(joined, ws)
  for eqn in layer.match.weight_chain:
    if eqn.primitive.name not in TYPE_ONLY:
      (w,) = bind(eqn, [w])
  return layer.match.operand_to_matrix(w)


def _bias_row(layer: Layer, bs: Sequence[jax.Array]) -> jax.Array:
  joined = layer.match.bias_fused
  if joined is not None:
    return fused.join(joined, bs).reshape(1, -1)
  bias = bs[0]
  if layer.match.bias_part is not None:
    bias = bias[_box(layer.match.bias_part)]
  return bias.reshape(1, -1)


def _box(part: Part) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in part)


def params_to_matrix(layer: Layer, weight: Leaves, bias: Leaves | None) -> jax.Array:
  """Weight (and bias) leaves -> the ``[d_in(+1), d_out]`` matrix ``[W; b]``.

  For a layer of a scanned stack, only its slices of the leaves are read.

  Args:
    layer: a layer with a match.
    weight: the weight leaf, or a sequence of the leaves of
      ``layer.weight_indices`` (joined for a fused weight).
    bias: likewise for ``layer.bias_indices``, or ``None``.

  Returns:
    The matrix, in the weight's dtype.
  """
  mat = _leaf_to_matrix(layer, _listed(weight))
  if bias is not None:
    mat = jnp.concatenate([mat, _bias_row(layer, _listed(bias)).astype(mat.dtype)], axis=0)
  return mat


def matrix_to_params(layer: Layer, mat: jax.Array, weight_like: Leaves,
                     bias_like: Leaves | None) -> tuple[Leaves, Leaves | None]:
  """Inverse of :func:`params_to_matrix` (a permutation, so its transpose).

  For a layer of a scanned stack the leaves are zero outside its slices; a
  fused weight or bias is split back into its leaves.

  Args:
    layer: a layer with a match.
    mat: a ``[d_in(+1), d_out]`` matrix.
    weight_like: the weight leaf or leaves (shapes and dtypes).
    bias_like: the bias leaf or leaves, or ``None``.

  Returns:
    ``(weight, bias)``, each a leaf or a list of leaves as given.
  """
  ws = _listed(weight_like)
  w_mat = mat[:mat.shape[0] - (bias_like is not None)]
  to_mat = jax.linear_transpose(lambda w: _leaf_to_matrix(layer, w),
                                [jax.ShapeDtypeStruct(w.shape, w_mat.dtype) for w in ws])
  (weights,) = to_mat(w_mat)
  weights = [w.astype(like.dtype) for w, like in zip(weights, ws)]
  weight = weights if isinstance(weight_like, (list, tuple)) else weights[0]
  if bias_like is None:
    return weight, None
  bs = _listed(bias_like)
  to_row = jax.linear_transpose(lambda b: _bias_row(layer, b),
                                [jax.ShapeDtypeStruct(b.shape, mat.dtype) for b in bs])
  (biases,) = to_row(mat[-1:])
  biases = [b.astype(like.dtype) for b, like in zip(biases, bs)]
  return weight, biases if isinstance(bias_like, (list, tuple)) else biases[0]
