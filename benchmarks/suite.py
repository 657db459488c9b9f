"""Does K-FAC reach my loss sooner than the AdamW I already have? The suite.

Five models that users train, small enough for two CPU cores, all data
offline (``suite_tasks.py``, ``suite_text.py``): the digits MLP and deep
autoencoder of ``examples/digits.py``, the ResNet with BatchNorm of
``examples/resnet_digits.py``, a character-level causal transformer on the
Python standard library's sources and a GRU reading digits row by row. Every
loss is a ``kfl.losses`` function (mean over the batch).

Optimizers (``suite_optim.py``): ``optax.adamw`` over learning rates
{1e-3, 3e-3, 1e-2, 3e-2, 1e-1} (weight decay 1e-4), ``optax.contrib.muon`` over
the same grid, and K-FAC as ``kfl.kfac(loss_fn, sample_batch,
**kwargs)`` with ``kwargs`` from ``--kfac key=value`` (none by default: the
library's defaults), plus any ``--variant name:key=value,...`` configs.

Protocol. Per model, every run starts from the same initialization and sees
the same batches in the same order for the same number of steps. Each
distinct train step is compiled ahead of time (excluded; a grid shares one
compilation: the learning rate is injected state) and called once on a
throwaway state. The runs then advance interleaved in chunks of ``--chunk``
steps (the order rotating each round, ``timing.interleave``) so that the
load of a shared machine hits all alike; a chunk's wall-clock is measured
from its first dispatch to ``block_until_ready`` of its last state, and the
evaluation loss is evaluated after each chunk, outside the timed region.

Figures. Tuned AdamW is the AdamW grid point with the lowest final evaluation
loss; its final loss is the target. For tuned Muon (chosen the same way),
K-FAC and each variant: seconds to first reach the target (linear
interpolation inside an evaluation interval; "never" if not reached) as a
ratio to tuned AdamW's seconds to first reach it, the same ratio of steps,
the mean step time over AdamW's, the final evaluation loss, and the loss at
tuned AdamW's total train seconds ("(end)": the run was shorter; its final
loss). Printed as a markdown table, written as JSON (``--json``) and a PNG
(``--png``, one panel per model).

Run ``python benchmarks/suite.py`` (``--quick`` smoke test, ``--models
mlp,ae,resnet,lm,gru``, ``--kfac damping=1e-2``, ``--variant
cheap:stats_every=10,inverse_every=50``).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite_optim  # pylint: disable=wrong-import-position
import suite_report  # pylint: disable=wrong-import-position
import suite_tasks  # pylint: disable=wrong-import-position
import suite_text  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position
from suite_report import Curve  # pylint: disable=wrong-import-position
from suite_tasks import Task, common  # pylint: disable=wrong-import-position

TASKS: dict[str, Callable[[int, bool], Task]] = {
    "mlp": suite_tasks.mlp_task, "ae": suite_tasks.autoencoder_task,
    "resnet": suite_tasks.resnet_task, "lm": suite_text.lm_task,
    "gru": suite_tasks.gru_task}
STEPS = {"mlp": 500, "ae": 500, "resnet": 300, "lm": 300, "gru": 400}
CHUNK = 20
QUICK_STEPS, QUICK_CHUNK = 10, 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChunkRunner(timing.TimedSteps):
  """A compiled step run in timed chunks, its evaluation loss after each chunk.

  Attributes:
    curve: the :class:`Curve` filled in as the run goes.
  """

  def __init__(self, curve: Curve, step: Any, state: Sequence[Any], task: Task):
    super().__init__(step, state, task.batches)
    self.curve = curve
    self.evaluate = task.evaluate
    curve.steps.append(0)
    curve.seconds.append(0.0)
    curve.loss.append(self.evaluate(self.state))

  def run(self, steps: int, record: bool = True) -> None:
    """Runs ``steps`` steps timed as one chunk, then evaluates (untimed)."""
    start = time.perf_counter()
    for _ in range(steps):
      out = self.step(*self.state, self.batches[self.count % len(self.batches)])
      self.state = tuple(out[:-1])
      self.count += 1
    jax.block_until_ready(self.state)
    elapsed = time.perf_counter() - start
    self.times.append(elapsed)
    self.curve.steps.append(self.count)
    self.curve.seconds.append(self.curve.seconds[-1] + elapsed)
    self.curve.loss.append(self.evaluate(self.state))


def compile_warm(step: Any, state: tuple[Any, ...], batch: Any,
                 options: dict[str, Any] | None) -> tuple[Any, float]:
  """Compiles ``step`` ahead of time and calls it once (result discarded)."""
  compiled, seconds = common.compile_step(step, *state, batch, compiler_options=options)
  jax.block_until_ready(compiled(*state, batch))
  return compiled, seconds


def make_runners(task: Task, specs: Sequence[suite_optim.OptSpec],
                 options: dict[str, Any] | None) -> list[ChunkRunner]:
  """One runner per grid point and K-FAC config, compiled and warmed up."""
  runners = []
  for spec in specs:
    if spec.family == "kfac":
      txs = [(None, suite_optim.make_kfac(task.loss_fn, task.batches[0], spec.kwargs))]
    else:
      factory = suite_optim.grid_optimizer(spec.family, task.params)
      txs = [(lr, factory(lr)) for lr in spec.grid]
    compiled, compile_s = None, 0.0
    for lr, tx in txs:
      state = (*task.init_state, tx.init(task.params))
      if compiled is None:  # a grid's runs share one compiled step
        compiled, compile_s = compile_warm(task.make_step(tx), state, task.batches[0],
                                           options)
      label = spec.name if lr is None else f"{spec.name} lr={lr:g}"
      curve = Curve(label, spec.name, lr, compile_s=compile_s)
      runners.append(ChunkRunner(curve, compiled, state, task))
  return runners


def run_model(task: Task, specs: Sequence[suite_optim.OptSpec], steps: int, chunk: int,
              options: dict[str, Any] | None) -> list[Curve]:
  """All runs of one model, interleaved in chunks; their curves."""
  start = time.perf_counter()
  runners = make_runners(task, specs, options)
  setup = time.perf_counter() - start
  timing.interleave(runners, steps // chunk, chunk)
  print(f"{task.name}: setup and compilation {setup:.1f} s, runs "
        f"{time.perf_counter() - start - setup:.1f} s", flush=True)
  return [r.curve for r in runners]


def git_commit() -> str:
  """The worktree's commit, with ``+dirty`` when it has uncommitted changes."""
  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True,
                          text=True, check=False).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD") or "unknown"
  return commit + ("+dirty" if git("status", "--porcelain") else "")


def header(specs: Sequence[suite_optim.OptSpec],
           load: tuple[float, ...]) -> list[str]:
  """Machine, versions, commit, load and how each optimizer is called."""
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  lines = [
      f"machine: {platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs, "
      f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})",
      f"python {platform.python_version()}, jax {jax.__version__}, optax "
      f"{optax.__version__}, flax {flax.__version__}, commit {git_commit()}, "
      f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}",
      "load average at start: " + " ".join(f"{x:.2f}" for x in load),
      f"evaluation loss: digits models on their {suite_tasks.EVAL_SPLIT} images, the LM "
      "on held-out text"]
  lines += [f"{s.name}: {suite_optim.describe(s)}" for s in specs]
  return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """The command line (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(TASKS),
                      help=f"comma-separated subset of {','.join(TASKS)}")
  parser.add_argument("--kfac", action="append", default=[], metavar="KEY=VALUE",
                      help="a keyword argument of kfl.kfac for the default K-FAC run")
  parser.add_argument("--variant", "--kfac-configs", action="append", default=[],
                      metavar="NAME:KEY=VALUE,...",
                      help="an extra K-FAC config run alongside (repeatable)")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"steps per run for every model (default per model: {STEPS})")
  parser.add_argument("--chunk", type=int, default=None,
                      help=f"steps per timed chunk = evaluation interval (default {CHUNK})")
  parser.add_argument("--quick", action="store_true",
                      help=f"smoke test: {QUICK_STEPS} steps, chunks of {QUICK_CHUNK}, "
                      "narrower models, fast compilation")
  parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results",
                                                     "suite.json"))
  parser.add_argument("--png", default=os.path.join(REPO, "docs", "suite.png"))
  parser.add_argument("--no-layers", action="store_true",
                      help="do not print kfl.find_layers of each model")
  parser.add_argument("--eval", choices=("train", "heldout"), default="train",
                      help="digits models: evaluation loss on the training or test images "
                      "(the LM is always evaluated on held-out text)")
  parser.add_argument("--baselines", default="adamw,muon",
                      help="tuned baselines to run (AdamW is the reference: always run)")
  args = parser.parse_args(argv)
  args.models = suite_optim.parse_models(parser, args.models, list(TASKS))
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the suite; prints the table, writes the JSON and the PNG.

  Returns:
    What the JSON holds: ``header``, ``summaries`` and ``curves`` per model.
  """
  args = parse_args(argv)
  suite_tasks.EVAL_SPLIT = args.eval
  load_start = os.getloadavg()
  wall = time.perf_counter()
  specs = [suite_optim.OptSpec("adamw", "adamw", suite_optim.ADAMW_GRID),
           *([suite_optim.OptSpec("muon", "muon", suite_optim.MUON_GRID)]
             if "muon" in args.baselines else []),
           suite_optim.OptSpec("kfac", "kfac", (None,),
                               suite_optim.parse_kwargs(args.kfac, "--kfac")),
           *map(suite_optim.parse_variant, args.variant)]
  lines = header(specs, load_start)
  print("\n".join(lines), flush=True)
  options = common.FAST_COMPILE if args.quick else None
  chunk = args.chunk or (QUICK_CHUNK if args.quick else CHUNK)
  curves, summaries, titles, floors = {}, {}, {}, {}
  for name in args.models:
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS[name])
    task = TASKS[name](steps, args.quick)
    if not args.no_layers:
      suite_tasks.print_layers(task)
    curves[name] = run_model(task, specs, steps, chunk, options)
    summaries[name] = suite_report.summarize(curves[name])
    titles[name], floors[name] = f"{name}: {task.title}", task.floor
    print(suite_report.format_table({name: summaries[name]}, titles), flush=True)
  lines.append("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
  lines.append(f"wall time: {time.perf_counter() - wall:.0f} s")
  print("\n" + "\n".join(lines[-2:]) + "\n\n" + suite_report.format_table(summaries, titles))
  result = {"header": lines, "summaries": summaries,
            "curves": {m: [c.__dict__ for c in cs] for m, cs in curves.items()}}
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1, default=str)
  suite_report.plot(curves, summaries, titles, floors, args.png)
  print(f"JSON written to {args.json}, plot to {args.png}")
  return result


if __name__ == "__main__":
  main()
