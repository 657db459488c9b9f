"""Layers registered by hand with ``kfl.register_dense``.

The registered computation here is an elementwise formulation of ``x @ w + b``
(``(x[:, :, None] * w).sum(1) + b``) that detection reads as something else.
Oracle: the closed-form K-FAC factors of one softmax-regression layer,
``A = mean [x; 1][x; 1]^T`` and ``G = mean(diag p - p p^T)``, in numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl

N, D_IN, K = 6, 3, 4


def elementwise_dense(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  y = jnp.sum(x[:, :, None] * w[None], axis=1)
  return y if b is None else y + b


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(D_IN, K)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(K,)), jnp.float32)}
  batch = (jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32),
           jnp.asarray(rng.integers(0, K, N)))
  return params, batch


def registered_loss(p, batch):
  return kfl.losses.softmax_cross_entropy(
      kfl.register_dense(elementwise_dense, batch[0], p["w"], p["b"]), batch[1])


def test_without_registration_the_layer_is_not_dense(setup):
  params, batch = setup
  loss = lambda p, b: kfl.losses.softmax_cross_entropy(
      elementwise_dense(b[0], p["w"], p["b"]), b[1])
  assert {l.kind for l in kfl.find_layers(loss, params, batch)} != {"dense"}


def test_registered_layer_is_dense_with_its_bias(setup):
  params, batch = setup
  (layer,) = kfl.find_layers(registered_loss, params, batch)
  assert (layer.name, layer.kind, jax.tree_util.keystr(layer.bias_path)) == (
      "['w']", "dense", "['b']")


def test_registered_factors_and_update_match_closed_form(setup):
  params, batch = setup
  lam = 0.1
  x = np.asarray(batch[0], np.float64)
  logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  xa = np.concatenate([x, np.ones((N, 1))], 1)
  a = xa.T @ xa / N
  g = np.mean([np.diag(q) - np.outer(q, q) for q in p], 0)
  got = kfl.estimate_curvature(registered_loss, params, batch, key=jax.random.key(0),
                               estimator="exact")["['w']"]
  np.testing.assert_allclose(got["A"], a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["G"], g, rtol=1e-5, atol=1e-6)

  tx = kfl.scale_by_kfac(registered_loss, batch, damping=lam, estimator="exact",
                         ema_decay=0.0, inverse_every=1)
  grads = jax.grad(registered_loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / K))
  mat = np.concatenate([grads["w"], grads["b"][None]], 0).astype(np.float64)
  expected = np.linalg.solve(a + pi * np.sqrt(lam) * np.eye(D_IN + 1), mat) @ np.linalg.inv(
      g + np.sqrt(lam) / pi * np.eye(K))
  np.testing.assert_allclose(updates["w"], expected[:-1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updates["b"], expected[-1], rtol=1e-4, atol=1e-6)


def test_registered_weight_used_elsewhere_is_an_error(setup):
  params, batch = setup

  def loss(p, b):  # w also scales the logits: a second use on the predictions' path
    y = kfl.register_dense(elementwise_dense, b[0], p["w"], p["b"]) * jnp.sum(p["w"])
    return kfl.losses.softmax_cross_entropy(y, b[1])

  with pytest.raises(ValueError, match=r"\['w'\] is registered with kfl.register_dense"):
    kfl.find_layers(loss, params, batch)
  # A weight-decay term is off that path: no Fisher, not a second use.
  penalized = lambda p, b: registered_loss(p, b) + 1e-3 * jnp.sum(p["w"] ** 2)
  assert str(kfl.find_layers(penalized, params, batch)) == str(
      kfl.find_layers(registered_loss, params, batch))


def test_registration_with_wrong_shapes_is_an_error(setup):
  params, batch = setup

  def loss(p, b):
    y = kfl.register_dense(lambda x, w: x @ w[:, :2], b[0], p["w"])
    return kfl.losses.softmax_cross_entropy(y, b[1])

  with pytest.raises(ValueError, match="kfl.register_dense: expected x"):
    kfl.find_layers(loss, params, batch)


def test_registered_function_closing_over_a_parameter_is_an_error(setup):
  params, batch = setup

  def loss(p, b):
    y = kfl.register_dense(lambda x, w: x @ w + p["b"], b[0], p["w"])
    return kfl.losses.softmax_cross_entropy(y, b[1])

  with pytest.raises(ValueError, match="closes over parameters"):
    kfl.find_layers(loss, params, batch)
