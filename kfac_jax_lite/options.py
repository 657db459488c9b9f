"""Structural options of K-FAC as frozen, self-validating values.

The numbers a user tunes or schedules (``learning_rate``, ``damping``,
``ema_decay``, ``kl_clip``, the periods) stay flat keywords of
:func:`kfac_jax_lite.scale_by_kfac` and :func:`kfac_jax_lite.kfac`. Everything
static, the choices that shape the compiled step, is grouped here:

- :class:`LayerOptions`: which layers get which block, and the approximations;
- :class:`EstimatorOptions`: how the Fisher statistics are estimated;
- :class:`InverseOptions`: how and when the damped inverses are computed;
- :class:`ParallelOptions`: the device axis and where inverse work happens;
- :class:`AdaptiveOptions`: step size, momentum and damping from the
  quadratic model.

They are immutable and hashable, validate themselves on construction (the
error names the field and the fix), and are not numbers, so
``optax.inject_hyperparams`` leaves them alone without ``static_args``.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Mapping

from kfac_jax_lite.curvature.estimators import ESTIMATORS
from kfac_jax_lite.curvature.kronecker import INVERSE_METHODS

APPROXIMATIONS = ("expand", "reduce")
BLOCK_CHOICES = ("kron", "rms", "full", "none")
PLACEMENTS = ("replicated", "sharded")
DEFAULT_MAX_FACTOR_DIM = 4096
METHODS = (*INVERSE_METHODS, "ekfac")


def _one_of(field: str, value: object, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}.")


def _python_int(field: str, value: object, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{field} must be a Python int >= {low}, got {value!r}.")


def _fraction(field: str, fraction: object) -> None:
  if fraction is not None and (isinstance(fraction, bool) or not isinstance(
      fraction, (int, float)) or not 0.0 < fraction <= 1.0):
    raise ValueError(f"{field} must be None or a Python float in (0, 1], got {fraction!r}.")


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """Which block preconditions each parameter (Ba et al. 2017, §2, §4, App. A).

  Attributes:
    conv_approximation: ``"expand"`` (KFC, Grosse & Martens 2016) or
      ``"reduce"`` (Ba et al. 2017, Appendix A: cheaper, spatially averaged).
    dense_approximation: ``"expand"`` or ``"reduce"`` for dense layers applied
      over extra axes (sequence positions; Eschenhagen et al. 2023).
    blocks: overrides of the detected blocks: regex (searched in the
      ``keystr`` of a parameter's path) -> ``"kron"`` | ``"full"`` (the exact
      Fisher block of a small layer) | ``"rms"`` (the squared-gradient
      fallback, RMSProp-like) | ``"none"`` (not preconditioned). Stored read-only.
    max_factor_dim: largest Kronecker factor kept as a dense matrix: a larger
      input factor is doubly factored (``K ⊗ Ψ``, Ba et al. 2017, §4) when the
      layer's input is a visibly flattened feature map, else a vector (its
      diagonal); a larger output factor is a vector. ``find_layers`` notes each case.
  """

  conv_approximation: str = "expand"
  dense_approximation: str = "expand"
  blocks: Mapping[str, str] = dataclasses.field(default_factory=dict)
  max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM

  def __post_init__(self) -> None:
    _one_of("LayerOptions.conv_approximation", self.conv_approximation, APPROXIMATIONS)
    _one_of("LayerOptions.dense_approximation", self.dense_approximation, APPROXIMATIONS)
    _python_int("LayerOptions.max_factor_dim", self.max_factor_dim)
    if not isinstance(self.blocks, Mapping):
      raise ValueError("LayerOptions.blocks must be a mapping {regex: block kind}, "
                       f"got {type(self.blocks).__name__}.")
    for pattern, choice in self.blocks.items():
      if choice == "diag":
        raise ValueError(f"LayerOptions.blocks[{pattern!r}] = 'diag': the squared-gradient "
                         "fallback is now called 'rms'; pass 'rms'.")
      _one_of(f"LayerOptions.blocks[{pattern!r}]", choice, BLOCK_CHOICES)
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ValueError(f"LayerOptions.blocks: {pattern!r} is not a valid regular "
                         f"expression ({e}); keys are regexes searched in each "
                         "parameter's keystr path.") from e
    object.__setattr__(self, "blocks", types.MappingProxyType(dict(self.blocks)))

  def __hash__(self) -> int:
    return hash((self.conv_approximation, self.dense_approximation,
                 tuple(sorted(self.blocks.items())), self.max_factor_dim))

  @property
  def approximation(self) -> dict[str, str]:
    """Layer family -> ``"expand"`` | ``"reduce"``."""
    return {"conv": self.conv_approximation, "dense": self.dense_approximation}


@dataclasses.dataclass(frozen=True)
class EstimatorOptions:
  """How the Fisher statistics are estimated (Martens & Grosse 2015, §5).

  Attributes:
    kind: ``"mc"`` (targets sampled from the model), ``"exact"`` (a square
      root of the output Fisher; cost grows with the output size) or
      ``"empirical"`` (the observed targets).
    num_samples: Monte-Carlo samples per example for ``"mc"``.
    batch_fraction: estimate on this leading fraction in ``(0, 1]`` of every
      batch leaf's first axis (curvature needs fewer samples than the
      gradient); ``None`` uses the whole batch, and then, inside one ``jit``
      with ``stats_every=1``, XLA shares the statistics pass's forward with
      the gradient's.
    accumulate: keep a buffer of micro-batch estimates in the state, for
      gradient accumulation with :func:`kfac_jax_lite.accumulate`.
    diagnostics: also keep, in ``KfacState.diagnostics``, the
      :class:`kfac_jax_lite.Diagnostics` (per-example gradient norms,
      gradient noise scale, diversity) of the latest statistics batch, from
      the same pass (one more backward column for ``"mc"`` / ``"exact"``);
      per device under ``pmap`` / ``shard_map``.
    diagnostics_fraction: with ``diagnostics``, compute them instead from a
      pass of their own, with the true labels, over this leading fraction in
      ``(0, 1]`` of the statistics batch, at least two examples (their
      estimates of ``tr Σ`` and ``||G||²`` are unbiased at any size ≥ 2, and
      the per-example work shrinks with it); ``None``: the whole statistics batch, same pass.
    per_example_norms: with ``diagnostics``, keep the per-example norms
      (``sq_norms``, ``layer_sq_norms``) in the state too; they fix the
      batch size the state takes (a batch of another size is then an
      error). ``False`` keeps the batch's totals only (``tr Σ``,
      ``||G||²``, ...: what noise scaling reads), for any batch size.
  """

  kind: str = "mc"
  num_samples: int = 1
  batch_fraction: float | None = None
  accumulate: bool = False
  diagnostics: bool = False
  diagnostics_fraction: float | None = None
  per_example_norms: bool = True

  def __post_init__(self) -> None:
    _one_of("EstimatorOptions.kind (the estimator)", self.kind, ESTIMATORS)
    _python_int("EstimatorOptions.num_samples", self.num_samples)
    _fraction("EstimatorOptions.batch_fraction", self.batch_fraction)
    _fraction("EstimatorOptions.diagnostics_fraction", self.diagnostics_fraction)
    if self.diagnostics_fraction is not None and not self.diagnostics:
      raise ValueError("EstimatorOptions.diagnostics_fraction applies to the diagnostics: "
                       "pass diagnostics=True too (kfl.kfac(..., noise_scaling=...) does).")
    if not self.per_example_norms and not self.diagnostics:
      raise ValueError("EstimatorOptions.per_example_norms applies to the diagnostics: "
                       "pass diagnostics=True too, or leave it at True.")


@dataclasses.dataclass(frozen=True)
class InverseOptions:
  """How the damped factor inverses are computed (Ba et al. 2017, eq. 3, §3).

  Attributes:
    method: ``"eigh"`` (robust to slightly indefinite estimates),
      ``"cholesky"`` (faster) or ``"ekfac"``: eigenvalue-corrected K-FAC
      (George et al. 2018) for every two-factor ``A ⊗ G`` layer: the
      eigenbases of ``A`` and ``G`` (refreshed every ``inverse_every``
      steps) with the Fisher's own diagonal in that basis, re-estimated on
      every statistics step, in place of the eigenvalue products
      (:mod:`kfac_jax_lite.curvature.ekfac`); other blocks keep ``"eigh"``.
      It is a value of ``method`` because it changes only what the refresh
      computes from the same factors and how the gradient is multiplied,
      not which layers get a block or how factors are estimated.
    staggered: instead of refreshing every inverse on one step in
      ``inverse_every`` (a latency spike), refresh a cost-balanced
      ``1/inverse_every`` share of the factors on every step (the functional
      analogue of Ba et al.'s asynchronous inverses); all are computed on the
      first step. Needs a Python-int ``inverse_every``.
    relative_damping: read ``damping`` as a fraction of each block's mean
      eigenvalue instead of an absolute ``λ``: a Kronecker factor ``A_i``
      of ``k`` gets ``damping^{1/k} tr A_i / dim A_i``, a diagonal, full
      or EK-FAC block ``damping`` times its mean diagonal entry
      (:mod:`kfac_jax_lite.curvature.damping`). The step then does not
      depend on the scale of a layer's inputs (``c x`` with ``W / c`` gives
      the same function and the same step in function space) or of its
      curvature. The squared-gradient fallback keeps ``damping`` absolute
      (an Adam-like epsilon).
  """

  method: str = "eigh"
  staggered: bool = False
  relative_damping: bool = False

  def __post_init__(self) -> None:
    _one_of("InverseOptions.method", self.method, METHODS)
    for field in ("staggered", "relative_damping"):
      if not isinstance(getattr(self, field), bool):
        raise ValueError(f"InverseOptions.{field} must be True or False, got "
                         f"{getattr(self, field)!r}.")


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
  """Data-parallel statistics and where inverse work happens (KAISA placements).

  Attributes:
    axis_name: a ``pmap`` / ``shard_map`` axis over which the factor
      statistics are averaged (the caller averages the gradients); ``None``
      on one device or under ``jit`` on a mesh.
    distribute_inverses: every device inverts only a cost-balanced share of
      the layers (exchanged by ``all_to_all`` + ``all_gather``), over
      ``axis_name``, or under ``jit`` on a mesh set with ``jax.set_mesh``
      over all its devices.
    inverse_placement: ``"replicated"`` (KAISA's COMM-OPT: every device keeps
      every inverse) or ``"sharded"`` (MEM-OPT: each device keeps a
      ``ceil(d / n)``-row slice of every Kronecker inverse and the
      preconditioning is distributed; needs ``axis_name``, implies
      ``distribute_inverses``, and ``init`` must run inside the ``pmap`` /
      ``shard_map``, see :func:`kfac_jax_lite.sharded_state_specs`).
    symmetry_aware: all-reduce only the upper triangles of the symmetric
      factors (half the bytes of the statistics all-reduce, for some packing
      work on every device).
  """

  axis_name: str | None = None
  distribute_inverses: bool = False
  inverse_placement: str = "replicated"
  symmetry_aware: bool = False

  def __post_init__(self) -> None:
    _one_of("ParallelOptions.inverse_placement", self.inverse_placement, PLACEMENTS)
    if self.inverse_placement == "sharded" and self.axis_name is None:
      raise ValueError(
          "ParallelOptions(inverse_placement='sharded') needs axis_name: run the step "
          "under jax.pmap or jax.shard_map over that axis (with jit on a mesh and no "
          "axis_name, use the default 'replicated').")
    if self.inverse_placement == "sharded":
      object.__setattr__(self, "distribute_inverses", True)

  @property
  def sharded(self) -> bool:
    """Whether each device keeps only row slices of the inverses."""
    return self.inverse_placement == "sharded"


def as_estimator(estimator: str | EstimatorOptions) -> EstimatorOptions:
  """``EstimatorOptions(kind=estimator)`` for a string, else ``estimator``."""
  if isinstance(estimator, str):
    return EstimatorOptions(kind=estimator)
  if not isinstance(estimator, EstimatorOptions):
    raise ValueError("estimator must be 'mc', 'exact', 'empirical' or a "
                     f"kfl.EstimatorOptions, got {estimator!r}.")
  return estimator


def check_type(name: str, value: object, cls: type) -> None:
  """Raises ``ValueError`` unless ``value`` is a ``cls`` (names the fix)."""
  if not isinstance(value, cls):
    raise ValueError(f"{name} must be a kfl.{cls.__name__}(...), got {value!r}.")


@dataclasses.dataclass(frozen=True)
class AdaptiveOptions:
  """Step size, momentum and damping chosen by the quadratic model.

  Martens & Grosse (2015), §7: every step, ``α`` and ``μ`` of the update
  ``α Δ + μ δ₀`` (``Δ`` the K-FAC direction, ``δ₀`` the previous update)
  minimize the damped quadratic model with the exact Gauss–Newton matrix on
  the batch (one linearization and two forward-mode products of the model);
  §6.5: every ``damping_every`` steps the damping follows the
  Levenberg–Marquardt rule from the reduction ratio ``ρ`` (one more forward
  pass), starting from the transform's ``damping``.

  Attributes:
    adapt_damping: adapt the damping (else it stays at ``damping``).
    damping_every: steps between damping adaptations.
    damping_decay: ``ω`` in ``(0, 1)``: ``λ ← ωλ`` when ``ρ > 3/4``, ``λ/ω``
      when ``ρ < 1/4`` (M&G's ``(19/20)^5`` for ``damping_every=5``).
    min_damping: the damping's lower bound.
    max_damping: the damping's upper bound.
    batch_fraction: form the model on this leading fraction in ``(0, 1]``
      of the batch (``None``: all of it).
  """

  adapt_damping: bool = True
  damping_every: int = 5
  damping_decay: float = 0.95 ** 5
  min_damping: float = 1e-6
  max_damping: float = 1e4
  batch_fraction: float | None = None

  def __post_init__(self) -> None:
    _python_int("AdaptiveOptions.damping_every", self.damping_every)
    if not 0.0 < self.damping_decay < 1.0:
      raise ValueError("AdaptiveOptions.damping_decay must be in (0, 1), got "
                       f"{self.damping_decay!r}.")
    if not 0.0 < self.min_damping <= self.max_damping:
      raise ValueError("AdaptiveOptions needs 0 < min_damping <= max_damping, got "
                       f"{self.min_damping!r}, {self.max_damping!r}.")
    _fraction("AdaptiveOptions.batch_fraction", self.batch_fraction)
