"""Data, models and losses for the digits experiments (offline, CPU friendly).

The data is scikit-learn's bundled ``load_digits``: 1797 grey 8x8 images of
handwritten digits with 17 intensity levels, shipped with the package (no
network). Pixels are scaled to ``[0, 1]`` and flattened to 64 float32 features.

Two models, both plain Flax ``linen`` modules whose dense layers K-FAC finds on
its own:

* :class:`MLPClassifier`: 64-128-128-10, softmax cross-entropy on the labels.
* :class:`DeepAutoencoder`: 64-256-128-32-128-256-64 with ``tanh`` hidden units,
  a linear 32-unit code and output logits scored with a Bernoulli
  (sigmoid cross-entropy) likelihood against the pixel intensities, the
  classic deep-autoencoder benchmark of Martens & Grosse (2015) at small scale.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_lite as kfl

import common
from common import Batch, LossFn

NUM_FEATURES = 64
NUM_CLASSES = 10
BATCH_SIZE = 256

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh, "relu": jax.nn.relu}


def load_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Batch, Batch]:
  """Loads digits and splits it deterministically into train and test sets.

  Args:
    test_fraction: fraction of the 1797 images held out.
    seed: seed of the permutation (the split depends on nothing else).

  Returns:
    ``(train, test)``, each ``{"x": float32 [n, 64] in [0, 1], "y": int32 [n]}``.
  """
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = (np.asarray(data.data, np.float32) / 16.0).astype(np.float32)
  y = np.asarray(data.target, np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = perm[:n_test], perm[n_test:]
  return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def batches(data: Batch, batch_size: int = BATCH_SIZE,
            seed: int = 0) -> Iterator[Batch]:
  """:func:`common.batches` with the digits experiments' batch size by default."""
  return common.batches(data, batch_size, seed)


class MLPClassifier(nn.Module):
  """Multilayer perceptron classifier: 64-128-128-10 by default.

  Attributes:
    hidden: widths of the hidden layers.
    num_classes: number of output logits.
    activation: ``"tanh"`` or ``"relu"``.
  """
  hidden: Sequence[int] = (128, 128)
  num_classes: int = NUM_CLASSES
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _ACTIVATIONS[self.activation]
    for width in self.hidden:
      x = act(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class DeepAutoencoder(nn.Module):
  """Deep autoencoder 64-256-128-32-128-256-64 returning output logits.

  The encoder widths are mirrored by the decoder; the code layer is linear.

  Attributes:
    encoder: hidden widths of the encoder (the decoder uses them reversed).
    code: width of the linear code layer.
    num_outputs: output size (the number of pixels).
  """
  encoder: Sequence[int] = (256, 128)
  code: int = 32
  num_outputs: int = NUM_FEATURES

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.encoder:
      x = jnp.tanh(nn.Dense(width)(x))
    x = nn.Dense(self.code)(x)
    for width in reversed(self.encoder):
      x = jnp.tanh(nn.Dense(width)(x))
    return nn.Dense(self.num_outputs)(x)


def classifier_loss(model: nn.Module) -> LossFn:
  """``loss_fn(params, batch)``: mean softmax cross-entropy of the labels."""
  def loss_fn(params: Any, batch: Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch["x"])
    return kfl.losses.softmax_cross_entropy(logits, batch["y"])
  return loss_fn


def autoencoder_loss(model: nn.Module) -> LossFn:
  """``loss_fn(params, batch)``: Bernoulli reconstruction NLL, summed over pixels."""
  def loss_fn(params: Any, batch: Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch["x"])
    return kfl.losses.sigmoid_cross_entropy(logits, batch["x"])
  return loss_fn


def loss_floor(problem: str, data: Batch) -> float:
  """The smallest loss any model can reach on ``data``.

  0 for the classifier; for the autoencoder, whose Bernoulli likelihood is
  scored against grey levels in ``[0, 1]``, the mean over images of the summed
  binary entropies of the pixel intensities (about 13.66 on the training
  split), reached by a perfect reconstruction.

  Args:
    problem: ``"mlp"`` or ``"autoencoder"``.
    data: ``{"x": ...}`` pixel intensities.

  Returns:
    The floor, as a float.
  """
  if problem == "mlp":
    return 0.0
  x = np.asarray(data["x"], np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -(np.where(x > 0, x * np.log(x), 0.0)
          + np.where(x < 1, (1 - x) * np.log1p(-x), 0.0))
  return float(h.sum(axis=1).mean())


def make_problem(name: str, *, small: bool = False) -> tuple[nn.Module, LossFn]:
  """The model and loss of ``"mlp"`` or ``"autoencoder"``.

  Args:
    name: ``"mlp"`` or ``"autoencoder"``.
    small: halve the widths (same architecture kind; for fast tests).

  Returns:
    ``(model, loss_fn)``.
  """
  if name == "mlp":
    model = MLPClassifier(hidden=(64, 64) if small else (128, 128))
    return model, classifier_loss(model)
  if name == "autoencoder":
    model = (DeepAutoencoder(encoder=(128, 64), code=16) if small
             else DeepAutoencoder())
    return model, autoencoder_loss(model)
  raise ValueError(f"Unknown problem {name!r}; use 'mlp' or 'autoencoder'.")


def init_params(model: nn.Module, seed: int = 0) -> Any:
  """Initial parameters of ``model`` for 64-feature inputs, drawn with numpy.

  The distribution is Flax's ``Dense`` default (LeCun normal: a normal with
  variance ``1 / fan_in`` truncated at two standard deviations, rescaled to
  keep that variance; zero biases), but drawn from a seeded numpy generator:
  ``model.init`` compiles its random-number programs, which costs seconds on
  CPU, whereas ``jax.eval_shape`` only traces the model for the shapes.

  Args:
    model: a module whose parameters are ``Dense`` kernels and biases.
    seed: seed of the numpy generator.

  Returns:
    The ``params`` collection (float32 jax arrays).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, NUM_FEATURES))))["params"]
  rng = np.random.default_rng(seed)

  def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
    if jax.tree_util.keystr(path[-1:]) != "['kernel']":
      return jnp.zeros(leaf.shape, np.float32)
    return common.lecun_normal(rng, leaf.shape, leaf.shape[0])

  return jax.tree_util.tree_map_with_path(draw, shapes)
