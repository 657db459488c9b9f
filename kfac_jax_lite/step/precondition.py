"""Phase 3: every parameter's update from its block.

A Kronecker layer's gradient is viewed as the ``[d_in(+1), d_out]`` matrix
``[∇W; ∇b]`` and multiplied by its damped inverse factors
(``A⁻¹ ∇ G⁻¹``, Martens & Grosse 2015, eq. 4; Ba et al. 2017, eq. 3, 9), or
with EK-FAC rotated into its eigenbasis and divided by its scales; a
diagonal-Fisher or full block by its inverse (:mod:`kfac_jax_lite.curvature.specs`),
distributed over devices when the inverses are sharded
(:mod:`kfac_jax_lite.placement`). Parameters outside any layer get the
fallback ``g / (v + λ)``; non-trainable collections a zero update.
Masked-out leaves (``optax.masked``) are placeholders and pass through.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from kfac_jax_lite import guard, masking, placement
from kfac_jax_lite.curvature import diagonal, ekfac
from kfac_jax_lite.options import ParallelOptions
from kfac_jax_lite.tagging import geometry
from kfac_jax_lite.tagging.layers import Layer, TaggedLoss

Inverses = dict[str, dict[str, jax.Array]]


def _gradient_matrices(tagged: TaggedLoss, grads: Sequence[Any],
                       params: Sequence[Any]) -> dict[Layer, tuple[Any, jax.Array]]:
  """Layer -> (its bias gradient leaves or ``None``, ``[∇W; ∇b]`` in float32).

  A masked-out weight skips the layer; a masked-out bias counts as zeros.
  """
  mats = {}
  for layer in tagged.factored:
    ws = [grads[i] for i in layer.weight_indices]
    if any(masking.is_masked(w) for w in ws):
      continue
    bs = [jnp.zeros_like(params[i], ws[0].dtype) if masking.is_masked(grads[i]) else grads[i]
          for i in layer.bias_indices] or None
    mats[layer] = (bs, geometry.params_to_matrix(
        layer, [w.astype(jnp.float32) for w in ws],
        None if bs is None else [b.astype(jnp.float32) for b in bs]))
  return mats


def _kronecker_updates(tagged: TaggedLoss, grads: Sequence[Any], params: Sequence[Any],
                       inverses: Inverses, parallel: ParallelOptions, eigen: Any,
                       damping: jax.Array | float,
                       relative_damping: bool) -> dict[int, jax.Array]:
  """Leaf index -> update of the leaves owned by Kronecker (or full) blocks.

  The slice layers of a stacked leaf (a scanned stack) add up in one leaf.
  """
  mats = _gradient_matrices(tagged, grads, params)
  eigen = eigen or {}
  pres = placement.precondition({l: m for l, (_, m) in mats.items() if l.name not in eigen},
                                inverses, parallel.axis_name if parallel.sharded else None)
  pres.update({l: ekfac.precondition(eigen[l.name], m, damping, relative_damping)
               for l, (_, m) in mats.items() if l.name in eigen})
  parts: list[tuple[int, jax.Array]] = []
  for layer, (bs, _) in mats.items():
    w_out, b_out = geometry.matrix_to_params(
        layer, pres[layer], [grads[i] for i in layer.weight_indices], bs)
    parts += zip(layer.weight_indices, w_out)
    parts += [(i, b) for i, b in zip(layer.bias_indices, b_out or ())
              if not masking.is_masked(grads[i])]
  out: dict[int, jax.Array] = {}
  for i, value in parts:
    out[i] = out[i] + value if i in out else value
  return out


def _fallback_update(grad: jax.Array, v: jax.Array, first: jax.Array,
                     damping: jax.Array | float,
                     ema_decay: jax.Array | float) -> tuple[jax.Array, jax.Array]:
  """``g / (v + λ)`` with ``v`` the moving average of ``g²`` (kept if not finite)."""
  new_v = diagonal.update_second_moment(v, grad, ema_decay, first)
  new_v = optax.tree.where(guard.all_finite(new_v), new_v, v)
  return diagonal.precondition(new_v, grad, damping).astype(grad.dtype), new_v


def precondition(tagged: TaggedLoss, updates: Any, params: Any, inverses: Inverses,
                 rms: Any, first: jax.Array, damping: jax.Array | float,
                 ema_decay: jax.Array | float, parallel: ParallelOptions,
                 eigen: Any = None, relative_damping: bool = False) -> tuple[Any, Any]:
  """Preconditions a gradient tree.

  Args:
    tagged: the tagged loss (static).
    updates: the gradients (``optax.MaskedNode`` for masked-out leaves).
    params: the full parameters.
    inverses: layer name -> factor name -> damped inverse (or row slice).
    rms: the fallback's squared-gradient averages (``None`` elsewhere).
    first: whether this is the first step (the averages start from ``g²``).
    damping: Tikhonov damping ``λ``.
    ema_decay: the fallback averages' decay.
    parallel: where the inverses live.
    eigen: EK-FAC's bases and scales of its layers
      (:mod:`kfac_jax_lite.curvature.ekfac`), which have no ``inverses``
      entry, or ``None``.
    relative_damping: EK-FAC's ``λ`` is a fraction of its mean scale
      (``InverseOptions.relative_damping``; the fallback's stays absolute).

  Returns:
    The preconditioned updates (each leaf in its gradient's dtype) and the
    new fallback averages.
  """
  grads, treedef = jax.tree_util.tree_flatten(updates, is_leaf=masking.is_masked)
  param_leaves = jax.tree_util.tree_leaves(params)
  out = list(grads)
  new_rms = list(treedef.flatten_up_to(rms))
  for i, value in _kronecker_updates(tagged, grads, param_leaves, inverses, parallel,
                                     eigen, damping, relative_damping).items():
    out[i] = value
  for layer in tagged.frozen:
    if not masking.is_masked(grads[layer.weight_index]):
      out[layer.weight_index] = jnp.zeros_like(grads[layer.weight_index])
  for layer in tagged.rms:
    i = layer.weight_index
    if not masking.is_masked(grads[i]):
      out[i], new_rms[i] = _fallback_update(grads[i], new_rms[i], first, damping,
                                             ema_decay)
  return (jax.tree_util.tree_unflatten(treedef, out),
          jax.tree_util.tree_unflatten(treedef, new_rms))
