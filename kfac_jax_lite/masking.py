"""Running inside ``optax.masked``: the inner transform sees placeholders.

``optax.masked`` hands the inner transform parameters and updates with
``optax.MaskedNode`` in place of the masked-out leaves. K-FAC's curvature needs
the model run on all parameters, so there it takes them explicitly
(``sample_params=`` for ``init``, ``kfac_params=`` for ``update``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def is_masked(x: Any) -> bool:
  """True for ``optax.masked``'s placeholder of a masked-out leaf."""
  return isinstance(x, optax.MaskedNode)


def has_masked(params: Any) -> bool:
  """True if ``optax.masked`` hid some of ``params``."""
  return any(map(is_masked, jax.tree_util.tree_leaves(params, is_leaf=is_masked)))


def masked_error(fix: str) -> ValueError:
  """Inside optax.masked K-FAC needs the parameters the mask hides."""
  return ValueError(
      "scale_by_kfac got parameters with optax.MaskedNode leaves (inside "
      "optax.masked / optax.partition): estimating curvature runs the model on "
      f"all parameters, so {fix}. To leave parameters out of K-FAC "
      "preconditioning without masking, use scale_by_kfac(..., blocks={regex: "
      "'none'}) (or 'rms').")
