"""Step time of K-FAC vs Adam on the ResNet and the transformer; expand vs reduce.

The models, losses, data and tuned settings are those of
``examples/resnet_digits.py`` (a ResNet with BatchNorm on 8x8 digits, batch
128: six convolutions and a dense head as Kronecker blocks) and
``examples/transformer_tokens.py`` (a 2-block causal transformer on
16-token sequences, batch 64: attention projections, MLPs and the
unembedding as dense blocks, the token embedding as an embedding block). For
each, in one process:

1. Step time: the jitted full train step (``value_and_grad`` + optimizer
   ``update`` + ``apply_updates``; the ResNet's step also carries BatchNorm's
   running averages), compiled ahead of time, a few warm-up steps run and
   discarded, then every call timed to ``jax.block_until_ready``. Adam and
   the K-FAC configurations run in interleaved rounds (the order rotates
   every round) so that machine noise hits all alike. K-FAC
   configurations: the layer family's approximation (``conv_approximation``
   for the ResNet, ``dense_approximation`` for the transformer) in
   ``{expand, reduce}`` x ``(stats_every, inverse_every)`` in
   ``{(1, 10), (10, 50)}``. Reported: median and mean step, their K-FAC/Adam
   ratios (the mean includes the amortized statistics and inverse steps when
   the round length is a multiple of 50) and the compile time.
2. The statistics phase alone: a jitted ``kfl.estimate_curvature`` (one
   Monte-Carlo Fisher sample, as in the optimizer: the forward pass, one
   backward pass of sampled output cotangents to the layer outputs, the Gram
   matrices ``A`` and ``G``), expand vs reduce, medians of interleaved calls.

Run ``python benchmarks/families.py`` (``--rounds``, ``--round-steps``,
``--stats-calls``, ``--models``, ``--quick``); it prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import common  # pylint: disable=wrong-import-position
import resnet_digits  # pylint: disable=wrong-import-position
import transformer_tokens  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position
from step_time import machine_info  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position

APPROXIMATIONS = ("expand", "reduce")
SCHEDULES = ((1, 10), (10, 50))  # (stats_every, inverse_every)
WARMUP_STEPS = 3
NUM_BATCHES = 5


@dataclasses.dataclass(frozen=True)
class Family:
  """One example's model, as the benchmark needs it.

  Attributes:
    name: the model's name in the tables.
    option: the ``kfl.LayerOptions`` field that picks the approximation.
    module: the example module (``ADAM_LR``, ``KFAC_HPARAMS``).
    loss_fn: K-FAC's loss ``(params, batch) -> scalar``.
    make_step: the example's train step for an optimizer.
    initial_state: the train step's state before the optimizer's, e.g.
      ``(params,)`` or ``(params, batch_stats)``.
    batches: a few training batches, cycled.
  """
  name: str
  option: str
  module: Any
  loss_fn: common.LossFn
  make_step: Callable[[Any], Any]
  initial_state: tuple[Any, ...]
  batches: list[common.Batch]


def resnet_family() -> Family:
  """The ResNet of ``examples/resnet_digits.py`` at its default widths."""
  problem = resnet_digits.make_problem()
  train, _ = resnet_digits.load_images()
  it = common.batches(train, resnet_digits.BATCH_SIZE)
  return Family("ResNet (digits)", "conv_approximation", resnet_digits, problem.kfac_loss,
                lambda tx: resnet_digits.make_train_step(problem.train_loss, tx),
                (problem.params, problem.batch_stats),
                [jax.device_put(next(it)) for _ in range(NUM_BATCHES)])


def transformer_family() -> Family:
  """The transformer of ``examples/transformer_tokens.py`` at its default width."""
  problem = transformer_tokens.make_problem()
  _, train, _ = transformer_tokens.make_data()
  it = common.batches(train, transformer_tokens.BATCH_SIZE)
  return Family("transformer (tokens)", "dense_approximation", transformer_tokens,
                problem.loss_fn, lambda tx: common.make_train_step(problem.loss_fn, tx),
                (problem.params,), [jax.device_put(next(it)) for _ in range(NUM_BATCHES)])


FAMILIES = {"resnet": resnet_family, "transformer": transformer_family}


class Runner(timing.TimedSteps):
  """One optimizer's compiled step, its running state and its step times."""

  def __init__(self, family: Family, name: str, **settings: Any):
    """Builds and compiles the step.

    Args:
      family: the model.
      name: ``"adam"`` or ``"kfac"``.
      **settings: K-FAC settings beyond the example's tuned ones.
    """
    params = family.initial_state[0]
    tx = common.make_optimizer(name, family.loss_fn, family.batches[0],
                               adam_lr=family.module.ADAM_LR,
                               kfac_hparams=family.module.KFAC_HPARAMS, **settings)
    state = (*family.initial_state, tx.init(params))
    step, self.compile_s = common.compile_step(family.make_step(tx), *state, family.batches[0])
    super().__init__(step, state, family.batches)
    self.run(WARMUP_STEPS, record=False)


def step_rows(family: Family, rounds: int,
              round_steps: int) -> tuple[list[str], float]:
  """Every K-FAC configuration's step time against Adam's.

  Args:
    family: the model.
    rounds: interleaved timing rounds.
    round_steps: steps per optimizer per round.

  Returns:
    The markdown rows and Adam's median step in seconds.
  """
  adam = Runner(family, "adam")
  kfac = {(a, s): Runner(family, "kfac", layers=kfl.LayerOptions(**{family.option: a}), stats_every=s[0],
                         inverse_every=s[1])
          for a in APPROXIMATIONS for s in SCHEDULES}
  timing.interleave([adam, *kfac.values()], rounds, round_steps)
  med_a, mean_a = np.median(adam.times), np.mean(adam.times)
  rows = []
  for (approximation, (stats, inverses)), x in kfac.items():
    med, mean = np.median(x.times), np.mean(x.times)
    rows.append(f"| {family.name} | {approximation} | stats {stats}, inverses {inverses} | "
                f"{med * 1e3:.1f} / {med_a * 1e3:.1f} | {med / med_a:.2f}x | "
                f"{mean / mean_a:.2f}x | {x.compile_s:.1f} / {adam.compile_s:.1f} |")
  return rows, float(med_a)


def statistics_pass(family: Family, approximation: str) -> Callable[..., Any]:
  """A jitted ``(params, batch, key) -> factors``: one MC Fisher estimate."""
  def estimate(params: Any, batch: common.Batch, key: jax.Array) -> Any:
    return kfl.estimate_curvature(family.loss_fn, params, batch, key=key, estimator="mc",
                                  layers=kfl.LayerOptions(**{family.option: approximation}))
  return jax.jit(estimate)


def stats_rows(family: Family, calls: int, adam_step_s: float) -> list[str]:
  """Markdown rows: the statistics pass alone, expand vs reduce, against Adam's step."""
  params, batch, key = family.initial_state[0], family.batches[0], jax.random.key(0)
  fns = {a: statistics_pass(family, a) for a in APPROXIMATIONS}
  for fn in fns.values():
    jax.block_until_ready(fn(params, batch, key))  # Compile and warm up.
  times: dict[str, list[float]] = {a: [] for a in APPROXIMATIONS}
  for i in range(calls):
    for a in APPROXIMATIONS[i % 2:] + APPROXIMATIONS[:i % 2]:
      start = time.perf_counter()
      jax.block_until_ready(fns[a](params, batch, key))
      times[a].append(time.perf_counter() - start)
  rows = []
  for a in APPROXIMATIONS:
    med = float(np.median(times[a]))
    rows.append(f"| {family.name} | {a} | {med * 1e3:.1f} | {med / adam_step_s:.2f}x |")
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
  parser.add_argument("--round-steps", type=int, default=50,
                      help="steps per optimizer per round (a multiple of 50 for the mean)")
  parser.add_argument("--stats-calls", type=int, default=20,
                      help="timed statistics passes per approximation")
  parser.add_argument("--models", nargs="+", choices=sorted(FAMILIES),
                      default=list(FAMILIES))
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: one round of 10 steps, 3 statistics passes")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.round_steps, args.stats_calls = 1, 10, 3
  start = time.perf_counter()
  print(machine_info())
  families = {name: FAMILIES[name]() for name in args.models}
  print(f"\nStep time ({args.rounds} interleaved rounds of {args.round_steps} steps, "
        f"{WARMUP_STEPS} warm-up steps excluded), ms median K-FAC / Adam\n")
  print("| model | approximation | K-FAC schedule | median ms K-FAC / Adam "
        "| median ratio | mean ratio | compile s K-FAC / Adam |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  adam_s = {}
  for name, family in families.items():
    rows, adam_s[name] = step_rows(family, args.rounds, args.round_steps)
    print("\n".join(rows), flush=True)
  print(f"\nStatistics pass alone (jitted kfl.estimate_curvature, one MC sample), "
        f"median of {args.stats_calls} calls, against the median Adam step above\n")
  print("| model | approximation | statistics ms | / Adam step |")
  print("| --- | --- | --- | --- |")
  for name, family in families.items():
    print("\n".join(stats_rows(family, args.stats_calls, adam_s[name])), flush=True)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"\nload average (1 min) at the end: {load:.2f}; "
        f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
