"""An independent brute-force oracle of the Fisher of a tiny MLP, and its data.

The oracle never calls the library: it runs its own forward pass of a tiny
tanh MLP (3 -> 4 -> 3), differentiates ``-log p(y|x_n)`` case by case with
``jax.grad`` / ``jax.jacobian`` (in float32), and averages in float64 numpy:

* categorical (softmax) and Bernoulli (sigmoid) outputs: the expectation over
  ``y ~ p(.|x_n)`` is an exact weighted sum over the whole support (every
  class; all ``2^k`` binary target vectors);
* unit Gaussian (squared error): ``E_y[g g^T] = J^T J`` with ``J`` the
  Jacobian of the outputs.

From these per-case derivatives it builds the exact Fisher block of every
layer (``theta = [W; b]`` flattened row-major) and the true K-FAC factors
``A = mean a a^T`` (``a = [input; 1]``) and ``G = mean E_y[ds ds^T]``
(``ds`` the derivative with respect to the layer's pre-activation, obtained
by perturbing it in the oracle's own forward pass).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl


LOSSES = ("softmax", "sigmoid", "squared")
D_IN, D_HID, D_OUT = 3, 4, 3
BATCH = 8
LAYERS = ("l1", "l2")
LIB_NAMES = {"l1": "['l1']['w']", "l2": "['l2']['w']"}
FLAX_NAMES = {"l1": "['Dense_0']['kernel']", "l2": "['Dense_1']['kernel']"}

Params = dict[str, dict[str, jax.Array]]
Oracle = dict[str, dict[str, np.ndarray]]


# ----------------------------------------------------------------------------
# Data, model and library losses.
# ----------------------------------------------------------------------------


def make_params(seed: int) -> Params:
  """Random parameters of the 3 -> 4 -> 3 MLP (``x @ w + b``).

  numpy draws keep the test free of per-shape PRNG compilations.
  """
  rng = np.random.default_rng(seed)
  draw = lambda scale, *shape: jnp.asarray(scale * rng.standard_normal(shape),
                                           jnp.float32)
  return {"l1": {"w": draw(0.9, D_IN, D_HID), "b": draw(0.5, D_HID)},
          "l2": {"w": draw(0.9, D_HID, D_OUT), "b": draw(0.5, D_OUT)}}


def make_batch(loss: str, n: int, seed: int) -> dict[str, jax.Array]:
  """Inputs and true targets in the encoding the library loss expects."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, D_IN)), jnp.float32)
  if loss == "softmax":
    y = jnp.asarray(rng.integers(0, D_OUT, (n,)), jnp.int32)
  elif loss == "sigmoid":
    y = jnp.asarray(rng.integers(0, 2, (n, D_OUT)), jnp.float32)
  else:
    y = jnp.asarray(rng.standard_normal((n, D_OUT)), jnp.float32)
  return {"x": x, "y": y}


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
  """The model handed to the library."""
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return h @ params["l2"]["w"] + params["l2"]["b"]


class FlaxMLP(nn.Module):
  """The same MLP written with ``flax.linen.Dense``."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.tanh(nn.Dense(D_HID)(x))
    return nn.Dense(D_OUT)(x)


def library_loss(loss: str, apply: Callable[[Any, jax.Array], jax.Array]
                  ) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """``loss_fn(params, batch)`` built with a ``kfl.losses`` function."""
  fn = {"softmax": kfl.losses.softmax_cross_entropy,
        "sigmoid": kfl.losses.sigmoid_cross_entropy,
        "squared": kfl.losses.squared_error}[loss]

  def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return fn(apply(params, batch["x"]), batch["y"])

  return loss_fn


# ----------------------------------------------------------------------------
# The oracle (independent of the library).
# ----------------------------------------------------------------------------


def forward(params: Params, x: jax.Array, e1: jax.Array, e2: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Oracle forward pass for one case, with additive pre-activation perturbations.

  Args:
    params: MLP parameters.
    x: one input ``[D_IN]``.
    e1: perturbation of the first layer's pre-activation ``[D_HID]``.
    e2: perturbation of the second layer's pre-activation ``[D_OUT]``.

  Returns:
    ``(z, h)``: the output and the hidden activation (second layer's input).
  """
  s1 = jnp.dot(x, params["l1"]["w"]) + params["l1"]["b"] + e1
  h = jnp.tanh(s1)
  s2 = jnp.dot(h, params["l2"]["w"]) + params["l2"]["b"] + e2
  return s2, h


def _nll(loss: str, z: jax.Array, y: jax.Array) -> jax.Array:
  """``-log p(y|z)`` of one case (up to a y-independent constant for Gaussian)."""
  if loss == "softmax":  # y one-hot
    return -jnp.sum(y * jax.nn.log_softmax(z))
  if loss == "sigmoid":  # y in {0, 1}^k
    return -jnp.sum(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
  return 0.5 * jnp.sum(jnp.square(z - y))


def theta(layer: dict[str, jax.Array]) -> jax.Array:
  """``[W; b]`` (bias as the last row) flattened row-major; works on Jacobians too."""
  w, b = layer["w"], layer["b"]
  return jnp.concatenate([w, b[..., None, :]], axis=-2).reshape(*w.shape[:-2], -1)


def zeros_e() -> tuple[jax.Array, jax.Array]:
  return jnp.zeros((D_HID,)), jnp.zeros((D_OUT,))


def _support_targets(loss: str) -> np.ndarray:
  """Every target of a categorical / Bernoulli output (one-hot / binary vectors)."""
  if loss == "softmax":
    return np.eye(D_OUT)
  return np.array(list(itertools.product([0.0, 1.0], repeat=D_OUT)))


def support_probs(loss: str, z: np.ndarray) -> np.ndarray:
  """``p(y|z)`` of every target of :func:`_support_targets`, in float64."""
  z = z.astype(np.float64)
  if loss == "softmax":
    p = np.exp(z - z.max())
    return p / p.sum()
  q = 1.0 / (1.0 + np.exp(-z))
  ys = _support_targets(loss)
  return np.prod(np.where(ys == 1.0, q, 1.0 - q), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _case_derivatives(loss: str, params: Params, x: jax.Array, y: jax.Array
                      ) -> dict[str, Any]:
  """Every per-case derivative the oracle needs, for one input ``x``.

  Args:
    loss: "softmax", "sigmoid" or "squared".
    params: MLP parameters.
    x: one input ``[D_IN]``.
    y: its true target (one-hot for softmax) ``[D_OUT]``.

  Returns:
    ``z`` and ``h`` (output, hidden activation); ``"support"`` and ``"emp"``:
    ``{layer: (d theta [S, P], d pre-activation [S, d_out])}`` of
    ``-log p(y|x)`` for every support target (``S = 0`` rows for squared
    error) and for the true target (``S = 1``); ``"jac"``: ``{layer:
    (d z / d theta [D_OUT, P], d z / d pre-activation [D_OUT, d_out])}``.
  """
  e0 = zeros_e()

  def nll(p: Params, e1: jax.Array, e2: jax.Array, t: jax.Array) -> jax.Array:
    return _nll(loss, forward(p, x, e1, e2)[0], t)

  def grads(ys: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    def one(t: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
      gp, d1, d2 = jax.grad(nll, argnums=(0, 1, 2))(params, *e0, t)
      return {"l1": (theta(gp["l1"]), d1), "l2": (theta(gp["l2"]), d2)}
    return jax.vmap(one)(ys)

  def out(p: Params, e1: jax.Array, e2: jax.Array) -> jax.Array:
    return forward(p, x, e1, e2)[0]

  jp, j1, j2 = jax.jacobian(out, argnums=(0, 1, 2))(params, *e0)
  z, h = forward(params, x, *e0)
  ys = (jnp.zeros((0, D_OUT)) if loss == "squared"
        else jnp.asarray(_support_targets(loss), jnp.float32))
  return {"z": z, "h": h, "support": grads(ys), "emp": grads(y[None]),
          "jac": {"l1": (theta(jp["l1"]), j1), "l2": (theta(jp["l2"]), j2)}}


def _true_targets(loss: str, y: jax.Array) -> np.ndarray:
  y = np.asarray(y)
  return np.eye(D_OUT)[y] if loss == "softmax" else y.astype(np.float64)


def oracle(loss: str, params: Params, x: jax.Array, y: jax.Array) -> Oracle:
  """Brute-force curvature of every layer, in float64.

  Returns:
    ``{layer: {"A", "G", "F", "G_emp", "F_emp", "grad"}}``: the true K-FAC
    factors, the exact Fisher block over ``theta = [W; b]`` (row-major), the
    empirical-Fisher counterparts (true targets) and the mean gradient of the
    loss as a ``[d_in + 1, d_out]`` matrix.
  """
  n = x.shape[0]
  y_true = jnp.asarray(_true_targets(loss, y), jnp.float32)
  res = {l: {"A": 0.0, "G": 0.0, "F": 0.0, "G_emp": 0.0, "F_emp": 0.0,
             "grad": 0.0} for l in LAYERS}
  for i in range(n):
    d = jax.tree.map(lambda m: np.asarray(m, np.float64),
                     jax.device_get(_case_derivatives(loss, params, x[i], y_true[i])))
    inputs = {"l1": np.asarray(x[i], np.float64), "l2": d["h"]}
    for l in LAYERS:
      r = res[l]
      a = np.append(inputs[l], 1.0)
      r["A"] = r["A"] + np.outer(a, a) / n
      if loss == "squared":  # E_y[g g^T] = J^T J for a unit Gaussian.
        jt, js = d["jac"][l]
        r["F"] = r["F"] + jt.T @ jt / n
        r["G"] = r["G"] + js.T @ js / n
      else:  # exact sum over the support, weighted by p(y|x).
        w = support_probs(loss, d["z"])
        gt, gs = d["support"][l]
        r["F"] = r["F"] + np.einsum("s,sp,sq->pq", w, gt, gt) / n
        r["G"] = r["G"] + np.einsum("s,sp,sq->pq", w, gs, gs) / n
      et, es = d["emp"][l][0][0], d["emp"][l][1][0]
      r["F_emp"] = r["F_emp"] + np.outer(et, et) / n
      r["G_emp"] = r["G_emp"] + np.outer(es, es) / n
      r["grad"] = r["grad"] + et.reshape(a.shape[0], -1) / n
  return res


def dense_solve(a: np.ndarray, g: np.ndarray, lam: float, mat: np.ndarray
                 ) -> np.ndarray:
  """``(kron(A + pi sqrt(lam) I, G + sqrt(lam)/pi I))^{-1} vec(mat)``, densely.

  ``vec`` is row-major, matching ``theta = [W; b]``; call under
  ``jax.enable_x64(True)`` for a float64 solve.
  """
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  m = np.kron(a + pi * np.sqrt(lam) * np.eye(a.shape[0]),
              g + np.sqrt(lam) / pi * np.eye(g.shape[0]))
  vec = jnp.linalg.solve(jnp.asarray(m), jnp.asarray(mat.reshape(-1)))
  return np.asarray(vec).reshape(mat.shape)


def flax_to_dict(fp: Any) -> Params:
  return {"l1": {"w": fp["Dense_0"]["kernel"], "b": fp["Dense_0"]["bias"]},
          "l2": {"w": fp["Dense_1"]["kernel"], "b": fp["Dense_1"]["bias"]}}


def rel_fro(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
