"""Fisher estimators: cotangents on the model output whose outer products
average to the output Fisher (Martens & Grosse 2015, §5).

Each estimator returns an array ``C`` of shape ``[S, *logits.shape]`` such that
``sum_s C_s C_s^T`` estimates, case by case, ``E_y[g g^T]`` with
``g = d(-log p(y|z))/dz``:

* ``"exact"``: the columns of a square root of the output Fisher (``S`` = the
  output size; cost grows with it).
* ``"mc"``: ``S = num_samples`` targets drawn from the model, scaled by
  ``1/sqrt(S)``.
* ``"empirical"``: ``S = 1``, the true targets (the "empirical Fisher").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_lite.losses import Distribution

ESTIMATORS = ("exact", "mc", "empirical")


def check_estimator(estimator: str, num_samples: int) -> None:
  """Raises ``ValueError`` for an unknown estimator or a bad sample count."""
  if estimator not in ESTIMATORS:
    raise ValueError(
        f"Unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}.")
  if isinstance(num_samples, int) and num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}.")


def output_cotangents(dist: Distribution, logits: jax.Array, targets: jax.Array,
                      key: jax.Array, estimator: str,
                      num_samples: int = 1) -> jax.Array:
  """Cotangents on the logits for one Fisher estimate.

  Args:
    dist: the registered predictive distribution.
    logits: model output ``z``.
    targets: the loss's target argument (used by ``"empirical"``).
    key: PRNG key (used by ``"mc"``).
    estimator: ``"exact"``, ``"mc"`` or ``"empirical"``.
    num_samples: Monte-Carlo samples per case for ``"mc"``.

  Returns:
    ``[S, *logits.shape]`` float32 per-case derivatives of ``-log p``.
  """
  z = jax.lax.stop_gradient(logits).astype(jnp.float32)
  if estimator == "exact":
    return dist.fisher_sqrt(z)
  mean = dist.mean(z)
  if estimator == "empirical":
    return (mean - dist.targets(z, targets))[None]
  y = dist.sample(key, z, num_samples)
  return (mean[None] - y) / jnp.sqrt(jnp.float32(num_samples))
