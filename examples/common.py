"""What the K-FAC vs Adam examples share: optimizers, the timed loop, output.

The examples (``digits.py``, ``resnet_digits.py``, ``transformer_tokens.py``)
define their data, model and tuned hyperparameters; this module builds the
optimizers (K-FAC with momentum 0.9, ``optax.adam``), compiles a train step
ahead of time, runs it while timing only the train steps (the compilation and
the evaluations of the reported loss are excluded) and prints and plots the
runs.

Train steps here are jitted functions ``step(*state, batch) -> (*state,
loss)``, ``state`` a tuple such as ``(params, opt_state)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_lite as kfl

Batch = dict[str, np.ndarray]
LossFn = Callable[[Any, Batch], jax.Array]
State = tuple[Any, ...]
TrainStep = Callable[..., tuple[Any, ...]]

# --quick: XLA's optimizations cost more compile time than they save in 20 steps.
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True}


def batches(data: Batch, batch_size: int, seed: int = 0) -> Iterator[Batch]:
  """An infinite iterator of shuffled, fixed-size ``{"x", "y"}`` minibatches.

  Each epoch is a fresh permutation from a seeded numpy generator; the last
  incomplete batch of an epoch is dropped so every batch has the same shape
  (one compilation of the train step). Other keys of ``data`` are not batched.

  Args:
    data: ``{"x": ..., "y": ...}`` arrays with the same leading size.
    batch_size: examples per batch (at most the data size).
    seed: seed of the shuffling generator.

  Yields:
    ``{"x": [batch_size, ...], "y": [batch_size, ...]}`` numpy batches.
  """
  n = len(data["x"])
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}.")
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = perm[start:start + batch_size]
      yield {"x": data["x"][idx], "y": data["y"][idx]}


def lecun_normal(rng: np.random.Generator, shape: Sequence[int],
                 fan_in: int) -> jax.Array:
  """Flax's default kernel distribution, drawn with numpy.

  ``model.init`` compiles its random-number programs, which costs seconds on
  CPU; the examples trace the model with ``jax.eval_shape`` for the shapes
  and draw the values here instead.

  Args:
    rng: the numpy generator.
    shape: the kernel's shape.
    fan_in: the kernel's input size.

  Returns:
    A float32 array: a normal with variance ``1 / fan_in`` truncated at two
    standard deviations and rescaled to keep that variance.
  """
  z = rng.standard_normal(shape)
  while np.any(bad := np.abs(z) > 2.0):
    z[bad] = rng.standard_normal(int(bad.sum()))
  std = np.sqrt(1.0 / fan_in) / 0.87962566103423978  # Truncation fix.
  return jnp.asarray(z * std, np.float32)


def make_adam(learning_rate: float) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` that accepts (and ignores) ``batch=``."""
  return optax.with_extra_args_support(optax.adam(learning_rate))


def make_kfac(loss_fn: LossFn, sample_batch: Any, *, learning_rate: float,
              **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """``kfl.kfac`` with momentum 0.9, statistics every step, inverses every 10.

  Args:
    loss_fn: the loss ``(params, batch) -> scalar``.
    sample_batch: a training batch (for K-FAC's tracing).
    learning_rate: the learning rate (K-FAC's KL clip scales it down).
    **kwargs: other arguments of ``kfl.kfac`` (``damping``, ``kl_clip``,
      ``stats_every``, ``layers`` ...). The examples' settings were tuned with
      statistics every step, inverses every 10, ``eigh`` inverses.

  Returns:
    The optimizer (``update`` needs ``batch=``).
  """
  kwargs = {"momentum": 0.9, "stats_every": 1, "inverse_every": 10,
            "inverses": kfl.InverseOptions("eigh"), **kwargs}
  return kfl.kfac(loss_fn, sample_batch, learning_rate, **kwargs)


def make_optimizer(name: str, loss_fn: LossFn, sample_batch: Any, *,
                   adam_lr: float, kfac_hparams: Mapping[str, Any],
                   **overrides: Any) -> optax.GradientTransformationExtraArgs:
  """The tuned ``"kfac"`` or ``"adam"`` optimizer of an example.

  Args:
    name: ``"kfac"`` or ``"adam"``.
    loss_fn: the loss K-FAC preconditions.
    sample_batch: a training batch (for K-FAC's tracing).
    adam_lr: Adam's tuned learning rate.
    kfac_hparams: K-FAC's tuned settings (arguments of :func:`make_kfac`).
    **overrides: replace tuned settings (``learning_rate`` for both; for
      K-FAC any argument of :func:`make_kfac`).

  Returns:
    The optimizer (``update`` accepts ``batch=``).
  """
  if name == "adam":
    return make_adam(overrides.get("learning_rate", adam_lr))
  if name == "kfac":
    return make_kfac(loss_fn, sample_batch, **{**kfac_hparams, **overrides})
  raise ValueError(f"Unknown optimizer {name!r}.")


def make_train_step(loss_fn: LossFn,
                    tx: optax.GradientTransformationExtraArgs) -> jax.stages.Wrapped:
  """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``."""
  def step(params: Any, opt_state: Any, batch: Batch) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


def compile_step(step: jax.stages.Wrapped, *args: Any,
                 compiler_options: dict[str, Any] | None = None
                 ) -> tuple[TrainStep, float]:
  """Ahead-of-time compiles a jitted ``step`` for ``args``.

  Args:
    step: a ``jax.jit``-wrapped function.
    *args: example arguments (arrays or pytrees of them).
    compiler_options: XLA options, e.g. :data:`FAST_COMPILE`.

  Returns:
    The compiled step and the seconds compiling took.
  """
  start = time.perf_counter()
  compiled = step.lower(*args).compile(compiler_options)
  return compiled, time.perf_counter() - start


@dataclasses.dataclass
class Run:
  """One training run.

  Attributes:
    steps: steps at which the reported loss was evaluated (0 = init).
    loss: the reported loss at those steps.
    seconds: cumulative train-step wall-clock time at those steps.
    compile_s: compile time of the train step (first call), excluded above.
    test_accuracy: test-set accuracy at the end, where an example measures it.
  """
  steps: list[int]
  loss: list[float]
  seconds: list[float]
  compile_s: float
  test_accuracy: float | None = None


class _NoBar:
  """The part of tqdm's interface that :func:`fit` uses, doing nothing."""
  n = 0

  def update(self, k: int) -> None:
    self.n += k

  def set_postfix(self, **_: Any) -> None:
    pass

  def close(self) -> None:
    pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
  """A tqdm progress bar on stderr, or a silent stand-in."""
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def fit(step: jax.stages.Wrapped, state: State, batch_iter: Iterator[Batch], num_steps: int,
        evaluate: Callable[[State], float], *, label: str,
        eval_every: int | None = None, progress: bool = True,
        max_seconds: float | None = None,
        compiler_options: dict[str, Any] | None = None) -> tuple[Run, State]:
  """Compiles ``step`` and runs it, timing only the train steps.

  Args:
    step: a jitted ``step(*state, batch) -> (*state, loss)``.
    state: the initial state, e.g. ``(params, opt_state)``.
    batch_iter: the batches of steps 1, 2, ...; the first also compiles ``step``.
    num_steps: number of train steps.
    evaluate: the reported loss of a state (run outside the timed region).
    label: the progress bar's description.
    eval_every: evaluate every this many steps (default ``num_steps // 100``,
      at least 1) and after the last step.
    progress: show a tqdm progress bar.
    max_seconds: stop at the first evaluation after this much train time.
    compiler_options: XLA options of the compilation.

  Returns:
    The :class:`Run` (``test_accuracy`` unset) and the final state.
  """
  batch = next(batch_iter)
  step, compile_s = compile_step(step, *state, batch, compiler_options=compiler_options)
  eval_every = eval_every or max(1, num_steps // 100)
  run = Run([0], [evaluate(state)], [0.0], compile_s)
  bar = progress_bar(num_steps, label, progress)
  elapsed = 0.0
  start = time.perf_counter()
  for i in range(1, num_steps + 1):
    state = tuple(step(*state, batch)[:-1])
    batch = next(batch_iter)
    if i % eval_every == 0 or i == num_steps:
      jax.block_until_ready(state)
      elapsed += time.perf_counter() - start
      loss = evaluate(state)
      run.steps.append(i)
      run.loss.append(loss)
      run.seconds.append(elapsed)
      bar.set_postfix(loss=f"{loss:.4f}")
      bar.update(i - bar.n)
      if max_seconds is not None and elapsed >= max_seconds:
        break
      start = time.perf_counter()
  bar.close()
  return run, state


def platform_summary() -> str:
  """``jax <version> on <backend> (<n> CPUs)``, the first words of a report."""
  return f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs)"


def make_parser(description: str, default_steps: int, default_out: str,
                quick_help: str = "smoke test: 20 steps, narrower model, fast "
                "compilation, evaluation every 4 steps, no progress bar"
                ) -> argparse.ArgumentParser:
  """The examples' command line: ``--steps``, ``--out`` and ``--quick``.

  Args:
    description: the example's one-line description.
    default_steps: train steps per run.
    default_out: path of the PNG plot.
    quick_help: what ``--quick`` changes.

  Returns:
    The parser.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=default_steps,
                      help="train steps per run")
  parser.add_argument("--out", default=default_out, help="path of the PNG plot")
  parser.add_argument("--quick", action="store_true", help=quick_help)
  return parser


def format_table(title: str, runs: Mapping[str, Run], floor: float = 0.0,
                 count: int = 10) -> str:
  """Loss and time of every run at about ``count`` evenly spaced evaluations.

  Args:
    title: first line.
    runs: label -> run (all evaluated at the same steps).
    floor: subtracted from every loss (0: the losses as they are).
    count: number of intervals between the rows.

  Returns:
    The table, with the compile times (and the test accuracies, where
    measured) in the header.
  """
  first = next(iter(runs.values()))
  rows = sorted({int(round(k)) for k in np.linspace(0, len(first.steps) - 1, count + 1)})
  columns = [f"loss {l}" for l in runs] + [f"time {l}" for l in runs]
  width = max(11, *(len(c) + 2 for c in columns))
  lines = [title, "compile (excluded below): " + ", ".join(
      f"{l} {r.compile_s:.1f}s" for l, r in runs.items())]
  if first.test_accuracy is not None:
    lines.append("test accuracy: " + ", ".join(
        f"{l} {r.test_accuracy:.3f}" for l, r in runs.items()))
  lines.append(f"{'step':>6}" + "".join(f"{c:>{width}}" for c in columns))
  for k in rows:
    lines.append(f"{first.steps[k]:>6}"
                 + "".join(f"{r.loss[k] - floor:>{width}.4g}" for r in runs.values())
                 + "".join(f"{r.seconds[k]:>{width - 1}.2f}s" for r in runs.values()))
  return "\n".join(lines)


def plot(panels: Mapping[str, Mapping[str, Run]], path: str, *,
         floors: Mapping[str, float] | None = None, loss_name: str = "training loss",
         min_loss: float = 1e-12) -> None:
  """One row per panel: loss vs step and loss vs wall-clock seconds (log loss).

  Args:
    panels: title -> label -> run.
    path: the PNG to write.
    floors: title -> lowest reachable loss, subtracted before plotting.
    loss_name: what the loss is, for the y axis.
    min_loss: smaller (excess) losses are drawn at this value (log scale).
  """
  floors = floors or {}
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.5 * len(panels)),
                           squeeze=False)
  for row, (title, runs) in enumerate(panels.items()):
    floor = floors.get(title, 0.0)
    for col, x_name in enumerate(("steps", "seconds")):
      ax = axes[row, col]
      for label, run in runs.items():
        ax.plot(getattr(run, x_name), np.maximum(np.asarray(run.loss) - floor, min_loss),
                label=label)
      ax.set_yscale("log")
      ax.set_xlabel("step" if x_name == "steps" else "wall-clock seconds (no compile)")
      ax.set_ylabel(f"{loss_name} - {floor:.3f} (floor)" if floor else loss_name)
      ax.set_title(f"{title}: loss vs {'step' if x_name == 'steps' else 'time'}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
