"""Main job: K-FAC vs Adam on scikit-learn's digits (offline, CPU friendly).

Trains two models on the 1438-image training split of ``load_digits`` with
minibatches of 256, once with K-FAC (``kfac_jax_lite.kfac``) and once with
``optax.adam``, on the same batch sequence from the same initialization:

* the MLP classifier 64-128-128-10 (tanh), softmax cross-entropy;
* the deep autoencoder 64-256-128-32-128-256-64, Bernoulli cross-entropy.

The loss reported is the full training-set loss, evaluated every
``steps / 100`` steps outside the timed region. Wall-clock time counts only
the train steps (the evaluation and the first call, which compiles, are
excluded; the compile time is reported on its own).

The autoencoder's loss cannot go below the entropy of the grey-level targets
(about 13.657 on the training split, see ``digits_data.loss_floor``); its
plot shows the excess over that floor on the log scale.

Hyperparameters: a sweep at 1000 steps, batch 256, seed 0, scored by the
full training-set loss at steps 50, 100, 200, 500 and 1000; each optimizer
got the best setting of its own grid:

* Adam: learning rate in {3e-4, 1e-3, 3e-3, 1e-2}. Best: 1e-2 for the MLP
  (loss 1e-4 at step 1000; 3e-3: 5e-4) and 3e-3 for the autoencoder
  (14.2; 1e-2: 14.3, 1e-3: 14.4).
* K-FAC: learning rate 0.3 (an upper bound: the KL-clipped rate is what
  binds), damping in {1e-3, 1e-2, 1e-1} x ``kl_clip`` in {1e-3, 1e-2}.
  Best on both models: damping 1e-2, ``kl_clip`` 1e-3 (MLP: < 5e-5 from
  step 200 on; autoencoder: 13.7). ``kl_clip`` 1e-2 is faster over the
  first 100 steps but noisier later. Momentum 0.9, ``stats_every=1``,
  ``inverse_every=10``, ``ema_decay=0.95``, one-sample MC Fisher, ``eigh``.

On CPU, jax's eigen/Cholesky kernels call scipy's OpenBLAS, whose worker
threads fight XLA's own thread pool; with few cores this made K-FAC's inverse
steps up to 10-60x slower in our measurements, so ``OPENBLAS_NUM_THREADS`` defaults
to 1 here (set it in the environment to override).

Run ``python examples/digits.py`` (``--steps``, ``--out``, ``--quick``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # Before jax/scipy load BLAS.

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_data  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

PROBLEMS = ("mlp", "autoencoder")

# Tuned settings (see the module docstring).
ADAM_LR = {"mlp": 1e-2, "autoencoder": 3e-3}
KFAC_HPARAMS = {
    "mlp": dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3),
    "autoencoder": dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3),
}

TrainStep = Callable[[Any, Any, Any], tuple[Any, Any, jax.Array]]


def make_kfac(loss_fn: digits_data.LossFn, sample_batch: Any, *,
              learning_rate: float, damping: float, kl_clip: float | None,
              **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """K-FAC with momentum 0.9; ``kwargs`` go to ``scale_by_kfac``."""
  kwargs.setdefault("stats_every", 1)
  kwargs.setdefault("inverse_every", 10)
  return kfl.kfac(loss_fn, sample_batch, learning_rate, damping=damping,
                  kl_clip=kl_clip, momentum=0.9, **kwargs)


def make_adam(learning_rate: float) -> optax.GradientTransformationExtraArgs:
  """``optax.adam`` that accepts (and ignores) ``batch=``."""
  return optax.with_extra_args_support(optax.adam(learning_rate))


def make_optimizer(name: str, problem: str, loss_fn: digits_data.LossFn,
                   sample_batch: Any, **overrides: Any
                   ) -> optax.GradientTransformationExtraArgs:
  """The tuned ``"kfac"`` or ``"adam"`` optimizer of ``problem``.

  Args:
    name: ``"kfac"`` or ``"adam"``.
    problem: ``"mlp"`` or ``"autoencoder"``.
    loss_fn: the problem's loss.
    sample_batch: a training batch (for K-FAC's tracing).
    **overrides: replace tuned settings (``learning_rate``, ``damping``,
      ``kl_clip``, ``stats_every``, ``inverse_every``, ``inverse_method`` ...).

  Returns:
    The optimizer.
  """
  if name == "adam":
    return make_adam(overrides.get("learning_rate", ADAM_LR[problem]))
  if name == "kfac":
    return make_kfac(loss_fn, sample_batch, **{**KFAC_HPARAMS[problem], **overrides})
  raise ValueError(f"Unknown optimizer {name!r}.")


def make_train_step(loss_fn: digits_data.LossFn,
                    tx: optax.GradientTransformationExtraArgs) -> TrainStep:
  """A jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``."""
  def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step)


def compile_step(step: TrainStep, params: Any, opt_state: Any,
                 batch: Any) -> tuple[TrainStep, float]:
  """Ahead-of-time compiles ``step``; returns it and the seconds it took."""
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  return compiled, time.perf_counter() - start


@dataclasses.dataclass
class Run:
  """One training run.

  Attributes:
    steps: steps at which the training loss was evaluated (0 = init).
    loss: full training-set loss at those steps.
    seconds: cumulative train-step wall-clock time at those steps.
    compile_s: compile time of the train step (first call), excluded above.
  """
  steps: list[int]
  loss: list[float]
  seconds: list[float]
  compile_s: float


def train(problem: str, optimizer: str, num_steps: int, *,
          train_data: digits_data.Batch, batch_size: int = digits_data.BATCH_SIZE,
          seed: int = 0, eval_every: int | None = None, small: bool = False,
          progress: bool = True, max_seconds: float | None = None,
          **overrides: Any) -> Run:
  """Trains one model with one optimizer, timing only the train steps.

  Args:
    problem: ``"mlp"`` or ``"autoencoder"``.
    optimizer: ``"kfac"`` or ``"adam"``.
    num_steps: number of train steps.
    train_data: the training set (also used for the reported loss).
    batch_size: minibatch size.
    seed: seed of the initialization and of the batch order.
    eval_every: evaluate the training loss every this many steps
      (default ``num_steps // 100``, at least 1).
    small: use the half-width model (tests).
    progress: show a tqdm progress bar.
    max_seconds: stop at the first evaluation after this much train time.
    **overrides: optimizer settings, see :func:`make_optimizer`.

  Returns:
    The :class:`Run`.
  """
  model, loss_fn = digits_data.make_problem(problem, small=small)
  params = digits_data.init_params(model, seed)
  it = digits_data.batches(train_data, batch_size, seed)
  first = next(it)
  tx = make_optimizer(optimizer, problem, loss_fn, first, **overrides)
  opt_state = tx.init(params)
  step, compile_s = compile_step(make_train_step(loss_fn, tx), params, opt_state, first)
  full_loss = jax.jit(loss_fn)
  full = {k: jax.numpy.asarray(v) for k, v in train_data.items()}
  eval_every = eval_every or max(1, num_steps // 100)

  run = Run([0], [float(full_loss(params, full))], [0.0], compile_s)
  bar = progress_bar(num_steps, f"{problem}/{optimizer}", progress)
  elapsed, batch = 0.0, first
  start = time.perf_counter()
  for i in range(1, num_steps + 1):
    params, opt_state, _ = step(params, opt_state, batch)
    batch = next(it)
    if i % eval_every == 0 or i == num_steps:
      jax.block_until_ready(params)
      elapsed += time.perf_counter() - start
      loss = float(full_loss(params, full))
      run.steps.append(i)
      run.loss.append(loss)
      run.seconds.append(elapsed)
      bar.set_postfix(loss=f"{loss:.4f}")
      bar.update(i - bar.n)
      if max_seconds is not None and elapsed >= max_seconds:
        break
      start = time.perf_counter()
  bar.close()
  return run


class _NoBar:
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


def checkpoints(run: Run, count: int = 10) -> list[int]:
  """Indices into ``run.steps`` of about ``count`` evenly spaced evaluations."""
  n = len(run.steps)
  return sorted({int(round(k)) for k in np.linspace(0, n - 1, count + 1)})


def format_table(problem: str, kfac: Run, adam: Run, floor: float = 0.0) -> str:
  """Loss and time of both optimizers at about ten checkpoints."""
  lines = [
      f"{problem}: full training-set loss (floor {floor:.4f}); compile: K-FAC "
      f"{kfac.compile_s:.2f}s, Adam {adam.compile_s:.2f}s (excluded below)",
      f"{'step':>6} {'loss K-FAC':>11} {'loss Adam':>10} {'time K-FAC':>11} {'time Adam':>10}"]
  for k in checkpoints(kfac):
    lines.append(f"{kfac.steps[k]:>6} {kfac.loss[k]:>11.4g} {adam.loss[k]:>10.4g} "
                 f"{kfac.seconds[k]:>10.2f}s {adam.seconds[k]:>9.2f}s")
  return "\n".join(lines)


def plot(results: dict[str, dict[str, Run]], path: str,
         floors: dict[str, float] | None = None) -> None:
  """2x2 figure: loss vs step and loss vs seconds for both problems (log loss).

  Args:
    results: problem -> optimizer label -> run.
    path: the PNG to write.
    floors: problem -> lowest reachable loss, subtracted before plotting.
  """
  floors = floors or {}
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(2, 2, figsize=(10, 8))
  for row, (problem, runs) in enumerate(results.items()):
    floor = floors.get(problem, 0.0)
    for col, x_name in enumerate(("steps", "seconds")):
      ax = axes[row, col]
      for name, run in runs.items():
        excess = np.maximum(np.asarray(run.loss) - floor, 1e-12)  # Log scale.
        ax.plot(getattr(run, x_name), excess, label=name)
      ax.set_yscale("log")
      ax.set_xlabel("step" if x_name == "steps" else "wall-clock seconds (no compile)")
      ax.set_ylabel(f"training loss - {floor:.3f} (floor)" if floor else "training loss")
      ax.set_title(f"{problem}: loss vs {'step' if x_name == 'steps' else 'time'}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Run]]:
  """Runs the comparison; prints the tables and writes the plot."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000, help="train steps per run")
  parser.add_argument("--out", default="digits.png", help="path of the PNG plot")
  parser.add_argument("--quick", action="store_true",
                      help="smoke test: 20 steps, no progress bar")
  args = parser.parse_args(argv)
  steps = 20 if args.quick else args.steps
  train_data, _ = digits_data.load_split()
  print(f"jax {jax.__version__} on {jax.default_backend()} "
        f"({os.cpu_count()} CPUs); {len(train_data['x'])} training images, "
        f"batch {digits_data.BATCH_SIZE}, {steps} steps")
  results: dict[str, dict[str, Run]] = {}
  floors = {p: digits_data.loss_floor(p, train_data) for p in PROBLEMS}
  for problem in PROBLEMS:
    results[problem] = {
        name: train(problem, opt, steps, train_data=train_data,
                    progress=not args.quick)
        for name, opt in (("K-FAC", "kfac"), ("Adam", "adam"))}
    print(format_table(problem, results[problem]["K-FAC"], results[problem]["Adam"],
                       floors[problem]))
    print()
  plot(results, args.out, floors)
  print(f"plot written to {args.out}")
  return results


if __name__ == "__main__":
  main()
