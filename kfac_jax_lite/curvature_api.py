"""``estimate_curvature``: one Kronecker-factor estimate, for inspection and tests."""

from __future__ import annotations

from typing import Any, Callable

import jax

from kfac_jax_lite.curvature.estimators import check_estimator
from kfac_jax_lite.statistics import factor_estimate
from kfac_jax_lite.tagging.layers import DEFAULT_MAX_FACTOR_DIM, tag
from kfac_jax_lite.tagging.trace import trace_loss


def estimate_curvature(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                       batch: Any, *, key: jax.Array, estimator: str = "exact",
                       num_samples: int = 1, conv_approximation: str = "expand",
                       dense_approximation: str = "expand",
                       max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM) -> dict[str, dict[str, jax.Array]]:
  """One estimate of every detected layer's curvature factors (no moving average).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` built with a
      :mod:`kfac_jax_lite.losses` function.
    params: parameter pytree.
    batch: batch pytree.
    key: PRNG key (used by ``"mc"``).
    estimator: ``"exact"``, ``"mc"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples for ``"mc"``.
    conv_approximation: ``"expand"`` or ``"reduce"`` (see
      :func:`kfac_jax_lite.scale_by_kfac`).
    dense_approximation: ``"expand"`` or ``"reduce"``.
    max_factor_dim: see :func:`kfac_jax_lite.scale_by_kfac`.

  Returns:
    ``{name: {"A": [d_in(+1), d_in(+1)], "G": [d_out, d_out]}}`` keyed by the
    ``keystr`` of each Kronecker layer's weight path; ``F ≈ kron(A, G)`` for
    ``θ = [W; b]`` flattened row-major, ``W`` the ``[d_in, d_out]`` matrix
    (for a convolution: ``d_in`` = input channels × filter positions,
    channel-major; for an embedding ``A`` is the vector of token
    frequencies). Scale-and-shift layers give ``{"F": [1(+1), d]}``, the
    diagonal Fisher of ``[γ; β]``. Layers over ``max_factor_dim`` have the
    factors listed by their ``Layer.factor_shapes`` (``K``, ``Psi``, ``G``,
    ``B`` when doubly factored; vectors for diagonal factors).
  """
  check_estimator(estimator, num_samples)
  tagged = tag(trace_loss(loss_fn, params, batch),
               {"conv": conv_approximation, "dense": dense_approximation},
               max_factor_dim=max_factor_dim)
  return factor_estimate(tagged, params, batch, key, estimator=estimator,
                         num_samples=num_samples)
