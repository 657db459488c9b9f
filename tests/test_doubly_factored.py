"""Doubly-factored Kronecker blocks (Ba et al. 2017, §4) and ``max_factor_dim``.

Oracles are numpy, independent of the library: dense Kronecker products and
solves, per-example SVDs with ``numpy.linalg.svd``, the softmax Fisher
``diag(p) - p p^T``, and eq. 12's ``π`` written out for three factors.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from helpers import loss_before_and_after
from kfac_jax_lite.curvature import damping, doubly, kronecker
from kfac_jax_lite.curvature.specs import spec_for

B, H, W, C, K_OUT = 6, 2, 3, 4, 5  # T = H*W = 6 locations, d_in = 24
T = H * W


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
  m = rng.normal(size=(d, d))
  return m @ m.T / d + 0.1 * np.eye(d)


def _pi3(factors: list[np.ndarray]) -> list[float]:
  """Ba et al. eq. 12 for k = 3, written out."""
  r = [np.trace(f) / f.shape[0] for f in factors]
  return [np.cbrt(r[i] ** 2 / (r[(i + 1) % 3] * r[(i + 2) % 3])) for i in range(3)]


def test_pi_for_two_factors_is_the_square_root_formula():
  rng = np.random.default_rng(0)
  a, g = _spd(rng, 4), 3.0 * _spd(rng, 3)
  pi_a, pi_g = damping.pi_factors([jnp.asarray(a), jnp.asarray(g)])
  expected = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
  np.testing.assert_allclose([pi_a, pi_g], [expected, 1 / expected], rtol=1e-5)


def test_pi_for_three_factors_matches_eq_12():
  rng = np.random.default_rng(1)
  fs = [_spd(rng, 3), 5.0 * _spd(rng, 4), 0.2 * _spd(rng, 2)]
  got = damping.pi_factors([jnp.asarray(f) for f in fs])
  np.testing.assert_allclose(got, _pi3(fs), rtol=1e-5)
  assert abs(float(np.prod(got)) - 1.0) < 1e-5


def _damped_inverses(fs: list[jax.Array], lam: float, method: str) -> list[jax.Array]:
  """Each factor's damped inverse with the library's factored damping shifts."""
  return [kronecker.damped_inverse(f, s, method)
          for f, s in zip(fs, damping.factored_damping(fs, lam))]


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_three_factor_precondition_equals_dense_kronecker_solve(method: str):
  rng = np.random.default_rng(2)
  fs = [_spd(rng, 3), _spd(rng, 4), _spd(rng, 2)]
  lam = 0.3
  grad = rng.normal(size=(3 * 4, 2))
  invs = _damped_inverses([jnp.asarray(f, jnp.float32) for f in fs], lam, method)
  got = kronecker.precondition(invs, jnp.asarray(grad, jnp.float32))
  shift = lam ** (1 / 3)
  damped = [f + p * shift * np.eye(f.shape[0]) for f, p in zip(fs, _pi3(fs))]
  dense = np.kron(np.kron(damped[0], damped[1]), damped[2])
  expected = np.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)


def test_diagonal_factor_precondition_equals_dense_solve():
  rng = np.random.default_rng(3)
  a = np.abs(rng.normal(size=4)) + 0.1  # a diagonal factor, stored as a vector
  g = _spd(rng, 3)
  grad = rng.normal(size=(4, 3))
  invs = _damped_inverses([jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)],
                          0.1, "eigh")
  got = kronecker.precondition(invs, jnp.asarray(grad, jnp.float32))
  pi = np.sqrt(np.mean(a) / (np.trace(g) / 3))
  dense = np.kron(np.diag(a) + pi * np.sqrt(0.1) * np.eye(4),
                  g + np.sqrt(0.1) / pi * np.eye(3))
  expected = np.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5)


def test_single_rank_one_example_is_exact():
  """For one example whose activation matrix is rank 1, K ⊗ Ψ = vec(a) vec(a)^T."""
  rng = np.random.default_rng(4)
  x = np.outer(rng.normal(size=T), rng.normal(size=C))[None]
  k, psi = doubly.input_factors(jnp.asarray(x, jnp.float32))
  a = x.reshape(-1)
  np.testing.assert_allclose(np.kron(k, psi), np.outer(a, a), rtol=1e-4, atol=1e-5)


def test_factors_match_numpy_svd():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(7, T, C))
  k, psi = doubly.input_factors(jnp.asarray(x, jnp.float32))
  ks, psis = [], []
  for m in x:
    u, s, vt = np.linalg.svd(m)
    ks.append(np.sqrt(s[0]) * u[:, 0])
    psis.append(np.sqrt(s[0]) * vt[0])
  np.testing.assert_allclose(k, np.mean([np.outer(v, v) for v in ks], 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(psi, np.mean([np.outer(v, v) for v in psis], 0), rtol=1e-4,
                             atol=1e-5)


# ----------------------------------------------------------------------------
# Detection and the full update through scale_by_kfac.
# ----------------------------------------------------------------------------


class FlatHead(nn.Module):
  """A feature map flattened into a dense softmax head."""
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(K_OUT, use_bias=self.use_bias)(x.reshape((x.shape[0], -1)))


def _setup(use_bias: bool = True):
  model = FlatHead(use_bias)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K_OUT, size=B))
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(1), p.shape), params)

  def loss_fn(p, batch):
    return kfl.losses.softmax_cross_entropy(model.apply({"params": p}, batch[0]), batch[1])

  return loss_fn, params, (x, y)


@pytest.mark.parametrize("use_bias", [True, False])
def test_flattened_input_over_threshold_is_doubly_factored(use_bias: bool):
  loss_fn, params, batch = _setup(use_bias)
  (layer,) = kfl.find_layers(loss_fn, params, batch,
                             layers=kfl.LayerOptions(max_factor_dim=T * C - 1))
  assert layer.input_form == "doubly" and layer.output_form == "full"
  expected = {"K": (T, T), "Psi": (C, C), "G": (K_OUT, K_OUT)}
  if use_bias:
    expected["B"] = (K_OUT, K_OUT)
  assert spec_for(layer).factor_shapes == expected
  assert "doubly factored" in layer.note
  table = str(kfl.find_layers(loss_fn, params, batch,
                              layers=kfl.LayerOptions(max_factor_dim=T * C - 1)))
  assert "kron3" in table and "Psi[4, 4]" in table


def test_under_threshold_stays_plain_kronecker():
  loss_fn, params, batch = _setup()
  (layer,) = kfl.find_layers(loss_fn, params, batch)
  assert layer.input_form == "full" and layer.note == ""
  assert spec_for(layer).factor_shapes == {"A": (T * C + 1, T * C + 1), "G": (K_OUT, K_OUT)}


def test_no_visible_flatten_gives_vector_a_and_large_output_vector_g():
  model = nn.Dense(K_OUT)
  x = jnp.ones((B, T * C))
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(p, batch):
    return kfl.losses.softmax_cross_entropy(model.apply({"params": p}, batch[0]), batch[1])

  batch = (x, jnp.zeros((B,), jnp.int32))
  (layer,) = kfl.find_layers(loss_fn, params, batch,
                             layers=kfl.LayerOptions(max_factor_dim=K_OUT - 1))
  assert (layer.input_form, layer.output_form) == ("vector", "vector")
  assert spec_for(layer).factor_shapes == {"A": (T * C + 1,), "G": (K_OUT,)}
  assert "vector A" in layer.note and "vector G" in layer.note


def _softmax_fisher(logits: np.ndarray) -> np.ndarray:
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.mean([np.diag(q) - np.outer(q, q) for q in p], 0)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_update_matches_three_factor_dense_solve(method: str):
  loss_fn, params, batch = _setup()
  lam = 0.05
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=lam, ema_decay=0.0, inverse_every=1,
                         estimator="exact", inverses=kfl.InverseOptions(method=method),
                         layers=kfl.LayerOptions(max_factor_dim=T * C - 1))
  grads = jax.grad(loss_fn)(params, batch)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, batch=batch)

  x = np.asarray(batch[0], np.float64).reshape(B, T, C)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  bias = np.asarray(params["Dense_0"]["bias"], np.float64)
  g = _softmax_fisher(x.reshape(B, -1) @ w + bias) / 1.0
  ks, psis = [], []
  for m in x:
    u, s, vt = np.linalg.svd(m)
    ks.append(np.sqrt(s[0]) * u[:, 0])
    psis.append(np.sqrt(s[0]) * vt[0])
  k = np.mean([np.outer(v, v) for v in ks], 0)
  psi = np.mean([np.outer(v, v) for v in psis], 0)
  name = "['Dense_0']['kernel']"
  np.testing.assert_allclose(state.factors[name]["K"], k, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.factors[name]["Psi"], psi, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.factors[name]["G"], g, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.factors[name]["B"], g, rtol=1e-4, atol=1e-6)

  fs = [k, psi, g]
  damped = [f + p * lam ** (1 / 3) * np.eye(f.shape[0]) for f, p in zip(fs, _pi3(fs))]
  dense = np.kron(np.kron(damped[0], damped[1]), damped[2])
  gw = np.asarray(grads["Dense_0"]["kernel"], np.float64)
  gb = np.asarray(grads["Dense_0"]["bias"], np.float64)
  expected_w = np.linalg.solve(dense, gw.reshape(-1)).reshape(gw.shape)
  expected_b = np.linalg.solve(g + lam * np.eye(K_OUT), gb)
  tol = 1e-4 * np.abs(expected_w).max()
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], expected_w, rtol=1e-3, atol=tol)
  np.testing.assert_allclose(updates["Dense_0"]["bias"], expected_b, rtol=1e-3,
                             atol=1e-4 * np.abs(expected_b).max())


def test_doubly_factored_training_goes_down():
  loss_fn, params, batch = _setup()
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.3, damping=1e-2,
                layers=kfl.LayerOptions(max_factor_dim=16))
  before, after = loss_before_and_after(loss_fn, params, batch, tx, 30)
  assert after < 0.3 * before
