"""Which form of a layer's per-example squared gradient norms is fastest.

``||g_n||²`` with ``g_n = Σ_t a_t ds_tᵀ`` (``T`` positions, ``a_t`` of width
``d_in``, ``ds_t`` of width ``d_out``) can be computed three ways, timed here
side by side (jitted, interleaved calls, medians) at the shapes of the
benchmarks' models:

* ``g_n``: forming ``g_n`` and summing its squares, ``T d_in d_out`` per
  example;
* ``Gram ∘ Gram``: ``Σ_{s,t} (a_s·a_t)(ds_s·ds_t)``, the elementwise product of
  the two ``[T, T]`` Gram matrices, ``T² (d_in + d_out)``;
* ``(K x) ∘ x``: the library's Gram form (:func:`kfac_jax_lite.diagnostics`),
  one Gram matrix times the other operand, the same flops as the previous.

Activations are stored as rows ``[N, T, d_in]`` (dense layers) or, for
convolutions, as the columns ``[N, d_in, T]`` the patches are built in. The
``ratio`` column is the Gram forms' flops over ``g_n``'s; ``used`` is what
:func:`kfac_jax_lite.diagnostics.use_gram` picks.

Run ``python benchmarks/diagnostics_forms.py`` (``--calls``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diagnostics_cost import median_times  # pylint: disable=wrong-import-position
from step_time import machine_info  # pylint: disable=wrong-import-position

_diagnostics = importlib.import_module("kfac_jax_lite.diagnostics")

# (N, T, d_in, d_out): the transformer example's layers (64 sequences of 16
# tokens, width 64), the suite LM's (32 windows of 32 bytes), a long sequence,
# and the ResNet example's convolutions (batch 128).
ROWS = ((64, 16, 65, 16), (64, 16, 65, 64), (64, 16, 65, 256), (64, 16, 257, 64),
        (32, 32, 129, 32), (32, 32, 33, 256), (16, 256, 65, 64))
COLUMNS = ((128, 64, 144, 16), (128, 16, 144, 32), (128, 16, 288, 32), (128, 16, 16, 32))


def forms(columns: bool) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array]]:
  """The three forms for one activation layout, each ``(a, ds) -> [N]``."""
  a_spec = "ni{}" if columns else "n{}i"
  gram_a = f"{a_spec.format('s')},{a_spec.format('t')}->nst"
  return {
      "g_n": jax.jit(lambda a, d: jnp.sum(jnp.square(
          jnp.einsum(f"{a_spec.format('t')},ntk->nik", a, d)), axis=(1, 2))),
      "Gram ∘ Gram": jax.jit(lambda a, d: jnp.sum(
          jnp.einsum(gram_a, a, a) * jnp.einsum("nsk,ntk->nst", d, d), axis=(1, 2))),
      "(K x) ∘ x": jax.jit(lambda a, d: _diagnostics._gram_sq(  # pylint: disable=protected-access
          a, d, False, columns)),
  }


def row(shape: tuple[int, int, int, int], columns: bool, calls: int) -> str:
  """One markdown row: the shape, the flop ratio, the form used and the times."""
  n, t, d_in, d_out = shape
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, d_in, t) if columns else (n, t, d_in))
  d = jax.random.normal(keys[1], (n, t, d_out))
  fns = forms(columns)
  wall, _ = median_times(fns, (a, d), calls)
  used = "Gram" if _diagnostics.use_gram(t, d_in, d_out, columns=columns) else "g_n"
  times = " | ".join(f"{wall[k] * 1e3:.3f}" for k in fns)
  return (f"| {'columns' if columns else 'rows'} | {n}, {t}, {d_in} → {d_out} | "
          f"{t * (d_in + d_out) / (d_in * d_out):.2f} | {used} | {times} |")


def main(argv: Sequence[str] | None = None) -> None:
  """Prints one markdown row per layout and shape."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=100, help="timed calls per form")
  args = parser.parse_args(argv)
  print(machine_info())
  print(f"\nmedian of {args.calls} interleaved calls, ms\n")
  print("| layout | N, T, d_in → d_out | ratio | used | g_n | Gram ∘ Gram | (K x) ∘ x |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for columns, shapes in ((False, ROWS), (True, COLUMNS)):
    for shape in shapes:
      print(row(shape, columns, args.calls), flush=True)
  print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
