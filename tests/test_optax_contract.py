"""``scale_by_kfac`` / ``kfac`` honour the contract optax asks of optimizers.

Composition with other transforms, ``inject_hyperparams``, ``masked``,
``apply_if_finite``, ``jit`` / ``lax.scan`` without recompilation, pytree
state round trips, dtype preservation, ``tree_map_params``, argument
validation and learning-rate schedules. A tiny plain-JAX MLP (4 -> 8 -> 3,
batch 8, softmax cross-entropy) keeps everything fast.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

Params = dict[str, dict[str, jax.Array]]
Batch = dict[str, jax.Array]
Tx = optax.GradientTransformationExtraArgs
Step = Callable[..., Any]

D_IN, D_HIDDEN, D_OUT, BATCH = 4, 8, 3, 8
LAYERS = ("['dense1']['kernel']", "['dense2']['kernel']")


# ----------------------------------------------------------------------------
# Model, data and shared helpers.
# ----------------------------------------------------------------------------


def mlp(params: Params, x: jax.Array) -> jax.Array:
  """Two dense layers with a tanh in between (``x @ kernel + bias``)."""
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  return h @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def loss_fn(params: Params, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy of the MLP."""
  return kfl.losses.softmax_cross_entropy(mlp(params, batch["x"]), batch["y"])


def make_params(seed: int = 0, dtype: Any = jnp.float32) -> Params:
  """Random MLP parameters (non-zero biases, so that biases matter)."""
  rng = np.random.default_rng(seed)
  params = {
      "dense1": {"kernel": rng.normal(size=(D_IN, D_HIDDEN)) * 0.7,
                 "bias": rng.normal(size=(D_HIDDEN,)) * 0.1},
      "dense2": {"kernel": rng.normal(size=(D_HIDDEN, D_OUT)) * 0.7,
                 "bias": rng.normal(size=(D_OUT,)) * 0.1},
  }
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)


def make_batch(seed: int = 1, n: int = BATCH, d_in: int = D_IN,
               dtype: Any = jnp.float32) -> Batch:
  """A random classification batch with integer labels."""
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, d_in)), dtype),
          "y": jnp.asarray(rng.integers(0, D_OUT, size=(n,)), jnp.int32)}


loss_jit = jax.jit(loss_fn)
grad_jit = jax.jit(jax.grad(loss_fn))


def kfac_state(state: Any) -> kfl.KfacState:
  """The first :class:`kfl.KfacState` found in an (optax-wrapped) state."""
  found = [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda s: isinstance(s, kfl.KfacState))
           if isinstance(s, kfl.KfacState)]
  assert len(found) == 1, f"expected one KfacState in {state}"
  return found[0]


def assert_trees_equal(a: Any, b: Any) -> None:
  """Same structure and bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-5,
                       atol: float = 1e-6) -> None:
  """Same structure and numerically close leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


def trees_differ(a: Any, b: Any) -> bool:
  """Whether any pair of leaves differs."""
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_finite(tree: Any) -> bool:
  """Whether every floating leaf is finite."""
  return all(np.all(np.isfinite(np.asarray(x, np.float64)))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.floating))


def damped_inverses_oracle(a: np.ndarray, g: np.ndarray,
                           damping: float) -> tuple[np.ndarray, np.ndarray]:
  """Factored-Tikhonov inverses (Ba et al. eq. 3), numpy float64."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  root = np.sqrt(damping)
  return (np.linalg.inv(a + pi * root * np.eye(a.shape[0])),
          np.linalg.inv(g + root / pi * np.eye(g.shape[0])))


def kfac_direction_oracle(factors: dict[str, dict[str, jax.Array]],
                          grads: Params, *, damping: float,
                          kl_clip: float | None = None,
                          learning_rate: float | None = None) -> Params:
  """KL-clipped ``A^-1 [gW; gb] G^-1`` for the MLP, numpy float64."""
  out, vg = {}, 0.0
  for name in grads:
    f = factors[f"['{name}']['kernel']"]
    a_inv, g_inv = damped_inverses_oracle(f["A"], f["G"], damping)
    gw = np.asarray(grads[name]["kernel"], np.float64)
    gb = np.asarray(grads[name]["bias"], np.float64)
    pre = a_inv @ np.concatenate([gw, gb[None]], axis=0) @ g_inv
    out[name] = {"kernel": pre[:-1], "bias": pre[-1]}
    vg += np.sum(pre[:-1] * gw) + np.sum(pre[-1] * gb)
  scale = 1.0
  if kl_clip is not None and vg > 0:
    scale = min(1.0, np.sqrt(kl_clip / vg) / learning_rate)
  return jax.tree.map(lambda x: x * scale, out)


def make_train_step(tx: Tx) -> Step:
  """Jitted ``(params, state, batch) -> (params, state, loss, updates)``."""

  @jax.jit
  def step(params: Params, state: Any,
           batch: Batch) -> tuple[Params, Any, jax.Array, Params]:
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss, updates

  return step


def make_update(tx: Tx) -> Step:
  """Jitted ``(grads, state, params, batch) -> (updates, state)``."""
  return jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))


@pytest.fixture(scope="module")
def params() -> Params:
  return make_params()


@pytest.fixture(scope="module")
def batch() -> Batch:
  return make_batch()


@pytest.fixture(scope="module")
def grads(params: Params, batch: Batch) -> Params:
  return grad_jit(params, batch)


SCHEDULE = optax.linear_schedule(0.1, 0.02, transition_steps=10)
KFAC_DAMPING = 1e-2


@pytest.fixture(scope="module")
def kfac_tx(batch: Batch) -> Tx:
  """The ready-made optimizer shared by the jit / schedule / scan / round-trip
  tests: a learning-rate schedule, KL clipping, momentum, and statistics /
  inverses on different periods."""
  return kfl.kfac(loss_fn, batch, learning_rate=SCHEDULE, damping=KFAC_DAMPING,
                  kl_clip=1e-2, stats_every=2, inverse_every=3, ema_decay=0.5)


@pytest.fixture(scope="module")
def kfac_step(kfac_tx: Tx) -> Step:
  return make_train_step(kfac_tx)


# ----------------------------------------------------------------------------
# 1. Composition with optax.chain.
# ----------------------------------------------------------------------------


def test_chain_with_clipping_and_learning_rate_trains(params: Params, batch: Batch):
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, kl_clip=1e-2,
                        learning_rate=0.1, inverse_every=5),
      optax.scale_by_learning_rate(0.1))
  step = make_train_step(tx)
  p, state = params, tx.init(params)
  losses = []
  for _ in range(20):
    p, state, loss, _ = step(p, state, batch)
    losses.append(float(loss))
  final = float(loss_jit(p, batch))
  assert all(np.isfinite(losses)) and np.isfinite(final)
  assert final < 0.9 * losses[0], losses + [final]
  assert int(kfac_state(state).count) == 20
  assert step._cache_size() == 1


# ----------------------------------------------------------------------------
# 2. optax.inject_hyperparams.
# ----------------------------------------------------------------------------


def test_inject_hyperparams_damping_changes_without_recompiling(
    params: Params, batch: Batch, grads: Params):
  make = optax.inject_hyperparams(kfl.scale_by_kfac,
                                  static_args="loss_fn")
  tx = make(loss_fn=loss_fn, sample_batch=batch, damping=1e-2,
            learning_rate=0.1, kl_clip=1e-2, inverse_every=1)
  update = make_update(tx)
  s0 = tx.init(params)
  assert set(s0.hyperparams) >= {"damping", "learning_rate", "kl_clip"}
  _, s1 = update(grads, s0, params, batch)

  u_small, _ = update(grads, s1, params, batch)
  hp = dict(s1.hyperparams)
  hp["damping"] = jnp.full_like(hp["damping"], 1.0)
  u_large, s2 = update(grads, s1._replace(hyperparams=hp), params, batch)
  assert update._cache_size() == 1
  assert all_finite(u_small) and all_finite(u_large)
  assert trees_differ(u_small, u_large)
  np.testing.assert_allclose(float(s2.hyperparams["damping"]), 1.0)

  # Oracle (numpy, float64): the K-FAC direction with damping 1 from the
  # factors the update used (inverse_every=1 recomputes the inverses).
  expected = kfac_direction_oracle(kfac_state(s2).factors, grads, damping=1.0,
                                   kl_clip=1e-2, learning_rate=0.1)
  assert_trees_close(u_large, expected, rtol=2e-3, atol=1e-6)


def test_inject_hyperparams_around_the_kfac_alias(params: Params, batch: Batch,
                                                  grads: Params):
  """The ready optimizer too: its learning rate becomes a state hyperparameter."""
  make = optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")
  tx = make(loss_fn, batch, learning_rate=0.1, damping=1e-2, inverse_every=1)
  update = make_update(tx)
  s0 = tx.init(params)
  u1, s1 = update(grads, s0, params, batch)
  hp = dict(s1.hyperparams)
  hp["learning_rate"] = jnp.full_like(hp["learning_rate"], 0.0)
  u2, _ = update(grads, s1._replace(hyperparams=hp), params, batch)
  assert update._cache_size() == 1
  assert all_finite(u1) and trees_differ(u1, jax.tree.map(jnp.zeros_like, u1))
  # A zero learning rate gives a zero step (momentum is scaled by it too).
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u2))


# ----------------------------------------------------------------------------
# 3. optax.masked.
# ----------------------------------------------------------------------------


def test_masked_without_the_full_parameters_is_a_clear_error(params: Params, batch: Batch,
                                                            grads: Params):
  """K-FAC runs the model on every parameter, which optax.masked hides."""
  mask = {name: {"kernel": True, "bias": False} for name in params}
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, damping=1e-2), mask)
  with pytest.raises(ValueError, match="sample_params"):
    tx.init(params)
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, sample_params=params), mask)
  with pytest.raises(ValueError, match="kfac_params"):
    tx.update(grads, tx.init(params), params, batch=batch)


def test_masked_excluding_biases(params: Params, batch: Batch, grads: Params):
  """Inside optax.masked: kernels preconditioned, masked-out biases untouched.

  Reference: K-FAC on all parameters with the bias gradients set to zero (the
  documented meaning of a masked-out bias in a Kronecker block).
  """
  mask = {name: {"kernel": True, "bias": False} for name in params}
  kw = dict(damping=1e-2, estimator="exact", ema_decay=0.0, inverse_every=1)
  tx = optax.masked(kfl.scale_by_kfac(loss_fn, batch, sample_params=params, **kw), mask)
  update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b, kfac_params=p))
  updates, _ = update(grads, tx.init(params), params, batch)
  ref = kfl.scale_by_kfac(loss_fn, batch, **kw)
  zero_bias = {n: {"kernel": g["kernel"], "bias": jnp.zeros_like(g["bias"])}
               for n, g in grads.items()}
  want, _ = make_update(ref)(zero_bias, ref.init(params), params, batch)
  for name in params:
    np.testing.assert_array_equal(updates[name]["bias"], grads[name]["bias"])
    np.testing.assert_allclose(updates[name]["kernel"], want[name]["kernel"],
                               rtol=1e-4, atol=1e-6)
    assert not np.allclose(updates[name]["kernel"], grads[name]["kernel"])


def test_blocks_none_excludes_biases_as_masked_would(params: Params, batch: Batch,
                                                     grads: Params):
  """The supported alternative to masking: biases left unpreconditioned."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=1e-2,
                         layers=kfl.LayerOptions(blocks={"bias": "none"}))
  updates, _ = make_update(tx)(grads, tx.init(params), params, batch)
  for name in params:
    np.testing.assert_array_equal(updates[name]["bias"], grads[name]["bias"])
    assert np.all(np.isfinite(updates[name]["kernel"]))
    assert not np.allclose(updates[name]["kernel"], grads[name]["kernel"])


# ----------------------------------------------------------------------------
# 4. optax.apply_if_finite.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finite_tx(batch: Batch) -> Tx:
  return optax.apply_if_finite(
      kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, kl_clip=1e-2,
               inverse_every=1), max_consecutive_errors=5)


@pytest.fixture(scope="module")
def finite_step(finite_tx: Tx) -> Step:

  @jax.jit
  def step(params: Params, state: Any, grads: Params,
           batch: Batch) -> tuple[Params, Any]:
    updates, state = finite_tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def test_apply_if_finite_rejects_nan_gradient(
    finite_tx: Tx, finite_step: Step, params: Params, batch: Batch, grads: Params):
  p1, s1 = finite_step(params, finite_tx.init(params), grads, batch)
  assert trees_differ(p1, params)
  g1 = grad_jit(p1, batch)
  bad = jax.tree.map(lambda g: g, g1)
  kernel = np.array(g1["dense1"]["kernel"])
  kernel[0, 0] = np.nan
  bad["dense1"]["kernel"] = jnp.asarray(kernel)

  p2, s2 = finite_step(p1, s1, bad, batch)
  assert_trees_equal(p2, p1)
  assert_trees_equal(s2.inner_state, s1.inner_state)
  assert_trees_equal(kfac_state(s2).factors, kfac_state(s1).factors)
  assert all_finite(kfac_state(s2).factors)
  assert int(s2.notfinite_count) == 1 and not bool(s2.last_finite)

  # The next finite step proceeds as if the NaN step never happened.
  p3, s3 = finite_step(p2, s2, g1, batch)
  p3_ref, s3_ref = finite_step(p1, s1, g1, batch)
  assert trees_differ(p3, p1) and all_finite(p3)
  assert_trees_equal(p3, p3_ref)
  assert_trees_equal(s3.inner_state, s3_ref.inner_state)
  assert int(s3.notfinite_count) == 0
  assert int(kfac_state(s3).count) == 2
  assert finite_step._cache_size() == 1


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_statistics_are_not_committed(
    finite_tx: Tx, finite_step: Step, params: Params, batch: Batch, grads: Params,
    bad_value: float):
  p1, s1 = finite_step(params, finite_tx.init(params), grads, batch)
  before = kfac_state(s1)
  assert all_finite(before.factors) and int(before.stats_count) == 1

  x = np.array(batch["x"])
  x[2, 1] = bad_value
  bad_batch = {"x": jnp.asarray(x), "y": batch["y"]}
  zeros = jax.tree.map(lambda g: jnp.asarray(np.zeros(g.shape, g.dtype)), grads)
  p2, s2 = finite_step(p1, s1, zeros, bad_batch)
  after = kfac_state(s2)
  assert int(after.count) == 2  # the inner update did run
  assert_trees_equal(after.factors, before.factors)
  assert int(after.stats_count) == int(before.stats_count)
  assert all_finite(after.inverses)
  assert all_finite(p2)
  assert finite_step._cache_size() == 1


# ----------------------------------------------------------------------------
# 5. jit without recompilation; stats / inverse schedule.
# ----------------------------------------------------------------------------


def test_jitted_step_compiles_once(kfac_tx: Tx, kfac_step: Step, params: Params,
                                   batch: Batch):
  p, state, _, _ = kfac_step(params, kfac_tx.init(params), batch)
  # kfac_step's cache is shared by the tests using it: 1 in file order, more
  # if a test with another batch shape ran first. No call may add an entry.
  compiled = kfac_step._cache_size()
  for _ in range(3):
    p, state, _, _ = kfac_step(p, state, batch)
  assert kfac_step._cache_size() == compiled
  assert int(kfac_state(state).count) == 4
  assert all_finite(p)


def test_stats_and_inverse_schedule(kfac_tx: Tx, kfac_step: Step, params: Params,
                                    batch: Batch):
  # kfac_tx: stats_every=2, inverse_every=3.
  p, state = params, kfac_tx.init(params)
  stats_counts, factor_changed, inverse_changed = [], [], []
  compiled = kfac_step._cache_size() or 1
  for t in range(7):
    p, new, _, _ = kfac_step(p, state, batch)
    old_k, new_k = kfac_state(state), kfac_state(new)
    stats_counts.append(int(new_k.stats_count))
    factor_changed.append(trees_differ(new_k.factors, old_k.factors))
    inverse_changed.append(trees_differ(new_k.inverses, old_k.inverses))
    if t == 3:  # inverses recomputed from the factors estimated at step 2
      for name in LAYERS:
        a_inv, g_inv = damped_inverses_oracle(
            new_k.factors[name]["A"], new_k.factors[name]["G"], KFAC_DAMPING)
        np.testing.assert_allclose(new_k.inverses[name]["A"], a_inv,
                                   rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(new_k.inverses[name]["G"], g_inv,
                                   rtol=2e-3, atol=1e-3)
    state = new
  assert kfac_step._cache_size() == compiled
  assert stats_counts == [1, 1, 2, 2, 3, 3, 4]
  assert factor_changed == [t % 2 == 0 for t in range(7)]
  assert inverse_changed == [t % 3 == 0 for t in range(7)]
  assert int(kfac_state(state).count) == 7


# ----------------------------------------------------------------------------
# 6. State round trip.
# ----------------------------------------------------------------------------


def test_state_round_trip_and_numpy_checkpoint(
    kfac_tx: Tx, kfac_step: Step, params: Params, batch: Batch, tmp_path: Any):
  p, state = params, kfac_tx.init(params)
  for _ in range(2):
    p, state, _, _ = kfac_step(p, state, batch)

  leaves, treedef = jax.tree_util.tree_flatten(state)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert_trees_equal(rebuilt, state)
  assert isinstance(kfac_state(rebuilt), kfl.KfacState)

  path = tmp_path / "kfac_state.npz"
  np.savez(path, *[np.asarray(x) for x in leaves])
  with np.load(path) as data:
    loaded = [data[f"arr_{i}"] for i in range(len(leaves))]
  restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in loaded])
  assert_trees_equal(restored, state)

  def run(s: Any) -> tuple[Params, Any]:
    q = p
    for _ in range(3):
      q, s, _, _ = kfac_step(q, s, batch)
    return q, s

  p_ref, s_ref = run(state)
  for other in (rebuilt, restored):
    p_other, s_other = run(other)
    assert_trees_equal(p_other, p_ref)
    assert_trees_equal(s_other, s_ref)


# ----------------------------------------------------------------------------
# 7. optax contract: extra args, scan, dtypes, tree_map_params.
# ----------------------------------------------------------------------------


def test_unknown_extra_args_are_ignored(kfac_tx: Tx, params: Params, batch: Batch,
                                        grads: Params):
  # Ignoring an argument means tracing the very same computation.
  alone = kfl.scale_by_kfac(loss_fn, batch, damping=1e-2)
  for tx in (alone, kfac_tx):
    state = tx.init(params)
    ref = jax.make_jaxpr(lambda g, s: tx.update(g, s, params, batch=batch))(
        grads, state)
    extra = jax.make_jaxpr(lambda g, s: tx.update(
        g, s, params, batch=batch, foo=1, bar="x"))(grads, state)
    assert str(extra) == str(ref)
    assert jax.tree.structure(extra.out_avals) == jax.tree.structure(ref.out_avals)


def test_scan_matches_python_loop(kfac_tx: Tx, kfac_step: Step, params: Params):
  batches = [make_batch(seed=10 + i) for i in range(4)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)

  @jax.jit
  def scanned(p: Params, s: Any, bs: Batch) -> tuple[Params, Any, jax.Array]:
    def body(carry, b):
      q, st = carry
      loss, g = jax.value_and_grad(loss_fn)(q, b)
      u, st = kfac_tx.update(g, st, q, batch=b)
      return (optax.apply_updates(q, u), st), loss
    (p, s), losses = jax.lax.scan(body, (p, s), bs)
    return p, s, losses

  p_scan, s_scan, losses_scan = scanned(params, kfac_tx.init(params), stacked)
  p, s, losses = params, kfac_tx.init(params), []
  for b in batches:
    p, s, loss, _ = kfac_step(p, s, b)
    losses.append(loss)
  assert trees_differ(p, params)
  assert_trees_close(p_scan, p)
  assert_trees_close(kfac_state(s_scan).factors, kfac_state(s).factors)
  np.testing.assert_allclose(losses_scan, np.stack(losses), rtol=1e-5)
  assert int(kfac_state(s_scan).count) == 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved(dtype: Any):
  p = make_params(dtype=dtype)
  b = make_batch(dtype=dtype)  # the model runs in `dtype`
  g = grad_jit(p, b)
  assert all(x.dtype == dtype for x in jax.tree.leaves(g))
  alone = kfl.scale_by_kfac(loss_fn, b, damping=1e-2, kl_clip=1e-2,
                            learning_rate=0.1, inverse_every=1)
  chained = kfl.kfac(loss_fn, b, learning_rate=0.1, damping=1e-2)

  def check(u: Any, state: Any) -> None:
    assert jax.tree.structure(u) == jax.tree.structure(p)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(p)):
      assert x.dtype == y.dtype and x.shape == y.shape
    ks = kfac_state(state)
    for tree in (ks.factors, ks.inverses):
      assert set(tree) == set(LAYERS)
      assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))

  for tx in (alone, chained):
    check(*jax.eval_shape(lambda s, tx=tx: tx.update(g, s, p, batch=b), tx.init(p)))

  if dtype == jnp.bfloat16:  # run it: a bf16 model gives finite float32 factors
    u, state = make_update(chained)(g, chained.init(p), p, b)
    check(u, state)
    assert all_finite(u)
    assert any(np.any(np.asarray(x, np.float32) != 0) for x in jax.tree.leaves(u))
    assert all_finite(kfac_state(state).factors)
    assert int(kfac_state(state).stats_count) == 1
    assert all(x.dtype == dtype for x in jax.tree.leaves(optax.apply_updates(p, u)))


def test_tree_map_params(kfac_tx: Tx, kfac_step: Step, params: Params, batch: Batch):
  map_params = getattr(getattr(optax, "tree", None), "map_params", None)
  if map_params is None:
    map_params = optax.tree_utils.tree_map_params
  _, state, _, _ = kfac_step(params, kfac_tx.init(params), batch)
  same = map_params(kfac_tx, lambda x: x, state)
  assert_trees_equal(same, state)

  shifted = map_params(kfac_tx, lambda x: x + 1.0, state)
  assert jax.tree.structure(shifted) == jax.tree.structure(state)
  # K-FAC's layer-keyed factors are not parameter-shaped: left alone.
  assert_trees_equal(kfac_state(shifted).factors, kfac_state(state).factors)
  assert_trees_equal(kfac_state(shifted).inverses, kfac_state(state).inverses)
  # The momentum trace is parameter-shaped: mapped.
  trace = state[-2].trace
  np.testing.assert_allclose(shifted[-2].trace["dense1"]["kernel"],
                             trace["dense1"]["kernel"] + 1.0)


# ----------------------------------------------------------------------------
# 8. Validation.
# ----------------------------------------------------------------------------


def test_update_needs_batch_and_params(params: Params, batch: Batch, grads: Params):
  for tx in (kfl.scale_by_kfac(loss_fn, batch, damping=1e-2),
             kfl.kfac(loss_fn, batch, learning_rate=0.1)):
    state = tx.init(params)
    with pytest.raises(ValueError, match="batch"):
      tx.update(grads, state, params)
    with pytest.raises(ValueError, match="params"):
      tx.update(grads, state, batch=batch)
    with pytest.raises(ValueError):
      tx.update(grads, state, None, batch=batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": 0.0}, "damping"),
    ({"damping": -1e-3}, "damping"),
    ({"inverse_every": 0}, "inverse_every"),
    ({"stats_every": 0}, "stats_every"),
    ({"kl_clip": 1e-3}, "learning_rate"),
    ({"estimator": "fisher"}, "estimator"),
    ({"inverses": "svd"}, "inverses"),
    ({"ema_decay": 1.0}, "ema_decay"),
])
def test_invalid_settings_raise(batch: Batch, kwargs: dict[str, Any], match: str):
  settings = {"damping": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=match):
    kfl.scale_by_kfac(loss_fn, batch, **settings)


# ----------------------------------------------------------------------------
# 9. Batches that differ from sample_batch.
# ----------------------------------------------------------------------------


def test_other_batch_size_retraces_and_works(kfac_tx: Tx, kfac_step: Step,
                                             params: Params, batch: Batch):
  big = make_batch(seed=5, n=2 * BATCH)
  p, state, _, _ = kfac_step(params, kfac_tx.init(params), batch)
  compiled = kfac_step._cache_size()
  p, state, _, _ = kfac_step(p, state, big)
  assert kfac_step._cache_size() == compiled + 1  # re-traced once for 16
  assert all_finite(p) and int(kfac_state(state).stats_count) == 1
  p, state, _, _ = kfac_step(p, state, big)  # step 2 estimates on 16 cases
  p, state, _, _ = kfac_step(p, state, batch)
  assert kfac_step._cache_size() == compiled + 1
  assert all_finite(p) and int(kfac_state(state).stats_count) == 2

  # A first step on the big batch takes its estimate as is: A = mean a a^T.
  _, fresh, _, _ = kfac_step(params, kfac_tx.init(params), big)
  x = np.asarray(big["x"], np.float64)
  a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  np.testing.assert_allclose(kfac_state(fresh).factors[LAYERS[0]]["A"],
                             a.T @ a / a.shape[0], rtol=1e-5, atol=1e-6)


def test_other_feature_dimension_fails(params: Params, batch: Batch, grads: Params):
  # The plain MLP cannot run on 5 features: the model's own error (a
  # TypeError from jax's dot_general shape check) propagates while K-FAC
  # traces the loss; the library adds no ValueError of its own here.
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=1e-2)
  state = tx.init(params)
  wide = make_batch(d_in=D_IN + 1)
  with pytest.raises(TypeError):
    tx.update(grads, state, params, batch=wide)


def test_batch_that_changes_layers_raises_value_error(params: Params, batch: Batch,
                                                      grads: Params):

  def sliced_loss(p: Params, b: Batch) -> jax.Array:
    # Accepts up to D_IN features by slicing the kernel: with fewer features
    # dense1 is no longer a plain dense layer.
    kernel = p["dense1"]["kernel"][: b["x"].shape[-1]]
    h = jnp.tanh(b["x"] @ kernel + p["dense1"]["bias"])
    logits = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
    return kfl.losses.softmax_cross_entropy(logits, b["y"])

  tx = kfl.scale_by_kfac(loss_fn=sliced_loss, sample_batch=batch, damping=1e-2)
  state = tx.init(params)
  narrow = {"x": batch["x"][:, :D_IN - 1], "y": batch["y"]}
  with pytest.raises(ValueError, match="changes the layers"):
    tx.update(grads, state, params, batch=narrow)
  with pytest.raises(ValueError, match="tree structure"):
    tx.update(grads, state, params, batch={**batch, "extra": batch["y"]})


# ----------------------------------------------------------------------------
# 10. kfac: schedules, momentum=None, weight decay.
# ----------------------------------------------------------------------------


def test_kfac_schedule_momentum_none_weight_decay(params: Params, batch: Batch):
  schedule = optax.linear_schedule(0.2, 0.05, transition_steps=4)
  damping, kl_clip, wd = 1e-2, 1e-3, 0.3
  tx = kfl.kfac(loss_fn, batch, learning_rate=schedule, damping=damping,
                kl_clip=kl_clip, momentum=None, weight_decay=wd,
                inverse_every=1, ema_decay=0.0)
  assert not [s for s in tx.init(params) if isinstance(s, optax.TraceState)]
  assert len([s for s in kfl.kfac(loss_fn, batch, learning_rate=0.1).init(params)
              if isinstance(s, optax.TraceState)]) == 1
  update = make_update(tx)
  p, state, clipped = params, tx.init(params), []
  for t in range(3):
    g = grad_jit(p, batch)
    u, state = update(g, state, p, batch)
    # Oracle: with momentum=None, u = -lr_t * (clip_t * K-FAC direction + wd p),
    # the clip computed with the schedule's lr_t (Ba et al. eq. 14).
    lr = float(schedule(t))
    factors = kfac_state(state).factors
    raw = kfac_direction_oracle(factors, g, damping=damping)
    direction = kfac_direction_oracle(factors, g, damping=damping,
                                      kl_clip=kl_clip, learning_rate=lr)
    clipped.append(not np.allclose(raw["dense1"]["kernel"],
                                   direction["dense1"]["kernel"]))
    expected = jax.tree.map(lambda d, x: -lr * (d + wd * np.asarray(x, np.float64)),
                            direction, p)
    assert_trees_close(u, expected, rtol=2e-3, atol=1e-6)
    without_decay = jax.tree.map(lambda d: -lr * d, direction)
    assert not np.allclose(u["dense2"]["kernel"], without_decay["dense2"]["kernel"])
    p = optax.apply_updates(p, u)
  assert any(clipped), "KL clipping never active: the test would not check it"
  assert update._cache_size() == 1
  assert float(loss_jit(p, batch)) < float(loss_jit(params, batch))


def test_kfac_schedule_with_kl_clip_and_momentum_trains(
    kfac_tx: Tx, kfac_step: Step, params: Params, batch: Batch):
  # kfac_tx uses SCHEDULE both for KL clipping and for the final scaling.
  p, state = params, kfac_tx.init(params)
  for _ in range(6):
    p, state, _, _ = kfac_step(p, state, batch)
  assert all_finite(p)
  assert float(loss_jit(p, batch)) < float(loss_jit(params, batch))
  assert int(state[-1].count) == 6  # the schedule's step counter advanced
