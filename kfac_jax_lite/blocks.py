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

from typing import Collection

import jax
import jax.numpy as jnp

from kfac_jax_lite.curvature import diagonal, kronecker
from kfac_jax_lite.curvature.damping import factored_damping
from kfac_jax_lite.tagging.layers import Layer

Block = dict[str, jax.Array]


def inverses(layer: Layer, factors: Block, damping: jax.Array | float,
             method: str, only: Collection[str] | None = None) -> Block:
  """The damped inverses of one layer's factors.

  Args:
    layer: the layer record.
    factors: its factor moving averages.
    damping: Tikhonov damping ``λ``.
    method: ``"eigh"`` or ``"cholesky"`` (see :mod:`kfac_jax_lite.curvature.kronecker`).
    only: the factors to invert (all if ``None``); the damping of a
      Kronecker factor still comes from all of its block's factors.

  Returns:
    Factor name -> inverse, for the factors asked for.
  """
  keys = set(factors) if only is None else set(only)
  lam = jnp.asarray(damping, jnp.float32)
  if layer.block == "diag":
    return {"F": diagonal.damped_inverse(factors["F"], damping)}
  names = layer.kron_factors
  shifts = dict(zip(names, factored_damping([factors[k] for k in names], damping))
                if names else {})
  shifts.update({k: lam for k in ("B", "full") if k in factors})  # plain Tikhonov
  return {k: kronecker.damped_inverse(factors[k], shifts[k], method)
          for k in factors if k in keys}


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
