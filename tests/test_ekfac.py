"""EK-FAC (George et al. 2018): ``InverseOptions(method="ekfac")``.

Oracles, none of which calls the code under test: per-example gradients by
``jax.vmap(jax.grad(...))`` of each example's summed loss terms, rotated into
the state's bases and squared in float64 numpy (the scales ``S``); the
preconditioner ``(Q diag(S + λ) Qᵀ)⁻¹`` with ``Q = U_A ⊗ U_G`` formed
explicitly; K-FAC's undamped block ``(A ⊗ G + λ I)⁻¹`` from the factors right
after a basis refresh. The estimator is ``"empirical"`` (deterministic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

LAM = 0.05
N, T, VOCAB = 12, 5, 7

Params = dict[str, Any]
Batch = dict[str, jax.Array]


def _mlp_loss(p: Params, b: Batch) -> jax.Array:
  h = jnp.tanh(b["x"] @ p["d1"]["w"] + p["d1"]["b"])
  return kfl.losses.softmax_cross_entropy(h @ p["d2"]["w"] + p["d2"]["b"], b["y"])


def _seq_loss(p: Params, b: Batch) -> jax.Array:
  """Embedding -> dense shared over positions (with bias) -> per-position softmax."""
  e = p["emb"][b["x"]]                                        # [N, T, 4]
  h = jnp.tanh(e @ p["d1"]["w"] + p["d1"]["b"])               # [N, T, 5]
  return kfl.losses.softmax_cross_entropy(h @ p["d2"]["w"] + p["d2"]["b"], b["y"])


def _draw(rng: np.random.Generator, *shape: int, scale: float = 0.7) -> jax.Array:
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _mlp_setup() -> tuple[Callable[..., jax.Array], Params, Batch, int]:
  rng = np.random.default_rng(0)
  params = {"d1": {"w": _draw(rng, 4, 6), "b": _draw(rng, 6)},
            "d2": {"w": _draw(rng, 6, 3), "b": _draw(rng, 3)}}
  batch = {"x": _draw(rng, N, 4, scale=1.0), "y": jnp.asarray(rng.integers(0, 3, N))}
  return _mlp_loss, params, batch, 1


def _seq_setup() -> tuple[Callable[..., jax.Array], Params, Batch, int]:
  rng = np.random.default_rng(1)
  params = {"emb": _draw(rng, VOCAB, 4), "d1": {"w": _draw(rng, 4, 5), "b": _draw(rng, 5)},
            "d2": {"w": _draw(rng, 5, 3), "b": _draw(rng, 3)}}
  batch = {"x": jnp.asarray(rng.integers(0, VOCAB, (N, T))),
           "y": jnp.asarray(rng.integers(0, 3, (N, T)))}
  return _seq_loss, params, batch, T


SETUPS = {"mlp": _mlp_setup, "seq": _seq_setup}


def _two_steps(loss_fn: Callable[..., jax.Array], params: Params, batch: Batch,
               estimator: Any = "empirical", **kwargs: Any) -> list[tuple[Any, Any]]:
  """(update, state after) of two ``scale_by_kfac`` steps on the same batch."""
  tx = kfl.scale_by_kfac(loss_fn, batch, damping=LAM, estimator=estimator,
                         inverses=kfl.InverseOptions("ekfac"), **kwargs)
  update = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))
  grads = jax.grad(loss_fn)(params, batch)
  state, out = tx.init(params), []
  for _ in range(2):
    u, state = update(grads, state)
    out.append((jax.device_get(u), jax.device_get(state)))
  return out


@pytest.fixture(scope="session", params=sorted(SETUPS))
def run(request: pytest.FixtureRequest) -> dict[str, Any]:
  """Step 0: statistics, refresh, scales from that batch alone (``ema_decay=0``);
  step 1: a refresh without statistics (the reset)."""
  loss_fn, params, batch, per_example = SETUPS[request.param]()
  steps = _two_steps(loss_fn, params, batch, ema_decay=0.0, stats_every=2, inverse_every=1)
  return {"loss_fn": loss_fn, "params": params, "batch": batch, "per_example": per_example,
          "grads": jax.device_get(jax.grad(loss_fn)(params, batch)), "steps": steps}


def _matrix(tree: Params, name: str) -> np.ndarray:
  """``[W; b]`` of layer ``name`` (leading axes of per-example trees kept)."""
  if name == "emb":
    return np.asarray(tree["emb"], np.float64)
  w, b = (np.asarray(tree[name][k], np.float64) for k in ("w", "b"))
  return np.concatenate([w, b[..., None, :]], axis=-2)


LIB = {"emb": "['emb']", "d1": "['d1']['w']", "d2": "['d2']['w']"}


def _layers(run: dict[str, Any]) -> list[str]:
  return [k for k in ("emb", "d1", "d2") if k in run["params"]]


def _per_example_grads(run: dict[str, Any]) -> Params:
  """Gradients of each example's summed loss terms (``T`` × its mean)."""
  loss_fn, params, batch, t = run["loss_fn"], run["params"], run["batch"], run["per_example"]

  def one(x: jax.Array, y: jax.Array) -> Params:
    return jax.grad(lambda p: t * loss_fn(p, {"x": x[None], "y": y[None]}))(params)

  return jax.device_get(jax.jit(jax.vmap(one))(batch["x"], batch["y"]))


def test_bases_diagonalize_the_factors(run: dict[str, Any]):
  _, state = run["steps"][0]
  for name in _layers(run):
    block, factors = state.ekfac[LIB[name]], state.factors[LIB[name]]
    assert ("A" in block) == (name != "emb")  # the embedding's basis is the identity
    for k in [k for k in ("A", "G") if k in block]:
      u, f = np.asarray(block[k], np.float64), np.asarray(factors[k], np.float64)
      np.testing.assert_allclose(u.T @ u, np.eye(len(u)), atol=1e-5)
      rotated = u.T @ f @ u
      np.testing.assert_allclose(rotated - np.diag(np.diag(rotated)), 0,
                                 atol=1e-5 * np.abs(f).max())


def test_scales_are_second_moments_of_rotated_per_example_gradients(run: dict[str, Any]):
  _, state = run["steps"][0]
  per_example = _per_example_grads(run)
  cases = N * run["per_example"]  # the loss averages over N·T cases
  for name in _layers(run):
    block = state.ekfac[LIB[name]]
    g = _matrix(per_example, name)  # [N, d_in(+1), d_out]
    if "A" in block:
      g = np.einsum("ia,nik->nak", np.asarray(block["A"], np.float64), g)
    g = np.einsum("nak,kb->nab", g, np.asarray(block["G"], np.float64))
    want = np.sum(g**2, axis=0) / cases
    np.testing.assert_allclose(block["S"], want, rtol=1e-5, atol=1e-6 * want.max())


def _explicit_precondition(block: dict[str, np.ndarray], mat: np.ndarray) -> np.ndarray:
  """``(Q diag(S + λ) Qᵀ)⁻¹ vec(M)``, ``Q = U_A ⊗ U_G`` (row-major ``vec``)."""
  s = np.asarray(block["S"], np.float64)
  u_a = np.asarray(block["A"], np.float64) if "A" in block else np.eye(s.shape[0])
  q = np.kron(u_a, np.asarray(block["G"], np.float64))
  curvature = q @ np.diag(s.reshape(-1) + LAM) @ q.T
  return np.linalg.solve(curvature, mat.reshape(-1)).reshape(mat.shape)


def test_update_is_the_inverse_of_the_rotated_diagonal(run: dict[str, Any]):
  update, state = run["steps"][0]
  for name in _layers(run):
    want = _explicit_precondition(state.ekfac[LIB[name]], _matrix(run["grads"], name))
    np.testing.assert_allclose(_matrix(update, name), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_after_a_refresh_the_update_is_undamped_kfac_plus_lambda(run: dict[str, Any]):
  """Step 1 refreshes without statistics: ``S = λ_A λ_Gᵀ`` and the update is
  ``(A ⊗ G + λ I)⁻¹ vec(M)`` (a vector ``A`` is a diagonal matrix)."""
  update, state = run["steps"][1]
  for name in _layers(run):
    f = state.factors[LIB[name]]
    a = np.asarray(f["A"], np.float64)
    a = np.diag(a) if a.ndim == 1 else a
    curvature = np.kron(a, np.asarray(f["G"], np.float64)) + LAM * np.eye(len(a) * len(f["G"]))
    mat = _matrix(run["grads"], name)
    want = np.linalg.solve(curvature, mat.reshape(-1)).reshape(mat.shape)
    np.testing.assert_allclose(_matrix(update, name), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_statistics_and_refresh_on_one_step_fold_into_the_reset():
  """Both due on one step: ``S = ε λ_A λ_Gᵀ + (1 - ε) Ŝ`` (a refresh does not
  discard the step's statistics)."""
  loss_fn, params, batch, _ = _mlp_setup()
  (_, half), _ = _two_steps(loss_fn, params, batch, ema_decay=0.5, inverse_every=1)
  (_, alone), _ = _two_steps(loss_fn, params, batch, ema_decay=0.0, inverse_every=1)
  for name in ("['d1']['w']", "['d2']['w']"):
    f = half.factors[name]
    reset = np.outer(*(np.clip(np.linalg.eigvalsh(np.asarray(f[k], np.float64)), 0, None)
                       for k in ("A", "G")))
    np.testing.assert_allclose(half.ekfac[name]["S"], 0.5 * reset + 0.5 * alone.ekfac[name]["S"],
                               rtol=1e-4, atol=1e-6 * reset.max())


def test_training_with_kfac_alias_under_inject_hyperparams_and_jit():
  loss_fn, params, batch, _ = _mlp_setup()
  make = optax.inject_hyperparams(kfl.kfac, static_args="loss_fn")
  tx = make(loss_fn, batch, inverses=kfl.InverseOptions("ekfac"), stats_every=2,
            inverse_every=6)

  @jax.jit
  def step(p: Params, s: Any) -> tuple[Params, Any, jax.Array]:
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s, loss

  state, losses = tx.init(params), []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
  assert step._cache_size() == 1


def _close_to_max(got: Any, want: Any, rtol: float) -> None:
  """Every leaf within ``rtol`` times its largest magnitude."""
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=0,
                                                       atol=rtol * np.abs(r).max()), got, want)


@pytest.mark.parametrize("setup, kind", [("mlp", "empirical"), ("seq", "mc")])
def test_diagnostics_from_the_same_pass_leave_the_update_alone(setup: str, kind: str):
  """With ``diagnostics=True`` the state's diagnostics are ``kfl.diagnostics``
  of the batch (a separate pass), and the update is the one without them."""
  loss_fn, params, batch, _ = SETUPS[setup]()
  runs = {diag: _two_steps(loss_fn, params, batch, inverse_every=1,
                           estimator=kfl.EstimatorOptions(kind=kind, diagnostics=diag))
          for diag in (False, True)}
  want = jax.device_get(jax.jit(lambda p, b: kfl.diagnostics(loss_fn, p, b))(params, batch))
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7),
               runs[True][0][1].diagnostics, want)
  assert runs[False][0][1].diagnostics is None
  for (u_with, s_with), (u_without, s_without) in zip(runs[True], runs[False]):
    if kind == "empirical":  # the diagnostics read the factors' own derivatives
      jax.tree.map(np.testing.assert_array_equal, (u_with, s_with.factors, s_with.ekfac),
                   (u_without, s_without.factors, s_without.ekfac))
    else:  # a 2-column backward pass against 1: G's float32 sums round differently
      _close_to_max((s_with.factors, {n: b["S"] for n, b in s_with.ekfac.items()}),
                    (s_without.factors, {n: b["S"] for n, b in s_without.ekfac.items()}), 1e-6)
      _close_to_max(u_with, u_without, 1e-5)


def test_noise_scaling_trains_under_jit():
  """``kfac(..., noise_scaling=0.2)`` turns the diagnostics on; with EK-FAC
  the loss falls, finite, and the factor acts on these noisy batches."""
  loss_fn, params, batch, _ = _mlp_setup()
  tx = kfl.kfac(loss_fn, batch, inverses=kfl.InverseOptions("ekfac"), noise_scaling=0.2,
                stats_every=2, inverse_every=4)

  @jax.jit
  def step(p: Params, s: Any) -> tuple[Params, Any, jax.Array]:
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p, batch=batch)
    return optax.apply_updates(p, u), s, loss

  state, losses, fractions = tx.init(params), [], []
  for _ in range(12):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    fractions.append(float(state.scale))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  assert all(a > b for a, b in zip(losses[:-1], losses[1:])), losses
  assert min(fractions) < 1.0, fractions


@pytest.mark.parametrize("kwargs, match", [
    ({"inverses": kfl.InverseOptions("ekfac", staggered=True)}, "staggered=False"),
    ({"parallel": kfl.ParallelOptions(axis_name="i", distribute_inverses=True)},
     "distribute_inverses=False"),
    ({"parallel": kfl.ParallelOptions(axis_name="i", inverse_placement="sharded")},
     "distribute_inverses=False"),
    ({"estimator": kfl.EstimatorOptions(accumulate=True)}, "accumulate=False"),
])
def test_unsupported_combinations_are_clear_errors(kwargs: dict[str, Any], match: str):
  loss_fn, _, batch, _ = _mlp_setup()
  kwargs = {"inverses": kfl.InverseOptions("ekfac"), "inverse_every": 5, **kwargs}
  with pytest.raises(ValueError, match=match):
    kfl.scale_by_kfac(loss_fn, batch, damping=LAM, **kwargs)
  with pytest.raises(ValueError, match="'ekfac'"):
    kfl.InverseOptions("ekfack")


def test_doubly_factored_layer_keeps_kfac_with_a_warning():
  rng = np.random.default_rng(2)
  params = {"w": _draw(rng, 12, 3), "b": _draw(rng, 3)}
  batch = {"x": _draw(rng, N, 4, 3), "y": jnp.asarray(rng.integers(0, 3, N))}

  def loss_fn(p: Params, b: Batch) -> jax.Array:
    return kfl.losses.softmax_cross_entropy(b["x"].reshape(N, 12) @ p["w"] + p["b"], b["y"])

  tx = kfl.scale_by_kfac(loss_fn, batch, damping=LAM, inverses=kfl.InverseOptions("ekfac"),
                         layers=kfl.LayerOptions(max_factor_dim=11))
  with pytest.warns(UserWarning, match=r"doubly-factored.*\['w'\]"):
    state = tx.init(params)
  assert state.ekfac == {} and set(state.inverses["['w']"]) == {"K", "Psi", "G", "B"}


_PMAP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_ekfac as t
    loss_fn, params, batch, _ = t._seq_setup()
    make = lambda **kw: t.kfl.scale_by_kfac(loss_fn, batch, damping=t.LAM, estimator="empirical",
        inverses=t.kfl.InverseOptions("ekfac"), ema_decay=0.0, **kw)
    grads = jax.grad(loss_fn)(params, batch)
    tx = make()
    _, single = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(grads, tx.init(params))
    tx2 = make(parallel=t.kfl.ParallelOptions(axis_name="i"))
    rep = lambda x: jax.tree.map(lambda a: np.stack([a, a]), x)
    halves = jax.tree.map(lambda a: a.reshape(2, a.shape[0] // 2, *a.shape[1:]), batch)
    step = jax.pmap(lambda g, s, p, b: tx2.update(g, s, p, batch=b), axis_name="i")
    _, both = step(rep(grads), rep(tx2.init(params)), rep(params), halves)
    err = max(float(np.max(np.abs(np.asarray(b[0]) - a)) / np.max(np.abs(a)))
              for a, b in zip(jax.tree.leaves(single.ekfac), jax.tree.leaves(both.ekfac)))
    print(json.dumps({"err": err}))
""")


def test_pmap_averages_the_scales_over_devices():
  """Two fake devices with half the batch each give the single-device ``S``."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run([sys.executable, "-c", _PMAP_SCRIPT, here], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = json.loads(proc.stdout.strip().splitlines()[-1])["err"]
  assert err < 1e-4, err  # float32 sums in another order; without the pmean: O(1)
