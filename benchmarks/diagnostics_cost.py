"""Cost of the diagnostics over one statistics pass.

For each model, four jitted functions of ``(params, batch, key)`` are timed in
interleaved calls (the order rotates every call), medians reported:

* ``estimate``: ``kfl.estimate_curvature`` (the statistics pass: forward, the
  vectorized backward of the Fisher cotangents to the layer outputs, the
  factor Gram matrices);
* ``estimate + diag``: :func:`factors_and_diagnostics`, the same factors and
  the :class:`Diagnostics` from the same pass. With the ``"empirical"``
  estimator they are computed from the very values the factors use; with
  ``"mc"`` the true-label cotangent is one more column of the vectorized
  backward pass;
* ``G given``: the same, with the batch gradient passed in (``batch_grads``,
  as an optimizer has it from its incoming gradient), which saves the one
  product per layer, ``Σ a dsᵀ``, that costs as much as a weight gradient;
* ``in the step``: the opt-in way, a statistics step of
  ``kfl.scale_by_kfac(..., stats_every=1)`` (no inverse refresh) with
  ``EstimatorOptions(diagnostics=True)`` against the same step without; here
  XLA sees the factors, the diagnostics and the preconditioning in one
  program.

Models: the digits MLP 64-128-128-10 (batch 256), the ResNet of
``examples/resnet_digits.py`` (batch 128; BatchNorm in training mode) and the
transformer of ``examples/transformer_tokens.py`` (batch 64, 16 tokens).

Run ``python benchmarks/diagnostics_cost.py`` (``--calls``, ``--models``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence


import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import common  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
import resnet_digits  # pylint: disable=wrong-import-position
import transformer_tokens  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position
from kfac_jax_lite.diagnostics import factors_and_diagnostics  # pylint: disable=wrong-import-position
from kfac_jax_lite.tagging.layers import tag  # pylint: disable=wrong-import-position
from kfac_jax_lite.tagging.trace import trace_loss  # pylint: disable=wrong-import-position
from step_time import machine_info  # pylint: disable=wrong-import-position

Problem = tuple[str, common.LossFn, Any, common.Batch]


def mlp() -> Problem:
  model, loss_fn = digits_data.make_problem("mlp")
  train, _ = digits_data.load_split()
  return ("MLP (digits, B=256)", loss_fn, digits_data.init_params(model),
          next(digits_data.batches(train)))


def resnet() -> Problem:
  problem = resnet_digits.make_problem()
  train, _ = resnet_digits.load_images()
  return ("ResNet (digits, B=128)", problem.kfac_loss, problem.params,
          next(common.batches(train, resnet_digits.BATCH_SIZE)))


def transformer() -> Problem:
  problem = transformer_tokens.make_problem()
  _, train, _ = transformer_tokens.make_data()
  return ("transformer (tokens, B=64)", problem.loss_fn, problem.params,
          next(common.batches(train, transformer_tokens.BATCH_SIZE)))


PROBLEMS = {"mlp": mlp, "resnet": resnet, "transformer": transformer}


def functions(loss_fn: common.LossFn, params: Any, batch: Any,
              estimator: str) -> dict[str, Callable[..., Any]]:
  """The jitted statistics pass, with and without the diagnostics."""
  tagged = tag(trace_loss(loss_fn, params, batch))
  return {
      "estimate": jax.jit(lambda p, b, k, g: kfl.estimate_curvature(
          loss_fn, p, b, key=k, estimator=estimator)),
      "estimate + diag": jax.jit(lambda p, b, k, g: factors_and_diagnostics(
          tagged, p, b, k, estimator=estimator)),
      "estimate + diag, G given": jax.jit(lambda p, b, k, g: factors_and_diagnostics(
          tagged, p, b, k, estimator=estimator, batch_grads=g)),
  }


def step_functions(loss_fn: common.LossFn, params: Any, batch: Any, grads: Any,
                   estimator: str) -> tuple[dict[str, Callable[..., Any]], tuple[Any, ...]]:
  """The jitted statistics step of the optimizer without and with the
  diagnostics, and their arguments ``(params, batch, grads, state, state)``.

  Each state has taken one step already, so the timed call is a statistics
  step with the inverses left alone (``inverse_every`` is never due again).
  """
  fns, states = {}, []
  for label, diag in (("step", False), ("step + diag", True)):
    tx = kfl.scale_by_kfac(
        loss_fn, batch, damping=0.01, stats_every=1, inverse_every=1 << 30,
        estimator=kfl.EstimatorOptions(kind=estimator, diagnostics=diag))
    state = tx.init(params)
    _, state = jax.jit(lambda g, s, p, b, tx=tx: tx.update(g, s, p, batch=b))(
        grads, state, params, batch)
    index = len(states)
    fns[label] = jax.jit(lambda p, b, g, *s, tx=tx, i=index: tx.update(g, s[i], p, batch=b))
    states.append(state)
  return fns, (params, batch, grads, *states)


def flops(fn: Callable[..., Any], args: Sequence[Any]) -> float:
  """XLA's count of the floating-point operations of the compiled ``fn``."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def median_times(fns: dict[str, Callable[..., Any]], args: Sequence[Any],
                 calls: int) -> tuple[dict[str, float], dict[str, float]]:
  """Median seconds per call of each function, interleaved, after a warm-up.

  Returns:
    Wall-clock medians, and medians of the process's CPU time (all threads),
    which other processes on a loaded machine disturb less.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  names = list(fns)
  wall: dict[str, list[float]] = {n: [] for n in names}
  cpu: dict[str, list[float]] = {n: [] for n in names}
  for i in range(calls):
    for name in names[i % len(names):] + names[:i % len(names)]:
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fns[name](*args))
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return ({n: float(np.median(t)) for n, t in wall.items()},
          {n: float(np.median(t)) for n, t in cpu.items()})


def extra(name: str, base: str, wall: dict[str, float], cpu: dict[str, float],
          flop: dict[str, float]) -> str:
  """``name``'s milliseconds and its extra over ``base`` in wall, CPU and flops."""
  return (f"{wall[name] * 1e3:.2f} ({(wall[name] / wall[base] - 1) * 100:+.0f}% time, "
          f"{(cpu[name] / cpu[base] - 1) * 100:+.0f}% cpu, "
          f"{(flop[name] / flop[base] - 1) * 100:+.1f}% flops)")


def main(argv: Sequence[str] | None = None) -> None:
  """Prints one markdown row per model and estimator."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=100,
                      help="timed calls per function (fewer: run to run ±3 points and more)")
  parser.add_argument("--models", nargs="+", choices=sorted(PROBLEMS), default=list(PROBLEMS))
  parser.add_argument("--estimators", nargs="+", choices=("empirical", "mc"),
                      default=["empirical", "mc"])
  args = parser.parse_args(argv)
  print(machine_info())
  print(f"\nmedian of {args.calls} interleaved calls, ms; in brackets the extra over the "
        "pass, in wall time, in process CPU time and in XLA's flop count\n")
  print("| model | estimator | statistics pass | + diagnostics | + diagnostics, G given "
        "| optimizer's statistics step | + diagnostics, in the step |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for name in args.models:
    title, loss_fn, params, batch = PROBLEMS[name]()
    batch = jax.device_put(batch)
    grads = jax.jit(jax.grad(loss_fn))(params, batch)
    call = (params, batch, jax.random.key(0), grads)
    for estimator in args.estimators:
      fns = functions(loss_fn, params, batch, estimator)
      t, c = median_times(fns, call, args.calls)
      f = {k: flops(fn, call) for k, fn in fns.items()}
      base, f_base = t["estimate"], f["estimate"]
      cells = [extra(k, "estimate", t, c, f) for k in ("estimate + diag",
                                                        "estimate + diag, G given")]
      step_fns, step_call = step_functions(loss_fn, params, batch, grads, estimator)
      ts, cs = median_times(step_fns, step_call, args.calls)
      fs = {k: flops(fn, step_call) for k, fn in step_fns.items()}
      print(f"| {title} | {estimator} | {base * 1e3:.2f} ({f_base / 1e6:.1f} MFLOP) | "
            f"{' | '.join(cells)} | {ts['step'] * 1e3:.2f} | "
            f"{extra('step + diag', 'step', ts, cs, fs)} |", flush=True)
  print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
