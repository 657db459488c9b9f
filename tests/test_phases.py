"""Each phase of the update on its own, against definitions written out in numpy.

``kfac_jax_lite.step``: estimate (moving averages, accumulation buffer),
refresh (factored Tikhonov damping, Ba et al. 2017 eq. 3; periods; finite-only
commits), precondition (``A⁻¹ [∇W; ∇b] G⁻¹``, the ``g / (v + λ)`` fallback),
step size (Ba et al. eq. 14).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.step import estimate, precondition, refresh, step_size
from kfac_jax_lite.tagging.layers import tag
from kfac_jax_lite.tagging.trace import trace_loss

D_IN, H, K, N = 3, 4, 2, 8
LAM = 0.1


def loss_fn(p: Any, b: Any) -> jax.Array:
  h = jnp.tanh(b["x"] @ p["w"] + p["b"])
  return kfl.losses.softmax_cross_entropy(h @ p["v"] * p["s"], b["y"])


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any, Any]:
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(D_IN, H)), "b": np.zeros(H), "v": rng.normal(size=(H, K)),
            "s": np.ones(K)}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  batch = {"x": jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, K, N))}
  return params, batch, tag(trace_loss(loss_fn, params, batch))


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
  m = rng.normal(size=(d, d))
  return m @ m.T / d + 0.1 * np.eye(d)


def test_moving_average_starts_from_the_first_estimate_and_skips_non_finite():
  f0 = {"l": {"A": jnp.zeros((2, 2))}}
  e1, e2 = {"l": {"A": jnp.eye(2)}}, {"l": {"A": 3 * jnp.eye(2)}}
  f1, n1 = estimate.moving_average(f0, jnp.asarray(0), e1, None, 0.9)
  np.testing.assert_allclose(f1["l"]["A"], np.eye(2))  # decay 0 on the first
  f2, n2 = estimate.moving_average(f1, n1, e2, None, 0.9)
  np.testing.assert_allclose(f2["l"]["A"], (0.9 * 1 + 0.1 * 3) * np.eye(2), rtol=1e-6)
  bad = {"l": {"A": jnp.full((2, 2), jnp.nan)}}
  f3, n3 = estimate.moving_average(f2, n2, bad, None, 0.9)
  np.testing.assert_array_equal(f3["l"]["A"], f2["l"]["A"])
  assert (int(n1), int(n2), int(n3)) == (1, 2, 2)


def test_accumulation_buffer_averages_micro_batches():
  pending = {"count": jnp.asarray(0), "sums": {"l": {"A": jnp.zeros(2)}}}
  pending = estimate.add_pending(pending, {"l": {"A": jnp.asarray([1.0, 2.0])}})
  pending = estimate.add_pending(pending, {"l": {"A": jnp.asarray([jnp.nan, 0.0])}})
  assert int(pending["count"]) == 1
  f, _ = estimate.moving_average({"l": {"A": jnp.zeros(2)}}, jnp.asarray(0),
                                 {"l": {"A": jnp.asarray([3.0, 4.0])}}, pending, 0.5)
  np.testing.assert_allclose(f["l"]["A"], [2.0, 3.0])  # mean of two estimates


def test_estimate_factors_is_the_estimate_of_the_inspection_api(setup):
  params, batch, tagged = setup
  key = jax.random.key(3)
  got, no_diag, no_values = estimate.estimate_factors(
      lambda p, b: tagged, params, batch, key, kfl.EstimatorOptions("exact"),
      kfl.ParallelOptions())
  assert no_diag is None and no_values is None
  want = kfl.estimate_curvature(loss_fn, params, batch, key=key, estimator="exact")
  jax.tree.map(np.testing.assert_array_equal, got, want)
  half, _, _ = estimate.estimate_factors(
      lambda p, b: tag(trace_loss(loss_fn, p, b)), params, batch, key,
      kfl.EstimatorOptions("exact", batch_fraction=0.5), kfl.ParallelOptions())
  first_half = jax.tree.map(lambda x: x[:N // 2], batch)
  jax.tree.map(np.testing.assert_array_equal, half,
               kfl.estimate_curvature(loss_fn, params, first_half, key=key))


def _numpy_damped(factors: dict[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
  """Ba et al. eq. 3: ``(A + π√λ I)⁻¹``, ``(G + √λ/π I)⁻¹``, π from mean eigenvalues."""
  a, g = (np.asarray(factors[k], np.float64) for k in ("A", "G"))
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  return {"A": np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(len(a))),
          "G": np.linalg.inv(g + np.sqrt(lam) / pi * np.eye(len(g)))}


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@pytest.mark.parametrize("staggered", [False, True])
def test_refresh_inverts_due_factors_with_factored_damping(setup, method: str,
                                                           staggered: bool):
  params, batch, tagged = setup
  factors = kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(0))
  old = jax.tree.map(jnp.zeros_like, factors)
  options = kfl.InverseOptions(method, staggered)
  fresh = refresh.refresh_inverses(tagged, factors, old, jnp.asarray(0), LAM, 5, options,
                                   kfl.ParallelOptions())
  for name in ("['w']", "['v']"):
    want = _numpy_damped(jax.device_get(factors[name]), LAM)
    for k in ("A", "G"):
      np.testing.assert_allclose(fresh[name][k], want[k], rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(fresh["['s']"]["F"], 1 / (factors["['s']"]["F"] + LAM), rtol=1e-6)
  later = refresh.refresh_inverses(tagged, factors, old, jnp.asarray(3), LAM, 5, options,
                                   kfl.ParallelOptions())
  refreshed = sum(int(jnp.any(later[n][k] != 0)) for n in later for k in later[n])
  assert refreshed == (1 if staggered else 0)  # staggered: 1 of 5 factors per step


def test_refresh_never_commits_non_finite_inverses(setup):
  params, batch, tagged = setup
  factors = kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(0))
  old = jax.tree.map(jnp.ones_like, factors)
  bad = jax.tree.map(lambda f: f * jnp.nan, factors)
  out = refresh.refresh_inverses(tagged, bad, old, jnp.asarray(0), LAM, 1,
                                 kfl.InverseOptions(), kfl.ParallelOptions())
  jax.tree.map(np.testing.assert_array_equal, out, old)


def test_precondition_applies_each_block(setup):
  params, batch, tagged = setup
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  inv = {"['w']": {"A": _spd(rng, D_IN + 1), "G": _spd(rng, H)},
         "['v']": {"A": _spd(rng, H), "G": _spd(rng, K)},
         "['s']": {"F": np.abs(rng.normal(size=(1, K)))}}
  inverses = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), inv)
  diag = {"w": None, "b": None, "v": None, "s": None}
  out, new_diag = precondition.precondition(tagged, grads, params, inverses, diag,
                                            jnp.asarray(True), LAM, 0.9,
                                            kfl.ParallelOptions())
  g = jax.device_get(grads)
  wb = inv["['w']"]["A"] @ np.vstack([g["w"], g["b"][None]]) @ inv["['w']"]["G"]
  np.testing.assert_allclose(out["w"], wb[:-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["b"], wb[-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["v"], inv["['v']"]["A"] @ g["v"] @ inv["['v']"]["G"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["s"], inv["['s']"]["F"][0] * g["s"], rtol=1e-6)
  assert new_diag == diag


def test_fallback_is_damped_rmsprop_on_leaves_outside_layers():
  def l1_loss(p, b):
    return kfl.losses.squared_error(b["x"] * jnp.sin(p["u"]), b["y"])  # no layer

  params = {"u": jnp.asarray([0.5, -1.0])}
  batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 2))}
  tagged = tag(trace_loss(l1_loss, params, batch))
  g = {"u": jnp.asarray([0.3, -2.0])}
  out, v = precondition.precondition(tagged, g, params, {}, {"u": jnp.zeros(2)},
                                     jnp.asarray(True), LAM, 0.9, kfl.ParallelOptions())
  np.testing.assert_allclose(v["u"], np.square([0.3, -2.0]), rtol=1e-6)
  np.testing.assert_allclose(out["u"], np.array([0.3, -2.0]) / (np.square([0.3, -2.0]) + LAM),
                             rtol=1e-6)


@pytest.mark.parametrize("lr", [0.5, -0.5, 1e-4])
def test_step_size_is_the_kl_clip_of_ba_et_al(lr: float):
  v = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([[3.0]])}
  g = {"a": jnp.asarray([0.5, 0.5]), "b": jnp.asarray([[1.0]])}
  vg, c = 1.0 * 0.5 + 2.0 * 0.5 + 3.0 * 1.0, 1e-3
  scale = min(1.0, np.sqrt(c / vg) / abs(lr))
  out = step_size.clip(v, g, lr, c)
  np.testing.assert_allclose(out["a"], np.array([1.0, 2.0]) * scale, rtol=1e-6)
  np.testing.assert_allclose(out["b"], [[3.0 * scale]], rtol=1e-6)
