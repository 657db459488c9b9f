"""What a skipped ``lax.cond`` and the default K-FAC step cost per call, blocked
on every call or dispatched in chunks.

K-FAC's periodic work (statistics, inverses) sits behind ``lax.cond`` in one
compiled step. On XLA:GPU a conditional reads its predicate on the host, so
it can cost more than the arithmetic of a small step. Timed here, each as the
median per-call time over rounds, either blocking on every call or
dispatching 20 calls before blocking once (as a training loop that does not
read the loss every step does):

1. a jitted chain of six ``256 x 256`` matrix products and tanh, followed by
   0, 1, 2 or 4 ``lax.cond`` whose predicate (a function of a traced step
   counter) is never true;
2. the suite's train steps (``benchmarks/suite.py`` tasks' ``make_step``) with
   ``optax.adamw``, the default ``kfl.kfac``, the same with the train state
   donated (``jax.jit(..., donate_argnums)``: the state a skipped conditional
   passes through is then not copied, e.g. 81 copies per step on the LM
   without, 3 with, on XLA:CPU) and ``kfl.kfac`` with statistics and inverses
   on every step (periods 1: no conditional at all).

Run ``python benchmarks/dispatch.py [mlp lm ...]`` (default: mlp and lm).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # pylint: disable=wrong-import-position
from step_time import machine_info  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

CHUNK = 20


def per_call(call: Callable[[], Any], calls: int, chunk: int) -> float:
  """Median seconds per call over rounds of ``chunk`` calls, each round
  blocked on once at its end (after one warm-up round)."""
  jax.block_until_ready(call())
  times = []
  for _ in range(max(calls // chunk, 1)):
    start = time.perf_counter()
    for _ in range(chunk):
      out = call()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / chunk)
  return float(np.median(times))


def with_conds(num_conds: int) -> Callable[..., Any]:
  """Six products and tanh, then ``num_conds`` never-taken conditionals."""
  def f(ws: Sequence[jax.Array], x: jax.Array, step: jax.Array) -> jax.Array:
    h = x
    for w in ws:
      h = jnp.tanh(h @ w)
    for c in range(num_conds):
      h = jax.lax.cond((step + c) % 1000 == 999, lambda h: h @ ws[0] @ ws[1], lambda h: h, h)
    return h
  return jax.jit(f)


def advancing(step: Callable[..., Any], state: tuple[Any, ...], batch: Any) -> Callable[[], Any]:
  """A call that advances the train ``state`` by one ``step`` and returns the loss."""
  carry = [state]

  def call() -> jax.Array:
    out = step(*carry[0], batch)
    carry[0] = tuple(out[:-1])
    return out[-1]
  return call


def main(argv: Sequence[str]) -> None:
  """Prints the per-call times (see the module docstring)."""
  print(machine_info(), flush=True)
  ws = [jax.random.normal(jax.random.key(i), (256, 256)) / 16 for i in range(6)]
  x, step = jnp.ones((256, 256)), jnp.zeros((), jnp.int32)
  for n in (0, 1, 2, 4):
    f = with_conds(n)
    print(f"products + {n} skipped conds: blocked {per_call(lambda: f(ws, x, step), 200, 1) * 1e6:.0f}"
          f" us, chunks of {CHUNK} {per_call(lambda: f(ws, x, step), 200, CHUNK) * 1e6:.0f} us",
          flush=True)
  for name in argv or ("mlp", "lm"):
    task = suite.TASKS[name](10, False)
    batch = task.batches[0]
    donated = tuple(range(len(task.init_state) + 1))  # every argument but the batch
    for label, tx, donate in (
        ("adamw", optax.adamw(1e-3), ()),
        ("kfac default", kfl.kfac(task.loss_fn, batch), ()),
        ("kfac default, state donated", kfl.kfac(task.loss_fn, batch), donated),
        ("kfac periods 1", kfl.kfac(task.loss_fn, batch, stats_every=1, inverse_every=1), ())):
      step, state = task.make_step(tx), (*task.init_state, tx.init(task.params))
      if donate:  # on copies: the task's initial state is shared by every run
        step = jax.jit(step.__wrapped__, donate_argnums=donate)
        state = jax.tree.map(jnp.copy, state)
      call = advancing(step, state, batch)
      print(f"{name} {label}: blocked {per_call(call, 100, 1) * 1e3:.3f} ms, chunks of {CHUNK} "
            f"{per_call(call, 100, CHUNK) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
