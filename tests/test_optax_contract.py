"""``scale_by_kfac`` honours the contract optax asks of optimizers.

``jit`` / ``lax.scan`` without recompilation, the statistics and inverse
schedule, pytree state round trips, extra arguments, dtype preservation,
``tree_map_params``, argument validation, and batches that differ from the
sample batch; the ``kfac`` alias with a schedule, KL clipping and momentum
(model and fixtures: :mod:`_optax_cases`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl
from _optax_cases import (
    BATCH, Batch, D_IN, KFAC_DAMPING, LAYERS, Params, SCHEDULE, Step, Tx, all_finite,
    assert_trees_close, assert_trees_equal, batch, damped_inverses_oracle, grad_jit, grads,
    find_state, kfac_state, loss_fn, loss_jit, make_batch, make_params, make_train_step,
    make_update,
    params, trees_differ)


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
# 1. jit without recompilation; stats / inverse schedule.
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
# 2. State round trip.
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
# 3. optax contract: extra args, scan, dtypes, tree_map_params.
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
  trace = find_state(state, optax.TraceState).trace
  np.testing.assert_allclose(find_state(shifted, optax.TraceState).trace["dense1"]["kernel"],
                             trace["dense1"]["kernel"] + 1.0)


# ----------------------------------------------------------------------------
# 4. Validation.
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
# 5. Batches that differ from sample_batch.
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


def test_kfac_schedule_with_kl_clip_and_momentum_trains(
    kfac_tx: Tx, kfac_step: Step, params: Params, batch: Batch):
  # kfac_tx uses SCHEDULE both for KL clipping and for the final scaling.
  p, state = params, kfac_tx.init(params)
  for _ in range(6):
    p, state, _, _ = kfac_step(p, state, batch)
  assert all_finite(p)
  assert float(loss_jit(p, batch)) < float(loss_jit(params, batch))
  assert int(find_state(state, optax.ScaleByScheduleState).count) == 6  # the schedule's step counter advanced


def test_each_statistics_step_samples_with_the_count_folded_in(params: Params, batch: Batch):
  """A statistics step draws its Monte-Carlo targets with ``fold_in(key(seed),
  count)``: fresh samples every step (same parameters and batch, different
  estimates), and no random-number work on the steps without statistics
  (the state's key is never advanced by ``update``)."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=KFAC_DAMPING, stats_every=1,
                         inverse_every=1 << 20, ema_decay=0.0, estimator="mc", seed=3)
  update = jax.jit(lambda s: tx.update(grad_jit(params, batch), s, params, batch=batch))
  state = tx.init(params)
  seen = []
  for count in range(2):
    state = update(state)[1]
    want = kfl.estimate_curvature(loss_fn, params, batch, estimator="mc",
                                  key=jax.random.fold_in(jax.random.key(3), count))
    got = state.factors
    for name in LAYERS:
      np.testing.assert_allclose(got[name]["G"], want[name]["G"], rtol=1e-5, atol=1e-7)
    seen.append(got[LAYERS[-1]]["G"])
    np.testing.assert_array_equal(state.key, jax.random.key_data(jax.random.key(3)))
  assert np.max(np.abs(np.asarray(seen[0]) - np.asarray(seen[1]))) > 1e-4
