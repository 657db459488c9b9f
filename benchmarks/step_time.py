"""Step time, compile time and time-to-loss of K-FAC vs Adam on digits.

For both digits models (``examples/digits_data.py``) at batch 256, in one
process:

1. Step time: the jitted full train step (``value_and_grad`` + optimizer
   ``update`` + ``apply_updates``), each call followed by
   ``jax.block_until_ready``. Adam and every K-FAC configuration are timed in
   interleaved rounds of 50 steps (the round order rotates), so that machine
   noise hits all of them alike. Reported: the median single step, the mean
   step (which includes the amortized statistics/inverse steps; 50 is a
   multiple of every period), their K-FAC/Adam ratios and the compile time
   (tracing, lowering and XLA compilation: what the first call costs beyond
   one step). Configurations: ``(stats_every, inverse_every)`` in
   ``{(1, 10), (10, 50)}`` x ``inverse_method`` in ``{eigh, cholesky}``.
2. Loss reached (full training set) by each optimizer after a fixed budget
   of train-step wall-clock time (compile and evaluations excluded).
3. Time to target: Adam's full training-set loss after 1000 steps and the
   time Adam took; then the train time K-FAC needs to first reach that loss
   (evaluated every 10 steps, at most 1000 steps).

The optimizer settings are the tuned ones of ``examples/digits.py``; pass
``--quick`` for a short run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import jax
import numpy as np

import kfac_jax_lite as kfl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import digits  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position

ROUND = 50  # Steps per timing round: a multiple of every period below.
KFAC_CONFIGS = (
    dict(stats_every=1, inverse_every=10, inverses=kfl.InverseOptions("eigh")),
    dict(stats_every=1, inverse_every=10, inverses=kfl.InverseOptions("cholesky")),
    dict(stats_every=10, inverse_every=50, inverses=kfl.InverseOptions("eigh")),
    dict(stats_every=10, inverse_every=50, inverses=kfl.InverseOptions("cholesky")),
)


def machine_info() -> str:
  """Platform, CPU count, load and library versions, one per line."""
  import optax  # pylint: disable=import-outside-toplevel
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
  return "\n".join([
      f"platform: {platform.platform()} ({platform.machine()}, "
      f"{platform.processor() or 'unknown CPU'})",
      f"CPUs: {os.cpu_count()}, load average (1 min) at start: {load[0]:.2f}",
      f"python {platform.python_version()}, jax {jax.__version__}, "
      f"optax {optax.__version__}, backend {jax.default_backend()} "
      f"({jax.devices()[0].device_kind})",
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
  ])


def _label(cfg: dict[str, Any]) -> str:
  return f"s{cfg['stats_every']}/i{cfg['inverse_every']}/{cfg['inverses'].method}"


class _Timed(timing.TimedSteps):
  """One optimizer's compiled step, its running state and its timings."""

  def __init__(self, name: str, problem: str, loss_fn: digits_data.LossFn,
               params: Any, batches: list[Any], **cfg: Any):
    self.name = name
    tx = digits.make_optimizer("adam" if name == "adam" else "kfac", problem,
                               loss_fn, batches[0], **cfg)
    state = (params, tx.init(params))
    step, self.compile_s = digits.compile_step(
        digits.make_train_step(loss_fn, tx), *state, batches[0])
    super().__init__(step, state, batches)


def step_times(problem: str, rounds: int) -> list[str]:
  """Interleaved step-time rounds for Adam and every K-FAC configuration."""
  model, loss_fn = digits_data.make_problem(problem)
  params = digits_data.init_params(model)
  train_data, _ = digits_data.load_split()
  it = digits_data.batches(train_data)
  batches = [jax.device_put(next(it)) for _ in range(5)]
  runners = [_Timed("adam", problem, loss_fn, params, batches)]
  runners += [_Timed(_label(c), problem, loss_fn, params, batches, **c)
              for c in KFAC_CONFIGS]
  timing.interleave(runners, rounds, ROUND)
  adam = runners[0]
  med_a, mean_a = np.median(adam.times), np.mean(adam.times)
  lines = []
  for x in runners:
    med, mean = np.median(x.times), np.mean(x.times)
    lines.append(
        f"{problem:<12}{x.name:<20}{med * 1e3:>10.2f}{mean * 1e3:>10.2f}"
        f"{med / med_a:>9.1f}x{mean / mean_a:>9.1f}x{x.compile_s:>10.2f}")
  return lines


def budget_and_target(problem: str, budget_s: float, target_steps: int,
                      train_data: digits_data.Batch) -> list[str]:
  """Loss after a time budget, and K-FAC's time to reach Adam's loss."""
  lines = []
  for name, opt in (("K-FAC", "kfac"), ("Adam", "adam")):
    run = digits.train(problem, opt, 10**9, train_data=train_data,
                       eval_every=10, progress=False, max_seconds=budget_s)
    lines.append(f"{problem:<12}{name:<7} loss after {run.seconds[-1]:.2f}s "
                 f"of training ({run.steps[-1]} steps): {run.loss[-1]:.4g}")
  adam = digits.train(problem, "adam", target_steps, train_data=train_data,
                      eval_every=target_steps, progress=False)
  target, adam_s = adam.loss[-1], adam.seconds[-1]
  kfac = digits.train(problem, "kfac", target_steps, train_data=train_data,
                      eval_every=10, progress=False)
  hit = next((k for k, l in enumerate(kfac.loss) if l <= target), None)
  lines.append(f"{problem:<12}Adam   {target_steps} steps: loss {target:.4g} "
               f"in {adam_s:.2f}s")
  if hit is None:
    lines.append(f"{problem:<12}K-FAC  did not reach {target:.4g} in "
                 f"{target_steps} steps ({kfac.seconds[-1]:.2f}s; best "
                 f"{min(kfac.loss):.4g})")
  else:
    lines.append(f"{problem:<12}K-FAC  reached {target:.4g} at step "
                 f"{kfac.steps[hit]} after {kfac.seconds[hit]:.2f}s "
                 f"({kfac.seconds[hit] / adam_s:.2f}x Adam's time)")
  return lines


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="short run")
  args = parser.parse_args(argv)
  rounds = 2 if args.quick else 6
  budget_s = 1.0 if args.quick else 5.0
  target_steps = 100 if args.quick else 1000
  print(machine_info())
  print()
  print(f"Step time at batch {digits_data.BATCH_SIZE} "
        f"({rounds} interleaved rounds of {ROUND} steps each)")
  print(f"{'model':<12}{'optimizer':<20}{'median ms':>10}{'mean ms':>10}"
        f"{'med/Adam':>10}{'mean/Adam':>10}{'compile s':>10}")
  for problem in digits.PROBLEMS:
    for line in step_times(problem, rounds):
      print(line, flush=True)
  print()
  print(f"Loss after {budget_s:.0f}s of training, and time to Adam's "
        f"{target_steps}-step loss (K-FAC s1/i10/eigh)")
  train_data, _ = digits_data.load_split()
  for problem in digits.PROBLEMS:
    for line in budget_and_target(problem, budget_s, target_steps, train_data):
      print(line, flush=True)


if __name__ == "__main__":
  main()
