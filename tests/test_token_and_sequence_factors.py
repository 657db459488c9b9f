"""Kronecker factors of embeddings and of dense layers over a sequence axis.

An embedding's input factor is the vector of token frequencies, its output
factor from output derivatives (oracles of :mod:`_family_oracles`); a tied
embedding gets the rms fallback; ``[B, T, d] @ W`` gives expand and reduce
factors.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from _family_oracles import (
    Factors, HIGHEST, Params, assert_close, flax_params, normal, exact_factors, fisher_ds,
    input_factor_oracle, library_factors, output_factor_oracle)


# ----------------------------------------------------------------------------
# 1. Embeddings.
# ----------------------------------------------------------------------------

VOCAB, EMB, B_TOK, T_TOK = 7, 3, 3, 4
IDS = np.array([[0, 1, 1, 3], [3, 3, 5, 0], [6, 1, 0, 0]])  # ids 2 and 4 unused


class FlaxTokenModel(nn.Module):
  """``nn.Embed`` -> tanh -> ``nn.Dense``."""
  num_out: int

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    return nn.Dense(self.num_out)(jnp.tanh(nn.Embed(VOCAB, EMB)(ids)))


def _token_leaves(params: Params) -> tuple[jax.Array, jax.Array, jax.Array]:
  if "Embed_0" in params:
    return (params["Embed_0"]["embedding"], params["Dense_0"]["kernel"],
            params["Dense_0"]["bias"])
  return params["table"], params["w"], params["b"]


def token_forward(params: Params, ids: jax.Array, eps: jax.Array | float = 0.0
                  ) -> jax.Array:
  """The oracle's own forward pass, ``eps`` added to the looked-up rows."""
  table, w, b = _token_leaves(params)
  return jnp.dot(jnp.tanh(table[ids] + eps), w, precision=HIGHEST) + b


@functools.lru_cache(maxsize=None)
def token_setup(flavor: str, dist: str) -> tuple[Params, dict[str, jax.Array],
                                                 Callable[[Any, Any], jax.Array], str]:
  """Params, batch, library loss and table name of an embedding model."""
  rng = np.random.default_rng(11)
  num_out = VOCAB if dist == "softmax" else 2
  if dist == "softmax":
    y = jnp.asarray(rng.integers(0, VOCAB, IDS.shape))
    loss_of = kfl.losses.softmax_cross_entropy
  else:
    y = normal(rng, *IDS.shape, num_out)
    loss_of = kfl.losses.squared_error
  ids = jnp.asarray(IDS, jnp.int32)
  batch = {"ids": ids, "y": y}
  if flavor == "flax":
    model = FlaxTokenModel(num_out)
    params = flax_params(model, ids, rng)

    def loss_fn(p, b):
      return loss_of(model.apply({"params": p}, b["ids"]), b["y"])

    assert_close(*jax.jit(lambda p: (token_forward(p, ids), model.apply(
        {"params": p}, ids)))(params))
    return params, batch, loss_fn, "['Embed_0']['embedding']"
  params = {"table": normal(rng, VOCAB, EMB), "w": normal(rng, EMB, num_out),
            "b": normal(rng, num_out, scale=0.3)}
  lookup = {"index": lambda t, i: t[i],
            "take": lambda t, i: jnp.take(t, i, axis=0)}[flavor]

  def loss_fn(p, b):
    z = jnp.dot(jnp.tanh(lookup(p["table"], b["ids"])), p["w"], precision=HIGHEST)
    return loss_of(z + p["b"], b["y"])

  return params, batch, loss_fn, "['table']"


@functools.lru_cache(maxsize=None)
def token_oracle(flavor: str, dist: str) -> tuple[np.ndarray, np.ndarray]:
  """``A`` (token frequencies) and ``G`` of the embedding table."""
  params = token_setup(flavor, dist)[0]
  a = np.bincount(IDS.reshape(-1), minlength=VOCAB) / IDS.size
  grads, weights = fisher_ds(lambda e, idn: token_forward(params, idn, e),
                             (T_TOK, EMB), jnp.asarray(IDS), dist)
  num_cases = IDS.size if dist == "softmax" else B_TOK
  return a, output_factor_oracle(grads, weights, "TC", num_cases, False)


@pytest.mark.parametrize("flavor,dist", [("index", "softmax"), ("take", "squared"),
                                         ("flax", "softmax")])
def test_embedding_factors_match_oracle(flavor: str, dist: str):
  params, batch, loss_fn, name = token_setup(flavor, dist)
  layers = {l.name: l for l in kfl.find_layers(loss_fn, params, batch)}
  assert layers[name].kind == "embedding", layers[name]
  assert layers[name].bias_path is None
  got = exact_factors(loss_fn, params, batch)[name]
  a, g = token_oracle(flavor, dist)
  assert got["A"].shape == (VOCAB,)
  assert_close(got["A"], a, 1e-6)
  assert_close(got["G"], g)


def test_tied_embedding_gets_rms_fallback():
  params = {"table": jax.ShapeDtypeStruct((VOCAB, EMB), jnp.float32)}
  batch = {"ids": jax.ShapeDtypeStruct(IDS.shape, jnp.int32),
           "y": jax.ShapeDtypeStruct(IDS.shape, jnp.int32)}

  def loss_fn(p, b):
    h = jnp.tanh(p["table"][b["ids"]])
    return kfl.losses.softmax_cross_entropy(h @ p["table"].T, b["y"])

  (layer,) = kfl.find_layers(loss_fn, params, batch)
  assert layer.name == "['table']"
  assert layer.kind == "rms", layer
  assert layer.note


def test_embedding_preconditioning_is_damped_kronecker_solve():
  params, batch, loss_fn, name = token_setup("index", "softmax")
  lam = 1e-2
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=lam, ema_decay=0.0,
                         inverse_every=1, estimator="exact")
  grads = jax.jit(jax.grad(loss_fn))(params, batch)
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch)[0])(
      grads, params)

  a, g = token_oracle("index", "softmax")
  pi = np.sqrt(np.mean(a) / (np.trace(g) / g.shape[0]))
  block = np.kron(np.diag(a) + pi * np.sqrt(lam) * np.eye(VOCAB),
                  g + np.sqrt(lam) / pi * np.eye(EMB))
  grad = np.asarray(grads["table"], np.float64).reshape(-1)  # row-major vec
  expected = np.linalg.solve(block, grad).reshape(VOCAB, EMB)
  assert_close(updates["table"], expected, 1e-3)


# ----------------------------------------------------------------------------
# 2. Dense layers over a sequence axis: [B, T, d] @ W.
# ----------------------------------------------------------------------------

B_SEQ, T_SEQ, D_SEQ, H_SEQ, C_SEQ = 3, 4, 2, 3, 3


def seq_forward(params: Params, x: jax.Array, head: str,
                eps: jax.Array | float = 0.0) -> jax.Array:
  """``tanh(x @ w1 + b1)`` -> flattened head ``[B, C]`` or per-position ``[B, T, C]``."""
  h = jnp.tanh(jnp.dot(x, params["w1"], precision=HIGHEST) + params["b1"] + eps)
  if head == "flatten":
    h = h.reshape(h.shape[0], -1)
  return jnp.dot(h, params[head], precision=HIGHEST)


@functools.lru_cache(maxsize=None)
def seq_setup(head: str) -> tuple[Params, dict[str, jax.Array], dict[str, Factors]]:
  """Params, batch and the library's expand/reduce factors."""
  rng = np.random.default_rng(5)
  params = {"w1": normal(rng, D_SEQ, H_SEQ), "b1": normal(rng, H_SEQ, scale=0.5),
            "flatten": normal(rng, T_SEQ * H_SEQ, C_SEQ),
            "per_position": normal(rng, H_SEQ, C_SEQ)}
  params = {k: v for k, v in params.items() if k in ("w1", "b1", head)}
  y_shape = (B_SEQ,) if head == "flatten" else (B_SEQ, T_SEQ)
  batch = {"x": normal(rng, B_SEQ, T_SEQ, D_SEQ),
           "y": jnp.asarray(rng.integers(0, C_SEQ, y_shape))}

  def loss_fn(p, b):
    return kfl.losses.softmax_cross_entropy(seq_forward(p, b["x"], head), b["y"])

  kinds = {l.name: l.kind for l in kfl.find_layers(loss_fn, params, batch)}
  assert kinds["['w1']"] == "dense", kinds
  return params, batch, library_factors(loss_fn, params, batch, "dense_approximation")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("head", ["flatten", "per_position"])
def test_sequence_dense_factors_match_oracle(head: str, approx: str):
  """``flatten``: one loss case per sequence; ``per_position``: one per token."""
  params, batch, lib = seq_setup(head)
  reduce = approx == "reduce"
  got = lib[approx]["['w1']"]
  assert_close(got["A"], input_factor_oracle(np.asarray(batch["x"]), True, reduce))
  grads, weights = fisher_ds(lambda e, xn: seq_forward(params, xn[None], head, e[None])[0],
                             (T_SEQ, H_SEQ), batch["x"], "softmax")
  num_cases = B_SEQ if head == "flatten" else B_SEQ * T_SEQ
  assert_close(got["G"], output_factor_oracle(grads, weights, "TC", num_cases, reduce))
