"""Relative damping (``InverseOptions(relative_damping=True)``) against its
definition, and the invariances it and the KL clip are for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.curvature import specs

LAM = 0.01


def _spd(rng: np.random.Generator, d: int, scale: float) -> jax.Array:
  m = rng.normal(size=(d, d))
  return jnp.asarray(scale * (m @ m.T / d + 0.1 * np.eye(d)), jnp.float32)


def _mean_diag(m) -> float:
  m = np.asarray(m)
  return float(np.mean(np.diagonal(m) if m.ndim == 2 else m))


def test_kronecker_shifts_are_the_root_of_lambda_times_each_mean_eigenvalue():
  """``λ^{1/k} tr A_i / dim A_i`` per factor (k = 2 and the doubly-factored
  k = 3 with its bias block), and equal to the absolute damping
  ``λ prod_j tr A_j / dim A_j``."""
  rng = np.random.default_rng(0)
  two = specs.Kronecker((("A", (4, 4)), ("G", (3,))))
  factors = {"A": _spd(rng, 4, 50.0), "G": jnp.asarray([1e-3, 2e-3, 4e-3], jnp.float32)}
  got = two.shifts(factors, LAM, relative=True)
  for k in ("A", "G"):
    np.testing.assert_allclose(got[k], np.sqrt(LAM) * _mean_diag(factors[k]), rtol=1e-6)
  absolute = two.shifts(factors, LAM * _mean_diag(factors["A"]) * _mean_diag(factors["G"]))
  for k in ("A", "G"):
    np.testing.assert_allclose(got[k], absolute[k], rtol=1e-5)

  three = specs.Kronecker((("K", (2, 2)), ("Psi", (3, 3)), ("G", (2, 2))), (2, 2))
  factors = {"K": _spd(rng, 2, 3.0), "Psi": _spd(rng, 3, 0.2), "G": _spd(rng, 2, 1e-2),
             "B": _spd(rng, 2, 7.0)}
  got = three.shifts(factors, LAM, relative=True)
  for k in ("K", "Psi", "G"):
    np.testing.assert_allclose(got[k], LAM ** (1 / 3) * _mean_diag(factors[k]), rtol=1e-5)
  np.testing.assert_allclose(got["B"], LAM * _mean_diag(factors["B"]), rtol=1e-6)
  assert float(three.shifts(factors, LAM)["B"]) == pytest.approx(LAM)


def test_diagonal_and_full_blocks_shift_by_lambda_times_their_mean_diagonal():
  rng = np.random.default_rng(1)
  fisher = jnp.asarray(rng.uniform(0.0, 5.0, size=(3, 3)), jnp.float32)  # entries, not a matrix
  got = specs.DiagonalFisher((3, 3)).inverses({"F": fisher}, LAM, "eigh", relative=True)
  np.testing.assert_allclose(got["F"], 1.0 / (np.asarray(fisher) + LAM * np.mean(fisher)),
                             rtol=1e-6)
  full = _spd(rng, 6, 4.0)
  got = specs.Full(6).inverses({"full": full}, LAM, "eigh", relative=True)
  want = np.linalg.inv(np.asarray(full, np.float64) + LAM * _mean_diag(full) * np.eye(6))
  np.testing.assert_allclose(got["full"], want, rtol=1e-3, atol=1e-5)


def _loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w"])
  return kfl.losses.softmax_cross_entropy(hidden @ params["v"], batch["y"])


def _problem():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(5, 6)) * 0.5, jnp.float32),
            "v": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, 16))}
  return params, batch


def _direction(params, batch, inverses: kfl.InverseOptions, damping: float = LAM):
  tx = kfl.scale_by_kfac(_loss, batch, damping=damping, estimator="exact", stats_every=1,
                         inverse_every=1, inverses=inverses)
  out, _ = tx.update(jax.grad(_loss)(params, batch), tx.init(params), params, batch=batch)
  return out


@pytest.mark.parametrize("method", ["eigh", "ekfac"])
def test_relative_damping_gives_the_same_step_for_rescaled_inputs(method):
  """Inputs ``c x`` with weights ``w / c`` are the same function; its first
  layer's ``A`` is ``c² A``, its gradient ``c ∇w``. With relative damping
  the step is ``u / c`` (the same in function space) and the next layer's is
  unchanged; with absolute damping it is not."""
  params, batch = _problem()
  c = 30.0
  scaled_params = {**params, "w": params["w"] / c}
  scaled_batch = {**batch, "x": batch["x"] * c}
  relative = kfl.InverseOptions(method, relative_damping=True)
  base = _direction(params, batch, relative)
  scaled = _direction(scaled_params, scaled_batch, relative)
  np.testing.assert_allclose(scaled["w"] * c, base["w"], rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(scaled["v"], base["v"], rtol=2e-3, atol=1e-6)
  absolute = kfl.InverseOptions(method)
  moved = _direction(scaled_params, scaled_batch, absolute)["w"] * c
  assert not np.allclose(moved, _direction(params, batch, absolute)["w"], rtol=0.05)


def test_the_kl_clipped_step_does_not_depend_on_the_loss_scale():
  """``kfl.kfac`` on ``s · loss``: the gradient is ``s g``, the Fisher (of the
  model's distribution) is unchanged, and the KL clip scales the step by
  ``1/s``: the same update for every ``s`` while the clip binds."""
  params, batch = _problem()
  updates = []
  for s in (1.0, 10.0, 100.0):
    loss = lambda p, b, s=s: s * _loss(p, b)  # pylint: disable=cell-var-from-loop
    tx = kfl.kfac(loss, batch)
    out, _ = tx.update(jax.grad(loss)(params, batch), tx.init(params), params, batch=batch)
    updates.append(out)
  for out in updates[1:]:
    for k in params:
      np.testing.assert_allclose(out[k], updates[0][k], rtol=2e-3, atol=1e-7)


def test_relative_damping_must_be_a_bool():
  with pytest.raises(ValueError, match="InverseOptions.relative_damping"):
    kfl.InverseOptions(relative_damping="yes")


def test_kfac_with_relative_damping_trains():
  """The whole default chain (Cholesky, noise scaling, momentum) with relative
  damping lowers the loss of the small MLP over 30 steps."""
  params, batch = _problem()
  tx = kfl.kfac(_loss, batch, damping=0.3,
                inverses=kfl.InverseOptions("cholesky", relative_damping=True))

  @jax.jit
  def step(p, s):
    grads = jax.grad(_loss)(p, batch)
    updates, s = tx.update(grads, s, p, batch=batch)
    return jax.tree.map(jnp.add, p, updates), s

  state, start = tx.init(params), float(_loss(params, batch))
  for _ in range(30):
    params, state = step(params, state)
  assert float(_loss(params, batch)) < 0.5 * start
