"""Two common forms that used to fall back to the diagonal.

- kfac-jax's own test LayerNorm (``tests/models.py`` ``_LayerNorm``: the
  scale and offset broadcast to the activation's shape with
  ``jnp.broadcast_to``, ``inv = scale * rsqrt(var + eps)``,
  ``out = inv * (x - mean) + offset``; written here independently) is
  scale-and-shift: its exact diagonal Fisher is checked against per-example
  gradients from ``jax.vmap(jax.grad)`` of a forward pass written here.
- An RNN cell ``h = tanh(h @ W_h + b_h + x @ W_x)`` (Flax's ``SimpleCell`` /
  ``LSTMCell`` layout: the bias on the hidden-to-hidden product) with a zero
  initial carry: ``0 @ W_h + b_h`` is the first use of ``[W_h; b_h]`` with
  input ``[0; 1]``, so ``b_h`` joins ``W_h``'s block. Its factors are checked
  against activations and output Jacobians of the RNN unrolled by hand.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl

N, T, D_IN, D, K = 6, 3, 3, 4, 3


def _normal(seed: int, *shape: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _batch(seq: bool = False) -> dict[str, jax.Array]:
  x = _normal(0, T, N, D_IN) if seq else _normal(0, N, D_IN)
  return {"x": x, "y": jnp.asarray(np.random.default_rng(1).integers(0, K, N))}


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(logits, y)


def _softmax_fisher(logits: np.ndarray) -> np.ndarray:
  p = np.exp(logits - logits.max())
  p /= p.sum()
  return np.diag(p) - np.outer(p, p)


# ----------------------------------------------------------------------------
# kfac-jax's LayerNorm form.
# ----------------------------------------------------------------------------


def kfac_jax_layer_norm(scale: jax.Array, offset: jax.Array, x: jax.Array,
                        eps: float = 1e-5) -> jax.Array:
  mean = jnp.broadcast_to(jnp.mean(x, axis=-1, keepdims=True), x.shape)
  variance = jnp.var(x, axis=-1, keepdims=True)
  scale, offset = jnp.broadcast_to(scale, x.shape), jnp.broadcast_to(offset, x.shape)
  multiplier = scale * jax.lax.rsqrt(variance + eps)
  return multiplier * (x - mean) + offset


def ln_forward(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  h = kfac_jax_layer_norm(p["scale"], p["offset"], x @ p["w1"])
  return jnp.tanh(h) @ p["w2"]


def ln_params() -> dict[str, jax.Array]:
  return {"w1": _normal(2, D_IN, D), "scale": 1 + 0.3 * _normal(3, D),
          "offset": 0.3 * _normal(4, D), "w2": _normal(5, D, K)}


def ln_loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  return _xent(ln_forward(p, b["x"]), b["y"])


def test_kfac_jax_layernorm_is_scale_and_shift():
  layers = {l.name: l.kind for l in kfl.find_layers(ln_loss, ln_params(), _batch())}
  assert layers == {"['w1']": "dense", "['scale']": "scale", "['offset']": "shift",
                    "['w2']": "dense"}


def test_kfac_jax_layernorm_diagonal_fisher_matches_per_example_grads():
  params, batch = ln_params(), _batch()
  got = kfl.estimate_curvature(ln_loss, params, batch, key=jax.random.key(0),
                               estimator="exact")

  def log_prob(p, x, y):  # log p(y | x) of one example
    return jax.nn.log_softmax(ln_forward(p, x[None])[0])[y]

  classes = jnp.arange(K)
  # grads[n][k]: gradient of log p(k | x_n); probs[n, k] = p(k | x_n).
  grads = jax.vmap(lambda x: jax.vmap(lambda y: jax.grad(log_prob)(params, x, y))(classes))(
      batch["x"])
  probs = np.asarray(jax.nn.softmax(ln_forward(params, batch["x"])), np.float64)
  for name in ("scale", "offset"):
    g = np.asarray(grads[name], np.float64)  # [N, K, D]
    want = np.einsum("nk,nkd->d", probs, g * g) / N
    np.testing.assert_allclose(np.asarray(got[f"['{name}']"]["F"]).reshape(-1), want,
                               rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------
# RNN: the hidden-to-hidden bias joins its kernel's block.
# ----------------------------------------------------------------------------


def rnn_params() -> dict[str, jax.Array]:
  return {"wx": _normal(6, D_IN, D), "wh": 0.5 * _normal(7, D, D), "bh": _normal(8, D),
          "wo": _normal(9, D, K)}


def rnn_loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  def cell(h, x_t):
    return jnp.tanh(h @ p["wh"] + p["bh"] + x_t @ p["wx"]), None
  h, _ = jax.lax.scan(cell, jnp.zeros((b["x"].shape[1], D)), b["x"])
  return _xent(h @ p["wo"], b["y"])


def unrolled(p: dict[str, jax.Array], x: jax.Array, e: jax.Array
             ) -> tuple[jax.Array, list[jax.Array]]:
  """The RNN by hand, ``e[t]`` added to ``h_t @ W_h + b_h``; also the rows
  ``[h_t; 1]`` that multiply ``[W_h; b_h]``."""
  h = jnp.zeros((x.shape[1], D))
  rows = []
  for t in range(T):
    rows.append(jnp.concatenate([h, jnp.ones((x.shape[1], 1))], -1))
    h = jnp.tanh(h @ p["wh"] + p["bh"] + e[t] + x[t] @ p["wx"])
  return h @ p["wo"], rows


def test_rnn_hidden_bias_joins_its_kernel():
  layers = {l.name: l for l in kfl.find_layers(rnn_loss, rnn_params(), _batch(seq=True))}
  wh = layers["['wh']"]
  assert wh.kind == "dense" and jax.tree_util.keystr(wh.bias_path) == "['bh']"
  assert len(wh.matches) == T  # the zero-carry step is a use, through its bias
  assert "['bh']" not in layers and layers["['wx']"].bias_path is None


def test_rnn_hidden_block_matches_the_unrolled_fisher():
  params, batch = rnn_params(), _batch(seq=True)
  got = kfl.estimate_curvature(rnn_loss, params, batch, key=jax.random.key(0),
                               estimator="exact")["['wh']"]
  zeros = jnp.zeros((T, N, D))
  logits, rows = unrolled(params, batch["x"], zeros)
  rows = np.concatenate([np.asarray(r, np.float64) for r in rows])
  np.testing.assert_allclose(got["A"], rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-6)
  g = np.zeros((D, D))
  for n in range(N):
    jac = np.asarray(jax.jacobian(lambda e, n=n: unrolled(
        params, batch["x"][:, n:n + 1], e)[0][0])(zeros[:, n:n + 1]), np.float64)
    fisher = _softmax_fisher(np.asarray(logits[n], np.float64))
    for t in range(T):  # [K, T, 1, D]: every step, the zero-carry one included
      g += jac[:, t, 0].T @ fisher @ jac[:, t, 0] / N
  np.testing.assert_allclose(got["G"], g, rtol=1e-4, atol=1e-6)


def test_flax_lstm_hidden_biases_join_their_kernels():
  model = nn.RNN(nn.LSTMCell(D))
  x = jnp.swapaxes(_batch(seq=True)["x"], 0, 1)
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, b: _xent(model.apply({"params": p}, b["x"])[:, -1, :K], b["y"])
  layers = kfl.find_layers(loss, params, {"x": x, "y": _batch()["y"]})
  by_name = {l.name: l for l in layers}
  for gate in ("hi", "hf", "hg", "ho"):
    layer = by_name[f"['cell']['{gate}']['kernel']"]
    assert layer.kind == "dense" and layer.bias_path is not None, str(layers)
  assert all(l.kind == "dense" for l in layers), str(layers)
