"""Where a K-FAC step's time goes on the suite's five models, against AdamW.

For each model of ``benchmarks/suite.py`` (``suite.TASKS``: mlp, ae, resnet,
lm, gru), K-FAC at the library's defaults ``kfl.kfac(loss_fn, batch)``
(statistics every 10 steps, fresh Cholesky inverses after each) and each of
its phases are compiled ahead of time and timed in the same process, in
interleaved rounds (the order rotating each round); each phase's figure is
the median over rounds of its per-round median call (each call followed by
``jax.block_until_ready``, on the same inputs):

* ``adamw``: the suite's AdamW train step (``optax.adamw(1e-3,
  weight_decay=1e-4)``, learning rate injected as in the suite's grid) —
  every ratio is to this.
* ``grad``: ``jax.value_and_grad(loss_fn)`` alone (the floor both share).
* ``precondition``: the default K-FAC train step with statistics and inverses
  never due (``stats_every=inverse_every=2**30``, its state advanced past step
  0, which always computes them): the cost K-FAC adds on every step
  (preconditioning, KL clip, momentum).
* ``statistics step``: the default K-FAC train step with statistics due on
  every call and inverses never (after step 0): ``precondition`` plus what
  the default's statistics add inside the step (Monte Carlo on the leading
  half of the batch, and the diagnostics noise scaling reads: a true-label
  pass over a quarter of that half); XLA shares the forward with the
  gradient's.
* ``statistics step, no diagnostics``: the same with ``noise_scaling=None``
  (no diagnostics): the difference is the diagnostics' in-step cost.
* ``statistics + refresh step``: the default K-FAC train step with statistics
  and Cholesky inverses on every call (periods 1: no conditional), what the
  default's periodic step costs inside the train step.
* ``stats``: one factor estimate alone on the whole batch
  (``kfl.estimate_curvature``, Monte Carlo): forward, sampled-output
  backward, Gram matrices.
* ``inverses cholesky`` / ``inverses eigh``: all damped factor inverses of
  that estimate (damping ``kfl.alias.DEFAULT_DAMPING``).
* ``default step (amortized)``: the default K-FAC train step run on the
  task's batches in turn, the mean step over windows of 40 steps (4
  statistics and 4 inverse refreshes each).
* ``estimate``: ``precondition + (statistics step − precondition + inverses
  cholesky) / 10``, to compare with the measured amortized step; the
  amortized window's median step at each position ``count % 10`` is printed
  too (position 0: statistics and inverses due).

Prints a table per model and a summary (ratios to AdamW), writes
``benchmarks/results/phases.json``. Run ``python benchmarks/phases.py``
(``--models mlp,gru``, ``--rounds 5``, ``--quick``: small models, few calls,
fast compilation; a smoke test whose times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # pylint: disable=wrong-import-position
import suite_optim  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position
from suite_tasks import Task, common  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position
from kfac_jax_lite import alias  # pylint: disable=wrong-import-position
from kfac_jax_lite.curvature.specs import spec_for  # pylint: disable=wrong-import-position
from kfac_jax_lite.step.layers import LayerCache  # pylint: disable=wrong-import-position

NEVER = 1 << 30
ADAMW_LR = 1e-3
AMORTIZED_STEPS = 40  # a multiple of both default periods
REPS, QUICK_REPS = 20, 3
ROUNDS, QUICK_ROUNDS = 5, 2
QUICK_AMORTIZED_STEPS = 10
AMORTIZED = "default step (amortized)"
STATS_STEP = "statistics step"
REFRESH_STEP = "statistics + refresh step"
ESTIMATE = "estimate"
RoundFn = Callable[[], float]


def repeated(fn: Callable[..., Any], args: Sequence[Any], reps: int) -> RoundFn:
  """A round of ``reps`` calls of ``fn(*args)``, each blocked on.

  Args:
    fn: a compiled function.
    args: its arguments (the same every call).
    reps: calls per round.

  Returns:
    A function running one round and returning its median call in seconds.
  """
  def round_() -> float:
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return float(np.median(times))
  return round_


def amortized(step: Callable[..., Any], state: Sequence[Any], batches: Sequence[Any],
              steps: int) -> RoundFn:
  """Rounds of ``steps`` consecutive train steps (the state advancing).

  Args:
    step: compiled ``step(*state, batch) -> (*state, loss)``.
    state: its state after the throwaway step 0 (so windows start at step 1).
    batches: the batches, in turn.
    steps: steps per round.

  Returns:
    A function running one round and returning its mean step in seconds.
  """
  runner = timing.TimedSteps(step, state, batches)
  runner.count = 1

  def round_() -> float:
    runner.run(steps)
    return float(np.mean(runner.times[-steps:]))
  round_.runner = runner  # type: ignore[attr-defined]  # for by_position
  return round_


def by_position(runner: timing.TimedSteps, period: int) -> list[float]:
  """Median seconds of the timed steps at each position ``count % period``
  (position 0: the steps where statistics and inverses are due)."""
  counts, times = np.asarray(runner.counts), np.asarray(runner.times)
  return [float(np.median(times[counts % period == k])) for k in range(period)]


def compiled(fn: Callable[..., Any], *args: Any,
             options: dict[str, Any] | None) -> Callable[..., Any]:
  """``jax.jit(fn)`` compiled ahead of time for ``args`` and called once."""
  out, _ = common.compile_step(jax.jit(fn), *args, compiler_options=options)
  jax.block_until_ready(out(*args))
  return out


def train_steps(task: Task, batch: Any, options: dict[str, Any] | None,
                reps: int, steps: int) -> dict[str, RoundFn]:
  """The train steps: AdamW, K-FAC preconditioning only, statistics steps, default K-FAC.

  Args:
    task: the suite's model.
    batch: the batch of the repeated calls.
    options: XLA compiler options (``None``: the defaults).
    reps: calls per round.
    steps: steps per amortized round.

  Returns:
    Phase name -> round function.
  """
  adamw = suite_optim.grid_optimizer("adamw", task.params)(ADAMW_LR)
  default = kfl.kfac(task.loss_fn, batch)
  out = {}
  for name, tx in (
      ("adamw", adamw),
      ("precondition", kfl.kfac(task.loss_fn, batch, stats_every=NEVER, inverse_every=NEVER)),
      (STATS_STEP, kfl.kfac(task.loss_fn, batch, stats_every=1, inverse_every=NEVER)),
      (STATS_STEP + ", no diagnostics",
       kfl.kfac(task.loss_fn, batch, stats_every=1, inverse_every=NEVER, noise_scaling=None)),
      (REFRESH_STEP, kfl.kfac(task.loss_fn, batch, stats_every=1, inverse_every=1))):
    state = (*task.init_state, tx.init(task.params))
    step = compiled(task.make_step(tx), *state, batch, options=options)
    if name != "adamw":  # step 0 computes statistics and inverses
      state = tuple(step(*state, batch)[:-1])
    out[name] = repeated(step, (*state, batch), reps)
  state = (*task.init_state, default.init(task.params))
  step = compiled(task.make_step(default), *state, task.batches[0], options=options)
  state = tuple(step(*state, task.batches[0])[:-1])
  out[AMORTIZED] = amortized(step, state, task.batches, steps)
  return out


def curvature_phases(task: Task, batch: Any, options: dict[str, Any] | None,
                     reps: int) -> dict[str, RoundFn]:
  """The gradient alone, one factor estimate and the factors' inverses.

  Args:
    task: the suite's model.
    batch: the batch of every call.
    options: XLA compiler options (``None``: the defaults).
    reps: calls per round.

  Returns:
    Phase name -> round function.
  """
  loss_fn, params = task.loss_fn, task.params
  key = jax.random.key(0)
  grad = compiled(jax.value_and_grad(loss_fn), params, batch, options=options)
  stats = compiled(lambda p, b, k: kfl.estimate_curvature(loss_fn, p, b, key=k,
                                                          estimator="mc"),
                   params, batch, key, options=options)
  factors = stats(params, batch, key)
  layers = LayerCache(loss_fn, batch, kfl.LayerOptions())(params).factored

  def inverses(method: str) -> Callable[..., Any]:
    return compiled(lambda f: {l.name: spec_for(l).inverses(f[l.name], alias.DEFAULT_DAMPING,
                                                            method) for l in layers},
                    factors, options=options)

  return {"grad": repeated(grad, (params, batch), reps),
          "stats": repeated(stats, (params, batch, key), reps),
          "inverses cholesky": repeated(inverses("cholesky"), (factors,), reps),
          "inverses eigh": repeated(inverses("eigh"), (factors,), reps)}


def interleaved(phases: dict[str, RoundFn], rounds: int) -> dict[str, list[float]]:
  """Every phase's per-round figure over ``rounds`` rounds, the order rotating."""
  names = list(phases)
  out: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      out[name].append(phases[name]())
  return out


def measure(task: Task, rounds: int, quick: bool) -> dict[str, Any]:
  """All phases of one model: per-round figures, medians and ratios to AdamW.

  Args:
    task: the suite's model.
    rounds: interleaved timing rounds.
    quick: few calls per round, short amortized windows, fast compilation.

  Returns:
    ``{"title", "rounds": {phase: [s]}, "seconds": {phase: s},
    "ratios": {phase: x AdamW}}``, with the derived ``estimate``.
  """
  batch = task.batches[0]
  options = common.FAST_COMPILE if quick else None
  reps = QUICK_REPS if quick else REPS
  steps = QUICK_AMORTIZED_STEPS if quick else AMORTIZED_STEPS
  phases = {**train_steps(task, batch, options, reps, steps),
            **curvature_phases(task, batch, options, reps)}
  per_round = interleaved(phases, rounds)
  order = ["adamw", "grad", "precondition", STATS_STEP, STATS_STEP + ", no diagnostics",
           REFRESH_STEP, "stats", "inverses cholesky", "inverses eigh", AMORTIZED]
  seconds = {n: float(np.median(per_round[n])) for n in order}
  seconds[ESTIMATE] = seconds["precondition"] + (
      (seconds[STATS_STEP] - seconds["precondition"]) / alias.DEFAULT_STATS_EVERY
      + seconds["inverses cholesky"] / alias.DEFAULT_INVERSE_EVERY)
  ratios = {n: s / seconds["adamw"] for n, s in seconds.items()}
  return {"title": task.title, "rounds": per_round, "seconds": seconds, "ratios": ratios,
          "amortized by position": by_position(phases[AMORTIZED].runner,
                                               alias.DEFAULT_STATS_EVERY)}


def format_model(name: str, result: dict[str, Any]) -> str:
  """One model's table: phase, median ms, ratio to the AdamW step."""
  lines = [f"{name}: {result['title']}",
           f"  {'phase':42s} {'median ms':>10s} {'x AdamW':>8s}"]
  for phase, s in result["seconds"].items():
    label = "estimate: precond + (stats step - precond + inv chol)/10" if phase == ESTIMATE \
        else phase
    lines.append(f"  {label:42s} {s * 1e3:10.3f} {result['ratios'][phase]:8.2f}")
  lines.append("  amortized window, median ms by step % period: " + ", ".join(
      f"{k}: {s * 1e3:.3f}" for k, s in enumerate(result["amortized by position"])))
  return "\n".join(lines)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Model -> the amortized K-FAC step's parts as ratios to the AdamW step
  (``diagnostics/10`` is part of ``stats/10``)."""
  out = {}
  for name, r in results.items():
    x = r["ratios"]
    plain = x[STATS_STEP + ", no diagnostics"]
    out[name] = {"precondition": x["precondition"],
                 "stats/10": (x[STATS_STEP] - x["precondition"]) / alias.DEFAULT_STATS_EVERY,
                 "diagnostics/10": (x[STATS_STEP] - plain) / alias.DEFAULT_STATS_EVERY,
                 "inverses/10": x["inverses cholesky"] / alias.DEFAULT_INVERSE_EVERY,
                 "estimate": x[ESTIMATE], "amortized": x[AMORTIZED],
                 "diagnostics / statistics in the step": (x[STATS_STEP] - plain) / max(
                     plain - x["precondition"], 1e-9)}
  return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
  """The summary as a markdown table (ratios to the AdamW step)."""
  cols = ["precondition", "stats/10", "diagnostics/10", "inverses/10", "estimate", "amortized",
          "diagnostics / statistics in the step"]
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, row in summary.items():
    lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
  return "\n".join(lines)


def header() -> list[str]:
  """Machine, load (``uptime``), versions and commit."""
  import optax  # pylint: disable=import-outside-toplevel
  return [
      f"machine: {platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs, "
      f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})",
      f"python {platform.python_version()}, jax {jax.__version__}, optax "
      f"{optax.__version__}, commit {suite.git_commit()}, "
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
      "uptime at start: " + uptime()]


def uptime() -> str:
  """The ``uptime`` line (its load averages), or ``os.getloadavg`` without it."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(suite.TASKS),
                      help=f"comma-separated subset of {','.join(suite.TASKS)}")
  parser.add_argument("--rounds", type=int, default=None,
                      help=f"interleaved rounds (default {ROUNDS}; --quick {QUICK_ROUNDS})")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: small models, few calls, fast compilation")
  parser.add_argument("--json", default=os.path.join(suite.REPO, "benchmarks", "results",
                                                     "phases.json"))
  args = parser.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in args.models if m not in suite.TASKS]
  if unknown:
    parser.error(f"--models: unknown {unknown}; choose from {list(suite.TASKS)}")
  if args.rounds is not None and args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Measures every model's phases, prints the tables, writes the JSON.

  Returns:
    What the JSON holds: ``header``, ``models`` (see :func:`measure`) and
    ``summary`` (see :func:`summarize`).
  """
  args = parse_args(argv)
  lines = header()
  print("\n".join(lines), flush=True)
  wall = time.perf_counter()
  steps = QUICK_AMORTIZED_STEPS if args.quick else AMORTIZED_STEPS
  results = {}
  for name in args.models:
    results[name] = measure(suite.TASKS[name](steps, args.quick), args.rounds, args.quick)
    print("\n" + format_model(name, results[name]), flush=True)
    write(args.json, {"header": lines, "models": results})  # kept if a later model is cut short
  summary = summarize(results)
  lines += ["uptime at end: " + uptime(), f"wall time: {time.perf_counter() - wall:.0f} s",
            f"rounds: {args.rounds}, quick: {args.quick}"]
  print("\n" + "\n".join(lines[-3:]) + "\n\nratios to the AdamW step\n"
        + format_summary(summary))
  result = {"header": lines, "models": results, "summary": summary}
  write(args.json, result)
  print(f"JSON written to {args.json}")
  return result


def write(path: str, result: dict[str, Any]) -> None:
  """Writes ``result`` as JSON to ``path`` (creating its folder)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
