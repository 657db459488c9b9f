"""``scale_by_kfac`` / ``kfac`` compose with optax's transforms.

``optax.chain``, ``inject_hyperparams``, ``masked`` (and the ``blocks``
override that needs no mask), ``apply_if_finite``, and the ``kfac`` alias with
a learning-rate schedule, ``momentum=None`` and weight decay (model and
fixtures: :mod:`_optax_cases`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from _optax_cases import (
    Batch, Params, Step, Tx, all_finite, assert_trees_close, assert_trees_equal, batch,
    grad_jit, grads, kfac_direction_oracle, kfac_state, loss_fn, loss_jit, make_train_step,
    make_update, params, trees_differ)


# ----------------------------------------------------------------------------
# 1. Composition with optax.chain.
# ----------------------------------------------------------------------------


def test_chain_with_clipping_and_learning_rate_trains(params: Params, batch: Batch):
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, kl_clip=1e-2,
                        learning_rate=0.1, inverse_every=5),
      optax.scale_by_learning_rate(0.1))
  step = make_train_step(tx)
  p, state = params, tx.init(params)
  losses = []
  for _ in range(20):
    p, state, loss, _ = step(p, state, batch)
    losses.append(float(loss))
  final = float(loss_jit(p, batch))
  assert all(np.isfinite(losses)) and np.isfinite(final)
  assert final < 0.9 * losses[0], losses + [final]
  assert int(kfac_state(state).count) == 20
  assert step._cache_size() == 1


# ----------------------------------------------------------------------------
# 2. optax.inject_hyperparams.
# ----------------------------------------------------------------------------


def test_inject_hyperparams_damping_changes_without_recompiling(
    params: Params, batch: Batch, grads: Params):
  make = optax.inject_hyperparams(kfl.scale_by_kfac,
                                  static_args="loss_fn")
  tx = make(loss_fn=loss_fn, sample_batch=batch, damping=1e-2,
            learning_rate=0.1, kl_clip=1e-2, inverse_every=1)
  update = make_update(tx)
  s0 = tx.init(params)
  assert set(s0.hyperparams) >= {"damping", "learning_rate", "kl_clip"}
  _, s1 = update(grads, s0, params, batch)

  u_small, _ = update(grads, s1, params, batch)
  hp = dict(s1.hyperparams)
  hp["damping"] = jnp.full_like(hp["damping"], 1.0)
  u_large, s2 = update(grads, s1._replace(hyperparams=hp), params, batch)
  assert update._cache_size() == 1
  assert all_finite(u_small) and all_finite(u_large)
  assert trees_differ(u_small, u_large)
  np.testing.assert_allclose(float(s2.hyperparams["damping"]), 1.0)

  # Oracle (numpy, float64): the K-FAC direction with damping 1 from the
  # factors the update used (inverse_every=1 recomputes the inverses).
  expected = kfac_direction_oracle(kfac_state(s2).factors, grads, damping=1.0,
                                   kl_clip=1e-2, learning_rate=0.1)
  assert_trees_close(u_large, expected, rtol=2e-3, atol=1e-6)


def test_inject_hyperparams_around_the_kfac_alias(params: Params, batch: Batch,
                                                  grads: Params):
  """The ready optimizer too: its learning rate becomes a state hyperparameter."""
  make = optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")
  tx = make(loss_fn, batch, learning_rate=0.1, damping=1e-2, inverse_every=1)
  update = make_update(tx)
  s0 = tx.init(params)
  u1, s1 = update(grads, s0, params, batch)
  hp = dict(s1.hyperparams)
  hp["learning_rate"] = jnp.full_like(hp["learning_rate"], 0.0)
  u2, _ = update(grads, s1._replace(hyperparams=hp), params, batch)
  assert update._cache_size() == 1
  assert all_finite(u1) and trees_differ(u1, jax.tree.map(jnp.zeros_like, u1))
  # A zero learning rate gives a zero step (momentum is scaled by it too).
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u2))


# ----------------------------------------------------------------------------
# 3. optax.masked.
# ----------------------------------------------------------------------------


def test_masked_without_the_full_parameters_is_a_clear_error(params: Params, batch: Batch,
                                                            grads: Params):
  """K-FAC runs the model on every parameter, which optax.masked hides."""
  mask = {name: {"kernel": True, "bias": False} for name in params}
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, damping=1e-2), mask)
  with pytest.raises(ValueError, match="sample_params"):
    tx.init(params)
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, sample_params=params), mask)
  with pytest.raises(ValueError, match="kfac_params"):
    tx.update(grads, tx.init(params), params, batch=batch)


def test_masked_excluding_biases(params: Params, batch: Batch, grads: Params):
  """Inside optax.masked: kernels preconditioned, masked-out biases untouched.

  Reference: K-FAC on all parameters with the bias gradients set to zero (the
  documented meaning of a masked-out bias in a Kronecker block).
  """
  mask = {name: {"kernel": True, "bias": False} for name in params}
  kw = dict(damping=1e-2, estimator="exact", ema_decay=0.0, inverse_every=1)
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, sample_params=params, **kw), mask)
  update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b, kfac_params=p))
  updates, _ = update(grads, tx.init(params), params, batch)
  ref = kfl.scale_by_kfac(loss_fn, batch, **kw)
  zero_bias = {n: {"kernel": g["kernel"], "bias": jnp.zeros_like(g["bias"])}
               for n, g in grads.items()}
  want, _ = make_update(ref)(zero_bias, ref.init(params), params, batch)
  for name in params:
    np.testing.assert_array_equal(updates[name]["bias"], grads[name]["bias"])
    np.testing.assert_allclose(updates[name]["kernel"], want[name]["kernel"],
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(updates[name]["kernel"], grads[name]["kernel"])


def test_blocks_none_excludes_biases_as_masked_would(params: Params, batch: Batch,
                                                     grads: Params):
  """The supported alternative to masking: biases left unpreconditioned."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=1e-2,
                         layers=kfl.LayerOptions(blocks={"bias": "none"}))
  updates, _ = make_update(tx)(grads, tx.init(params), params, batch)
  for name in params:
    np.testing.assert_array_equal(updates[name]["bias"], grads[name]["bias"])
    assert np.all(np.isfinite(updates[name]["kernel"]))
    assert not np.allclose(updates[name]["kernel"], grads[name]["kernel"])


# ----------------------------------------------------------------------------
# 4. optax.apply_if_finite.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finite_tx(batch: Batch) -> Tx:
  return optax.apply_if_finite(
      kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, kl_clip=1e-2,
               inverse_every=1), max_consecutive_errors=5)


@pytest.fixture(scope="module")
def finite_step(finite_tx: Tx) -> Step:

  @jax.jit
  def step(params: Params, state: Any, grads: Params,
           batch: Batch) -> tuple[Params, Any]:
    updates, state = finite_tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def test_apply_if_finite_rejects_nan_gradient(
    finite_tx: Tx, finite_step: Step, params: Params, batch: Batch, grads: Params):
  p1, s1 = finite_step(params, finite_tx.init(params), grads, batch)
  assert trees_differ(p1, params)
  g1 = grad_jit(p1, batch)
  bad = jax.tree.map(lambda g: g, g1)
  kernel = np.array(g1["dense1"]["kernel"])
  kernel[0, 0] = np.nan
  bad["dense1"]["kernel"] = jnp.asarray(kernel)

  p2, s2 = finite_step(p1, s1, bad, batch)
  assert_trees_equal(p2, p1)
  assert_trees_equal(s2.inner_state, s1.inner_state)
  assert_trees_equal(kfac_state(s2).factors, kfac_state(s1).factors)
  assert all_finite(kfac_state(s2).factors)
  assert int(s2.notfinite_count) == 1 and not bool(s2.last_finite)

  # The next finite step proceeds as if the NaN step never happened.
  p3, s3 = finite_step(p2, s2, g1, batch)
  p3_ref, s3_ref = finite_step(p1, s1, g1, batch)
  assert trees_differ(p3, p1) and all_finite(p3)
  assert_trees_equal(p3, p3_ref)
  assert_trees_equal(s3.inner_state, s3_ref.inner_state)
  assert int(s3.notfinite_count) == 0
  assert int(kfac_state(s3).count) == 2
  assert finite_step._cache_size() == 1


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_statistics_are_not_committed(
    finite_tx: Tx, finite_step: Step, params: Params, batch: Batch, grads: Params,
    bad_value: float):
  p1, s1 = finite_step(params, finite_tx.init(params), grads, batch)
  before = kfac_state(s1)
  assert all_finite(before.factors) and int(before.stats_count) == 1

  x = np.array(batch["x"])
  x[2, 1] = bad_value
  bad_batch = {"x": jnp.asarray(x), "y": batch["y"]}
  zeros = jax.tree.map(lambda g: jnp.asarray(np.zeros(g.shape, g.dtype)), grads)
  p2, s2 = finite_step(p1, s1, zeros, bad_batch)
  after = kfac_state(s2)
  assert int(after.count) == 2  # the inner update did run
  assert_trees_equal(after.factors, before.factors)
  assert int(after.stats_count) == int(before.stats_count)
  assert all_finite(after.inverses)
  assert all_finite(p2)
  assert finite_step._cache_size() == 1


# ----------------------------------------------------------------------------
# 5. kfac: schedules, momentum=None, weight decay.
# ----------------------------------------------------------------------------


def test_kfac_schedule_momentum_none_weight_decay(params: Params, batch: Batch):
  schedule = optax.linear_schedule(0.2, 0.05, transition_steps=4)
  damping, kl_clip, wd = 1e-2, 1e-3, 0.3
  tx = kfl.kfac(loss_fn, batch, learning_rate=schedule, damping=damping,
                kl_clip=kl_clip, momentum=None, weight_decay=wd,
                inverse_every=1, ema_decay=0.0, noise_scaling=None)
  assert not [s for s in tx.init(params) if isinstance(s, optax.TraceState)]
  assert len([s for s in kfl.kfac(loss_fn, batch, learning_rate=0.1,
                                  noise_scaling=None).init(params)
              if isinstance(s, optax.TraceState)]) == 1
  update = make_update(tx)
  p, state, clipped = params, tx.init(params), []
  for t in range(3):
    g = grad_jit(p, batch)
    u, state = update(g, state, p, batch)
    # Oracle: with momentum=None, u = -lr_t * (clip_t * K-FAC direction + wd p),
    # the clip computed with the schedule's lr_t (Ba et al. eq. 14).
    lr = float(schedule(t))
    factors = kfac_state(state).factors
    raw = kfac_direction_oracle(factors, g, damping=damping)
    direction = kfac_direction_oracle(factors, g, damping=damping,
                                      kl_clip=kl_clip, learning_rate=lr)
    clipped.append(not np.allclose(raw["dense1"]["kernel"],
                                   direction["dense1"]["kernel"]))
    expected = jax.tree.map(lambda d, x: -lr * (d + wd * np.asarray(x, np.float64)),
                            direction, p)
    assert_trees_close(u, expected, rtol=2e-3, atol=1e-6)
    without_decay = jax.tree.map(lambda d: -lr * d, direction)
    assert not np.allclose(u["dense2"]["kernel"], without_decay["dense2"]["kernel"])
    p = optax.apply_updates(p, u)
  assert any(clipped), "KL clipping never active: the test would not check it"
  assert update._cache_size() == 1
  assert float(loss_jit(p, batch)) < float(loss_jit(params, batch))
