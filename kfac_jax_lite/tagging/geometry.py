"""A layer's parameter leaves as the ``[d_in(+1), d_out]`` matrix K-FAC works with.

Each layer family (:mod:`.dense`, :mod:`.conv`) knows how its weight operand
is a ``[d_in, d_out]`` matrix; this module adds what all families share: the
parameter's view equations (a weight stored transposed or reshaped), the bias
row (``[W; b]`` is ``[d_in + 1, d_out]``, Martens & Grosse 2015, §A), the
slices of a scanned stack, and the way back from the preconditioned matrix to
the parameter leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.tagging.match import Part
from kfac_jax_lite.tagging.jaxpr import TYPE_ONLY, bind


def _leaf_to_matrix(layer: Layer, w: jax.Array) -> jax.Array:
  for eqn in layer.match.weight_chain:
    if eqn.primitive.name not in TYPE_ONLY:
      (w,) = bind(eqn, [w])
  return layer.match.operand_to_matrix(w)


def _box(part: Part) -> tuple[slice, ...]:
  return tuple(slice(a, b) for a, b in part)


def params_to_matrix(layer: Layer, weight: jax.Array,
                     bias: jax.Array | None) -> jax.Array:
  """Weight (and bias) leaves -> the ``[d_in(+1), d_out]`` matrix ``[W; b]``.

  For a layer of a scanned stack, only its slices of the leaves are read.
  """
  mat = _leaf_to_matrix(layer, weight)
  if bias is not None:
    if layer.match.bias_part is not None:
      bias = bias[_box(layer.match.bias_part)]
    mat = jnp.concatenate([mat, bias.reshape(1, -1).astype(mat.dtype)], axis=0)
  return mat


def matrix_to_params(layer: Layer, mat: jax.Array, weight_like: jax.Array,
                     bias_like: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Inverse of :func:`params_to_matrix` (a permutation, so its transpose).

  For a layer of a scanned stack the leaves are zero outside its slices.
  """
  w_mat = mat[:mat.shape[0] - (bias_like is not None)]
  to_mat = jax.linear_transpose(
      lambda w: _leaf_to_matrix(layer, w),
      jax.ShapeDtypeStruct(weight_like.shape, w_mat.dtype))
  (weight,) = to_mat(w_mat)
  weight = weight.astype(weight_like.dtype)
  if bias_like is None:
    return weight, None
  part = layer.match.bias_part
  if part is None:
    return weight, mat[-1].reshape(bias_like.shape).astype(bias_like.dtype)
  box = _box(part)
  bias = jnp.zeros(bias_like.shape, bias_like.dtype)
  return weight, bias.at[box].set(mat[-1].reshape(bias[box].shape).astype(bias.dtype))
