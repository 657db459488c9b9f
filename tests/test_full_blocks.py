"""``blocks={regex: "full"}``: the exact Fisher block of a small layer.

Oracle (numpy): for a softmax-regression layer ``logits = [x; 1] M`` the
Jacobian of the logits w.r.t. row-major ``vec(M)`` is ``[x; 1]^T ⊗ I``, so the
Fisher block is ``mean_n ([x;1][x;1]^T) ⊗ (diag p - p p^T)``, per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.curvature.specs import spec_for

N, D_IN, K = 5, 3, 4


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(D_IN, K)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(K,)), jnp.float32),
            "emb": jnp.asarray(rng.normal(size=(6, D_IN)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32),
           "tok": jnp.asarray(rng.integers(0, 6, N)),
           "y": jnp.asarray(rng.integers(0, K, N))}
  return params, batch


def loss_fn(p, b):
  h = b["x"] + p["emb"][b["tok"]]
  return kfl.losses.softmax_cross_entropy(h @ p["w"] + p["b"], b["y"])


def test_full_block_and_update_match_the_exact_fisher(setup):
  params, batch = setup
  lam = 0.05
  blocks = {r"\['(w|b)'\]": "full"}
  (layer,) = [l for l in kfl.find_layers(loss_fn, params, batch,
                                         layers=kfl.LayerOptions(blocks=blocks))
              if l.name == "['w']"]
  assert layer.block == "full" and spec_for(layer).factor_shapes == {"full": ((D_IN + 1) * K,) * 2}
  assert "full" in str(kfl.find_layers(loss_fn, params, batch,
                                       layers=kfl.LayerOptions(blocks=blocks)))

  h = np.asarray(batch["x"] + params["emb"][batch["tok"]], np.float64)
  logits = h @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
  fisher = np.zeros(((D_IN + 1) * K,) * 2)
  for n in range(N):
    p = np.exp(logits[n] - logits[n].max())
    p /= p.sum()
    xa = np.append(h[n], 1.0)
    fisher += np.kron(np.outer(xa, xa), np.diag(p) - np.outer(p, p)) / N
  got = kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(0),
                               estimator="exact")
  assert set(got["['w']"]) == {"A", "G"}  # estimate_curvature has no overrides

  tx = kfl.scale_by_kfac(loss_fn, batch, damping=lam, ema_decay=0.0, inverse_every=1,
                         estimator="exact", layers=kfl.LayerOptions(blocks=blocks))
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, tx.init(params), params, batch=batch)
  np.testing.assert_allclose(state.factors["['w']"]["full"], fisher, rtol=1e-4, atol=1e-6)
  mat = np.concatenate([grads["w"], grads["b"][None]], 0).astype(np.float64)
  expected = np.linalg.solve(fisher + lam * np.eye(len(fisher)), mat.reshape(-1)).reshape(
      mat.shape)
  np.testing.assert_allclose(updates["w"], expected[:-1], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(updates["b"], expected[-1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("blocks,message", [
    ({"emb": "full"}, "full blocks are for"),
    ({r"\['w'\]": "full"}, "more than max_factor_dim"),
])
def test_full_block_errors(setup, blocks, message):
  params, batch = setup
  with pytest.raises(ValueError, match=message):
    kfl.find_layers(loss_fn, params, batch,
                    layers=kfl.LayerOptions(blocks=blocks, max_factor_dim=8))


def test_full_block_where_nothing_was_detected_is_an_error(setup):
  params, batch = setup

  def loss(p, b):  # emb also read whole (a second, different use): no layer
    return loss_fn(dict(p, w=p["w"] * jnp.mean(p["emb"])), b)

  with pytest.raises(ValueError, match="full block for \\['emb'\\], but no layer"):
    kfl.find_layers(loss, params, batch, layers=kfl.LayerOptions(blocks={"emb": "full"}))
