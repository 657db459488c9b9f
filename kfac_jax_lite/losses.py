"""Loss functions that mark the model's predictive distribution in the jaxpr.

Each loss is an ordinary differentiable function (usable with plain ``jax.grad``
outside K-FAC). Its body is wrapped in a ``jax.jit`` whose function name starts
with :data:`MARKER_PREFIX`; the tagger finds that ``jit`` equation in the traced
loss, reads the logits (its first operand), the targets (its second) and an
optional mask or weights of the cases (its third), and knows which
distribution the logits parameterize. No custom primitive is needed,
so the marker survives every JAX transformation unchanged.

Each distribution also provides what the curvature estimators need: the
per-case derivative of ``-log p(y|z)`` with respect to the logits ``z`` for a
target ``y``, a sampler for ``y ~ p(.|z)``, and the columns of a square root of
the output Fisher ``F_z = E_y[grad grad^T]`` (Martens & Grosse 2015, §5).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MARKER_PREFIX = "kfl_loss__"


@dataclasses.dataclass(frozen=True)
class Distribution:
  """What the curvature estimators need to know about a registered loss.

  Attributes:
    name: the loss name (``softmax_cross_entropy`` ...).
    mean: maps logits ``z`` to the distribution's mean (``softmax``, ...); the
      derivative of ``-log p(y|z)`` with respect to ``z`` is ``mean(z) - y``
      for all three losses (they are exponential families in canonical form).
    sample: ``(key, z, n) -> y`` of shape ``(n, *z.shape)``, targets drawn from
      ``p(.|z)`` in the same encoding as ``mean(z)`` (one-hot for classes).
    fisher_sqrt: ``z -> C`` of shape ``(k, *z.shape)`` with
      ``sum_k C_k C_k^T = F_z``, the output Fisher of each example (block
      diagonal over its cases); ``k`` is the number of outputs per example.
    num_cases: number of independent cases the loss averages over.
    targets: maps the loss's target argument to the encoding of ``mean(z)``.
  """

  name: str
  mean: Callable[[jax.Array], jax.Array]
  sample: Callable[[jax.Array, jax.Array, int], jax.Array]
  fisher_sqrt: Callable[[jax.Array], jax.Array]
  num_cases: Callable[[tuple[int, ...]], int]
  targets: Callable[[jax.Array, jax.Array], jax.Array]


def _one_hot_targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
  if labels.ndim == logits.ndim - 1:
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if labels.shape != logits.shape:
    raise ValueError(
        f"labels of shape {labels.shape} fit neither integer labels "
        f"{logits.shape[:-1]} nor one-hot labels {logits.shape} for logits of "
        f"shape {logits.shape}.")
  return labels.astype(logits.dtype)


def _same_targets(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  if targets.shape != predictions.shape:
    raise ValueError(
        f"targets of shape {targets.shape} must match predictions of shape "
        f"{predictions.shape}.")
  return targets.astype(predictions.dtype)


def _categorical_sample(key: jax.Array, z: jax.Array, n: int) -> jax.Array:
  # Inverse-CDF sampling: one uniform per case (cheaper to compile and run
  # than the Gumbel trick, which draws one number per class).
  cdf = jnp.cumsum(jax.nn.softmax(z.astype(jnp.float32), axis=-1), axis=-1)
  u = jax.random.uniform(key, (n, *z.shape[:-1], 1), jnp.float32)
  y = jnp.minimum(jnp.sum(cdf[None] < u * cdf[..., -1:], axis=-1), z.shape[-1] - 1)
  return jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)


def _softmax_fisher_sqrt(z: jax.Array) -> jax.Array:
  # Per case, F = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T. Cases at
  # different positions are independent, so each column lives at one position:
  # column (t, c) is sqrt(p_tc) (e_c - p_t) at position t and zero elsewhere.
  p = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
  batch, k = p.shape[0], p.shape[-1]
  p = p.reshape(batch, -1, k)  # [B, T, K]
  cols = jnp.sqrt(p)[..., :, None] * (jnp.eye(k, dtype=p.dtype) - p[..., None, :])
  eye_t = jnp.eye(p.shape[1], dtype=p.dtype)
  cols = jnp.einsum("tu,btcj->tcbuj", eye_t, cols)  # [T, K, B, T, K]
  return cols.reshape(-1, *z.shape)


def _diag_fisher_sqrt(scale: jax.Array) -> jax.Array:
  # F = diag(scale^2) over every output of an example: column k is
  # scale_k e_k, one column per output element.
  flat = scale.reshape(scale.shape[0], -1)  # [B, D]
  cols = jnp.eye(flat.shape[1], dtype=flat.dtype)[:, None, :] * flat[None]
  return cols.reshape(-1, *scale.shape)


def _leading_cases(shape: tuple[int, ...]) -> int:
  return shape[0] if shape else 1


def _all_but_last_cases(shape: tuple[int, ...]) -> int:
  n = 1
  for d in shape[:-1]:
    n *= d
  return n


_SOFTMAX = Distribution(
    name="softmax_cross_entropy",
    mean=lambda z: jax.nn.softmax(z, axis=-1),
    sample=_categorical_sample,
    fisher_sqrt=_softmax_fisher_sqrt,
    num_cases=_all_but_last_cases,
    targets=_one_hot_targets,
)
_SIGMOID = Distribution(
    name="sigmoid_cross_entropy",
    mean=jax.nn.sigmoid,
    sample=lambda key, z, n: jax.random.bernoulli(
        key, jax.nn.sigmoid(z), (n, *z.shape)).astype(z.dtype),
    fisher_sqrt=lambda z: _diag_fisher_sqrt(jnp.sqrt(
        jax.nn.sigmoid(z) * jax.nn.sigmoid(-z))),
    num_cases=_leading_cases,
    targets=_same_targets,
)
_SQUARED = Distribution(
    name="squared_error",
    mean=lambda z: z,
    sample=lambda key, z, n: z + jax.random.normal(key, (n, *z.shape), z.dtype),
    fisher_sqrt=lambda z: _diag_fisher_sqrt(jnp.ones_like(z)),
    num_cases=_leading_cases,
    targets=_same_targets,
)

DISTRIBUTIONS: dict[str, Distribution] = {
    d.name: d for d in (_SOFTMAX, _SIGMOID, _SQUARED)}


def _marked(dist: Distribution, body: Callable[[jax.Array, jax.Array], jax.Array]):
  body.__name__ = MARKER_PREFIX + dist.name
  body.__qualname__ = body.__name__
  return jax.jit(body)


def _average(per_case: jax.Array, mask: tuple[jax.Array, ...]) -> jax.Array:
  """The mean over the cases, or their mean weighted by ``mask``."""
  if not mask:
    return jnp.mean(per_case)
  weights = mask[0].astype(jnp.float32)
  return jnp.sum(jnp.where(weights != 0, weights * per_case, 0.0)) / _total(weights)


def _total(weights: jax.Array) -> jax.Array:
  """``Σ m``, or 1 where it is 0 (a batch of padding only: loss and curvature 0)."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, total, 1.0)


def _softmax_xent_body(logits: jax.Array, labels: jax.Array, *mask: jax.Array) -> jax.Array:
  targets = _one_hot_targets(logits, labels)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_case = -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)
  return _average(per_case, mask).astype(logits.dtype)


def _sigmoid_xent_body(logits: jax.Array, targets: jax.Array, *mask: jax.Array) -> jax.Array:
  t = _same_targets(logits, targets).astype(jnp.float32)
  z = logits.astype(jnp.float32)
  per_output = jnp.maximum(z, 0.0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))
  per_case = jnp.sum(per_output.reshape(z.shape[0], -1), axis=-1)
  return _average(per_case, mask).astype(logits.dtype)


def _squared_error_body(predictions: jax.Array, targets: jax.Array,
                        *mask: jax.Array) -> jax.Array:
  diff = (predictions - _same_targets(predictions, targets)).astype(jnp.float32)
  per_case = 0.5 * jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
  return _average(per_case, mask).astype(predictions.dtype)


def _mask_operand(mask: jax.Array | None, cases: tuple[int, ...],
                  loss: str) -> tuple[jax.Array, ...]:
  """``(mask,)`` checked against the cases' shape (and, when its values are
  known, for negative weights), or ``()`` for none."""
  if mask is None:
    return ()
  if tuple(jnp.shape(mask)) != tuple(cases):
    raise ValueError(f"{loss}: mask has shape {tuple(jnp.shape(mask))}, but the loss has "
                     f"cases of shape {tuple(cases)}: pass one entry per case (1 or True "
                     "to count it, 0 or False for padding, another nonnegative value to "
                     "weigh it).")
  try:
    negative = bool(np.any(np.asarray(mask) < 0))
  except jax.errors.TracerArrayConversionError:  # traced: its values are not known here
    negative = False
  if negative:
    raise ValueError(f"{loss}: mask has negative entries; case weights must be "
                     "nonnegative (0 leaves a case out).")
  return (jnp.asarray(mask),)


class CaseWeights(NamedTuple):
  """How the registered loss weighs its cases (:func:`case_weights`).

  With weights ``m`` the loss is ``Σ m ℓ / Σ m``, its Gauss–Newton matrix and
  Fisher ``Σ_c (m_c / Σ m) J_cᵀ F_c J_c``.

  Attributes:
    gradient: ``m`` broadcast against the logits (``1.0`` without a mask):
      the factor of a case's loss gradient and Gauss–Newton products.
    fisher: the factor of a Fisher cotangent column, ``√m`` (``m`` itself for
      a boolean mask), so that its outer products weigh a case by ``m``.
    num_cases: ``Σ m`` (the number of cases without a mask).
    binary: whether every weight is 0 or 1 by its type (no mask, or a boolean
      one), so that ``gradient`` and ``fisher`` are the same.
  """
  gradient: jax.Array | float
  fisher: jax.Array | float
  num_cases: jax.Array | int
  binary: bool


def case_weights(logits_shape: tuple[int, ...], mask: jax.Array | None,
                 dist: Distribution) -> CaseWeights:
  """How the registered loss weighs its cases.

  Args:
    logits_shape: shape of the registered loss's logits.
    mask: the loss's mask operand (0/1 or nonnegative weights), or ``None``.
    dist: its distribution.

  Returns:
    The :class:`CaseWeights`.
  """
  if mask is None:
    return CaseWeights(1.0, 1.0, dist.num_cases(logits_shape), True)
  weights = mask.astype(jnp.float32)
  gradient = weights.reshape(weights.shape + (1,) * (len(logits_shape) - weights.ndim))
  binary = mask.dtype == jnp.bool_
  return CaseWeights(gradient, gradient if binary else jnp.sqrt(gradient), _total(weights),
                     binary)


_softmax_xent = _marked(_SOFTMAX, _softmax_xent_body)
_sigmoid_xent = _marked(_SIGMOID, _sigmoid_xent_body)
_squared_error = _marked(_SQUARED, _squared_error_body)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Categorical negative log-likelihood, averaged over all but the last axis.

  Registers a categorical predictive distribution over the last axis.

  Args:
    logits: unnormalized log-probabilities ``[..., num_classes]``.
    labels: integer class labels ``[...]`` or one-hot / soft labels
      ``[..., num_classes]``.
    mask: optional ``[...]`` (one entry per case, e.g. per token): 1 (or
      ``True``) for the cases that count, 0 for padding, or nonnegative case
      weights ``m``. The loss is then ``Σ m ℓ / Σ m``, the mean over the kept
      cases; K-FAC's output statistics, diagnostics and quadratic model weigh
      each case by ``m`` (padding left out; input statistics still average
      over every position).

  Returns:
    The scalar (weighted) mean of ``-log softmax(logits)[label]`` over the cases.
  """
  return _softmax_xent(logits, labels,
                       *_mask_operand(mask, logits.shape[:-1], "softmax_cross_entropy"))


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Bernoulli negative log-likelihood per output, summed over outputs.

  Registers independent Bernoulli distributions, one per output.

  Args:
    logits: ``[batch, ...]`` log-odds.
    targets: ``[batch, ...]`` probabilities in ``[0, 1]`` (0/1 labels).
    mask: optional ``[batch]``, as in :func:`softmax_cross_entropy`.

  Returns:
    The scalar loss summed over non-batch axes and averaged (weighted) over
    the batch.
  """
  return _sigmoid_xent(logits, targets,
                       *_mask_operand(mask, logits.shape[:1], "sigmoid_cross_entropy"))


def squared_error(predictions: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Half squared error ``0.5 * sum_outputs (p - t)^2``, averaged over the batch.

  Registers a unit-variance Gaussian predictive distribution.

  Args:
    predictions: ``[batch, ...]`` predicted means.
    targets: ``[batch, ...]`` regression targets.
    mask: optional ``[batch]``, as in :func:`softmax_cross_entropy`.

  Returns:
    The scalar loss summed over non-batch axes and averaged (weighted) over
    the batch.
  """
  return _squared_error(predictions, targets,
                        *_mask_operand(mask, predictions.shape[:1], "squared_error"))
