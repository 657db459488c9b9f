"""Masked losses: padded cases count in neither the gradient nor the curvature.

``kfl.losses.*(..., mask=m)`` averages over the kept cases. Oracles, on a
sequence model whose tokens are the cases:

* the loss value against its numpy definition ``Σ m ℓ / Σ m``;
* the output factor ``G`` of the last layer (exact estimator) against
  ``(1/Σm) Σ_c m_c F_c``, ``F_c = diag(p) − p pᵀ`` the softmax Fisher of case
  ``c`` written out in numpy (``A`` still averages over every position);
* the diagnostics' per-example norms against ``jax.vmap(jax.grad)`` of each
  example's term ``(B/Σm) Σ_t m_t ℓ_t``;
* the quadratic model's Gauss–Newton products against the Hessian of the
  masked loss with respect to the logits;
* a ``kfl.kfac`` step (Monte-Carlo or empirical Fisher) does not depend on
  the labels of padded cases.
"""

from __future__ import annotations

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.step import quadratic
from kfac_jax_lite.step.layers import LayerCache

B, T, D, K = 4, 5, 3, 6
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)


def _params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (D, D)) * 0.7, "out": jax.random.normal(k2, (D, K)) * 0.7}


def _batch(labels_seed: int = 1) -> dict[str, jax.Array]:
  return {"x": jax.random.normal(jax.random.key(2), (B, T, D)),
          "y": jax.random.randint(jax.random.key(labels_seed), (B, T), 0, K),
          "mask": jnp.asarray(MASK)}


def _logits(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  return jnp.tanh(b["x"] @ p["w"]) @ p["out"]


def _loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(_logits(p, b), b["y"], mask=b["mask"])


def test_masked_losses_are_means_over_the_kept_cases():
  p, b = _params(), _batch()
  z = np.asarray(_logits(p, b), np.float64)
  logp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(b["y"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(_loss(p, b)), np.sum(nll * MASK) / MASK.sum(), rtol=1e-6)
  rows = np.array([1, 0, 1, 1], bool)
  pred, target = z[:, 0, :2], np.zeros((B, 2))
  want = np.sum(0.5 * np.sum((pred - target) ** 2, -1) * rows) / rows.sum()
  got = kfl.losses.squared_error(jnp.asarray(pred, jnp.float32), jnp.zeros((B, 2)),
                                 mask=jnp.asarray(rows))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="mask has shape"):
    kfl.losses.softmax_cross_entropy(jnp.zeros((B, T, K)), jnp.zeros((B, T), int),
                                     mask=jnp.ones((B,)))


def test_output_factor_counts_only_the_kept_cases():
  p, b = _params(), _batch()
  layers = kfl.LayerOptions(dense_approximation="expand")
  est = kfl.estimate_curvature(_loss, p, b, key=jax.random.key(0), estimator="exact",
                               layers=layers)
  z = np.asarray(_logits(p, b), np.float64).reshape(-1, K)
  prob = np.exp(z) / np.sum(np.exp(z), -1, keepdims=True)
  fisher = np.stack([np.diag(q) - np.outer(q, q) for q in prob])
  keep = MASK.reshape(-1)
  np.testing.assert_allclose(np.asarray(est["['out']"]["G"]), fisher[keep].mean(0),
                             rtol=1e-4, atol=1e-6)
  unmasked = kfl.estimate_curvature(
      lambda q, c: kfl.losses.softmax_cross_entropy(_logits(q, c), c["y"]), p, b,
      key=jax.random.key(0), estimator="exact", layers=layers)
  np.testing.assert_allclose(np.asarray(est["['out']"]["A"]),
                             np.asarray(unmasked["['out']"]["A"]), rtol=1e-6)


def test_diagnostics_are_the_masked_per_example_gradients():
  p, b = _params(), _batch()
  diag = kfl.diagnostics(_loss, p, b)

  def example_term(q, x, y, m):
    one = {"x": x[None], "y": y[None], "mask": jnp.zeros_like(b["mask"][:1]) + m[None]}
    per_case = kfl.losses.softmax_cross_entropy(_logits(q, one), one["y"], mask=one["mask"])
    return per_case * jnp.sum(m) * B / MASK.sum()  # ℓ_n = (B/Σm) Σ_t m_t ℓ_t

  grads = jax.vmap(jax.grad(example_term), (None, 0, 0, 0))(p, b["x"], b["y"], b["mask"])
  want = np.sum([np.sum(np.square(np.asarray(g)), axis=tuple(range(1, g.ndim)))
                 for g in jax.tree.leaves(grads)], axis=0)
  np.testing.assert_allclose(np.asarray(diag.sq_norms), want, rtol=1e-4)


def test_quadratic_model_uses_the_masked_gauss_newton_matrix():
  p, b = _params(), _batch()
  tagged = LayerCache(_loss, b, kfl.LayerOptions())(p)
  flat, unravel = ravel_pytree(p)
  vs = [unravel(jax.random.normal(jax.random.key(i), flat.shape)) for i in (3, 4)]
  _, gram = quadratic.curvature_products(tagged, p, b, vs, None)
  jac = jax.jacobian(lambda f: _logits(unravel(f), b).reshape(-1))(flat)
  hess = jax.hessian(lambda z: kfl.losses.softmax_cross_entropy(
      z.reshape(B, T, K), b["y"], mask=b["mask"]))(_logits(p, b).reshape(-1))
  ggn = np.asarray(jac.T @ hess @ jac, np.float64)
  v = np.stack([np.asarray(ravel_pytree(u)[0], np.float64) for u in vs])
  np.testing.assert_allclose(np.asarray(gram), v @ ggn @ v.T, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", ["mc", "empirical"])
def test_kfac_step_ignores_the_labels_of_padded_cases(estimator: str):
  p = _params()
  tx = kfl.kfac(_loss, _batch(), estimator=estimator)

  @jax.jit
  def two_steps(b):
    s = tx.init(p)
    u1, s = tx.update(jax.grad(_loss)(p, b), s, p, batch=b)
    u2, _ = tx.update(jax.grad(_loss)(p, b), s, p, batch=b)
    return u1, u2

  b = _batch()
  relabeled = {**b, "y": jnp.where(b["mask"], b["y"], (b["y"] + 1) % K)}
  assert not np.array_equal(np.asarray(relabeled["y"]), np.asarray(b["y"]))
  for got, want in zip(jax.tree.leaves(two_steps(relabeled)), jax.tree.leaves(two_steps(b))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["cholesky", "ekfac"])
def test_devices_weigh_their_estimates_by_their_kept_cases(method: str):
  """Two devices (a named ``vmap`` axis) holding 8 and 5 kept tokens give the
  one-device statistics of the whole batch."""
  p, b = _params(), _batch()
  opts = dict(damping=1e-2, estimator="exact", stats_every=1, inverse_every=1,
              inverses=kfl.InverseOptions(method))
  one = kfl.scale_by_kfac(_loss, b, **opts)
  whole = one.update(jax.grad(_loss)(p, b), one.init(p), p, batch=b)[1]
  split = jax.tree.map(lambda x: x.reshape(2, B // 2, *x.shape[1:]), b)
  two = kfl.scale_by_kfac(_loss, jax.tree.map(lambda x: x[0], split),
                          parallel=kfl.ParallelOptions(axis_name="d"), **opts)

  def device(part):
    return two.update(jax.grad(_loss)(p, part), two.init(p), p, batch=part)[1]

  per_device = jax.vmap(device, axis_name="d")(split)
  for got, want in ((per_device.factors, whole.factors), (per_device.ekfac, whole.ekfac)):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g)[0], np.asarray(w), rtol=1e-4, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
