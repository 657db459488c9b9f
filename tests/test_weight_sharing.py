"""Shared weights and control flow: RNN cells, scanned stacks, cond.

- A weight used at several places (an RNN cell over time, one projection
  applied to two activations) is one Kronecker layer whose statistics are
  summed over its uses (K-FAC-expand over uses): checked against factors
  built here from per-use activations and per-use output Jacobians of a
  forward pass written independently of the library.
- A stack of layers scanned with ``lax.scan`` / ``nn.scan`` gets one layer per
  slice: same factors and updates as the same network with separate leaves.
- ``lax.cond`` hides its layers: their parameters get the rms fallback,
  with a note; a scan longer than the unroll limit likewise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from helpers import loss_before_and_after
from kfac_jax_lite.tagging import unroll

N, T, D_IN, D_H, K = 4, 3, 2, 3, 3
L = 3  # layers in a stack


def _normal(seed: int, *shape: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(logits, y)


# ----------------------------------------------------------------------------
# RNN: Wx, Wh closed over by lax.scan (one use per step).
# ----------------------------------------------------------------------------


def rnn_params() -> dict[str, jax.Array]:
  return {"wx": _normal(1, D_IN, D_H), "b": _normal(2, D_H), "wh": _normal(3, D_H, D_H),
          "wo": _normal(4, D_H, K)}


def rnn_batch() -> dict[str, jax.Array]:
  return {"x": _normal(5, T, N, D_IN),
          "y": jnp.asarray(np.random.default_rng(6).integers(0, K, N))}


def rnn_loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  def cell(h, x_t):
    h = jnp.tanh(x_t @ p["wx"] + p["b"] + h @ p["wh"])
    return h, None
  h, _ = jax.lax.scan(cell, jnp.zeros((N, D_H)), b["x"])
  return _xent(h @ p["wo"], b["y"])


def _rnn_logits(p, x, ex, eh):
  """The same RNN unrolled by hand, with additive perturbations of the
  outputs of ``x_t @ Wx + b`` (``ex[t]``) and ``h @ Wh`` (``eh[t]``)."""
  h = jnp.zeros((x.shape[1], D_H))
  inputs = {"wx": [], "wh": []}
  for t in range(T):
    inputs["wx"].append(jnp.concatenate([x[t], jnp.ones((x.shape[1], 1))], -1))
    if t:  # h_0 @ Wh = 0 is not a use of Wh
      inputs["wh"].append(h)
    h = jnp.tanh(x[t] @ p["wx"] + p["b"] + ex[t] + h @ p["wh"] + eh[t])
  return h @ p["wo"], inputs


def _softmax_fisher_sqrt(logits: np.ndarray) -> np.ndarray:
  p = np.exp(logits - logits.max())
  p /= p.sum()
  return np.diag(p) - np.outer(p, p)


def test_rnn_cell_is_one_layer_per_weight_with_a_use_per_step():
  layers = {l.name: l for l in kfl.find_layers(rnn_loss, rnn_params(), rnn_batch())}
  assert {n: l.kind for n, l in layers.items()} == {
      "['wx']": "dense", "['wh']": "dense", "['wo']": "dense"}
  # h_0 = 0: the first step's h @ Wh is zero, no use of Wh.
  assert len(layers["['wx']"].matches) == T and len(layers["['wh']"].matches) == T - 1
  assert layers["['wx']"].bias_path is not None and layers["['wh']"].bias_path is None
  assert f"shared by {T} uses" in layers["['wx']"].note


def test_rnn_factors_are_sums_over_steps():
  params, batch = rnn_params(), rnn_batch()
  got = kfl.estimate_curvature(rnn_loss, params, batch, key=jax.random.key(0),
                               estimator="exact")
  zeros = jnp.zeros((T, N, D_H))
  logits, inputs = _rnn_logits(params, batch["x"], zeros, zeros)
  for name, arg in (("wx", 2), ("wh", 3)):
    rows = np.concatenate([np.asarray(r, np.float64) for r in inputs[name]])
    np.testing.assert_allclose(got[f"['{name}']"]["A"], rows.T @ rows / rows.shape[0],
                               rtol=1e-4, atol=1e-6)
    g = np.zeros((D_H, D_H))
    for n in range(N):
      def f(e, n=n):
        ex, eh = (e, zeros[:, n:n + 1]) if arg == 2 else (zeros[:, n:n + 1], e)
        return _rnn_logits(params, batch["x"][:, n:n + 1], ex, eh)[0][0]
      jac = np.asarray(jax.jacobian(f)(zeros[:, n:n + 1]), np.float64)  # [K, T, 1, D_H]
      fisher = _softmax_fisher_sqrt(np.asarray(logits[n], np.float64))
      for t in range(0 if name == "wx" else 1, T):  # h_0 @ Wh is no use
        j = jac[:, t, 0, :]
        g += j.T @ fisher @ j / N
    np.testing.assert_allclose(got[f"['{name}']"]["G"], g, rtol=1e-4, atol=1e-6)


def test_rnn_trains():
  params, batch = rnn_params(), rnn_batch()
  tx = kfl.kfac(rnn_loss, batch, learning_rate=0.3, damping=1e-2)
  before, after = loss_before_and_after(rnn_loss, params, batch, tx, 25)
  assert after < 0.5 * before


# ----------------------------------------------------------------------------
# Scanned stacks: one layer per slice, as if the leaves were separate.
# ----------------------------------------------------------------------------


def stack_params() -> dict[str, jax.Array]:
  return {"w_in": _normal(10, D_IN, D_H), "w": 0.7 * _normal(11, L, D_H, D_H),
          "b": _normal(12, L, D_H), "w_out": _normal(13, D_H, K)}


def stack_batch() -> dict[str, jax.Array]:
  return {"x": _normal(14, N, D_IN),
          "y": jnp.asarray(np.random.default_rng(15).integers(0, K, N))}


def stack_loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  def block(h, wb):
    w, bias = wb
    return jnp.tanh(h @ w + bias), None
  h, _ = jax.lax.scan(block, jnp.tanh(b["x"] @ p["w_in"]), (p["w"], p["b"]))
  return _xent(h @ p["w_out"], b["y"])


def split(p: dict[str, jax.Array]) -> dict[str, jax.Array]:
  out = {"w_in": p["w_in"], "w_out": p["w_out"]}
  for i in range(L):
    out[f"w{i}"], out[f"b{i}"] = p["w"][i], p["b"][i]
  return out


def split_loss(p: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
  h = jnp.tanh(b["x"] @ p["w_in"])
  for i in range(L):
    h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
  return _xent(h @ p["w_out"], b["y"])


def test_scanned_stack_has_a_layer_per_slice():
  layers = kfl.find_layers(stack_loss, stack_params(), stack_batch())
  got = {(l.name, l.kind, None if l.bias_path is None else jax.tree_util.keystr(l.bias_path))
         for l in layers}
  assert got == {("['w_in']", "dense", None), ("['w_out']", "dense", None),
                 *((f"['w'][{i}]", "dense", "['b']") for i in range(L))}


def test_scanned_stack_factors_and_updates_equal_separate_layers():
  params, batch = stack_params(), stack_batch()
  key = jax.random.key(0)
  stacked = kfl.estimate_curvature(stack_loss, params, batch, key=key, estimator="exact")
  separate = kfl.estimate_curvature(split_loss, split(params), batch, key=key, estimator="exact")
  for i in range(L):
    for f in ("A", "G"):
      np.testing.assert_allclose(stacked[f"['w'][{i}]"][f], separate[f"['w{i}']"][f],
                                 rtol=1e-5, atol=1e-7)

  def updates(loss, p):
    tx = kfl.scale_by_kfac(loss, batch, damping=1e-2, estimator="exact", inverse_every=1)
    return tx.update(jax.grad(loss)(p, batch), tx.init(p), p, batch=batch)[0]

  u_stacked, u_separate = updates(stack_loss, params), updates(split_loss, split(params))
  np.testing.assert_allclose(jax.tree.map(np.asarray, split(u_stacked))["w1"],
                             u_separate["w1"], rtol=1e-4, atol=1e-6)
  # The rolled and the unrolled gradients differ in float32 rounding, which
  # the damped inverses (condition number up to 1/damping = 100) amplify:
  # entries of size ~0.4 agree to ~1e-5 (jax 0.11's scan rounds differently).
  for name, leaf in split(u_stacked).items():
    np.testing.assert_allclose(leaf, u_separate[name], rtol=1e-4, atol=1e-5, err_msg=name)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(D_H)(h)), None


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D_H)(x)
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L)()(h, None)
    return nn.Dense(K)(h)


def test_linen_nn_scan_stack_is_detected_per_slice():
  model, batch = ScanNet(), stack_batch()
  params = model.init(jax.random.key(0), batch["x"])["params"]
  loss = lambda p, b: _xent(model.apply({"params": p}, b["x"]), b["y"])
  layers = kfl.find_layers(loss, params, batch)
  names = sorted(l.name for l in layers)
  scanned = [n for n in names if "ScanBlock" in n]
  assert len(scanned) == L, names
  assert all(l.kind == "dense" and l.bias_path is not None for l in layers)
  assert {n.rsplit("[", 1)[1] for n in scanned} == {f"{i}]" for i in range(L)}

  tx = kfl.kfac(loss, batch, learning_rate=0.2, damping=1e-2)
  before, after = loss_before_and_after(loss, params, batch, tx, 20)
  assert after < 0.5 * before


# ----------------------------------------------------------------------------
# What stays a fallback: cond branches, scans over the unroll limit.
# ----------------------------------------------------------------------------


def test_layer_inside_cond_gets_the_rms_fallback(monkeypatch: Any):
  params = {"w1": _normal(20, D_IN, D_H), "w2": _normal(21, D_H, K)}

  def loss(p, b):
    h = jax.lax.cond(b["flag"], lambda x: jnp.tanh(x @ p["w1"]), lambda x: x @ p["w1"], b["x"])
    return _xent(h @ p["w2"], b["y"])

  batch = {**stack_batch(), "flag": jnp.asarray(True)}
  layers = {l.name: l for l in kfl.find_layers(loss, params, batch)}
  assert layers["['w1']"].kind == "rms" and "cond" in layers["['w1']"].note
  assert layers["['w2']"].kind == "dense"


def test_scan_over_the_unroll_limit_gets_the_rms_fallback(monkeypatch: Any):
  monkeypatch.setattr(unroll, "MAX_UNROLL", L - 1)
  layers = {l.name: l for l in kfl.find_layers(stack_loss, stack_params(), stack_batch())}
  assert layers["['w']"].kind == "rms" and "scan" in layers["['w']"].note
  assert layers["['b']"].kind == "rms"
  assert layers["['w_in']"].kind == "dense" and layers["['w_out']"].kind == "dense"


def test_nnx_scan_stack_is_detected_per_slice():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.lin = nnx.Linear(D_H, D_H, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.lin(x))

  @nnx.split_rngs(splits=L)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_blocks(rngs: nnx.Rngs) -> Block:
    return Block(rngs)

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.inp = nnx.Linear(D_IN, D_H, rngs=rngs)
      self.blocks = make_blocks(rngs)
      self.head = nnx.Linear(D_H, K, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(h, block):
        return block(h)
      return self.head(body(self.inp(x), self.blocks))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  batch = stack_batch()

  def loss(p, b):
    return _xent(nnx.merge(graphdef, p)(b["x"]), b["y"])

  layers = kfl.find_layers(loss, params, batch)
  stacked = sorted(l.name for l in layers if "blocks" in l.name)
  assert len(stacked) == L and all(n.endswith(f"[{i}]") for i, n in enumerate(stacked))
  assert all(l.kind == "dense" and l.bias_path is not None for l in layers)
