"""Timing compiled train steps side by side: the runner every benchmark uses."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax


class TimedSteps:
  """A compiled step ``step(*state, batch) -> (*state, loss)``, its running
  state and the time of every timed step.

  Attributes:
    state: the step's arguments before the batch (parameters, optimizer state, ...).
    count: steps run so far (timed or not).
    times: seconds of every timed step, in order.
    counts: the value of ``count`` before each timed step.
  """

  def __init__(self, step: Callable[..., Any], state: Sequence[Any], batches: Sequence[Any]):
    self.step = step
    self.state = tuple(state)
    self.batches = batches
    self.count = 0
    self.times: list[float] = []
    self.counts: list[int] = []

  def run(self, steps: int, record: bool = True) -> None:
    """Runs ``steps`` steps on the batches in turn, each timed to completion."""
    for _ in range(steps):
      batch = self.batches[self.count % len(self.batches)]
      start = time.perf_counter()
      out = self.step(*self.state, batch)
      jax.block_until_ready(out)
      if record:
        self.times.append(time.perf_counter() - start)
        self.counts.append(self.count)
      self.state = tuple(out[:-1])
      self.count += 1


def interleave(runners: Sequence[TimedSteps], rounds: int, steps: int) -> None:
  """``rounds`` rounds of ``steps`` steps per runner, rotating the order, so
  slow drifts of a shared machine hit every runner alike."""
  runners = list(runners)
  for r in range(rounds):
    shift = r % len(runners)
    for runner in runners[shift:] + runners[:shift]:
      runner.run(steps)
