"""Every layer of a real network: K-FAC vs Adam on a small ResNet with BatchNorm.

A Flax ``linen`` ResNet on scikit-learn's 8x8 digits images (NHWC
``[B, 8, 8, 1]``, the 1438-image training split of ``digits_data``): a 3x3
conv stem (16 channels), two residual blocks (conv-BatchNorm-relu-conv-BatchNorm
plus the skip connection; the second block has stride 2, 32 channels and a 1x1
projection conv on the skip path), global average pooling and a dense head
with 10 logits, trained with softmax cross-entropy. Nothing in the model is
written for K-FAC: ``kfl.find_layers`` finds the six convolutions (Kronecker
blocks, KFC: one row of patches per output location) and the dense head; the
BatchNorm offsets get the exact diagonal Fisher of a shift, and the BatchNorm
scales (multiplied by the batch's own rsqrt(variance), so no per-example
gradient can be read) the rms fallback. The table is printed at the start.

Three runs from the same initialization on the same batch sequence: K-FAC with
``conv_approximation="expand"`` (Grosse & Martens 2016), K-FAC with
``"reduce"`` (Ba et al. 2017, Appendix A: patches averaged over locations
before the outer products) and ``optax.adam``.

BatchNorm. ``batch_stats`` (the running averages) is a second variable
collection, not a parameter: K-FAC preconditions the ``params`` collection
only. In training mode (``use_running_average=False``) BatchNorm normalizes
with the statistics of the batch itself and only *writes* the running
averages, so the training loss does not depend on their values. Hence the
pattern used here:

* ``train_loss(params, batch_stats, batch) -> (loss, new_batch_stats)``
  applies the model with ``mutable=["batch_stats"]``; the train step
  differentiates it with ``has_aux=True`` and carries the new running averages
  forward (one forward pass gives the gradient and the new statistics);
* K-FAC's ``loss_fn(params, batch) -> scalar`` is the same function with the
  running averages closed over (any value gives the same loss and the same
  layers; we close over the initial ones) and the new ones dropped;
* evaluation applies the model with ``train=False`` (running averages).

The loss reported is the full training-set loss in evaluation mode (running
averages, as the model would be deployed), evaluated every ``steps / 100``
steps outside the timed region; the final test-set accuracy is printed too.
Wall-clock time counts only the train steps (the first call, which compiles,
is reported on its own).

Hyperparameters: a sweep at 300 steps, batch 128, seed 0, scored by the
training loss at steps 50, 100, 200 and 300; each optimizer got the best
setting of its own grid:

* Adam: learning rate in {1e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2}. Best: 2e-2
  (loss 0.022, 1.2e-3, 2.7e-4, 1.4e-4 at those steps; 1e-2: 0.14, 2.8e-3,
  7e-4, 4e-4; 3e-2 is unstable).
* K-FAC, both approximations: learning rate in {0.1, 0.3}, damping in
  {1e-3, 1e-2, 1e-1}, ``kl_clip`` in {1e-3, 1e-2}, then damping 0.3 and 1 and
  ``kl_clip`` 1e-2 around the best. Best for both: learning rate 0.1, damping
  0.1, ``kl_clip`` 1e-3 (expand: 0.017-0.028, 0.009, 6e-5-7e-4, 4e-5;
  reduce: 0.02, 1.3e-3-2.2e-3, 4e-4-6e-4, 4e-5; the ranges are two sweeps
  compiled differently: runs are deterministic, but evaluation-mode BatchNorm
  amplifies rounding differences). Damping
  1e-3 and 1e-2 are clearly worse (spikes of the evaluation loss), 0.3 about
  as good, 1 slower. Momentum 0.9, ``stats_every=1``, ``inverse_every=10``,
  ``ema_decay=0.95``, one-sample MC Fisher, ``eigh``.

Run ``python examples/resnet_digits.py`` (``--steps``, ``--out``, ``--quick``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

IMAGE_SHAPE = (8, 8, 1)
BATCH_SIZE = 128
BN_MOMENTUM = 0.9

# Tuned settings (see the module docstring).
ADAM_LR = 2e-2
KFAC_HPARAMS = dict(learning_rate=0.1, damping=0.1, kl_clip=1e-3)
# label -> (optimizer, its settings beyond the tuned ones).
OPTIMIZERS = {"K-FAC expand": ("kfac", {"layers": kfl.LayerOptions(conv_approximation="expand")}),
              "K-FAC reduce": ("kfac", {"layers": kfl.LayerOptions(conv_approximation="reduce")}),
              "Adam": ("adam", {})}

Batch = common.Batch
Variables = tuple[Any, Any]  # (params, batch_stats)
TrainLoss = Callable[[Any, Any, Batch], tuple[jax.Array, Any]]
EvalFn = Callable[[Variables, Batch], tuple[jax.Array, jax.Array]]


class ResidualBlock(nn.Module):
  """conv-BN-relu-conv-BN plus the skip (projected when the shape changes).

  Attributes:
    features: output channels.
    strides: stride of the first conv (and of the projection).
  """
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=BN_MOMENTUM)
    y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = norm()(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Conv stem, residual blocks, global average pool, dense head.

  Attributes:
    widths: channels of the stem and of each residual block.
    num_classes: number of logits.
  """
  widths: Sequence[int] = (16, 16, 32)
  num_classes: int = digits_data.NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x))
    for i, width in enumerate(self.widths[1:]):
      x = ResidualBlock(width, strides=1 if i == 0 else 2)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def load_images() -> tuple[Batch, Batch]:
  """The digits train/test split of ``digits_data`` as ``[n, 8, 8, 1]`` images."""
  train, test = digits_data.load_split()
  return tuple({"x": d["x"].reshape(-1, *IMAGE_SHAPE), "y": d["y"]}
               for d in (train, test))


def init_variables(model: nn.Module, seed: int = 0) -> Variables:
  """``(params, batch_stats)`` drawn with numpy (``model.init`` compiles slowly).

  Flax's defaults: kernels LeCun normal (variance ``1 / fan_in`` with ``fan_in``
  the product of all but the last axis, truncated at two standard deviations
  and rescaled), zero biases, BatchNorm scales 1 and shifts 0, running means 0
  and variances 1.

  Args:
    model: the :class:`ResNet`.
    seed: seed of the numpy generator.

  Returns:
    The ``params`` and ``batch_stats`` collections (float32 jax arrays).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *IMAGE_SHAPE)), train=False))
  rng = np.random.default_rng(seed)

  def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    name = path[-1].key
    if name == "kernel":
      return common.lecun_normal(rng, leaf.shape, int(np.prod(leaf.shape[:-1])))
    fill = 1.0 if name in ("scale", "var") else 0.0
    return jnp.full(leaf.shape, fill, np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return variables["params"], variables["batch_stats"]


def make_losses(model: nn.Module, batch_stats: Any
                ) -> tuple[TrainLoss, common.LossFn, EvalFn]:
  """The training loss, K-FAC's loss and the evaluation loss.

  Args:
    model: the :class:`ResNet`.
    batch_stats: any running averages of the right structure (K-FAC's loss
      closes over them; in training mode their values are not read).

  Returns:
    ``(train_loss, kfac_loss, eval_loss)``: ``train_loss(params, batch_stats,
    batch) -> (loss, new_batch_stats)`` in training mode;
    ``kfac_loss(params, batch) -> loss``, the same loss as a function of the
    parameters only; ``evaluate((params, batch_stats), batch) -> (loss,
    accuracy)`` with the running averages.
  """
  def train_loss(params: Any, stats: Any, batch: Batch) -> tuple[jax.Array, Any]:
    logits, updated = model.apply({"params": params, "batch_stats": stats},
                                  batch["x"], train=True, mutable=["batch_stats"])
    return kfl.losses.softmax_cross_entropy(logits, batch["y"]), updated["batch_stats"]

  def kfac_loss(params: Any, batch: Batch) -> jax.Array:
    return train_loss(params, batch_stats, batch)[0]

  def evaluate(variables: Variables, batch: Batch) -> tuple[jax.Array, jax.Array]:
    params, stats = variables
    logits = model.apply({"params": params, "batch_stats": stats}, batch["x"], train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch["y"])

  return train_loss, kfac_loss, evaluate


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model with its initial variables and losses.

  Attributes:
    model: the :class:`ResNet`.
    params: initial ``params`` collection.
    batch_stats: initial running averages.
    train_loss: see :func:`make_losses`.
    kfac_loss: see :func:`make_losses`.
    evaluate: ``jax.jit`` of the evaluation (loss, accuracy), shared by runs.
  """
  model: ResNet
  params: Any
  batch_stats: Any
  train_loss: TrainLoss
  kfac_loss: common.LossFn
  evaluate: EvalFn


@functools.cache
def make_problem(widths: tuple[int, ...] = (16, 16, 32), seed: int = 0) -> Problem:
  """The :class:`Problem` (cached: the runs of a comparison share compilations)."""
  model = ResNet(widths=widths)
  params, stats = init_variables(model, seed)
  train_loss, kfac_loss, evaluate = make_losses(model, stats)
  return Problem(model, params, stats, train_loss, kfac_loss, jax.jit(evaluate))


def make_train_step(train_loss: TrainLoss,
                    tx: optax.GradientTransformationExtraArgs) -> jax.stages.Wrapped:
  """A jitted ``(params, batch_stats, opt_state, batch) -> (..., loss)``."""
  def step(params: Any, stats: Any, opt_state: Any,
           batch: Batch) -> tuple[Any, Any, Any, jax.Array]:
    (loss, stats), grads = jax.value_and_grad(train_loss, has_aux=True)(
        params, stats, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), stats, opt_state, loss
  return jax.jit(step)


def train(label: str, num_steps: int, *, train_data: Batch, test_data: Batch,
          batch_size: int = BATCH_SIZE, seed: int = 0, eval_every: int | None = None,
          widths: Sequence[int] = (16, 16, 32), progress: bool = True,
          compiler_options: dict[str, Any] | None = None,
          **overrides: Any) -> common.Run:
  """Trains the ResNet with one optimizer, timing only the train steps.

  Args:
    label: a key of ``OPTIMIZERS``.
    num_steps: number of train steps.
    train_data: the training set (also used for the reported loss).
    test_data: the test set (accuracy at the end).
    batch_size: minibatch size.
    seed: seed of the initialization and of the batch order.
    eval_every: evaluate every this many steps (default ``num_steps // 100``).
    widths: channels of the stem and the residual blocks.
    progress: show a tqdm progress bar.
    compiler_options: XLA options of the train step's compilation.
    **overrides: optimizer settings, see :func:`common.make_optimizer`.

  Returns:
    The :class:`common.Run`, with the test accuracy.
  """
  problem = make_problem(tuple(widths), seed)
  params, stats = problem.params, problem.batch_stats
  it = common.batches(train_data, batch_size, seed)
  first = next(it)
  name, settings = OPTIMIZERS[label]
  tx = common.make_optimizer(name, problem.kfac_loss, first, adam_lr=ADAM_LR,
                             kfac_hparams={**KFAC_HPARAMS, **settings}, **overrides)
  full, test = ({k: jnp.asarray(v) for k, v in d.items()} for d in (train_data, test_data))

  def full_loss(state: common.State) -> float:
    return float(problem.evaluate(state[:2], full)[0])

  run, state = common.fit(make_train_step(problem.train_loss, tx),
                          (params, stats, tx.init(params)), itertools.chain([first], it),
                          num_steps, full_loss, label=label, eval_every=eval_every,
                          progress=progress, compiler_options=compiler_options)
  run.test_accuracy = float(problem.evaluate(state[:2], test)[1])
  return run


def main(argv: Sequence[str] | None = None) -> dict[str, common.Run]:
  """Runs the comparison; prints the layer table and the results, writes the plot."""
  args = common.make_parser(
      __doc__.splitlines()[0], 300, "resnet_digits.png").parse_args(argv)
  steps = 20 if args.quick else args.steps
  widths = (8, 8, 16) if args.quick else (16, 16, 32)
  train_data, test_data = load_images()
  print(f"{common.platform_summary()}; {len(train_data['x'])} training images "
        f"{IMAGE_SHAPE}, batch {BATCH_SIZE}, {steps} steps, ResNet widths {widths}")
  problem = make_problem(widths)
  sample = next(common.batches(train_data, BATCH_SIZE))
  print(kfl.find_layers(problem.kfac_loss, problem.params, sample))
  print()
  quick = dict(eval_every=4, compiler_options=common.FAST_COMPILE) if args.quick else {}
  runs = {label: train(label, steps, train_data=train_data, test_data=test_data,
                       widths=widths, progress=not args.quick, **quick)
          for label in OPTIMIZERS}
  title = "ResNet on digits"
  print(common.format_table(f"{title}: full training-set loss (eval-mode BatchNorm)",
                            runs))
  common.plot({title: runs}, args.out)
  print(f"plot written to {args.out}")
  return runs


if __name__ == "__main__":
  main()
