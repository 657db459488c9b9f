"""Bad settings fail loudly, naming the argument; no setting silently freezes training.

Each case here was accepted silently (or failed with an unhelpful message)
before: NaN or numpy-typed zero damping, a zero damping injected by
``optax.inject_hyperparams`` (all updates exactly zero), a negative learning
rate whose sign the KL clip flipped back, a bad regex in ``blocks``, a
``sample_batch`` of the wrong structure, a positional ``batch``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

D_IN, D_OUT, N = 6, 3, 4  # fewer examples than inputs: A is singular


def loss_fn(p: Any, b: Any) -> jax.Array:
  return kfl.losses.softmax_cross_entropy(jnp.tanh(b["x"] @ p["w1"]) @ p["w2"], b["y"])


@pytest.fixture(scope="module")
def problem() -> tuple[Any, Any, Any]:
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(D_IN, 5)) / 3, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(5, D_OUT)) / 3, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, D_OUT, N))}
  return params, batch, jax.grad(loss_fn)(params, batch)


@pytest.mark.parametrize("name, value", [
    ("damping", float("nan")), ("damping", np.float32(0.0)), ("damping", jnp.asarray(0.0)),
    ("damping", np.float64(-1.0)), ("ema_decay", np.float32(1.0)),
    ("ema_decay", float("nan")), ("kl_clip", jnp.asarray(0.0)),
    ("learning_rate", float("nan")), ("inverse_every", np.int32(0)),
    ("damping", jnp.ones(2)), ("damping", "0.1"),
])
def test_bad_concrete_numbers_are_rejected_by_name(problem, name: str, value: Any):
  _, batch, _ = problem
  settings = {"damping": 1e-2, "learning_rate": 0.1, "kl_clip": 1e-3, name: value}
  with pytest.raises(ValueError, match=name):
    kfl.scale_by_kfac(loss_fn, batch, **settings)


@pytest.mark.parametrize("name, value", [("momentum", 1.5), ("weight_decay", -1e-4)])
def test_bad_kfac_alias_numbers_are_rejected_by_name(problem, name: str, value: float):
  _, batch, _ = problem
  with pytest.raises(ValueError, match=name):
    kfl.kfac(loss_fn, batch, 0.1, **{name: value})


@pytest.mark.parametrize("damping", [0.0, float("nan")])
def test_injected_invalid_damping_does_not_freeze_training(problem, damping: float):
  """A traced damping cannot be rejected; it must not zero every update.

  An inverse that is not finite is never committed, so the initial identity
  stays and the step is the gradient (with a NaN damping, exactly); a zero
  damping of these singular factors (fewer examples than inputs) gives a
  finite step either way. Before, the inverses started as zeros: every
  update was exactly zero from then on.
  """
  params, batch, grads = problem
  make = optax.inject_hyperparams(kfl.scale_by_kfac, static_args="loss_fn")
  with pytest.raises(ValueError, match="damping"):  # concrete at init: checked
    make(loss_fn=loss_fn, sample_batch=batch, damping=damping).init(params)
  tx = make(loss_fn=loss_fn, sample_batch=batch, damping=1e-2, estimator="exact")
  state = tx.init(params)
  state.hyperparams["damping"] = jnp.asarray(damping, jnp.float32)  # traced below
  updates, _ = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(grads, state)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert np.all(np.isfinite(u)) and np.abs(u).max() > 0
    if np.isnan(damping):
      np.testing.assert_allclose(u, g, rtol=1e-6)  # the identity "inverses"


def test_negative_learning_rate_has_the_same_sign_with_and_without_kl_clip(problem):
  params, batch, grads = problem

  def update(lr: float, kl_clip: float | None) -> jax.Array:
    tx = kfl.kfac(loss_fn, batch, lr, damping=1e-2, kl_clip=kl_clip, momentum=None)
    u, _ = tx.update(grads, tx.init(params), params, batch=batch)
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(u)])

  clipped, unclipped, positive = update(-0.1, 1e-3), update(-0.1, None), update(0.1, 1e-3)
  assert float(clipped @ unclipped) > 0  # both ascend
  np.testing.assert_allclose(clipped, -positive, rtol=1e-6)


def test_invalid_blocks_regex_names_blocks():
  with pytest.raises(ValueError, match="blocks.*regular expression"):
    kfl.LayerOptions(blocks={"w[": "rms"})


def test_old_diag_block_choice_says_it_is_now_rms():
  with pytest.raises(ValueError, match=r"LayerOptions\.blocks\['w1'\] = 'diag'.*now called 'rms'"):
    kfl.LayerOptions(blocks={"w1": "diag"})


def test_sample_batch_of_the_wrong_structure_is_named(problem):
  params, batch, _ = problem
  tx = kfl.scale_by_kfac(loss_fn, {"inputs": batch["x"], "y": batch["y"]}, damping=1e-2)
  with pytest.raises(KeyError) as info:
    tx.init(params)
  assert any("sample_batch" in note for note in getattr(info.value, "__notes__", []))


def test_positional_batch_says_to_pass_it_by_keyword(problem):
  params, batch, grads = problem
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=1e-2)
  with pytest.raises(TypeError, match="batch=batch"):
    tx.update(grads, tx.init(params), params, batch)


def test_options_must_be_option_values(problem):
  _, batch, _ = problem
  with pytest.raises(ValueError, match="layers must be a kfl.LayerOptions"):
    kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, layers={"max_factor_dim": 8})
  with pytest.raises(ValueError, match="max_factor_dim"):
    kfl.LayerOptions(max_factor_dim=0)
  with pytest.raises(ValueError, match="batch_fraction"):
    kfl.EstimatorOptions(batch_fraction=1.5)
  with pytest.raises(ValueError, match="diagnostics_fraction"):
    kfl.EstimatorOptions(diagnostics=True, diagnostics_fraction=0.0)
  with pytest.raises(ValueError, match="diagnostics=True"):
    kfl.EstimatorOptions(diagnostics_fraction=0.5)
  with pytest.raises(ValueError, match="method"):
    kfl.InverseOptions(method="svd")


def test_inject_hyperparams_needs_no_static_args_for_options(problem):
  """Option values are not numbers: inject_hyperparams leaves them static."""
  params, batch, grads = problem
  make = optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")
  tx = make(loss_fn, batch, 0.1, damping=1e-2,
            layers=kfl.LayerOptions(blocks={"w1": "rms"}),
            estimator=kfl.EstimatorOptions("mc", num_samples=2),
            inverses=kfl.InverseOptions("cholesky"))
  state = tx.init(params)
  assert set(state.hyperparams) >= {"learning_rate", "damping", "kl_clip", "momentum"}
  updates, _ = tx.update(grads, state, params, batch=batch)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_a_fraction_of_a_batch_needs_the_batch_axis_leading():
  """A time-major input beside per-example targets: slicing both leading axes would
  change the traced shapes; the error names the option and the fix."""
  def seq_loss(p, b):
    h = jnp.tanh(jnp.einsum("tbd,dh->tbh", b["x"], p["w"])).mean(0)
    return kfl.losses.softmax_cross_entropy(h, b["y"])

  params = {"w": jnp.ones((2, 3), jnp.float32)}
  batch = {"x": jnp.ones((5, 4, 2), jnp.float32), "y": jnp.zeros((4,), jnp.int32)}
  tx = kfl.kfac(seq_loss, batch, estimator=kfl.EstimatorOptions(batch_fraction=0.5))
  with pytest.raises(ValueError, match=r"EstimatorOptions.batch_fraction=0.5.*batch axis first"):
    tx.update(params, tx.init(params), params, batch=batch)


@pytest.mark.parametrize("noise_scaling", [0.2, None])
def test_update_with_parameters_init_did_not_see_names_the_layers(noise_scaling):
  """Parameters of another structure name other layers than the state's."""
  batch = {"x": jnp.ones((8, 4)), "y": jnp.arange(8) % 3}

  def loss(p, b):
    first, second = sorted(p)
    return kfl.losses.softmax_cross_entropy(jnp.tanh(b["x"] @ p[first]) @ p[second], b["y"])

  at_init = {"a": jnp.full((4, 5), 0.1), "b": jnp.full((5, 3), 0.1)}
  renamed = {"a": at_init["a"], "c": at_init["b"]}
  tx = kfl.kfac(loss, batch, noise_scaling=noise_scaling)
  state = tx.init(at_init)
  with pytest.raises(ValueError, match=r"built for \[\"\['a'\]\", \"\['b'\]\"\]"):
    tx.update(jax.grad(loss)(renamed, batch), state, renamed, batch=batch)


def test_a_loss_with_auxiliary_outputs_is_told_how_to_drop_them():
  batch = {"x": jnp.ones((8, 4)), "y": jnp.arange(8) % 3}
  params = {"w": jnp.full((4, 3), 0.1)}

  def loss_with_aux(p, b):
    logits = b["x"] @ p["w"]
    return kfl.losses.softmax_cross_entropy(logits, b["y"]), logits

  with pytest.raises(ValueError, match=r"loss_fn\(params, batch\)\[0\]"):
    kfl.kfac(loss_with_aux, batch).init(params)
  tx = kfl.kfac(lambda p, b: loss_with_aux(p, b)[0], batch)  # the fix the message names
  tx.init(params)
