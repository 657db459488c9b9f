"""Curvature math of kfac_jax_lite against independent brute-force oracles.

Factors, exact Fisher blocks, estimators (exact, Monte-Carlo, empirical),
preconditioned updates and KL clipping of a tiny MLP, for softmax, sigmoid and
squared-error losses, against the oracle of :mod:`_fisher_oracle`, which
never calls the library.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from _fisher_oracle import (
    BATCH, FLAX_NAMES, LAYERS, LIB_NAMES, LOSSES, Oracle, Params, FlaxMLP, dense_solve,
    flax_to_dict, forward, library_loss, make_batch, make_params, mlp_apply, oracle,
    rel_fro, support_probs, theta, zeros_e)


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params() -> Params:
  return make_params(0)


@functools.lru_cache(maxsize=None)
def _problem(loss: str, n: int) -> tuple[dict[str, jax.Array], Oracle]:
  """A batch of ``n`` cases and its oracle, for the parameters of ``params()``."""
  batch = make_batch(loss, n, seed=1 + LOSSES.index(loss) + 10 * n)
  return batch, oracle(loss, make_params(0), batch["x"], batch["y"])


def _estimate(loss: str, params: Any, batch: dict[str, jax.Array], *,
              estimator: str = "exact", key: int = 0, num_samples: int = 1,
              apply: Callable[[Any, jax.Array], jax.Array] = mlp_apply
              ) -> dict[str, dict[str, np.ndarray]]:
  """One ``kfl.estimate_curvature`` call, as numpy arrays."""
  out = kfl.estimate_curvature(library_loss(loss, apply), params, batch,
                               key=jax.random.key(key),
                               estimator=kfl.EstimatorOptions(kind=estimator, num_samples=num_samples))
  return jax.device_get(out)


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


def test_oracle_self_consistency(params: Params) -> None:
  """The oracle's gradient matches jax.grad of the library loss; supports sum to 1."""
  for loss in LOSSES:
    batch, orc = _problem(loss, BATCH)
    g = jax.grad(library_loss(loss, mlp_apply))(params, batch)
    for l in LAYERS:
      np.testing.assert_allclose(
          orc[l]["grad"], np.asarray(theta(g[l])).reshape(orc[l]["grad"].shape),
          rtol=1e-4, atol=1e-6)
  for loss in ("softmax", "sigmoid"):
    w = support_probs(loss, np.array([0.3, -1.0, 2.0]))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)


def test_layers_found(params: Params) -> None:
  """Both layers are Kronecker blocks, named by their weight paths."""
  batch, _ = _problem("softmax", BATCH)
  layers = kfl.find_layers(library_loss("softmax", mlp_apply), params, batch)
  assert sorted(l.name for l in layers if l.kind == "dense") == sorted(LIB_NAMES.values())


@pytest.mark.parametrize("loss", LOSSES)
def test_exact_factors_match_oracle(loss: str, params: Params) -> None:
  """``estimator="exact"`` gives the true A and G = mean E_y[ds ds^T]."""
  batch, orc = _problem(loss, BATCH)
  est = _estimate(loss, params, batch, estimator="exact")
  assert set(est) == set(LIB_NAMES.values())
  for l in LAYERS:
    f = est[LIB_NAMES[l]]
    np.testing.assert_allclose(f["A"], orc[l]["A"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["G"], orc[l]["G"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_single_example_kron_is_exact_fisher(loss: str, params: Params) -> None:
  """With N = 1, kron(A, G) is the exact Fisher block (last layer and first)."""
  batch, orc = _problem(loss, 1)
  est = _estimate(loss, params, batch, estimator="exact")
  for l in ("l2", "l1"):
    f = est[LIB_NAMES[l]]
    np.testing.assert_allclose(np.kron(f["A"], f["G"]), orc[l]["F"],
                               rtol=1e-4, atol=1e-6)


def test_kron_is_not_exact_for_many_examples(params: Params) -> None:
  """Sanity: the comparison above can fail (K-FAC is approximate for N > 1)."""
  _, orc = _problem("softmax", BATCH)
  a, g, f = orc["l2"]["A"], orc["l2"]["G"], orc["l2"]["F"]
  assert rel_fro(np.kron(a, g), f) > 1e-2


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_matches_true_label_oracle(loss: str, params: Params) -> None:
  """``estimator="empirical"`` uses the true targets: G = mean ds_n ds_n^T."""
  batch, orc = _problem(loss, BATCH)
  est = _estimate(loss, params, batch, estimator="empirical")
  for l in LAYERS:
    f = est[LIB_NAMES[l]]
    np.testing.assert_allclose(f["A"], orc[l]["A"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["G"], orc[l]["G_emp"], rtol=1e-4, atol=1e-6)
  # Single example: kron(A, G_emp) is the exact empirical Fisher block.
  batch1, orc1 = _problem(loss, 1)
  est1 = _estimate(loss, params, batch1, estimator="empirical")
  for l in LAYERS:
    f = est1[LIB_NAMES[l]]
    np.testing.assert_allclose(np.kron(f["A"], f["G"]), orc1[l]["F_emp"],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_mc_converges_to_exact(loss: str, params: Params) -> None:
  """Many Monte-Carlo targets per case approach the exact G (and do sample)."""
  batch, orc = _problem(loss, BATCH)
  est = _estimate(loss, params, batch, estimator="mc", key=0, num_samples=4000)
  other = _estimate(loss, params, batch, estimator="mc", key=1, num_samples=4000)
  for l in LAYERS:
    f = est[LIB_NAMES[l]]
    np.testing.assert_allclose(f["A"], orc[l]["A"], rtol=1e-4, atol=1e-6)
    assert rel_fro(f["G"], orc[l]["G"]) < 0.05
    assert rel_fro(other[LIB_NAMES[l]]["G"], orc[l]["G"]) < 0.05
    # It really samples: another key gives another estimate.
    assert not np.allclose(f["G"], other[LIB_NAMES[l]]["G"], rtol=1e-5, atol=1e-7)


def _kfac_update(loss: str, params: Params, batch: dict[str, jax.Array],
                 orc: Oracle, lam: float, method: str, **kw: Any
                 ) -> tuple[Params, Params, kfl.KfacState]:
  """One ``scale_by_kfac`` update (exact estimator, no averaging) of the true gradient.

  Returns:
    ``(grads, updates, new_state)``; ``grads`` is the oracle's mean gradient
    (float32), the input of the update.
  """
  loss_fn = library_loss(loss, mlp_apply)
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=lam, ema_decay=0.0, inverse_every=1, **kw,
                         estimator="exact", inverses=kfl.InverseOptions(method=method))
  grads = {l: {"w": jnp.asarray(orc[l]["grad"][:-1], jnp.float32),
               "b": jnp.asarray(orc[l]["grad"][-1], jnp.float32)} for l in LAYERS}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, batch=batch)
  return jax.device_get(grads), jax.device_get(updates), jax.device_get(state)


def _oracle_updates(orc: Oracle, grads: Params, lam: float) -> dict[str, np.ndarray]:
  """Dense-solve preconditioned ``[W; b]`` of every layer (float64 oracle factors)."""
  out = {}
  for l in LAYERS:
    mat = np.concatenate([grads[l]["w"], grads[l]["b"][None]], 0).astype(np.float64)
    out[l] = dense_solve(orc[l]["A"], orc[l]["G"], lam, mat)
  return out


def _assert_updates(updates: Params, expected: dict[str, np.ndarray],
                    scale: float = 1.0) -> None:
  for l in LAYERS:
    exp = expected[l] * scale
    tol = 2e-5 * np.abs(exp).max()
    np.testing.assert_allclose(updates[l]["w"], exp[:-1], rtol=1e-3, atol=tol)
    np.testing.assert_allclose(updates[l]["b"], exp[-1], rtol=1e-3, atol=tol)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@pytest.mark.parametrize("loss", LOSSES)
def test_preconditioned_update_matches_dense_solve(loss: str, method: str,
                                                   params: Params) -> None:
  """Each layer's output is ``kron(A + pi sqrt(lam) I, G + sqrt(lam)/pi I)^{-1} g``."""
  lam = 1e-2
  batch, orc = _problem(loss, BATCH)
  grads, updates, state = _kfac_update(loss, params, batch, orc, lam, method)
  for l in LAYERS:  # ema_decay = 0: the state holds this step's estimate.
    np.testing.assert_allclose(state.factors[LIB_NAMES[l]]["A"], orc[l]["A"],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.factors[LIB_NAMES[l]]["G"], orc[l]["G"],
                               rtol=1e-4, atol=1e-6)
  with jax.enable_x64(True):
    expected = _oracle_updates(orc, grads, lam)
  _assert_updates(updates, expected)


@pytest.mark.parametrize("kl_clip,clipped", [(1e-7, True), (1e6, False)])
@pytest.mark.parametrize("loss", LOSSES)
def test_kl_clipping(loss: str, kl_clip: float, clipped: bool,
                     params: Params) -> None:
  """The output is the unclipped update times ``min(1, sqrt(c / v.g) / eta)``."""
  lam, eta = 1e-2, 0.1
  batch, orc = _problem(loss, BATCH)
  grads, updates, _ = _kfac_update(loss, params, batch, orc, lam, "eigh",
                                   kl_clip=kl_clip, learning_rate=eta)
  with jax.enable_x64(True):
    expected = _oracle_updates(orc, grads, lam)
  vg = sum(np.vdot(expected[l][:-1], grads[l]["w"]) +
           np.vdot(expected[l][-1], grads[l]["b"]) for l in LAYERS)
  assert vg > 0
  scale = min(1.0, np.sqrt(kl_clip / vg) / eta)
  if clipped:
    assert scale < 0.1  # the regime really clips
  else:
    assert scale == 1.0
  _assert_updates(updates, expected, scale)


@pytest.mark.parametrize("loss", LOSSES)
def test_flax_dense_mlp_exact_factors(loss: str) -> None:
  """The same oracle holds for a ``flax.linen.Dense`` MLP (kernel, bias)."""
  model = FlaxMLP()
  batch = make_batch(loss, BATCH, seed=123)
  shapes = jax.eval_shape(model.init, jax.random.key(7), batch["x"])["params"]
  rng = np.random.default_rng(7)
  fparams = jax.tree.map(lambda s: jnp.asarray(
      0.8 * rng.standard_normal(s.shape), jnp.float32), shapes)
  dparams = flax_to_dict(fparams)
  # The flax model and the oracle's forward compute the same function.
  z = jax.vmap(lambda x: forward(dparams, x, *zeros_e())[0])(batch["x"])
  np.testing.assert_allclose(model.apply({"params": fparams}, batch["x"]), z,
                             rtol=1e-5, atol=1e-6)
  orc = oracle(loss, dparams, batch["x"], batch["y"])
  est = _estimate(loss, fparams, batch, estimator="exact",
                  apply=lambda p, x: model.apply({"params": p}, x))
  assert set(est) == set(FLAX_NAMES.values())
  for l in LAYERS:
    f = est[FLAX_NAMES[l]]
    np.testing.assert_allclose(f["A"], orc[l]["A"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f["G"], orc[l]["G"], rtol=1e-4, atol=1e-6)
