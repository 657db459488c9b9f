"""Fused kernels: a weight operand joined from several parameter leaves.

``x @ concatenate([wa, wb], 1) + concatenate([ba, bb])`` (Flax's
``OptimizedLSTMCell``; a fused QKV built from separate leaves) is one dense
layer over the joined ``[W; b]``: checked against the same model with the
kernel stored pre-joined (factors and preconditioned updates bit-close), and
against a brute-force Fisher from per-example derivatives written out here
(softmax output: exact expectation over every class).
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from tests.helpers import loss_before_and_after

D_IN, D_A, D_B, D_OUT, N = 3, 2, 3, 4, 6
FUSED = "['wa']+['wb']"


def _draw(rng: np.random.Generator, *shape: int) -> jax.Array:
  return jnp.asarray(0.7 * rng.standard_normal(shape), jnp.float32)


@functools.lru_cache(maxsize=None)
def _setup() -> tuple[dict, dict, dict]:
  """(fused params, the same values pre-joined, batch)."""
  rng = np.random.default_rng(0)
  fp = {"wa": _draw(rng, D_IN, D_A), "wb": _draw(rng, D_IN, D_B), "ba": _draw(rng, D_A),
        "bb": _draw(rng, D_B), "w2": _draw(rng, D_A + D_B, D_OUT), "b2": _draw(rng, D_OUT)}
  jp = {"w": jnp.concatenate([fp["wa"], fp["wb"]], 1),
        "b": jnp.concatenate([fp["ba"], fp["bb"]]), "w2": fp["w2"], "b2": fp["b2"]}
  batch = {"x": _draw(rng, N, D_IN), "y": jnp.asarray(rng.integers(0, D_OUT, N), jnp.int32)}
  return fp, jp, batch


def _logits(w: jax.Array, b: jax.Array, w2: jax.Array, b2: jax.Array, x: jax.Array,
            e: jax.Array | float = 0.0) -> jax.Array:
  """The model, with an additive perturbation ``e`` of the fused pre-activation."""
  return jnp.tanh(x @ w + b + e) @ w2 + b2


def _fused_loss(p: dict, batch: dict) -> jax.Array:
  w = jnp.concatenate([p["wa"], p["wb"]], axis=1)
  b = jnp.concatenate([p["ba"], p["bb"]])
  return kfl.losses.softmax_cross_entropy(_logits(w, b, p["w2"], p["b2"], batch["x"]),
                                          batch["y"])


def _joined_loss(p: dict, batch: dict) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(
      _logits(p["w"], p["b"], p["w2"], p["b2"], batch["x"]), batch["y"])


def _estimate(loss_fn, params: dict, batch: dict) -> dict:
  return jax.device_get(kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(0),
                                               estimator="exact"))


def test_one_layer_over_the_joined_weight() -> None:
  fp, _, batch = _setup()
  layers = kfl.find_layers(_fused_loss, fp, batch)
  kinds = {l.name: l.kind for l in layers}
  assert kinds == {FUSED: "dense", "['w2']": "dense"}, str(layers)
  fused = next(l for l in layers if l.name == FUSED)
  assert fused.d_in == D_IN + 1 and fused.d_out == D_A + D_B
  leaves = jax.tree_util.tree_flatten_with_path(fp)[0]
  names = [jax.tree_util.keystr(k) for k, _ in leaves]
  assert [names[i] for i in fused.weight_indices] == ["['wa']", "['wb']"]
  assert [names[i] for i in fused.bias_indices] == ["['ba']", "['bb']"]


def test_an_override_on_one_leaf_drops_the_whole_join() -> None:
  fp, _, batch = _setup()
  layers = kfl.find_layers(_fused_loss, fp, batch, layers=kfl.LayerOptions(blocks={"wb": "rms"}))
  notes = {l.name: (l.kind, l.note) for l in layers}
  assert notes["['wb']"] == ("rms", "blocks override: rms")
  assert notes["['wa']"][0] == "rms" and "fused weight" in notes["['wa']"][1]


def test_factors_equal_the_pre_joined_model() -> None:
  fp, jp, batch = _setup()
  got, want = _estimate(_fused_loss, fp, batch), _estimate(_joined_loss, jp, batch)
  for k in ("A", "G"):
    np.testing.assert_allclose(got[FUSED][k], want["['w']"][k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["['w2']"][k], want["['w2']"][k], rtol=1e-6, atol=1e-7)


def _softmax_fisher(z: np.ndarray) -> np.ndarray:
  """``E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T`` of a softmax output."""
  p = np.exp(z - z.max())
  p /= p.sum()
  return np.diag(p) - np.outer(p, p)


def _oracle(fp: dict, batch: dict, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(A, G, F)`` of the fused layer over the first ``n`` cases, in float64.

  ``F`` is the exact Fisher of ``theta = [[wa, wb]; [ba, bb]]`` flattened
  row-major, from the Jacobian of each case's logits w.r.t. the four leaves.
  """
  a_sum, g_sum, f_sum = 0.0, 0.0, 0.0
  for i in range(n):
    x = batch["x"][i]
    out = lambda wa, wb, ba, bb, e, x=x: _logits(
        jnp.concatenate([wa, wb], 1), jnp.concatenate([ba, bb]), fp["w2"], fp["b2"], x, e)
    args = (fp["wa"], fp["wb"], fp["ba"], fp["bb"], jnp.zeros(D_A + D_B))
    ja, jb, jba, jbb, je = (np.asarray(j, np.float64)
                            for j in jax.jacobian(out, argnums=(0, 1, 2, 3, 4))(*args))
    jtheta = np.concatenate([np.concatenate([ja, jb], 2),
                             np.concatenate([jba, jbb], 1)[:, None, :]], 1).reshape(D_OUT, -1)
    fz = _softmax_fisher(np.asarray(out(*args), np.float64))
    a = np.append(np.asarray(x, np.float64), 1.0)
    a_sum = a_sum + np.outer(a, a) / n
    g_sum = g_sum + je.T @ fz @ je / n
    f_sum = f_sum + jtheta.T @ fz @ jtheta / n
  return a_sum, g_sum, f_sum


def test_exact_factors_match_brute_force() -> None:
  fp, _, batch = _setup()
  a, g, _ = _oracle(fp, batch, N)
  got = _estimate(_fused_loss, fp, batch)[FUSED]
  np.testing.assert_allclose(got["A"], a, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["G"], g, rtol=1e-4, atol=1e-6)
  # One case: kron(A, G) is the exact Fisher block, in the joined order.
  one = {k: v[:1] for k, v in batch.items()}
  _, _, f = _oracle(fp, one, 1)
  got = _estimate(_fused_loss, fp, one)[FUSED]
  np.testing.assert_allclose(np.kron(got["A"], got["G"]), f, rtol=1e-4, atol=1e-6)


def _updates(loss_fn, params: dict, batch: dict, steps: int) -> list[dict]:
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, kl_clip=None, momentum=None,
                estimator="exact", stats_every=1, inverse_every=1)
  state, out = tx.init(params), []
  for _ in range(steps):
    u, state = tx.update(jax.grad(loss_fn)(params, batch), state, params, batch=batch)
    params = optax.apply_updates(params, u)
    out.append(jax.device_get(u))
  return out


def test_updates_equal_the_pre_joined_model() -> None:
  fp, jp, batch = _setup()
  for got, want in zip(_updates(_fused_loss, fp, batch, 2), _updates(_joined_loss, jp, batch, 2)):
    np.testing.assert_allclose(np.concatenate([got["wa"], got["wb"]], 1), want["w"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.concatenate([got["ba"], got["bb"]]), want["b"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["w2"], want["w2"], rtol=1e-5, atol=1e-7)


def test_stacked_qkv_equals_the_pre_stacked_model() -> None:
  """``jnp.stack([wq, wk, wv])`` read by one einsum is one layer (d_out 3 D_A)."""
  rng = np.random.default_rng(1)
  sp = {k: _draw(rng, D_IN, D_A) for k in ("wq", "wk", "wv")}
  sp["w2"] = _draw(rng, 3 * D_A, D_OUT)
  jp = {"w": jnp.stack([sp["wq"], sp["wk"], sp["wv"]]), "w2": sp["w2"]}
  _, _, batch = _setup()

  def head(w, w2, x):
    return jnp.tanh(jnp.einsum("bi,kio->bko", x, w)).reshape(x.shape[0], -1) @ w2

  stacked = lambda p, b: kfl.losses.softmax_cross_entropy(
      head(jnp.stack([p["wq"], p["wk"], p["wv"]]), p["w2"], b["x"]), b["y"])
  joined = lambda p, b: kfl.losses.softmax_cross_entropy(head(p["w"], p["w2"], b["x"]), b["y"])
  name = "['wq']+['wk']+['wv']"  # in joining order
  assert {l.name: l.kind for l in kfl.find_layers(stacked, sp, batch)} == {
      name: "dense", "['w2']": "dense"}
  got, want = _updates(stacked, sp, batch, 1)[0], _updates(joined, jp, batch, 1)[0]
  np.testing.assert_allclose(np.stack([got["wq"], got["wk"], got["wv"]]), want["w"],
                             rtol=1e-5, atol=1e-7)


class _LSTMClassifier(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.RNN(nn.OptimizedLSTMCell(6))(x)
    return nn.Dense(3)(h[:, -1])


def test_optimized_lstm_cell_gets_kronecker_blocks() -> None:
  model = _LSTMClassifier()
  rng = np.random.default_rng(2)
  batch = {"x": _draw(rng, 8, 4, 2), "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  loss_fn = lambda p, b: kfl.losses.softmax_cross_entropy(model.apply({"params": p}, b["x"]),
                                                          b["y"])
  layers = kfl.find_layers(loss_fn, params, batch)
  assert [l.kind for l in layers] == ["dense"] * 3, str(layers)
  gates = [l for l in layers if "OptimizedLSTMCell" in l.name]
  assert sorted(len(l.weight_indices) for l in gates) == [4, 4]
  assert sorted(len(l.bias_indices) for l in gates) == [0, 4]  # hidden-to-hidden has biases
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no rms-fallback warning
    tx.init(params)
  before, after = loss_before_and_after(loss_fn, params, batch, tx, 15)
  assert after < 0.7 * before
