"""Diagnostics from the statistics pass against brute-force per-example gradients.

Oracle: ``jax.vmap(jax.grad(...))`` of the loss on one-example batches (each
example's term of the mean loss), grouped by hand into the layers' leaves;
the noise scale and diversity are McCandlish et al.'s and Yin et al.'s
formulas written out in numpy on those gradients.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.diagnostics import factors_and_diagnostics, use_gram
from kfac_jax_lite.tagging.layers import tag
from kfac_jax_lite.tagging.trace import trace_loss

B, K = 6, 3
RTOL = 1e-5


def brute_grads(loss_fn: Any, params: Any, batch: Any) -> dict[str, np.ndarray]:
  """keystr -> ``[B, size]`` float64 per-example gradients of each leaf."""
  one = lambda ex: jax.grad(loss_fn)(params, jax.tree.map(lambda v: v[None], ex))
  grads = jax.jit(jax.vmap(one))(batch)
  return {jax.tree_util.keystr(p): np.asarray(g, np.float64).reshape(g.shape[0], -1)
          for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


def check(loss_fn: Any, params: Any, batch: Any, groups: dict[str, list[str]],
          uncovered: tuple[str, ...] = ()) -> None:
  """Every field of ``kfl.diagnostics`` against the oracle; ``groups`` maps a
  layer name to the keystrs of its leaves (weight, bias)."""
  got = jax.jit(lambda p, b: kfl.diagnostics(loss_fn, p, b))(params, batch)
  g = brute_grads(loss_fn, params, batch)
  per_layer = {name: np.concatenate([g[k] for k in leaves], axis=1)
               for name, leaves in groups.items()}
  assert set(got.layer_sq_norms) == set(groups)
  assert got.uncovered == uncovered
  for name, gl in per_layer.items():
    np.testing.assert_allclose(got.layer_sq_norms[name], np.sum(gl**2, 1), rtol=RTOL,
                               err_msg=name)
    np.testing.assert_allclose(got.layer_batch_grad_sq_norms[name],
                               np.sum(gl.mean(0)**2), rtol=RTOL, err_msg=name)
  flat = np.concatenate(list(per_layer.values()), axis=1)  # [B, covered params]
  sq, mean = np.sum(flat**2, 1), flat.mean(0)
  n = flat.shape[0]
  trace_sigma = (sq.sum() - n * mean @ mean) / (n - 1)
  np.testing.assert_allclose(got.sq_norms, sq, rtol=RTOL)
  np.testing.assert_allclose(got.batch_grad_sq_norm, mean @ mean, rtol=RTOL)
  np.testing.assert_allclose(got.trace_sigma, trace_sigma, rtol=RTOL)
  # McCandlish et al. App. A with B_small = 1, B_big = n.
  grad_sq = (n * (mean @ mean) - sq.mean()) / (n - 1)
  np.testing.assert_allclose(got.grad_sq_norm, grad_sq, rtol=1e-4)
  np.testing.assert_allclose(got.noise_scale, trace_sigma / grad_sq, rtol=1e-4)
  summed = flat.sum(0)
  np.testing.assert_allclose(got.diversity, sq.sum() / (summed @ summed), rtol=RTOL)


def bumped(params: Any) -> Any:
  """Parameters moved off their initialization (nonzero biases, LayerNorm)."""
  return jax.tree.map(lambda v: v + 0.3 * jnp.sin(jnp.arange(v.size, dtype=v.dtype))
                      .reshape(v.shape), params)


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(K)(jnp.tanh(nn.Dense(5)(x)))


class Cnn(nn.Module):
  """A same-padded 3x3 convolution (g_n formed) and a strided valid one (Gram form)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    h = jnp.tanh(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID")(h))
    return nn.Dense(K)(h.reshape(h.shape[0], -1))


class Seq(nn.Module):
  """Embedding -> dense over [B, T, d] -> LayerNorm -> per-position logits."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Dense(12)(nn.Embed(5, 6)(ids))
    return nn.Dense(K)(jnp.tanh(nn.LayerNorm()(h)))


def flax_case(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any, Any]:
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  params = bumped(model.init(jax.random.key(0), batch["x"])["params"])
  loss = lambda p, b: kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]),
                                                       b["y"])
  return loss, params, batch


def dense_group(module: str) -> list[str]:
  return [f"['{module}']['kernel']", f"['{module}']['bias']"]


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
  return np.random.default_rng(0)


def test_dense_mlp(rng):
  case = flax_case(Mlp(), rng.normal(size=(B, 4)).astype(np.float32), rng.integers(0, K, B))
  check(*case, {dense_group(m)[0]: dense_group(m) for m in ("Dense_0", "Dense_1")})


def test_conv_both_forms(rng):
  assert not use_gram(25, 2 * 9 + 1, 4, columns=True)  # both forms run
  assert use_gram(4, 4 * 9 + 1, 8, columns=True)
  case = flax_case(Cnn(), rng.normal(size=(B, 5, 5, 2)).astype(np.float32),
                   rng.integers(0, K, B))
  check(*case, {dense_group(m)[0]: dense_group(m) for m in ("Conv_0", "Conv_1", "Dense_0")})


def test_sequence_dense_embedding_layernorm(rng):
  """Per-position labels: the loss averages over B*T cases, examples are rows of B."""
  assert use_gram(8, 7, 12, columns=False) and not use_gram(8, 13, K, columns=False)
  ids = rng.integers(0, 5, (B, 8))
  ids[:, 1] = ids[:, 3]  # repeated tokens within each example
  case = flax_case(Seq(), ids, rng.integers(0, K, (B, 8)))
  groups = {dense_group(m)[0]: dense_group(m) for m in ("Dense_0", "Dense_1")}
  groups.update({"['Embed_0']['embedding']": ["['Embed_0']['embedding']"],
                 "['LayerNorm_0']['scale']": ["['LayerNorm_0']['scale']"],
                 "['LayerNorm_0']['bias']": ["['LayerNorm_0']['bias']"]})
  check(*case, groups)


def shared_loss(p: Any, b: Any) -> jax.Array:
  """A weight applied twice (one layer, two uses) and a scalar gain (fallback)."""
  h = jnp.tanh(b["x"] @ p["w1"])
  for _ in range(2):
    h = jnp.tanh(h @ p["w2"] + p["b2"])
  return kfl.losses.squared_error(p["alpha"] * (h @ p["w3"]), b["y"])


def test_shared_weight_squared_error_and_uncovered(rng):
  shapes = {"w1": (4, 5), "w2": (5, 5), "b2": (5,), "w3": (5, 2), "alpha": ()}
  params = {k: jnp.asarray(rng.normal(size=s) * 0.7, jnp.float32) for k, s in shapes.items()}
  batch = {"x": jnp.asarray(rng.normal(size=(B, 4)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)}
  groups = {"['w1']": ["['w1']"], "['w2']": ["['w2']", "['b2']"], "['w3']": ["['w3']"]}
  check(shared_loss, params, batch, groups, uncovered=("['alpha']",))


@pytest.mark.parametrize("estimator", ["mc", "empirical"])
def test_one_pass_gives_factors_and_diagnostics(rng, estimator):
  """The combined pass equals ``estimate_curvature`` and ``diagnostics`` apart."""
  loss, params, batch = flax_case(Mlp(), rng.normal(size=(B, 4)).astype(np.float32),
                                  rng.integers(0, K, B))
  key = jax.random.key(3)
  tagged = tag(trace_loss(loss, params, batch))
  factors, diag = jax.jit(lambda p, b: factors_and_diagnostics(
      tagged, p, b, key, estimator=estimator, num_samples=2))(params, batch)
  want = jax.jit(lambda p, b: kfl.estimate_curvature(loss, p, b, key=key,
                                                     estimator=kfl.EstimatorOptions(kind=estimator, num_samples=2)))(params, batch)
  alone = jax.jit(lambda p, b: kfl.diagnostics(loss, p, b))(params, batch)
  # Two programs (a 3-column and a 1-column backward pass): float32 rounding,
  # amplified in the noise scale's difference of sums, stays under the 1e-5 target.
  for got, ref in ((factors, want), (diag, alone)):
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7),
                 got, ref)


def test_supplied_batch_gradient_gives_the_same(rng):
  """``batch_grads`` (the optimizer's gradient) replaces the Σ a dsᵀ products."""
  loss, params, batch = flax_case(Seq(), rng.integers(0, 5, (B, 4)), rng.integers(0, K, (B, 4)))
  tagged = tag(trace_loss(loss, params, batch))

  @jax.jit
  def both(p, b):
    run = lambda g: factors_and_diagnostics(tagged, p, b, jax.random.key(0),
                                            estimator="empirical", batch_grads=g)[1]
    return run(None), run(jax.grad(loss)(p, b))

  computed, supplied = both(params, batch)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5), supplied, computed)


def test_single_example_batch_is_an_error(rng):
  loss, params, batch = flax_case(Mlp(), rng.normal(size=(1, 4)).astype(np.float32),
                                  rng.integers(0, K, 1))
  with pytest.raises(ValueError, match="at least 2 examples"):
    jax.eval_shape(lambda: kfl.diagnostics(loss, params, batch))
