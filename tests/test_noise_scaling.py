"""noise_scaled: updates times the batch gradient's signal fraction (McCandlish et al. 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.noise_scaling import signal_fraction
from tests.helpers import loss_before_and_after

B, D, H, K = 16, 5, 6, 3


def mlp_loss(p, b):
  h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
  return kfl.losses.softmax_cross_entropy(h @ p["w2"], b["y"])


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(D, H)) * 0.5, jnp.float32),
            "b1": jnp.zeros((H,), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(H, K)) * 0.5, jnp.float32)}
  batches = [{"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
              "y": jnp.asarray(rng.integers(0, K, B))} for _ in range(3)]
  return params, batches


def test_signal_fraction_is_b_over_b_plus_noise_scale():
  """``||G||² / (||G||² + trΣ/B)`` equals ``B / (B + B_noise)`` and, with
  ``||G||² = ||G_B||² − trΣ/B``, the one-device form ``1 − trΣ/(B||G_B||²)``."""
  tr, gb, b = 3.0, 0.5, 32
  g = gb - tr / b
  got = signal_fraction(tr, g, b, 0.0)
  np.testing.assert_allclose(got, b / (b + tr / g), rtol=1e-6)
  np.testing.assert_allclose(got, 1 - tr / (b * gb), rtol=1e-6)
  assert float(signal_fraction(100.0, 0.5 - 100.0 / b, b, 0.2)) == pytest.approx(0.2)  # floored
  assert float(signal_fraction(tr, -tr / b - 0.1, b, 0.2)) == pytest.approx(0.2)  # E||G_B||² < 0
  assert float(signal_fraction(0.0, 0.0, b, 0.2)) == 1.0  # before any statistics


@pytest.mark.parametrize("fraction, diag_fraction", [(None, None), (0.5, None), (None, 0.5)])
def test_scale_follows_the_diagnostics_moving_averages(problem, fraction, diag_fraction):
  """Against ``kfl.diagnostics`` on the same parameters and batches (a separate pass),
  the moving averages written out in numpy, and the unscaled inner optimizer.

  With ``batch_fraction`` the diagnostics are of the first ``B/2`` examples
  but the gradient is of all ``B``: the factor is ``B``'s,
  ``||G||² / (||G||² + trΣ/B)`` with ``||G||² = ||G_{B/2}||² − trΣ/(B/2)``
  (for the whole batch, ``1 − trΣ/(B||G_B||²)``). With ``diagnostics_fraction``
  alone, they are of the first ``B/2`` examples too, from a pass of their own."""
  params, batches = problem
  decay, floor = 0.7, 0.05
  n = int(B * (fraction or 1) * (diag_fraction or 1))

  def inner():
    return kfl.kfac(mlp_loss, batches[0], stats_every=1, momentum=None,
                    estimator=kfl.EstimatorOptions(diagnostics=True, batch_fraction=fraction,
                                                   diagnostics_fraction=diag_fraction))

  wrapped, plain = kfl.noise_scaled(inner(), floor=floor, decay=decay), inner()
  ws, ps = wrapped.init(params), plain.init(params)
  tr = g2 = 0.0
  for t, batch in enumerate(batches):
    p = jax.tree.map(lambda x: x * (1.0 + 0.1 * t), params)  # the same sequence for both
    g = jax.grad(mlp_loss)(p, batch)
    u, ws = jax.jit(wrapped.update)(g, ws, p, batch=batch)
    v, ps = jax.jit(plain.update)(g, ps, p, batch=batch)
    d = kfl.diagnostics(mlp_loss, p, jax.tree.map(lambda x: x[:n], batch))
    tr = decay * tr + (1 - decay) * float(d.trace_sigma)
    g2 = decay * g2 + (1 - decay) * (float(d.batch_grad_sq_norm) - float(d.trace_sigma) / n)
    want = float(np.clip(g2 / (g2 + tr / B), floor, 1.0))
    np.testing.assert_allclose(ws.scale, want, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, want * b, rtol=1e-4, atol=1e-8),
                 u, v)
  assert floor < want < 1.0  # the factor did something on these noisy batches


def test_kfac_noise_scaling_is_the_default_and_turns_diagnostics_on(problem):
  """By default ``kfac`` is noise-scaled (floor 0.2), from the totals of
  diagnostics over a quarter of the statistics batch (half the batch), at
  least two examples, so its state takes batches of any size."""
  params, batches = problem
  tx = kfl.kfac(mlp_loss, batches[0], stats_every=1)
  before, after = loss_before_and_after(mlp_loss, params, batches[0], tx, 10)
  assert np.isfinite(after) and after < before
  state = tx.init(params)
  assert isinstance(state, kfl.NoiseScaledState)
  diag = optax.tree.get(state.inner, "diagnostics")
  assert isinstance(diag, kfl.Diagnostics) and diag.sq_norms.shape == (0,)
  step = jax.jit(tx.update)
  for batch in (batches[0], jax.tree.map(lambda x: x[:6], batches[1])):
    _, state = step(jax.grad(mlp_loss)(params, batch), state, params, batch=batch)
  # The state's totals are the last batch's first two examples' (a quarter of
  # its half is one; the diagnostics keep at least two).
  want = kfl.diagnostics(mlp_loss, params, jax.tree.map(lambda x: x[:2], batches[1]))
  np.testing.assert_allclose(optax.tree.get(state.inner, "diagnostics").trace_sigma,
                             want.trace_sigma, rtol=1e-4)


def test_kfac_noise_scaling_falls_back_where_a_quarter_cannot_be_taken(problem):
  """Leaves that do not all lead with the batch axis, or a quarter under two
  examples: diagnostics over the whole statistics batch; a batch of one:
  no noise scaling, with a warning."""
  params, batches = problem
  odd = {**batches[0], "x": batches[0]["x"][None]}  # [1, B, D]: a leading axis not the batch's

  def odd_loss(p, b):
    return mlp_loss(p, {**b, "x": b["x"][0]})

  for loss, batch in ((odd_loss, odd), (mlp_loss, jax.tree.map(lambda x: x[:4], batches[0]))):
    tx = kfl.kfac(loss, batch)
    _, state = jax.jit(tx.update)(jax.grad(loss)(params, batch), tx.init(params), params,
                                  batch=batch)
    got = optax.tree.get(state.inner, "diagnostics").trace_sigma
    whole = kfl.diagnostics(mlp_loss, params, jax.tree.map(lambda x: x[:4], batches[0])
                            if batch is not odd else batches[0])
    np.testing.assert_allclose(got, whole.trace_sigma, rtol=1e-4)
  with pytest.warns(UserWarning, match="noise scaling is off"):
    tx = kfl.kfac(mlp_loss, jax.tree.map(lambda x: x[:1], batches[0]))
  assert not isinstance(tx.init(params), kfl.NoiseScaledState)


def test_per_example_norms_fix_the_batch_size(problem):
  params, batches = problem
  tx = kfl.kfac(mlp_loss, batches[0], estimator=kfl.EstimatorOptions(diagnostics=True))
  small = jax.tree.map(lambda x: x[:6], batches[0])
  with pytest.raises(ValueError, match="per_example_norms=False"):
    tx.update(jax.grad(mlp_loss)(params, small), tx.init(params), params, batch=small)
  with pytest.raises(ValueError, match="per_example_norms applies to the diagnostics"):
    kfl.EstimatorOptions(per_example_norms=False)


def test_errors_name_the_fix(problem):
  params, batches = problem
  plain = kfl.kfac(mlp_loss, batches[0], noise_scaling=None)
  with pytest.raises(ValueError, match="diagnostics=True"):
    kfl.noise_scaled(plain).init(params)
  with pytest.raises(ValueError, match="floor"):
    kfl.kfac(mlp_loss, batches[0], noise_scaling=0.0)
  with pytest.raises(ValueError, match="decay"):
    kfl.noise_scaled(plain, decay=1.0)
  with pytest.raises(ValueError, match="batch=batch"):
    tx = kfl.kfac(mlp_loss, batches[0])
    tx.update(params, tx.init(params), params)
  unbound = kfl.noise_scaled(kfl.kfac(mlp_loss, batches[0], noise_scaling=None,
                                      estimator=kfl.EstimatorOptions(diagnostics=True)),
                             axis_name="i")
  with pytest.raises(ValueError, match="axis_name='i'.*pmap"):
    jax.eval_shape(lambda p: unbound.update(p, unbound.init(p), p, batch=batches[0]), params)


def test_data_parallel_factor_is_the_global_batchs_on_every_replica():
  """Two replicas (``vmap`` with an axis name) with half the batch each: the
  scale, the state and the updates agree across them, and the scale is the
  global batch's, from ``kfl.diagnostics`` of each half's leading quarter
  (``kfac``'s default ``diagnostics_fraction``) averaged in numpy
  (``||G||² / (||G||² + trΣ/(2B))`` of the moving averages over two steps).
  Each device's own factor makes the replicas' parameters differ; the
  device-averaged estimates with ``B`` for ``2B`` give 0.60 for 0.75."""
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(D, H)) * 0.5, jnp.float32),
            "b1": jnp.zeros((H,), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(H, K)) * 0.5, jnp.float32)}
  w_true = rng.normal(size=(D, K))  # learnable labels: a signal fraction well inside (0.2, 1)
  xs = [rng.normal(size=(2, B, D)) for _ in range(2)]
  batches = [{"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(np.argmax(x @ w_true, -1))}
             for x in xs]
  tx = kfl.kfac(mlp_loss, jax.tree.map(lambda a: a[0], batches[0]), noise_scaling=0.2,
                stats_every=1, parallel=kfl.ParallelOptions(axis_name="i"),
                estimator=kfl.EstimatorOptions())  # statistics on the whole batch

  def step(p, s, b):
    u, s = tx.update(jax.lax.pmean(jax.grad(mlp_loss)(p, b), "i"), s, p, batch=b)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.vmap(step, axis_name="i"))
  p = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  s = jax.vmap(tx.init, axis_name="i")(p)
  tr = g = 0.0
  for batch in batches:
    halves = [kfl.diagnostics(mlp_loss, jax.tree.map(lambda a: a[0], p),
                              jax.tree.map(lambda a, i=i: a[i, :B // 4], batch))
              for i in range(2)]
    tr = 0.95 * tr + 0.05 * np.mean([float(d.trace_sigma) for d in halves])
    g = 0.95 * g + 0.05 * np.mean([float(d.grad_sq_norm) for d in halves])
    p, s = step(p, s, batch)
    for leaf in jax.tree.leaves((p, s.trace_sigma, s.grad_sq_norm, s.scale)):
      np.testing.assert_array_equal(leaf[0], leaf[1])
    np.testing.assert_allclose(s.scale[0], g / (g + tr / (2 * B)), rtol=1e-4)
  assert 0.2 < float(s.scale[0]) < 1.0


@pytest.mark.parametrize("kwargs", [{"noise_scaling": 0.2},
                                    {"estimator": kfl.EstimatorOptions(diagnostics=True)}])
def test_map_params_maps_the_momentum_and_leaves_the_diagnostics(problem, kwargs):
  """``optax.tree.map_params`` (it calls ``init`` on placeholders) over a state
  holding diagnostics: the parameter-shaped momentum is mapped, the rest kept."""
  params, batches = problem
  tx = kfl.kfac(mlp_loss, batches[0], **kwargs)
  _, state = jax.jit(tx.update)(jax.grad(mlp_loss)(params, batches[0]), tx.init(params),
                                params, batch=batches[0])
  shifted = optax.tree.map_params(tx, lambda x: x + 1.0, state)
  assert jax.tree.structure(shifted) == jax.tree.structure(state)
  trace, new_trace = (optax.tree.get(s, "trace") for s in (state, shifted))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a + 1.0), trace, new_trace)
  diag, new_diag = (optax.tree.get(s, "diagnostics") for s in (state, shifted))
  jax.tree.map(np.testing.assert_array_equal, diag, new_diag)
