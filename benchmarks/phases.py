"""Per-phase time of a K-FAC step on the digits models, against Adam.

Where a K-FAC step's time goes, each phase jitted and timed on its own in the
same process as an Adam step (interleaved rounds, medians):

* ``adam``: the full Adam train step (value_and_grad + update + apply).
* ``grad``: ``value_and_grad`` alone (the floor both optimizers share).
* ``precondition``: K-FAC step with statistics and inverses never due
  (value_and_grad + preconditioning + KL clip + momentum + apply).
* ``stats``: one factor estimate alone (forward + output-derivative backward +
  Gram matrices) — inside a step with ``stats_every=1`` XLA shares its forward
  with ``grad``'s, so the step costs less than the sum.
* ``inverses eigh`` / ``inverses cholesky``: all damped factor inverses.

Run ``python benchmarks/phases.py`` (``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import digits  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position
from kfac_jax_lite.curvature.specs import spec_for  # pylint: disable=wrong-import-position
from kfac_jax_lite.statistics import factor_estimate  # pylint: disable=wrong-import-position
from kfac_jax_lite.tagging import tag, trace_loss  # pylint: disable=wrong-import-position

NEVER = 1 << 30


def _timed(fn: Callable[[], Any], rounds: int, reps: int = 20) -> float:
  """Median seconds of ``fn`` over ``rounds`` rounds of ``reps`` calls."""
  jax.block_until_ready(fn())
  meds = []
  for _ in range(rounds):
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      ts.append(time.perf_counter() - t0)
    meds.append(np.median(ts))
  return float(np.median(meds))


def phases(problem: str, rounds: int) -> dict[str, float]:
  """Median seconds of each phase for one digits problem."""
  model, loss_fn = digits_data.make_problem(problem)
  params = digits_data.init_params(model)
  train, _ = digits_data.load_split()
  batch = next(digits_data.batches(train))
  adam = digits.make_optimizer("adam", problem, loss_fn, batch)
  pre = digits.make_optimizer("kfac", problem, loss_fn, batch,
                              stats_every=NEVER, inverse_every=NEVER)
  adam_step = digits.make_train_step(loss_fn, adam)
  pre_step = digits.make_train_step(loss_fn, pre)
  adam_state = adam.init(params)
  # One step first: step 0 always computes statistics and inverses.
  _, pre_state, _ = pre_step(params, pre.init(params), batch)
  tagged = tag(trace_loss(loss_fn, params, batch))
  key = jax.random.key(0)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  stats = jax.jit(lambda p, b: factor_estimate(tagged, p, b, key, estimator="mc"))
  factors = stats(params, batch)

  def inverses(method):
    return jax.jit(lambda f: {l.name: spec_for(l).inverses(f[l.name], 1e-2, method)
                              for l in tagged.factored})

  inv_eigh, inv_chol = inverses("eigh"), inverses("cholesky")
  return {
      "adam": _timed(lambda: adam_step(params, adam_state, batch), rounds),
      "grad": _timed(lambda: grad(params, batch), rounds),
      "precondition": _timed(lambda: pre_step(params, pre_state, batch), rounds),
      "stats": _timed(lambda: stats(params, batch), rounds),
      "inverses eigh": _timed(lambda: inv_eigh(factors), rounds),
      "inverses cholesky": _timed(lambda: inv_chol(factors), rounds),
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  for problem in digits.PROBLEMS:
    times = phases(problem, args.rounds)
    print(f"\n{problem}: phase, median ms, ratio to an Adam step")
    for name, t in times.items():
      print(f"  {name:18s} {t * 1e3:8.3f} ms  {t / times['adam']:5.2f}x")


if __name__ == "__main__":
  main()
