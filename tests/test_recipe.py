"""The large-batch recipe's knobs: damping and ema_decay schedules; diagnostics from the step.

Osawa et al. (2019) decay the damping and warm the learning rate up; the
schedules run inside one compiled step (no recompilation). Diagnostics come
from the optimizer's own statistics pass (PyTorch-SSO's promise), no extra
backward pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

D_IN, H, K, N = 3, 4, 3, 16


def loss_fn(p: Any, b: Any) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(jnp.tanh(b["x"] @ p["w"]) @ p["v"], b["y"])


@pytest.fixture(scope="module")
def setup() -> tuple[Any, list[Any]]:
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(D_IN, H)), jnp.float32),
            "v": jnp.asarray(rng.normal(size=(H, K)), jnp.float32)}
  batches = [{"x": jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32),
              "y": jnp.asarray(rng.integers(0, K, N))} for _ in range(3)]
  return params, batches


def _damped_inverse(f: np.ndarray, shift: float) -> np.ndarray:
  return np.linalg.inv(np.asarray(f, np.float64) + shift * np.eye(len(f)))


def _run(tx: optax.GradientTransformationExtraArgs, params: Any,
         batches: list[Any]) -> tuple[list[Any], Any]:
  """The states after each update (parameters fixed), and the jitted update."""
  update = jax.jit(lambda s, b: tx.update(jax.grad(loss_fn)(params, b), s, params, batch=b))
  states, state = [], tx.init(params)
  for b in batches:
    _, state = update(state, b)
    states.append(state)
  return states, update


def test_damping_schedule_is_applied_per_step_without_recompiling(setup):
  params, batches = setup
  schedule = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.1)
  tx = kfl.scale_by_kfac(loss_fn, batches[0], damping=schedule, inverse_every=1,
                         estimator="exact", ema_decay=0.0)
  states, update = _run(tx, params, batches)
  assert update._cache_size() == 1
  for step, state in enumerate(states):
    lam = float(schedule(step))
    a, g = (np.asarray(state.factors["['v']"][k], np.float64) for k in ("A", "G"))
    pi = np.sqrt((np.trace(a) / H) / (np.trace(g) / K))
    np.testing.assert_allclose(state.inverses["['v']"]["A"],
                               _damped_inverse(a, pi * np.sqrt(lam)), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(state.inverses["['v']"]["G"],
                               _damped_inverse(g, np.sqrt(lam) / pi), rtol=2e-3, atol=1e-4)


def test_ema_decay_schedule_is_applied_per_step(setup):
  params, batches = setup
  decays = [0.0, 0.25, 0.75]  # the first estimate is taken as is anyway
  tx = kfl.scale_by_kfac(loss_fn, batches[0], damping=1e-2, estimator="exact",
                         ema_decay=lambda count: jnp.asarray(decays)[count])
  states, _ = _run(tx, params, batches)
  expected = None
  for state, decay, b in zip(states, decays, batches):
    est = kfl.estimate_curvature(loss_fn, params, b, key=jax.random.key(0))
    est_a = np.asarray(est["['w']"]["A"], np.float64)
    expected = est_a if expected is None else decay * expected + (1 - decay) * est_a
    np.testing.assert_allclose(state.factors["['w']"]["A"], expected, rtol=1e-5, atol=1e-7)


def test_diagnostics_come_from_the_optimizers_own_step(setup):
  params, batches = setup
  estimator = kfl.EstimatorOptions("mc", diagnostics=True)
  tx = kfl.kfac(loss_fn, batches[0], 0.1, damping=1e-2, estimator=estimator, stats_every=2)
  state = tx.init(params)
  zero = optax.tree.get(state, "diagnostics")
  assert float(zero.noise_scale) == 0.0
  update = jax.jit(lambda s, b: tx.update(jax.grad(loss_fn)(params, b), s, params, batch=b))
  _, state = update(state, batches[0])
  got = optax.tree.get(state, "diagnostics")
  want = kfl.diagnostics(loss_fn, params, batches[0])
  np.testing.assert_allclose(got.sq_norms, want.sq_norms, rtol=1e-5)
  np.testing.assert_allclose(got.noise_scale, want.noise_scale, rtol=1e-4)
  _, state = update(state, batches[1])  # no statistics on step 1: kept
  np.testing.assert_array_equal(optax.tree.get(state, "diagnostics").sq_norms, got.sq_norms)
