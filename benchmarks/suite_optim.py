"""The suite's optimizers: AdamW and Muon learning-rate grids, K-FAC as called.

AdamW (``optax.adamw``, weight decay 1e-4, its default) and Muon
(``optax.contrib.muon``: Newton–Schulz orthogonalized momentum on every
``kernel``, its built-in Adam on the embeddings, biases and norm parameters)
are wrapped in ``optax.inject_hyperparams`` with the learning rate as the only
injected value: every point of a grid has the same state shapes, so one
compiled train step serves the whole grid (the learning rate is read from the
optimizer state; the update is the same as with a Python float).

K-FAC is ``kfl.kfac(loss_fn, sample_batch, **kwargs)`` with the keyword
arguments given on the command line (none by default: the library's
defaults, what a new user gets).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

import kfac_jax_lite as kfl

ADAMW_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Muon's learning rate multiplies an orthogonalized (unit spectral scale)
# update; Jordan's reference uses 0.02, inside this grid.
MUON_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
ADAMW_WEIGHT_DECAY = 1e-4


@dataclasses.dataclass(frozen=True)
class OptSpec:
  """One optimizer family of the comparison.

  Attributes:
    name: label in the tables (``"adamw"``, ``"muon"``, ``"kfac"`` or a
      variant's name).
    family: ``"adamw"``, ``"muon"`` or ``"kfac"``.
    grid: learning rates (AdamW, Muon); ``(None,)`` for K-FAC.
    kwargs: K-FAC's keyword arguments as given (empty: the defaults).
  """
  name: str
  family: str
  grid: tuple[float | None, ...]
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_value(text: str) -> Any:
  """A command-line value: a Python literal (number, tuple, string...), or
  ``true``/``false``/``none`` in any case, else the text itself."""
  lowered = text.strip().lower()
  if lowered in ("true", "false", "none"):
    return {"true": True, "false": False, "none": None}[lowered]
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text.strip()


def parse_kwargs(items: Sequence[str], option: str) -> dict[str, Any]:
  """``["key=value", ...]`` -> ``{key: parse_value(value)}``.

  Args:
    items: the ``key=value`` strings.
    option: the command-line option they came from (for errors).

  Returns:
    The keyword arguments.
  """
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"{option} expects key=value, got {item!r} "
                       "(e.g. learning_rate=0.3).")
    out[key.strip()] = parse_value(value)
  return out


def parse_models(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
  """``"a,b"`` -> ``["a", "b"]``; a name not in ``known`` is a command-line error."""
  models = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in models if m not in known]
  if unknown:
    parser.error(f"--models: unknown {unknown}; choose from {list(known)}")
  return models


def parse_variant(text: str) -> OptSpec:
  """``"name:key=val,key=val"`` (``"name:"`` for the plain call) -> a K-FAC spec."""
  name, sep, rest = text.partition(":")
  if not sep or not name.strip():
    raise ValueError(f"--variant expects name:key=val,key=val, got {text!r}.")
  items = [s for s in rest.split(",") if s.strip()]
  return OptSpec(name.strip(), "kfac", (None,), parse_kwargs(items, "--variant"))


def muon_dimensions(params: Any) -> Any:
  """Muon's matrix view of every ``kernel`` leaf; ``None`` (Adam) elsewhere.

  Dense kernels ``[in, out]`` as they are; conv kernels ``[h, w, in, out]``
  and attention output kernels ``[heads, head_dim, d]`` reduce over all but
  the last axis; query/key/value kernels ``[d, heads, head_dim]`` reduce over
  the first. Embedding tables, biases and norm parameters stay with Adam
  (Jordan's recipe for Muon).

  Args:
    params: the parameter tree.

  Returns:
    A tree of ``optax.contrib.MuonDimensionNumbers`` or ``None``.
  """
  def spec(path: tuple[Any, ...], leaf: Any) -> Any:
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys[-1] != "kernel" or leaf.ndim < 2:
      return None
    if len(keys) > 1 and keys[-2] in ("query", "key", "value"):
      return optax.contrib.MuonDimensionNumbers(0, tuple(range(1, leaf.ndim)))
    return optax.contrib.MuonDimensionNumbers(tuple(range(leaf.ndim - 1)), leaf.ndim - 1)
  return jax.tree_util.tree_map_with_path(spec, params)


def grid_optimizer(family: str, params: Any
                   ) -> Callable[[float], optax.GradientTransformationExtraArgs]:
  """``learning_rate -> optimizer`` of ``"adamw"`` or ``"muon"`` (the rate injected).

  Args:
    family: ``"adamw"`` or ``"muon"``.
    params: the parameters (Muon's matrix views).

  Returns:
    A function of the learning rate; its optimizers share one state structure.
  """
  if family == "adamw":
    def factory(learning_rate: float) -> optax.GradientTransformation:
      return optax.adamw(learning_rate, weight_decay=ADAMW_WEIGHT_DECAY)
  elif family == "muon":
    dims = muon_dimensions(params)

    def factory(learning_rate: float) -> optax.GradientTransformation:
      return optax.contrib.muon(learning_rate, muon_weight_dimension_numbers=dims)
  else:
    raise ValueError(f"family must be 'adamw' or 'muon', got {family!r}.")
  injected = optax.inject_hyperparams(factory)
  return lambda lr: optax.with_extra_args_support(injected(learning_rate=lr))


# Dotted keys set a field of an option value: ``inverses.method=cholesky``.
OPTION_TYPES = {"layers": kfl.LayerOptions, "estimator": kfl.EstimatorOptions,
                "inverses": kfl.InverseOptions, "adaptive": kfl.AdaptiveOptions}


def call_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """``kwargs`` with dotted keys (``layers.conv_approximation``) made option values."""
  out: dict[str, Any] = {}
  fields: dict[str, dict[str, Any]] = {}
  for key, value in kwargs.items():
    group, dot, field = key.partition(".")
    if dot:
      fields.setdefault(group, {})[field] = value
    else:
      out[key] = value
  for group, values in fields.items():
    out[group] = OPTION_TYPES[group](**values)
  return out


def make_kfac(loss_fn: Callable[[Any, Any], jax.Array], sample_batch: Any,
              kwargs: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
  """``kfl.kfac(loss_fn, sample_batch, **kwargs)`` (dotted keys: option fields)."""
  return kfl.kfac(loss_fn, sample_batch, **call_kwargs(kwargs))


def describe(spec: OptSpec) -> str:
  """How the suite calls ``spec``'s optimizer, in one line."""
  if spec.family == "adamw":
    return f"optax.adamw(lr, weight_decay={ADAMW_WEIGHT_DECAY}), lr in {list(spec.grid)}"
  if spec.family == "muon":
    return f"optax.contrib.muon(lr) (kernels Muon, rest Adam), lr in {list(spec.grid)}"
  args = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
  return f"kfl.kfac(loss_fn, batch{', ' if args else ''}{args})"
