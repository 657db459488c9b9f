"""Framework compatibility: Flax linen and nnx, Equinox, Haiku and plain JAX.

Each test asserts the exact layer records of a small model per framework and
layer family (:mod:`_framework_cases`, :mod:`_eqx_haiku_cases`). Families
tested elsewhere are not repeated here: linen dense / conv / embedding /
LayerNorm (``test_tagging_*``, ``test_conv_factors``,
``test_token_and_sequence_factors``, ``test_scale_shift``), nnx dense and
plain-JAX dense and attention (``test_tagging_*``).

Expected kinds: ``"dense"``, ``"conv"``, ``"embedding"`` (Kronecker); a
normalization scale ``γ`` that multiplies the normalized activation gets an
exact diagonal-Fisher ``"scale"`` block, holding ``[γ; β]`` when the offset
``β`` is added right after it (Equinox, the plain forms here), or ``"scale"``
and ``"shift"`` records when the framework folds ``γ`` into the normalizer
first (``x̂ = (x - μ) · (γ · rsqrt(σ² + ε))``: linen, nnx and Haiku LayerNorm).
With batch statistics (train-mode BatchNorm) that folded ``γ`` multiplies a
batch-wide value, not a per-example activation: rms fallback, a
documented limitation. Attention projections are dense layers; the ``q·kᵀ``
and ``attn·v`` products of two activations are never layers. BatchNorm
statistics passed inside a linen variables dict (or an nnx state) are never
tagged.
"""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx
import jax
import numpy as np
import pytest

import kfac_jax_lite as kfl
from helpers import leaf_paths, path_name
from _eqx_haiku_cases import eqx, eqx_case, haiku_case, hk
from _framework_cases import (
    LossFn, Record, assert_partition, check_records, compiled, family_batch, keystr, linen_case,
    linen_loss, linen_model, nnx_case, nnx_model, plain_case, random_like, rec, records, xent)


@pytest.mark.parametrize("family", ["batchnorm", "attention"])
def test_linen_layer_records(family: str):
  check_records(*linen_case(family))


@pytest.mark.parametrize("family", ["conv", "embedding", "layernorm", "batchnorm", "attention"])
def test_nnx_layer_records(family: str):
  check_records(*nnx_case(family))


@pytest.mark.parametrize("family,bias", [
    ("dense", True), ("dense", False), ("conv", True), ("conv", False), ("embedding", True),
    ("layernorm", True), ("batchnorm", True), ("attention", True), ("attention", False)])
def test_equinox_layer_records(eqx: Any, family: str, bias: bool):
  check_records(*eqx_case(eqx, family, bias))


@pytest.mark.parametrize("family,bias", [
    ("dense", True), ("dense", False), ("conv", True), ("conv", False),
    ("embedding", True), ("layernorm", True), ("batchnorm", True),
    ("attention", True), ("attention", False)])
def test_haiku_layer_records(hk: Any, family: str, bias: bool):
  check_records(*haiku_case(hk, family, bias))


@pytest.mark.parametrize("family", ["conv", "embedding", "layernorm", "batchnorm"])
def test_plain_jax_layer_records(family: str):
  check_records(*plain_case(family))


# ----------------------------------------------------------------------------
# Non-trainable collections are never tagged.
# ----------------------------------------------------------------------------


def assert_frozen(loss_fn: LossFn, variables: Any, batch: Any, stat_names: set[str],
                  want: set[Record]) -> None:
  """Statistics leaves are kind "frozen" (non-trainable), the rest as ``want``."""
  layers = kfl.find_layers(loss_fn, variables, batch)
  assert records(layers) == want | {(n, "frozen", None) for n in stat_names}, "\n" + str(layers)
  assert_partition(layers, variables)
  for l in layers:
    if l.name in stat_names:
      assert "non-trainable collection" in l.note, l.note


def linen_whole_case() -> tuple[LossFn, Any, dict[str, jax.Array], set[str], set[Record]]:
  """(loss_fn, variables, batch, statistics names, expected parameter records)."""
  model = linen_model("batchnorm")
  batch = family_batch("batchnorm")
  variables = random_like(jax.eval_shape(model.init, jax.random.key(0), batch["x"]))
  assert set(variables) == {"params", "batch_stats"}
  r = functools.partial(rec, variables)
  want = {r(("params", "head", "kernel"), "dense"),
          r(("params", "body", "scale"), "rms"),
          r(("params", "body", "bias"), "shift")}
  stats = {path_name(variables, "batch_stats", "body", s) for s in ("mean", "var")}
  return linen_loss(model, variables), variables, batch, stats, want


def test_linen_whole_variables_dict_leaves_batch_stats_untagged():
  loss_fn, variables, batch, stats, want = linen_whole_case()
  assert_frozen(loss_fn, variables, batch, stats, want)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_linen_batch_stats_get_zero_updates(weight_decay: float):
  loss_fn, variables, batch, stats, _ = linen_whole_case()
  tx = kfl.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, weight_decay=weight_decay)

  def step(v, s):
    return tx.update(jax.grad(loss_fn)(v, batch), s, v, batch=batch)[0]

  state = tx.init(variables)
  updates = compiled(step, variables, state)(variables, state)
  flat = {keystr(p): np.asarray(u)
          for p, u in zip(leaf_paths(updates), jax.tree.leaves(updates))}
  assert all(np.all(np.isfinite(u)) for u in flat.values())
  assert all(np.any(u != 0) for n, u in flat.items() if n not in stats)
  for name in stats:
    assert np.all(flat[name] == 0.0), (name, flat[name])


def test_nnx_whole_state_leaves_batch_stats_untagged():
  graphdef, state = nnx.split(nnx.eval_shape(lambda: nnx_model("batchnorm")))
  state = random_like(state)

  def loss_fn(s, b):
    return xent(nnx.merge(graphdef, s, copy=True)(b["x"]), b)

  r = functools.partial(rec, state)
  want = {r(("head", "kernel"), "dense"), r(("body", "scale"), "rms"),
          r(("body", "bias"), "shift")}
  stats = {path_name(state, "body", s) for s in ("mean", "var")}
  assert_frozen(loss_fn, state, family_batch("batchnorm"), stats, want)
