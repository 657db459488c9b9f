"""Reshape a dense layer's tensors to the matrices K-FAC works with.

For a layer whose ``dot_general`` contracts the activation ``x`` with a weight
operand ``W'`` (a reshaped / transposed view of the parameter), the weight
matrix is ``W'`` with its contracting axes first, reshaped to
``[d_in, d_out]``; the activation rows are ``x`` with its contracting axes last,
reshaped to ``[rows, d_in]`` (every non-contracted axis of ``x``: batch,
sequence positions, ... is a row); output derivatives are reshaped to
``[rows, d_out]``. With a bias, ``[W; b]`` is ``[d_in + 1, d_out]`` and the
activation rows get a trailing 1 (Martens & Grosse 2015, §A).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.tagging.trace import bind_eqn


def input_rows(layer: Layer, x: jax.Array) -> jax.Array:
  """Activation operand -> ``[rows, d_in(+1)]`` float32 (ones column for a bias)."""
  m = layer.match
  x = jnp.transpose(x, m.act_free + m.act_contract).astype(jnp.float32)
  d = math.prod(x.shape[len(m.act_free):])
  x = x.reshape(-1, d)
  if layer.bias_index is not None:
    x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  return x


def output_rows(layer: Layer, ds: jax.Array) -> jax.Array:
  """Output derivative ``[..., *out_shape]`` -> ``[..., rows, d_out]``."""
  m = layer.match
  lead = ds.ndim - len(m.out_shape)
  n_w, n_a = len(m.weight_free), len(m.act_free)
  if m.weight_operand == 0:  # output axes are [w_free..., act_free...]
    perm = tuple(range(lead)) + tuple(lead + n_w + k for k in range(n_a)) + tuple(
        lead + k for k in range(n_w))
    ds = jnp.transpose(ds, perm)
  rows = math.prod(ds.shape[lead:lead + n_a])
  return ds.reshape(*ds.shape[:lead], rows, layer.d_out)


def _operand_to_matrix(layer: Layer, w: jax.Array) -> jax.Array:
  m = layer.match
  for eqn in m.weight_chain:
    if eqn.primitive.name != "convert_element_type":
      (w,) = bind_eqn(eqn, [w])
  w = jnp.transpose(w, m.weight_contract + m.weight_free)
  return w.reshape(-1, layer.d_out)


def params_to_matrix(layer: Layer, weight: jax.Array,
                     bias: jax.Array | None) -> jax.Array:
  """Weight (and bias) leaves -> the ``[d_in(+1), d_out]`` matrix ``[W; b]``."""
  mat = _operand_to_matrix(layer, weight)
  if bias is not None:
    mat = jnp.concatenate([mat, bias.reshape(1, -1).astype(mat.dtype)], axis=0)
  return mat


def matrix_to_params(layer: Layer, mat: jax.Array, weight_like: jax.Array,
                     bias_like: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Inverse of :func:`params_to_matrix` (a permutation, so its transpose)."""
  w_mat = mat[:mat.shape[0] - (bias_like is not None)]
  to_mat = jax.linear_transpose(
      lambda w: _operand_to_matrix(layer, w),
      jax.ShapeDtypeStruct(weight_like.shape, w_mat.dtype))
  (weight,) = to_mat(w_mat)
  weight = weight.astype(weight_like.dtype)
  if bias_like is None:
    return weight, None
  return weight, mat[-1].reshape(bias_like.shape).astype(bias_like.dtype)
