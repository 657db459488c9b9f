"""Phase 4: the KL-clipped step size (Ba et al. 2017, §5, eq. 14).

With learning rate ``η`` and bound ``c``, the step's KL divergence
``η² vᵀF v ≈ η² v·g`` (``v`` the preconditioned direction, ``g`` the gradient)
is kept under ``c`` by ``η_eff = min(η, sqrt(c / v·g))``. The direction is
scaled by ``η_eff / |η|`` so that a following ``scale_by_learning_rate(η)``
applies ``η_eff`` (a negative ``η`` ascends as it would without the clip).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kfac_jax_lite import masking
from kfac_jax_lite.curvature.kl_clip import kl_scale


def clip(updates: Any, grads: Any, learning_rate: jax.Array | float,
         kl_clip: jax.Array | float) -> Any:
  """The preconditioned ``updates`` scaled by ``η_eff / |η|``.

  Args:
    updates: the preconditioned direction ``v`` (a tree; masked-out leaves
      are ``optax.MaskedNode`` and pass through).
    grads: the gradient ``g``, same structure.
    learning_rate: ``η`` at this step.
    kl_clip: the KL bound ``c``.

  Returns:
    The scaled updates, each leaf in its dtype.
  """
  out, treedef = jax.tree_util.tree_flatten(updates, is_leaf=masking.is_masked)
  g = treedef.flatten_up_to(grads)
  vg = sum(jnp.vdot(o.astype(jnp.float32), x.astype(jnp.float32))
           for o, x in zip(out, g) if not masking.is_masked(x))
  scale = kl_scale(vg, learning_rate, kl_clip)
  return jax.tree_util.tree_unflatten(treedef, [
      o if masking.is_masked(o) else (o * scale).astype(o.dtype) for o in out])
