"""Scale-and-shift parameters get the exact diagonal Fisher from per-example gradients.

Oracle: per-example Jacobians of every class's log-probability (exact
expectation over the softmax), computed with ``jax.jacobian`` on a forward
pass written here, independent of the library.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl

B, D_IN, D, K = 6, 3, 4, 3


class LnNet(nn.Module):
  """Dense -> LayerNorm (scale and bias) -> tanh -> Dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(nn.Dense(D)(x))
    return nn.Dense(K)(jnp.tanh(h))


def rms_forward(p: Any, x: jax.Array) -> jax.Array:
  """Plain-JAX RMSNorm with a scale only, then a dense head."""
  h = x @ p["w1"]
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * p["gamma"]
  return jnp.tanh(h) @ p["w2"]


@pytest.fixture(scope="module")
def data() -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {"x": jnp.asarray(rng.normal(size=(B, D_IN)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, K, B))}


def _oracle_diag_fisher(logits_fn, params, x, leaf_paths):
  """(1/N) Σ_n Σ_y p(y|x_n) g_{n,y}² for the named leaves."""
  def logp(p, xn):
    return jax.nn.log_softmax(logits_fn(p, xn[None])[0])
  out = {}
  for n in range(x.shape[0]):
    probs = np.exp(np.asarray(logp(params, x[n]), np.float64))
    jac = jax.jacobian(logp)(params, x[n])  # leaves [K, *leaf]
    for path, leaf in jax.tree_util.tree_flatten_with_path(jac)[0]:
      name = jax.tree_util.keystr(path)
      if name in leaf_paths:
        g = np.asarray(leaf, np.float64).reshape(K, -1)
        out[name] = out.get(name, 0.0) + (probs[:, None] * g * g).sum(0) / x.shape[0]
  return out


def test_layernorm_scale_and_bias_detected(data):
  model = LnNet()
  params = model.init(jax.random.key(0), data["x"])["params"]
  loss = lambda p, b: kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]), b["y"])
  kinds = {l.name: (l.kind, l.bias_path is not None) for l in kfl.find_layers(loss, params, data)}
  assert kinds["['LayerNorm_0']['scale']"] == ("scale", False)
  assert kinds["['LayerNorm_0']['bias']"] == ("shift", False)
  assert kinds["['Dense_0']['kernel']"] == ("dense", True)


def test_layernorm_diagonal_fisher_matches_oracle(data):
  model = LnNet()
  params = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape) / v.size,
                        model.init(jax.random.key(0), data["x"])["params"])
  loss = lambda p, b: kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]), b["y"])
  got = kfl.estimate_curvature(loss, params, data, key=jax.random.key(0), estimator="exact")
  names = {"['LayerNorm_0']['scale']", "['LayerNorm_0']['bias']"}
  want = _oracle_diag_fisher(lambda p, x: model.apply({"params": p}, x), params, data["x"], names)
  for name in names:
    np.testing.assert_allclose(np.asarray(got[name]["F"]).reshape(-1), want[name],
                               rtol=1e-4, atol=1e-7)


def test_rmsnorm_scale_update_is_damped_diagonal_solve(data):
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(D_IN, D)), jnp.float32),
            "gamma": jnp.asarray(1 + 0.1 * rng.normal(size=(D,)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(D, K)), jnp.float32)}
  loss = lambda p, b: kfl.losses.softmax_cross_entropy(rms_forward(p, b["x"]), b["y"])
  kinds = {l.name: l.kind for l in kfl.find_layers(loss, params, data)}
  assert kinds == {"['w1']": "dense", "['gamma']": "scale", "['w2']": "dense"}
  lam = 1e-2
  tx = kfl.scale_by_kfac(loss, data, damping=lam, estimator="exact", ema_decay=0.0,
                         inverse_every=1)
  grads = jax.grad(loss)(params, data)
  updates, _ = tx.update(grads, tx.init(params), params, batch=data)
  fisher = _oracle_diag_fisher(rms_forward, params, data["x"], {"['gamma']"})["['gamma']"]
  np.testing.assert_allclose(np.asarray(updates["gamma"]),
                             np.asarray(grads["gamma"], np.float64) / (fisher + lam),
                             rtol=1e-4, atol=1e-7)


def test_scale_used_twice_sums_per_example_gradients(data):
  """A scale shared by two uses: its exact diagonal Fisher uses the per-example
  gradient summed over both uses (checked against the Jacobian oracle)."""
  rng = np.random.default_rng(2)
  params = {"w1": jnp.asarray(rng.normal(size=(D_IN, D)), jnp.float32),
            "gamma": jnp.asarray(1 + 0.3 * rng.normal(size=(D,)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(D, K)), jnp.float32)}

  def forward(p, x):
    return (jnp.tanh((x @ p["w1"]) * p["gamma"]) * p["gamma"]) @ p["w2"]

  def loss(p, b):
    return kfl.losses.softmax_cross_entropy(forward(p, b["x"]), b["y"])

  (gamma,) = [l for l in kfl.find_layers(loss, params, data) if l.name == "['gamma']"]
  assert gamma.kind == "scale" and len(gamma.matches) == 2 and "shared by 2 uses" in gamma.note
  got = kfl.estimate_curvature(loss, params, data, key=jax.random.key(0), estimator="exact")
  want = _oracle_diag_fisher(forward, params, data["x"], {"['gamma']"})["['gamma']"]
  np.testing.assert_allclose(np.asarray(got["['gamma']"]["F"]).reshape(-1), want,
                             rtol=1e-4, atol=1e-7)


class BnNet(nn.Module):
  """Dense -> BatchNorm -> tanh -> Dense."""
  train: bool

  @nn.compact
  def __call__(self, x):
    h = nn.BatchNorm(use_running_average=not self.train)(nn.Dense(D)(x))
    return nn.Dense(K)(jnp.tanh(h))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_whole_variables_dict_never_tags_batch_stats(data, train: bool):
  """Passing ``{"params", "batch_stats"}`` whole: running statistics get a zero
  update and no block; the trainable layers are those found from ``params``."""
  model = BnNet(train)
  variables = model.init(jax.random.key(0), data["x"])
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-trivial running stats

  def logits(v, x):
    if train:
      return model.apply(v, x, mutable=["batch_stats"])[0]
    return model.apply(v, x)

  def loss_whole(v, batch):
    return kfl.losses.softmax_cross_entropy(logits(v, batch[0]), batch[1])

  def loss_params(p, batch):
    return loss_whole({**variables, "params": p}, batch)

  batch = (data["x"], data["y"])
  whole = {l.name: l for l in kfl.find_layers(loss_whole, variables, batch)}
  stats = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]]
  assert len(stats) == 2
  for s in stats:
    layer = whole["['batch_stats']" + s]
    assert layer.kind == "frozen" and "non-trainable collection 'batch_stats'" in layer.note
  only_params = kfl.find_layers(loss_params, variables["params"], batch)
  assert sorted((l.name, l.kind) for l in only_params) == sorted(
      (l.name.replace("['params']", "", 1), l.kind) for l in whole.values()
      if l.kind != "frozen")

  tx = kfl.scale_by_kfac(loss_whole, batch, damping=1e-2, estimator="exact")
  grads = jax.tree.map(jnp.ones_like, variables)  # a non-zero "gradient" everywhere
  updates, _ = tx.update(grads, tx.init(variables), variables, batch=batch)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates["batch_stats"]))
  assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates["params"]))
