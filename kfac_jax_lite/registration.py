"""Registering a dense layer by hand, where detection cannot see it.

Automatic detection reads ``dot_general`` / conv / gather equations. A layer
computed some other way (a custom primitive or kernel, an elementwise
formulation) is invisible to it; :func:`register_dense` marks it, the way the
losses mark the predictive distribution: the computation runs inside a
``jax.jit`` whose function name starts with :data:`REGISTRATION_PREFIX`, and
the tagger treats that equation as one dense layer without looking inside.
"""

from __future__ import annotations

from typing import Callable

import jax

REGISTRATION_PREFIX = "kfl_layer__"


def register_dense(fn: Callable[..., jax.Array], x: jax.Array, w: jax.Array,
                   b: jax.Array | None = None) -> jax.Array:
  """Computes ``fn(x, w)`` (or ``fn(x, w, b)``) and registers it as a dense layer.

  The caller asserts that ``fn`` computes ``x @ w + b``: ``x`` of shape
  ``[..., d_in]`` (the leading axis is the batch), ``w`` a parameter of shape
  ``[d_in, d_out]`` (or a reshape / transpose / cast of one), ``b`` an
  optional ``[d_out]`` parameter. K-FAC then gives ``w`` (and ``b``) a
  Kronecker block from ``x`` and the derivative of the output (Martens &
  Grosse 2015, eq. 1), exactly as for a detected ``x @ w + b``. Nothing
  inside ``fn`` is tagged; ``w`` and ``b`` must not be used anywhere else in
  the loss (:func:`kfac_jax_lite.find_layers` raises ``ValueError`` if they
  are: a registration never double counts).

  Args:
    fn: the layer's computation.
    x: the activations.
    w: the weight.
    b: the bias, or ``None``.

  Returns:
    ``fn(x, w[, b])``.
  """
  if b is None:
    def kfl_layer__dense(x, w):
      return fn(x, w)
    return jax.jit(kfl_layer__dense)(x, w)

  def kfl_layer__dense_bias(x, w, b):
    return fn(x, w, b)
  return jax.jit(kfl_layer__dense_bias)(x, w, b)
