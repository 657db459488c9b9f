"""Which parameter leaves are not trainable (never layers, zero updates).

Users pass ``variables["params"]`` / ``nnx.split(model, nnx.Param, ...)``'s
parameters as usual; when they pass the whole state instead, its
non-trainable parts must not be preconditioned or decayed: the collections
other than ``"params"`` of a Flax linen variables dict (``batch_stats``), and
the ``nnx.Variable`` leaves that are not ``nnx.Param`` (``nnx.BatchStat``).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def non_trainable(params: Any) -> dict[int, str]:
  """Flat leaf index -> collection name of every non-trainable leaf.

  Args:
    params: the pytree handed to K-FAC as parameters.

  Returns:
    ``{index: name}``: the linen collection (``"batch_stats"``) or the nnx
    variable type (``"BatchStat"``) of each leaf K-FAC must leave alone.
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  roots = [getattr(p[0], "key", None) if p else None for p in paths]
  out = {}
  if "params" in roots and len(set(roots)) > 1:
    out.update({i: str(r) for i, r in enumerate(roots) if r != "params"})
  variables = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if len(variables) == len(paths):  # one array leaf per variable: indices line up
    out.update({i: type(v).__name__ for i, v in enumerate(variables)
                if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)})
  return out
