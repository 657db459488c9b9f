"""kfl.kfac's default statistics batch: the leading half of a batch-major batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_lite as kfl
from tests._optax_cases import kfac_state


def _loss(p, b):
  return kfl.losses.softmax_cross_entropy(jnp.tanh(b["x"] @ p["w"]) @ p["v"], b["y"])


def _problem(n: int):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, n))}
  return params, batch


def _first_factors(tx, params, batch):
  _, state = jax.jit(tx.update)(jax.grad(_loss)(params, batch), tx.init(params), params,
                                batch=batch)
  return kfac_state(state).factors


def _assert_factors(got, want):
  for name, factors in want.items():
    for k, value in factors.items():
      np.testing.assert_allclose(got[name][k], value, rtol=1e-5, atol=1e-7)


def test_a_kind_estimates_on_the_leading_half_an_options_value_on_all():
  """The exact Fisher's factors after one step (the first estimate replaces
  the zeros) against ``kfl.estimate_curvature`` of the slice."""
  params, batch = _problem(32)
  half = jax.tree.map(lambda x: x[:16], batch)
  key = jax.random.key(0)
  _assert_factors(_first_factors(kfl.kfac(_loss, batch, estimator="exact"), params, batch),
                  kfl.estimate_curvature(_loss, params, half, key=key, estimator="exact"))
  _assert_factors(_first_factors(kfl.kfac(_loss, batch, estimator=kfl.EstimatorOptions("exact")),
                                 params, batch),
                  kfl.estimate_curvature(_loss, params, batch, key=key, estimator="exact"))


def test_small_or_time_major_batches_keep_the_whole_batch():
  """Half of 12 is under 8 examples; a leaf whose leading axis is not the
  batch's makes a leading slice meaningless: both use every example."""
  params, batch = _problem(12)
  key = jax.random.key(0)
  whole = kfl.estimate_curvature(_loss, params, batch, key=key, estimator="exact")
  _assert_factors(_first_factors(kfl.kfac(_loss, batch, estimator="exact"), params, batch), whole)

  params, batch = _problem(32)
  odd = {**batch, "x": batch["x"][None]}  # [1, B, d]

  def odd_loss(p, b):
    return _loss(p, {**b, "x": b["x"][0]})

  tx = kfl.kfac(odd_loss, odd, estimator="exact")
  _, state = jax.jit(tx.update)(jax.grad(odd_loss)(params, odd), tx.init(params), params,
                                batch=odd)
  _assert_factors(kfac_state(state).factors,
                  kfl.estimate_curvature(_loss, params, batch, key=key, estimator="exact"))
  assert isinstance(optax.tree.get(state, "scale"), jax.Array)
