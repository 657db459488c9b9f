"""kfl.Diagnostics: one packed leaf whose fields read back what was packed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl


def _fields(rng: np.random.Generator) -> dict:
  b = 5
  return {"sq_norms": rng.random(b), "layer_sq_norms": {"a": rng.random(b), "b": rng.random(b)},
          "batch_grad_sq_norm": rng.random(), "layer_batch_grad_sq_norms": {
              "a": rng.random(), "b": rng.random()},
          "trace_sigma": rng.random(), "grad_sq_norm": -rng.random(),
          "noise_scale": rng.random(), "diversity": rng.random(), "uncovered": ("c",)}


def _check(record: kfl.Diagnostics, fields: dict, index: tuple = ()) -> None:
  for name, want in fields.items():
    got = getattr(record, name)
    if name == "uncovered":
      assert got == want
    elif isinstance(want, dict):
      assert list(got) == list(want)
      for k in want:
        np.testing.assert_allclose(np.asarray(got[k])[index], want[k], rtol=1e-6)
    else:
      np.testing.assert_allclose(np.asarray(got)[index], want, rtol=1e-6)


def test_fields_read_back_through_jit_and_a_stacked_leading_axis():
  rng = np.random.default_rng(0)
  fields = [_fields(rng) for _ in range(2)]
  records = [kfl.Diagnostics.pack(**{k: jax.tree.map(jnp.asarray, v) if k != "uncovered" else v
                                     for k, v in f.items()}) for f in fields]
  assert len(jax.tree_util.tree_leaves(records[0])) == 1
  _check(jax.jit(lambda r: r)(records[0]), fields[0])
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *records)  # as pmap's outputs are
  for i, f in enumerate(fields):
    _check(stacked, f, (i,))


def test_totals_drop_the_per_example_rows_and_keep_the_rest():
  rng = np.random.default_rng(1)
  fields = _fields(rng)
  record = kfl.Diagnostics.pack(**{k: jax.tree.map(jnp.asarray, v) if k != "uncovered" else v
                                   for k, v in fields.items()})
  totals = record.totals()
  _check(totals, {k: v for k, v in fields.items() if k not in ("sq_norms", "layer_sq_norms")})
  assert totals.sq_norms.shape == (0,)
  assert {k: v.shape for k, v in totals.layer_sq_norms.items()} == {"a": (0,), "b": (0,)}
  # The layout no longer depends on the batch size.
  other = kfl.Diagnostics.pack(**{**fields, "sq_norms": jnp.ones(3),
                                   "layer_sq_norms": {"a": jnp.ones(3), "b": jnp.ones(3)}})
  assert jax.tree.structure(other.totals()) == jax.tree.structure(totals)
