"""The suite's models on digits: MLP, deep autoencoder, ResNet, row-by-row GRU.

Every task is a :class:`Task`: the initial train state, K-FAC's loss, a train
step factory, the batches of every step (the same for every optimizer, on
the device before timing) and the held-out evaluation. The data is
scikit-learn's bundled digits (no download), split 80/20 by
``digits_data.load_split`` (seed 0). The evaluation loss is on the 1438
training images (:data:`EVAL_SPLIT` ``"train"``, the default: how fast the
optimizer minimizes the objective; these small models overfit digits within
tens of epochs, so a held-out loss after hundreds of steps measures early
stopping more than optimization) or on the 359 test images (``"heldout"``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import common  # pylint: disable=wrong-import-position
import digits_data  # pylint: disable=wrong-import-position
import resnet_digits  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

Batch = dict[str, jax.Array]
StepFactory = Callable[[optax.GradientTransformationExtraArgs], Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """One model of the suite.

  Attributes:
    name: short name (``--models``).
    title: what it is, for the table and the plot.
    init_state: the train state before the optimizer's, e.g. ``(params,)`` or
      ``(params, batch_stats)``; the step takes ``(*init_state, opt_state, batch)``.
    loss_fn: the training loss ``(params, batch) -> scalar`` K-FAC traces.
    make_step: optimizer -> jitted ``step(*state, batch) -> (*state, loss)``.
    batches: the batches of steps 0, 1, ... (device arrays, cycled).
    evaluate: train state ``(*init_state, opt_state)`` -> held-out loss.
    floor: lowest reachable held-out loss (subtracted in the plot), or 0.
  """
  name: str
  title: str
  init_state: tuple[Any, ...]
  loss_fn: common.LossFn
  make_step: StepFactory
  batches: list[Batch]
  evaluate: Callable[[tuple[Any, ...]], float]
  floor: float = 0.0

  @property
  def params(self) -> Any:
    """The initial parameters (the first element of the state)."""
    return self.init_state[0]


def device_batches(data: dict[str, np.ndarray], batch_size: int, count: int,
                   seed: int = 0) -> list[Batch]:
  """The first ``count`` shuffled batches of ``common.batches``, on the device."""
  it = common.batches(data, batch_size, seed)
  return [jax.device_put(next(it)) for _ in range(count)]


# Which digits images the evaluation loss is computed on: "train" or "heldout".
EVAL_SPLIT = "train"


def _eval_split(train: Batch, test: Batch) -> Batch:
  """The evaluation images of :data:`EVAL_SPLIT`, on the device."""
  if EVAL_SPLIT not in ("train", "heldout"):
    raise ValueError(f"EVAL_SPLIT must be 'train' or 'heldout', got {EVAL_SPLIT!r}.")
  return jax.device_put(train if EVAL_SPLIT == "train" else test)


def _digits_task(name: str, title: str, model: nn.Module, loss_fn: common.LossFn,
                 params: Any, steps: int, floor: float = 0.0) -> Task:
  """A task on flat 64-pixel digits with a plain ``(params, opt_state)`` state."""
  train, test = digits_data.load_split()
  test = _eval_split(train, test)
  eval_loss = jax.jit(loss_fn)
  return Task(name, title, (params,), loss_fn,
              lambda tx: common.make_train_step(loss_fn, tx),
              device_batches(train, digits_data.BATCH_SIZE, steps),
              lambda state: float(eval_loss(state[0], test)), floor)


def mlp_task(steps: int, small: bool = False) -> Task:
  """The 64-128-128-10 tanh MLP of ``examples/digits.py``, batch 256
  (``small``: half widths, for smoke tests)."""
  model, loss_fn = digits_data.make_problem("mlp", small=small)
  widths = "-".join(map(str, (64, *model.hidden, 10)))
  return _digits_task("mlp", f"MLP {widths} (digits, batch 256)", model, loss_fn,
                      digits_data.init_params(model), steps)


def autoencoder_task(steps: int, small: bool = False) -> Task:
  """The 64-256-128-32-128-256-64 autoencoder of ``examples/digits.py``
  (Bernoulli cross-entropy), batch 256; the floor is the evaluation pixels'
  entropy (``small``: half widths, for smoke tests)."""
  model, loss_fn = digits_data.make_problem("autoencoder", small=small)
  test = _eval_split(*digits_data.load_split())
  code = (*model.encoder, model.code, *reversed(model.encoder))
  return _digits_task("ae", f"autoencoder 64-{'-'.join(map(str, code))}-64 (digits, batch 256)",
                      model, loss_fn, digits_data.init_params(model), steps,
                      digits_data.loss_floor("autoencoder", test))


class RowGRU(nn.Module):
  """A GRU reading an 8x8 digit row by row (8 steps of 8 pixels), dense head.

  Attributes:
    hidden: the GRU's state size.
    num_classes: number of logits.
  """
  hidden: int = 128
  num_classes: int = digits_data.NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rows = x.reshape(x.shape[0], 8, 8)
    states = nn.RNN(nn.GRUCell(self.hidden))(rows)
    return nn.Dense(self.num_classes)(states[:, -1])


def _orthogonal(rng: np.random.Generator, shape: tuple[int, ...]) -> jax.Array:
  """Flax's default recurrent kernel: a random orthogonal matrix (QR of a
  Gaussian, signs fixed by R's diagonal)."""
  q, r = np.linalg.qr(rng.standard_normal(shape))
  return jnp.asarray(q * np.sign(np.diag(r)), np.float32)


def init_gru(model: RowGRU, seed: int = 0) -> Any:
  """Flax's default GRU initialization drawn with numpy: input kernels LeCun
  normal, hidden-to-hidden kernels orthogonal, biases zero."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, digits_data.NUM_FEATURES))))["params"]
  rng = np.random.default_rng(seed)

  def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] != "kernel":
      return jnp.zeros(leaf.shape, np.float32)
    if keys[-2].startswith("h"):
      return _orthogonal(rng, leaf.shape)
    return common.lecun_normal(rng, leaf.shape, leaf.shape[0])

  return jax.tree_util.tree_map_with_path(draw, shapes)


def gru_task(steps: int, small: bool = False) -> Task:
  """:class:`RowGRU` (128 units; ``small``: 32) on digits, softmax
  cross-entropy, batch 256."""
  model = RowGRU(hidden=32 if small else 128)
  return _digits_task("gru", f"GRU-{model.hidden} over 8 rows of 8 pixels (digits, batch 256)",
                      model, digits_data.classifier_loss(model), init_gru(model), steps)


def resnet_task(steps: int, small: bool = False) -> Task:
  """The ResNet with BatchNorm of ``examples/resnet_digits.py``, batch 128
  (``small``: widths 8-8-16).

  The held-out loss uses BatchNorm's running averages (evaluation mode).
  """
  problem = resnet_digits.make_problem((8, 8, 16) if small else (16, 16, 32))
  train, test = resnet_digits.load_images()
  test = _eval_split(train, test)
  widths = "-".join(map(str, problem.model.widths))
  return Task("resnet", f"ResNet {widths} with BatchNorm (digits 8x8x1, batch 128)",
              (problem.params, problem.batch_stats), problem.kfac_loss,
              lambda tx: resnet_digits.make_train_step(problem.train_loss, tx),
              device_batches(train, resnet_digits.BATCH_SIZE, steps),
              lambda state: float(problem.evaluate(state[:2], test)[0]))


def print_layers(task: Task) -> None:
  """Prints ``kfl.find_layers`` of the task (what K-FAC preconditions)."""
  print(f"{task.name}: layers K-FAC finds")
  print(kfl.find_layers(task.loss_fn, task.params, task.batches[0]))
