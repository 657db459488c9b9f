"""K-FAC training and updates in every framework.

One short K-FAC training run per framework on a teacher's labels; Haiku and
Equinox softmax-regression updates against a numpy oracle of the exact
Fisher's Kronecker factors.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from _eqx_haiku_cases import eqx, hk
from _framework_cases import LossFn, compiled, normal, random_like, xent


# ----------------------------------------------------------------------------
# 1. A short K-FAC training run per framework (MLP 16-8-4 on a teacher's labels).
# ----------------------------------------------------------------------------

STEPS = 20
N_TRAIN, D_X, D_HID, CLASSES = 128, 16, 8, 4
KFAC_SETTINGS = dict(learning_rate=0.1, damping=1e-2, kl_clip=1e-3, momentum=0.9, stats_every=1,
                     inverse_every=10)


@pytest.fixture(scope="module")
def teacher_batch() -> dict[str, jax.Array]:
  """Gaussian inputs labelled by a random linear teacher (a learnable task)."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((N_TRAIN, D_X))
  y = np.argmax(x @ rng.standard_normal((D_X, CLASSES)), axis=1)
  return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.int32)}


def train_losses(loss_fn: LossFn, params: Any, batch: Any) -> np.ndarray:
  """Losses of ``STEPS + 1`` K-FAC steps on ``batch``: the last is after ``STEPS`` updates.

  Args:
    loss_fn: ``loss_fn(params, batch)``.
    params: initial parameters.
    batch: the (fixed) training batch.

  Returns:
    ``STEPS + 1`` losses.
  """
  tx = kfl.kfac(loss_fn, batch, **KFAC_SETTINGS)

  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = tx.update(grads, s, p, batch=batch)
    return optax.apply_updates(p, updates), s, loss

  state = tx.init(params)
  run = compiled(step, params, state)
  losses = []
  for _ in range(STEPS + 1):
    params, state, loss = run(params, state)
    losses.append(float(loss))
  return np.asarray(losses)


def mlp_case(framework: str) -> tuple[LossFn, Any]:
  """(loss_fn, params) of the framework's own MLP ``D_X -> D_HID -> tanh -> CLASSES``."""
  x = jax.ShapeDtypeStruct((1, D_X), jnp.float32)
  if framework == "linen":
    model = nn.Sequential([nn.Dense(D_HID), jnp.tanh, nn.Dense(CLASSES)])
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    loss_fn = lambda p, b: xent(model.apply({"params": p}, b["x"]), b)
  elif framework == "nnx":
    graphdef, params = nnx.split(nnx.eval_shape(lambda: nnx.Sequential(
        nnx.Linear(D_X, D_HID, rngs=nnx.Rngs(0)), jnp.tanh,
        nnx.Linear(D_HID, CLASSES, rngs=nnx.Rngs(1)))))
    loss_fn = lambda p, b: xent(nnx.merge(graphdef, p)(b["x"]), b)
  elif framework == "equinox":
    eqx = pytest.importorskip("equinox")
    model = eqx.filter_eval_shape(lambda: eqx.nn.MLP(
        D_X, CLASSES, D_HID, 1, activation=jnp.tanh, key=jax.random.key(0)))
    is_array = lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    params = eqx.filter(model, is_array)
    static = eqx.filter(model, is_array, inverse=True)
    loss_fn = lambda p, b: xent(jax.vmap(eqx.combine(p, static))(b["x"]), b)
  elif framework == "haiku":
    hk = pytest.importorskip("haiku")
    model = hk.without_apply_rng(hk.transform(
        lambda x: hk.nets.MLP([D_HID, CLASSES], activation=jnp.tanh)(x)))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    loss_fn = lambda p, b: xent(model.apply(p, b["x"]), b)
  else:
    params = {"w1": jax.ShapeDtypeStruct((D_X, D_HID), jnp.float32),
              "b1": jax.ShapeDtypeStruct((D_HID,), jnp.float32),
              "w2": jax.ShapeDtypeStruct((D_HID, CLASSES), jnp.float32),
              "b2": jax.ShapeDtypeStruct((CLASSES,), jnp.float32)}
    loss_fn = lambda p, b: xent(jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], b)
  return loss_fn, random_like(params, seed=6, scale=0.3)


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox", "haiku", "plain"])
def test_short_training_run_lowers_the_loss(framework: str,
                                            teacher_batch: dict[str, jax.Array]):
  loss_fn, params = mlp_case(framework)
  dense = [l for l in kfl.find_layers(loss_fn, params, teacher_batch) if l.kind == "dense"]
  assert len(dense) == 2
  losses = train_losses(loss_fn, params, teacher_batch)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------
# 2. Preconditioned updates against a numpy oracle (softmax regression).
# ----------------------------------------------------------------------------

N_OR, D_OR, K_OR = 8, 3, 4  # examples, inputs, classes (all different)
LAMBDA = 1e-2


def softmax_regression_oracle(x: jax.Array, w: jax.Array, b: jax.Array | None,
                              y: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Gradient and K-FAC update of ``[W; b]`` for ``logits = x W + b``, in numpy.

  ``A = mean(a aᵀ)`` with ``a = [x; 1]`` (``x`` without a bias), ``G`` the
  average of ``diag(p) - p pᵀ`` (the exact Fisher of the softmax), and the
  update ``(A + π√λ I)⁻¹ grad (G + √λ/π I)⁻¹`` with
  ``π = sqrt((tr A / dim A) / (tr G / dim G))``.

  Args:
    x: inputs ``[N, d_in]``.
    w: weights ``[d_in, K]``.
    b: bias ``[K]`` or ``None``.
    y: integer labels ``[N]``.

  Returns:
    ``(grad, update)``, both ``[d_in (+1), K]`` float64.
  """
  x = np.asarray(x, np.float64)
  z = x @ np.asarray(w, np.float64)
  if b is not None:
    z = z + np.asarray(b, np.float64)
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  n = x.shape[0]
  grad = x.T @ (p - np.eye(z.shape[1])[np.asarray(y)]) / n
  big_a = x.T @ x / n
  big_g = np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0)
  pi = np.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
  ia = np.linalg.inv(big_a + pi * np.sqrt(LAMBDA) * np.eye(big_a.shape[0]))
  ig = np.linalg.inv(big_g + np.sqrt(LAMBDA) / pi * np.eye(big_g.shape[0]))
  return grad, ia @ grad @ ig


def one_step(loss_fn: LossFn, params: Any, batch: Any) -> tuple[Any, Any]:
  """(grads, updates) of one exact-Fisher K-FAC step with fresh factors."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=LAMBDA, estimator="exact",
                         ema_decay=0.0, stats_every=1, inverse_every=1)

  def step(p, s):
    grads = jax.grad(loss_fn)(p, batch)
    return grads, tx.update(grads, s, p, batch=batch)[0]

  state = tx.init(params)
  return compiled(step, params, state)(params, state)


@pytest.fixture(scope="module")
def regression_batch() -> dict[str, jax.Array]:
  """``N_OR`` Gaussian inputs with random labels."""
  return {"x": normal(8, N_OR, D_OR),
          "y": jnp.asarray(np.random.default_rng(9).integers(0, K_OR, N_OR), jnp.int32)}


def assert_rows(actual_w: Any, actual_b: Any, want: np.ndarray, bias: bool,
                rtol: float) -> None:
  """``actual_w`` (``[d_in, K]``) and ``actual_b`` are the rows of ``want``."""
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(np.asarray(actual_w), want[:D_OR], rtol=rtol, atol=rtol * scale)
  if bias:
    np.testing.assert_allclose(np.asarray(actual_b), want[D_OR], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("bias", [True, False])
def test_haiku_update_matches_oracle(hk: Any, regression_batch: dict[str, jax.Array],
                                     bias: bool):
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(K_OR, with_bias=bias, name="lin")(x)))
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), regression_batch["x"]))
  loss_fn = lambda p, b: xent(model.apply(p, b["x"]), b)
  grads, updates = one_step(loss_fn, params, regression_batch)
  lin = params["lin"]
  grad, update = softmax_regression_oracle(regression_batch["x"], lin["w"], lin.get("b"),
                                           regression_batch["y"])
  assert_rows(grads["lin"]["w"], grads["lin"].get("b"), grad, bias, 1e-4)
  assert_rows(updates["lin"]["w"], updates["lin"].get("b"), update, bias, 2e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_equinox_update_matches_oracle(eqx: Any, regression_batch: dict[str, jax.Array],
                                       bias: bool):
  model = random_like(eqx.filter_eval_shape(
      lambda: eqx.nn.Linear(D_OR, K_OR, use_bias=bias, key=jax.random.key(0))))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  loss_fn = lambda p, b: xent(jax.vmap(eqx.combine(p, static))(b["x"]), b)
  grads, updates = one_step(loss_fn, params, regression_batch)
  grad, update = softmax_regression_oracle(  # Equinox stores the weight [K, d_in]
      regression_batch["x"], params.weight.T, params.bias, regression_batch["y"])
  assert_rows(grads.weight.T, grads.bias, grad, bias, 1e-4)
  assert_rows(updates.weight.T, updates.bias, update, bias, 2e-3)
