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

Run ``python examples/digits.py`` (``--steps``, ``--out``, ``--quick``).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
# Also what the benchmarks use as digits.compile_step and digits.make_train_step.
from common import Run, compile_step, make_train_step  # pylint: disable=wrong-import-position,unused-import

PROBLEMS = ("mlp", "autoencoder")

# Tuned settings (see the module docstring).
ADAM_LR = {"mlp": 1e-2, "autoencoder": 3e-3}
KFAC_HPARAMS = {
    "mlp": dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3),
    "autoencoder": dict(learning_rate=0.3, damping=1e-2, kl_clip=1e-3),
}


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
      ``kl_clip``, ``stats_every``, ``inverse_every``, ``inverses`` ...).

  Returns:
    The optimizer.
  """
  return common.make_optimizer(name, loss_fn, sample_batch, adam_lr=ADAM_LR[problem],
                               kfac_hparams=KFAC_HPARAMS[problem], **overrides)


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
    The :class:`common.Run`.
  """
  model, loss_fn = digits_data.make_problem(problem, small=small)
  params = digits_data.init_params(model, seed)
  it = digits_data.batches(train_data, batch_size, seed)
  first = next(it)
  tx = make_optimizer(optimizer, problem, loss_fn, first, **overrides)
  full_loss = jax.jit(loss_fn)
  full = {k: jnp.asarray(v) for k, v in train_data.items()}
  run, _ = common.fit(make_train_step(loss_fn, tx), (params, tx.init(params)),
                      itertools.chain([first], it), num_steps,
                      lambda state: float(full_loss(state[0], full)),
                      label=f"{problem}/{optimizer}", eval_every=eval_every,
                      progress=progress, max_seconds=max_seconds)
  return run


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Run]]:
  """Runs the comparison; prints the tables and writes the plot."""
  args = common.make_parser(__doc__.splitlines()[0], 1000, "digits.png",
                            "smoke test: 20 steps, no progress bar").parse_args(argv)
  steps = 20 if args.quick else args.steps
  train_data, _ = digits_data.load_split()
  print(f"{common.platform_summary()}; {len(train_data['x'])} training images, "
        f"batch {digits_data.BATCH_SIZE}, {steps} steps")
  results: dict[str, dict[str, Run]] = {}
  floors = {p: digits_data.loss_floor(p, train_data) for p in PROBLEMS}
  for problem in PROBLEMS:
    results[problem] = {
        name: train(problem, opt, steps, train_data=train_data,
                    progress=not args.quick)
        for name, opt in (("K-FAC", "kfac"), ("Adam", "adam"))}
    print(common.format_table(
        f"{problem}: full training-set loss (floor {floors[problem]:.4f})",
        results[problem]))
    print()
  common.plot(results, args.out, floors=floors)
  print(f"plot written to {args.out}")
  return results


if __name__ == "__main__":
  main()
