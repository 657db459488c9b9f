"""K-FAC step times on CPU with ``OPENBLAS_NUM_THREADS`` unset: before and after.

jax's CPU eigh/Cholesky run on the BLAS library scipy links; with its default
thread count (one per core) its threads fought XLA's and made inverse steps
slow. The library now limits that one library to a single thread on the first
CPU inverse (``kfac_jax_lite/_cpu_blas.py``). Three configurations, each a
fresh process (the thread count is set when BLAS loads), run in alternating
order over several rounds so the load of a shared machine hits them alike:

* ``before``: variable unset, the library's limit switched off
  (``_cpu_blas.ENABLED = False``): what users got before the fix;
* ``after``: variable unset, the library's default;
* ``env=1``: ``OPENBLAS_NUM_THREADS=1`` set (the former workaround).

Models: the ResNet of ``examples/resnet_digits.py`` (batch 128, K-FAC
"expand", its tuned settings) and the MLP of ``examples/digits.py`` (batch
256), statistics every step, inverses every 10 steps, ``eigh``. Each process
compiles the step ahead of time, drops 3 warm-up steps and times ``--steps``
steps; "inverse steps" are those that refresh the inverses.

Run ``python benchmarks/blas_threads.py`` (``--rounds``, ``--steps``,
``--models``, ``--quick``); it prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, os.path.join(_ROOT, "examples"))
import common  # pylint: disable=wrong-import-position
import digits  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
import resnet_digits  # pylint: disable=wrong-import-position

import timing  # pylint: disable=wrong-import-position
from kfac_jax_lite import _cpu_blas  # pylint: disable=wrong-import-position

CONFIGS = ("before", "after", "env=1")
MODELS = ("resnet", "mlp")
INVERSE_EVERY = 10
WARMUP_STEPS = 3


def _first_batches(it: Any, n: int) -> list[Any]:
  """The first ``n`` batches of ``it`` as jax arrays."""
  return [{k: jnp.asarray(v) for k, v in b.items()} for b in itertools.islice(it, n)]


def _resnet_step() -> tuple[Any, tuple[Any, ...], list[Any]]:
  """The ResNet example's K-FAC ("expand") train step, state and batches."""
  train, _ = resnet_digits.load_images()
  problem = resnet_digits.make_problem()
  batches = _first_batches(common.batches(train, resnet_digits.BATCH_SIZE), 5)
  tx = common.make_kfac(problem.kfac_loss, batches[0], inverse_every=INVERSE_EVERY,
                        **resnet_digits.KFAC_HPARAMS)
  state = (problem.params, problem.batch_stats, tx.init(problem.params))
  return resnet_digits.make_train_step(problem.train_loss, tx), state, batches


def _mlp_step() -> tuple[Any, tuple[Any, ...], list[Any]]:
  """The digits MLP's K-FAC train step, state and batches."""
  train, _ = digits_data.load_split()
  net, loss_fn = digits_data.make_problem("mlp")
  params = digits_data.init_params(net)
  batches = _first_batches(digits_data.batches(train), 5)
  tx = digits.make_optimizer("kfac", "mlp", loss_fn, batches[0],
                             inverse_every=INVERSE_EVERY)
  return digits.make_train_step(loss_fn, tx), (params, tx.init(params)), batches


def child(config: str, model: str, steps: int) -> None:
  """Times one configuration in this process; prints the times as JSON."""
  _cpu_blas.ENABLED = config != "before"
  step, state, batches = _resnet_step() if model == "resnet" else _mlp_step()
  compiled, _ = common.compile_step(step, *state, batches[0])
  runner = timing.TimedSteps(compiled, state, batches)
  runner.run(WARMUP_STEPS, record=False)
  runner.run(steps)
  print(json.dumps({"times": runner.times, "counts": runner.counts}))


def _run_child(config: str, model: str, steps: int) -> dict[str, Any]:
  """Runs :func:`child` in a fresh process with ``config``'s environment."""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  if config == "env=1":
    env["OPENBLAS_NUM_THREADS"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  out = subprocess.run([sys.executable, __file__, "--child", config, model, str(steps)],
                       env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Median / mean / max of all steps and of the inverse steps, in ms."""
  times = np.concatenate([r["times"] for r in runs]) * 1e3
  counts = np.concatenate([r["counts"] for r in runs])
  inverse = times[counts % INVERSE_EVERY == 0]
  return dict(median=np.median(times), mean=times.mean(), max=times.max(),
              inv_median=np.median(inverse), inv_max=inverse.max(),
              other_median=np.median(times[counts % INVERSE_EVERY != 0]))


def main(argv: Sequence[str] | None = None) -> None:
  """Alternates the configurations over rounds and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=60, help="timed steps per process")
  parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
  parser.add_argument("--quick", action="store_true", help="1 round of 20 steps")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args.child[0], args.child[1], int(args.child[2]))
    return
  rounds, steps = (1, 20) if args.quick else (args.rounds, args.steps)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT,
                          capture_output=True, text=True).stdout.strip()
  print(f"CPUs {os.cpu_count()}, commit {commit}, load (1/5/15 min) at start "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
  runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in range(rounds):
    for model in args.models:
      for config in CONFIGS[r % 3:] + CONFIGS[:r % 3]:
        runs.setdefault((model, config), []).append(_run_child(config, model, steps))
        print(f"round {r + 1}/{rounds}: {model} {config} done", file=sys.stderr, flush=True)
  print("load at end " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
  print(f"\n| model | configuration | median step | mean | max | inverse steps median | "
        f"inverse steps max | other steps median |\n|{' --- |' * 8}")
  for (model, config), result in runs.items():
    s = summarize(result)
    print(f"| {model} | {config} | {s['median']:.1f} ms | {s['mean']:.1f} ms | "
          f"{s['max']:.0f} ms | {s['inv_median']:.1f} ms | {s['inv_max']:.0f} ms | "
          f"{s['other_median']:.1f} ms |")


if __name__ == "__main__":
  main()
