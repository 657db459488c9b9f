"""Packing symmetric factors as their upper triangle (for the all-reduce)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_lite.curvature import symmetric


@pytest.mark.parametrize("n", range(1, 10))
def test_pack_unpack_round_trip(n: int):
  a = np.random.default_rng(n).normal(size=(n, n)).astype(np.float32)
  a = a + a.T
  p = symmetric.pack(jnp.asarray(a))
  assert p.shape == (symmetric.packed_size(n),)
  assert symmetric.packed_size(n) == (n + n % 2) * (n + n % 2 + 1) // 2  # ~ n(n+1)/2
  np.testing.assert_array_equal(symmetric.unpack(p, n), a)


def test_pack_reads_only_the_upper_triangle():
  a = np.triu(np.arange(1, 37, dtype=np.float32).reshape(6, 6))
  p = symmetric.pack(jnp.asarray(a + np.tril(np.full((6, 6), 99.0, np.float32), -1)))
  np.testing.assert_array_equal(symmetric.unpack(p, 6), a + np.triu(a, 1).T)
  assert sorted(np.asarray(p).tolist()) == sorted(a[np.triu_indices(6)].tolist())
