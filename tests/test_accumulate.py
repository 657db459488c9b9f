"""Gradient accumulation keeps K-FAC's statistics from every micro-batch."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

# Noise scaling off: its diagnostics are of the emitting micro-batch, so with
# it the accumulated step equals one big batch's only in expectation.
KW = dict(learning_rate=0.1, damping=1e-2, inverse_every=1, ema_decay=0.5, noise_scaling=None)
EXACT = kfl.EstimatorOptions("exact")
ACCUMULATE = kfl.EstimatorOptions("exact", accumulate=True)


def loss_fn(p: Any, b: Any) -> jax.Array:
  h = jnp.tanh(b["x"] @ p["w"] + p["c"])
  return kfl.losses.softmax_cross_entropy(h @ p["v"], b["y"])


@pytest.fixture(scope="module")
def setup() -> tuple[Any, list[Any]]:
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "c": jnp.zeros(5),
            "v": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
  batches = [{"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
              "y": jnp.asarray(rng.integers(0, 3, 8))} for _ in range(3)]
  return params, batches


def _stepper(tx: optax.GradientTransformationExtraArgs):
  @jax.jit
  def step(p, s, b):
    updates, s = tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b)
    return optax.apply_updates(p, updates), s
  return step


def _micro(batch: Any, k: int) -> list[Any]:
  n = batch["x"].shape[0] // k
  return [jax.tree.map(lambda x: x[i * n:(i + 1) * n], batch) for i in range(k)]


def _run_accumulated(params, batches, k):
  tx = kfl.accumulate(kfl.kfac(loss_fn, _micro(batches[0], k)[0], **KW,
                               estimator=ACCUMULATE), k)
  p, s, step = params, tx.init(params), _stepper(tx)
  for batch in batches:
    for micro in _micro(batch, k):
      p, s = step(p, s, micro)
  return p, s.inner_state[0]


def _run_big(params, batches):
  tx = kfl.kfac(loss_fn, batches[0], **KW, estimator=EXACT)
  p, s, step = params, tx.init(params), _stepper(tx)
  for batch in batches:
    p, s = step(p, s, batch)
  return p, s[0]


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_big_batch(setup, k):
  params, batches = setup
  p_big, s_big = _run_big(params, batches)
  p_acc, s_acc = _run_accumulated(params, batches, k)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_close, p_acc, p_big)
  jax.tree.map(chex_close, s_acc.factors, s_big.factors)
  assert int(s_acc.count) == int(s_big.count) == len(batches)


def test_noise_scaling_counts_every_micro_batch(setup):
  """The accumulated gradient averages ``k`` micro-batches: the signal fraction
  is that of ``k·m`` examples (McCandlish et al. 2018), from the emitting
  micro-batch's diagnostics."""
  params, batches = setup
  k, floor = 2, 0.01
  micro = _micro(batches[0], k)
  tx = kfl.accumulate(kfl.kfac(loss_fn, micro[0], **{**KW, "noise_scaling": floor},
                               estimator=kfl.EstimatorOptions("exact", accumulate=True,
                                                              diagnostics=True)), k)
  p, s, step = params, tx.init(params), _stepper(tx)
  for m in micro:
    p, s = step(p, s, m)
  scaled = s.inner_state
  diag = scaled.inner[0].diagnostics
  # The moving averages start at zero, so their ratio is this step's.
  t, g = float(diag.trace_sigma), float(diag.grad_sq_norm)
  expected = np.clip(g / (g + t / (k * micro[0]["x"].shape[0])), floor, 1.0)
  per_micro = np.clip(g / (g + t / micro[0]["x"].shape[0]), floor, 1.0)
  assert abs(expected - per_micro) > 1e-3  # the case tells the two apart
  np.testing.assert_allclose(float(scaled.scale), expected, rtol=1e-5)


def test_non_emitting_micro_steps_return_zero_updates(setup):
  params, batches = setup
  tx = kfl.accumulate(kfl.kfac(loss_fn, _micro(batches[0], 2)[0], **KW,
                               estimator=ACCUMULATE), 2)
  s = tx.init(params)
  micro = _micro(batches[0], 2)[0]
  updates, s = tx.update(jax.grad(loss_fn)(params, micro), s, params, batch=micro)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  assert int(s.inner_state[0].pending["count"]) == 1
  assert int(s.inner_state[0].count) == 0  # K-FAC's step counter only moves on emit


def test_multisteps_loses_micro_batch_statistics(setup):
  """Why accumulate exists: optax.MultiSteps' K-FAC sees only the last micro-batch."""
  params, batches = setup
  _, s_big = _run_big(params, batches[:1])
  tx = optax.MultiSteps(kfl.kfac(loss_fn, _micro(batches[0], 2)[0], **KW, estimator=EXACT), 2)
  s = tx.init(params)
  for micro in _micro(batches[0], 2):
    g = jax.grad(loss_fn)(params, micro)
    _, s = tx.update(g, s, params, batch=micro)
  f_ms = s.inner_opt_state[0].factors
  diff = max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(f_ms), jax.tree.leaves(s_big.factors)))
  assert diff > 1e-3


def test_accumulate_only_needs_the_buffer(setup):
  params, batches = setup
  tx = kfl.scale_by_kfac(loss_fn, batches[0], damping=1e-2)
  with pytest.raises(ValueError, match="accumulate=True"):
    tx.update(params, tx.init(params), params, batch=batches[0], kfac_accumulate_only=True)
  with pytest.raises(ValueError, match="every_k"):
    kfl.accumulate(tx, 0)
