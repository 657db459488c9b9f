"""One layer's curvature block: its damped inverse and its preconditioning.

What a block holds follows from its :class:`~kfac_jax_lite.tagging.layers.Layer`
record (``Layer.factor_shapes``):

- Kronecker ``A ⊗ G`` (or ``K ⊗ Ψ ⊗ G``, doubly factored): factored Tikhonov
  damping over its ``k`` factors (Ba et al. 2017, eq. 3, 12), applied axis by
  axis (eq. 9). A doubly-factored layer's bias has its own full block ``B``
  with plain damping ``(B + λ I)^{-1}`` (Ba et al. 2017, §4).
- ``F``: the exact diagonal Fisher of ``[W; b]``, ``g / (F + λ)``.
- ``full``: the exact Fisher block of ``[W; b]`` (a ``blocks`` choice for small
  layers), ``(F + λ I)^{-1} vec(g)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import diagonal, kronecker
from kfac_jax_lite.tagging.layers import Layer

Block = dict[str, jax.Array]


def inverses(layer: Layer, factors: Block, damping: jax.Array | float,
             method: str) -> Block:
  """The damped inverses of one layer's factors.

  Args:
    layer: the layer record.
    factors: its factor moving averages.
    damping: Tikhonov damping ``λ``.
    method: ``"eigh"`` or ``"cholesky"`` (see :mod:`kfac_jax_lite.curvature.kronecker`).

  Returns:
    Factor name -> inverse, with the keys of ``factors``.
  """
  if layer.block == "full":
    return {"full": kronecker.damped_inverse(factors["full"], jnp.asarray(damping, jnp.float32),
                                             method)}
  if layer.block == "diag":
    return {"F": diagonal.damped_inverse(factors["F"], damping)}
  names = layer.kron_factors
  out = dict(zip(names, kronecker.inverses([factors[k] for k in names], damping, method)))
  if "B" in factors:
    out["B"] = kronecker.damped_inverse(factors["B"], jnp.asarray(damping, jnp.float32), method)
  return out


def products(layer: Layer, inv: Block,
             mat: jax.Array) -> list[tuple[jax.Array, list[jax.Array]]]:
  """A Kronecker or full block as products: (gradient part, its inverses).

  The weight rows go with the Kronecker factors, in Kronecker order; a
  doubly-factored layer's bias row with its own block ``B``; a full block's
  whole ``vec`` with its one inverse.

  Args:
    layer: the layer record (not a diagonal-Fisher ``"F"`` block).
    inv: its damped inverses.
    mat: the ``[d_in(+1), d_out]`` gradient matrix.

  Returns:
    The parts of ``mat`` (in order, concatenating to its row-major ``vec``)
    with the inverses acting on each.
  """
  if "full" in inv:
    return [(mat.reshape(-1), [inv["full"]])]
  kron = [inv[k] for k in layer.kron_factors]
  if "B" not in inv:
    return [(mat, kron)]
  return [(mat[:-1], kron), (mat[-1], [inv["B"]])]


def precondition(layer: Layer, inv: Block, mat: jax.Array) -> jax.Array:
  """Applies one layer's inverse block to its gradient matrix.

  Args:
    layer: the layer record.
    inv: its damped inverses (see :func:`inverses`).
    mat: the ``[d_in(+1), d_out]`` gradient matrix ``[∇W; ∇b]`` (float32).

  Returns:
    The preconditioned matrix, same shape.
  """
  if "F" in inv:
    return inv["F"] * mat
  return jnp.concatenate([kronecker.precondition(invs, part).reshape(-1)
                          for part, invs in products(layer, inv, mat)]).reshape(mat.shape)
