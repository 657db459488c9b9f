"""Block specs (``kfac_jax_lite.curvature.specs``) against dense definitions in numpy.

Each block's damped inverse applied to a gradient matrix is checked against a
dense solve with the matrix the block stands for: ``⊗_i (F_i + π_i λ^{1/k} I)``
on the weight rows (Ba et al. 2017, eq. 3, 12; a vector factor is a diagonal
matrix), ``B + λ I`` on a doubly-factored layer's bias row (§4), ``F + λ``
elementwise for a diagonal Fisher, ``F + λ I`` on ``vec([W; b])`` for a full
block; plus costs, identities and the specs of a traced model's layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.curvature import specs
from kfac_jax_lite.tagging import tag, trace_loss

LAM = 0.3


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
  m = rng.normal(size=(d, d))
  return m @ m.T / d + 0.05 * np.eye(d)


def _factored_shifts(factors: list[np.ndarray], lam: float) -> list[float]:
  """Ba et al. eq. 12 written out: π_i λ^{1/k}, π_i = m_i / (Π_j m_j)^{1/k}."""
  means = [np.mean(f) if f.ndim == 1 else np.trace(f) / len(f) for f in factors]
  geo = np.prod(means) ** (1 / len(factors))
  return [m / geo * lam ** (1 / len(factors)) for m in means]


def _damped(f: np.ndarray, shift: float) -> np.ndarray:
  return np.diag(f + shift) if f.ndim == 1 else f + shift * np.eye(len(f))


def _apply(spec: specs.Block, factors: dict[str, np.ndarray], mat: np.ndarray,
           method: str = "eigh") -> np.ndarray:
  inv = spec.inverses({k: jnp.asarray(v, jnp.float32) for k, v in factors.items()},
                      LAM, method)
  return np.asarray(spec.precondition(inv, jnp.asarray(mat, jnp.float32)))


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_doubly_factored_block_with_bias_is_a_dense_solve(method: str):
  rng = np.random.default_rng(0)
  t, c, k = 3, 2, 4
  spec = specs.Kronecker((("K", (t, t)), ("Psi", (c, c)), ("G", (k, k))), (k, k))
  factors = {"K": _spd(rng, t), "Psi": _spd(rng, c), "G": _spd(rng, k), "B": _spd(rng, k)}
  mat = rng.normal(size=(t * c + 1, k))
  s = _factored_shifts([factors["K"], factors["Psi"], factors["G"]], LAM)
  weight = np.kron(np.kron(_damped(factors["K"], s[0]), _damped(factors["Psi"], s[1])),
                   _damped(factors["G"], s[2]))
  dense = np.zeros((mat.size, mat.size))
  dense[:t * c * k, :t * c * k] = weight
  dense[t * c * k:, t * c * k:] = factors["B"] + LAM * np.eye(k)
  want = np.linalg.solve(dense, mat.reshape(-1)).reshape(mat.shape)
  np.testing.assert_allclose(_apply(spec, factors, mat, method), want, rtol=2e-4, atol=1e-5)


def test_kronecker_block_with_diagonal_factors_is_a_dense_solve():
  rng = np.random.default_rng(1)
  d_in, k = 5, 3
  for a_shape, g_shape in [((d_in,), (k, k)), ((d_in, d_in), (k,)), ((d_in,), (k,))]:
    spec = specs.Kronecker((("A", a_shape), ("G", g_shape)))
    factors = {n: (rng.uniform(0.1, 2.0, size=s[0]) if len(s) == 1 else _spd(rng, s[0]))
               for n, s in spec.factor_shapes.items()}
    mat = rng.normal(size=(d_in, k))
    s = _factored_shifts([factors["A"], factors["G"]], LAM)
    dense = np.kron(_damped(factors["A"], s[0]), _damped(factors["G"], s[1]))
    want = np.linalg.solve(dense, mat.reshape(-1)).reshape(mat.shape)
    np.testing.assert_allclose(_apply(spec, factors, mat), want, rtol=2e-4, atol=1e-5)


def test_diagonal_fisher_is_elementwise_and_clipped_at_zero():
  rng = np.random.default_rng(2)
  fisher = rng.uniform(0.0, 1.0, size=(2, 4))
  fisher[0, 1] = -0.05  # a slightly negative estimate counts as 0
  mat = rng.normal(size=(2, 4))
  got = _apply(specs.DiagonalFisher((2, 4)), {"F": fisher}, mat)
  np.testing.assert_allclose(got, mat / (np.maximum(fisher, 0) + LAM), rtol=1e-6)


def test_full_block_is_a_dense_solve_on_row_major_vec():
  rng = np.random.default_rng(3)
  mat = rng.normal(size=(3, 2))
  fisher = _spd(rng, 6)
  want = np.linalg.solve(fisher + LAM * np.eye(6), mat.reshape(-1)).reshape(mat.shape)
  np.testing.assert_allclose(_apply(specs.Full(6), {"full": fisher}, mat), want,
                             rtol=2e-4, atol=1e-5)


def test_inverting_some_factors_keeps_the_whole_blocks_damping():
  rng = np.random.default_rng(4)
  spec = specs.Kronecker((("A", (4, 4)), ("G", (3, 3))))
  factors = {"A": jnp.asarray(_spd(rng, 4)), "G": jnp.asarray(10 * _spd(rng, 3))}
  everything = spec.inverses(factors, LAM, "eigh")
  only = spec.inverses(factors, LAM, "eigh", only=["G"])
  assert set(only) == {"G"}
  np.testing.assert_array_equal(only["G"], everything["G"])


def test_costs_identities_and_what_is_a_symmetric_matrix():
  kron = specs.Kronecker((("K", (4, 4)), ("Psi", (2, 2)), ("G", (3,))), (3,))
  assert kron.factor_shapes == {"K": (4, 4), "Psi": (2, 2), "G": (3,), "B": (3,)}
  assert kron.costs() == {"K": 64, "Psi": 8, "G": 3, "B": 3}
  assert specs.DiagonalFisher((2, 5)).costs() == {"F": 10}
  assert specs.Full(6).costs() == {"full": 216}
  assert [specs.symmetric_matrix(k, s) for k, s in
          [("A", (3, 3)), ("A", (3,)), ("F", (2, 5)), ("full", (6, 6)), ("B", (2, 3))]] == [
              True, False, False, True, True]  # a row slice of B is a matrix's
  np.testing.assert_array_equal(specs.identity("G", (3, 3)), np.eye(3))
  np.testing.assert_array_equal(specs.identity("F", (2, 5)), np.ones((2, 5)))
  np.testing.assert_array_equal(specs.identity("A", (4,)), np.ones(4))
  assert [s.label for s in (kron, specs.Kronecker((("A", (2,)), ("G", (2,)))),
                            specs.DiagonalFisher((1, 2)), specs.Full(4))] == [
                                "kron3(vector G)", "kron(vector A, vector G)", "diagonal_fisher", "full"]


def _model_loss(p, b):
  h = jnp.tanh(b["x"] @ p["w"] + p["b"] + p["emb"][b["ids"]])
  return kfl.losses.softmax_cross_entropy(h * p["s"] @ p["v"], b["y"])


def _model():
  rng = np.random.default_rng(5)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  params = {"w": f32(rng.normal(size=(3, 4))), "b": f32(np.zeros(4)),
            "emb": f32(rng.normal(size=(7, 4))), "s": f32(np.ones(4)),
            "v": f32(rng.normal(size=(4, 2)))}
  batch = {"x": f32(rng.normal(size=(6, 3))), "ids": jnp.asarray(rng.integers(0, 7, 6)),
           "y": jnp.asarray(rng.integers(0, 2, 6))}
  return params, batch


def test_spec_for_a_traced_model_and_its_estimates_have_the_spec_shapes():
  params, batch = _model()
  blocks = {r"\['v'\]": "full"}
  tagged = tag(trace_loss(_model_loss, params, batch), blocks=blocks)
  got = {l.name: specs.spec_for(l) for l in tagged.factored}
  assert got == {"['w']": specs.Kronecker((("A", (4, 4)), ("G", (4, 4)))),  # [W; b]
                 "['emb']": specs.Kronecker((("A", (7,)), ("G", (4, 4)))),
                 "['s']": specs.DiagonalFisher((1, 4)),
                 "['v']": specs.Full(8)}
  est = kfl.estimate_curvature(_model_loss, params, batch, key=jax.random.key(0),
                               layers=kfl.LayerOptions(blocks=blocks))
  assert {n: {k: v.shape for k, v in f.items()} for n, f in est.items()} == {
      n: s.factor_shapes for n, s in got.items()}
