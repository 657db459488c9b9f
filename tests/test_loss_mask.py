"""Masked and weighted losses: padded cases count in neither the gradient nor
the curvature, weighted ones by their weight in both.

``kfl.losses.*(..., mask=m)`` is ``Σ m ℓ / Σ m``: the mean over the kept cases
for a 0/1 mask, a weighted mean for nonnegative weights. Every test runs with
a boolean mask and with float weights (zero on the same padding). Oracles, on
a sequence model whose tokens are the cases:

* the loss value against its numpy definition ``Σ m ℓ / Σ m``;
* the output factor ``G`` of the last layer (exact estimator) against
  ``(1/Σm) Σ_c m_c F_c``, ``F_c = diag(p) − p pᵀ`` the softmax Fisher of case
  ``c`` written out in numpy (``A`` still averages over every position), and
  the empirical one against ``(1/Σm) Σ_c m_c g_c g_cᵀ``, ``g_c = p − e_y``;
* the diagnostics from the empirical factors' own pass (a separate
  true-label column for weights) against ``kfl.diagnostics``;
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
from kfac_jax_lite.diagnostics import factors_and_diagnostics
from kfac_jax_lite.step import quadratic
from kfac_jax_lite.step.layers import LayerCache

B, T, D, K = 4, 5, 3, 6
KEEP = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
WEIGHTS = KEEP * np.random.default_rng(0).uniform(0.2, 3.0, KEEP.shape)
MASKS = {"mask": KEEP, "weights": WEIGHTS.astype(np.float32)}


@pytest.fixture(params=sorted(MASKS), name="mask")
def _mask(request) -> np.ndarray:
  return MASKS[request.param]


def _params() -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (D, D)) * 0.7, "out": jax.random.normal(k2, (D, K)) * 0.7}


def _batch(mask: np.ndarray, labels_seed: int = 1) -> dict[str, jax.Array]:
  return {"x": jax.random.normal(jax.random.key(2), (B, T, D)),
          "y": jax.random.randint(jax.random.key(labels_seed), (B, T), 0, K),
          "mask": jnp.asarray(mask)}


def _logits(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  return jnp.tanh(b["x"] @ p["w"]) @ p["out"]


def _loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(_logits(p, b), b["y"], mask=b["mask"])


def test_masked_losses_are_weighted_means(mask):
  p, b = _params(), _batch(mask)
  z = np.asarray(_logits(p, b), np.float64)
  logp = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(b["y"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(_loss(p, b)), np.sum(nll * mask) / mask.sum(), rtol=1e-6)
  rows = mask[:, 0] * np.array([1, 0, 1, 1])
  pred, target = z[:, 0, :2], np.zeros((B, 2))
  want = np.sum(0.5 * np.sum((pred - target) ** 2, -1) * rows) / rows.sum()
  got = kfl.losses.squared_error(jnp.asarray(pred, jnp.float32), jnp.zeros((B, 2)),
                                 mask=jnp.asarray(rows))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  with pytest.raises(ValueError, match="mask has shape"):
    kfl.losses.softmax_cross_entropy(jnp.zeros((B, T, K)), jnp.zeros((B, T), int),
                                     mask=jnp.ones((B,)))
  with pytest.raises(ValueError, match="nonnegative"):
    kfl.losses.squared_error(jnp.zeros((B, 2)), jnp.zeros((B, 2)),
                             mask=jnp.array([1.0, -0.5, 1.0, 1.0]))


def _softmax_output(p: dict[str, jax.Array],
                    b: dict[str, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
  """``[B T, K]`` probabilities and one-hot labels in float64."""
  z = np.asarray(_logits(p, b), np.float64).reshape(-1, K)
  prob = np.exp(z) / np.sum(np.exp(z), -1, keepdims=True)
  return prob, np.eye(K)[np.asarray(b["y"]).reshape(-1)]


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_output_factor_weighs_the_cases(mask, estimator: str):
  p, b = _params(), _batch(mask)
  layers = kfl.LayerOptions(dense_approximation="expand")
  est = kfl.estimate_curvature(_loss, p, b, key=jax.random.key(0), estimator=estimator,
                               layers=layers)
  prob, onehot = _softmax_output(p, b)
  if estimator == "exact":
    per_case = np.stack([np.diag(q) - np.outer(q, q) for q in prob])
  else:
    per_case = np.einsum("ci,cj->cij", prob - onehot, prob - onehot)
  m = mask.reshape(-1).astype(np.float64)
  np.testing.assert_allclose(np.asarray(est["['out']"]["G"]),
                             np.einsum("c,cij->ij", m, per_case) / m.sum(), rtol=1e-4, atol=1e-6)
  unmasked = kfl.estimate_curvature(
      lambda q, c: kfl.losses.softmax_cross_entropy(_logits(q, c), c["y"]), p, b,
      key=jax.random.key(0), estimator=estimator, layers=layers)
  np.testing.assert_allclose(np.asarray(est["['out']"]["A"]),
                             np.asarray(unmasked["['out']"]["A"]), rtol=1e-6)


def test_empirical_pass_gives_the_factors_and_the_diagnostics(mask):
  """With weights the true-label gradient (``m``) and the Fisher column
  (``√m``) differ: one pass gives both, equal to the separate computations."""
  p, b = _params(), _batch(mask)
  tagged = LayerCache(_loss, b, kfl.LayerOptions())(p)
  factors, diag = factors_and_diagnostics(tagged, p, b, jax.random.key(0), estimator="empirical")
  want_factors = kfl.estimate_curvature(_loss, p, b, key=jax.random.key(0), estimator="empirical")
  want_diag = kfl.diagnostics(_loss, p, b)
  for got, want in ((factors, want_factors), (diag, want_diag)):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_diagnostics_are_the_weighted_per_example_gradients(mask):
  p, b = _params(), _batch(mask)
  diag = kfl.diagnostics(_loss, p, b)

  def example_term(q, x, y, m):
    one = {"x": x[None], "y": y[None], "mask": jnp.zeros_like(b["mask"][:1]) + m[None]}
    per_case = kfl.losses.softmax_cross_entropy(_logits(q, one), one["y"], mask=one["mask"])
    return per_case * jnp.sum(m) * B / mask.sum()  # ℓ_n = (B/Σm) Σ_t m_t ℓ_t

  grads = jax.vmap(jax.grad(example_term), (None, 0, 0, 0))(p, b["x"], b["y"], b["mask"])
  want = np.sum([np.sum(np.square(np.asarray(g)), axis=tuple(range(1, g.ndim)))
                 for g in jax.tree.leaves(grads)], axis=0)
  np.testing.assert_allclose(np.asarray(diag.sq_norms), want, rtol=1e-4)


def test_quadratic_model_uses_the_weighted_gauss_newton_matrix(mask):
  p, b = _params(), _batch(mask)
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
def test_kfac_step_ignores_the_labels_of_padded_cases(mask, estimator: str):
  p = _params()
  tx = kfl.kfac(_loss, _batch(mask), estimator=estimator)

  @jax.jit
  def two_steps(b):
    s = tx.init(p)
    u1, s = tx.update(jax.grad(_loss)(p, b), s, p, batch=b)
    u2, _ = tx.update(jax.grad(_loss)(p, b), s, p, batch=b)
    return u1, u2

  b = _batch(mask)
  relabeled = {**b, "y": jnp.where(b["mask"] != 0, b["y"], (b["y"] + 1) % K)}
  assert not np.array_equal(np.asarray(relabeled["y"]), np.asarray(b["y"]))
  for got, want in zip(jax.tree.leaves(two_steps(relabeled)), jax.tree.leaves(two_steps(b))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["cholesky", "ekfac"])
def test_devices_weigh_their_estimates_by_their_kept_cases(mask, method: str):
  """Two devices (a named ``vmap`` axis) holding 8 and 5 kept tokens (or their
  weights) give the one-device statistics of the whole batch."""
  p, b = _params(), _batch(mask)
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
      np.testing.assert_allclose(np.asarray(g)[0], np.asarray(w), rtol=1e-4, atol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))  # float32 eigenvectors
