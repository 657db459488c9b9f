"""A weight that should be K-FAC but got the rms fallback is said loudly.

``scale_by_kfac(...).init`` emits one ``UserWarning`` naming every parameter
of two or more axes that a matrix product or convolution reads but that got
the rms fallback (a tied embedding / unembedding, a weight read inside
``lax.cond``), with the reason and the fix; an explicit ``blocks`` choice of
``"rms"`` or ``"none"`` for a path silences it for that path. Ordinary
models (and models whose loss carries weight decay) warn about nothing.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.tagging import report
from kfac_jax_lite.tagging.layers import tag
from kfac_jax_lite.tagging.trace import trace_loss
import _framework_cases as fw
import _tagging_cases as tt
import _model_forms as forms
import test_weight_sharing as ws

VOCAB, D = 6, 4


def _tied_case() -> tuple[Callable[..., jax.Array], Any, Any]:
  """Embedding table reused (transposed) as the output projection."""
  params = {"embed": tt.normal(1, VOCAB, D), "wh": tt.normal(2, D, D), "bh": tt.normal(3, D)}
  batch = {"tok": tt.randint(5, (tt.B, tt.T), VOCAB), "y": tt.randint(6, (tt.B, tt.T), VOCAB)}

  def loss_fn(p, b):
    h = jnp.tanh(p["embed"][b["tok"]] @ p["wh"] + p["bh"])
    return tt.xent(h @ p["embed"].T, b)

  return loss_fn, params, batch


def _cond_case() -> tuple[Callable[..., jax.Array], Any, Any]:
  """``w1`` read inside both branches of a ``lax.cond``; ``w2`` a plain layer."""
  params = {"w1": tt.normal(1, tt.D_IN, tt.D_H), "w2": tt.normal(2, tt.D_H, tt.D_OUT)}

  def loss_fn(p, b):
    h = jax.lax.cond(b["flag"], lambda x: jnp.tanh(x @ p["w1"]), lambda x: x @ p["w1"], b["x"])
    return tt.xent(h @ p["w2"], b)

  return loss_fn, params, {**tt.class_batch(), "flag": jnp.asarray(True)}


def _init(loss_fn: Callable[..., jax.Array], params: Any, batch: Any,
          blocks: dict[str, str] | None = None) -> None:
  layers = kfl.LayerOptions(blocks=blocks or {})
  kfl.scale_by_kfac(loss_fn, batch, damping=1e-2, layers=layers).init(params)


def _init_silently(*args: Any, **kwargs: Any) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _init(*args, **kwargs)


@pytest.mark.parametrize("case,path,why", [
    (_tied_case, "['embed']", "used 2 times"), (_cond_case, "['w1']", "used by cond")])
def test_fallback_of_a_weight_matrix_warns_at_init(case, path: str, why: str):
  loss_fn, params, batch = case()
  with pytest.warns(UserWarning, match="no Kronecker block") as record:
    _init(loss_fn, params, batch)
  assert len(record) == 1
  msg = str(record[0].message)
  assert f"  {path}: {why}" in msg and "rms fallback" in msg
  assert "kfl.register_dense" in msg and "blocks=" in msg
  others = [n for n in ("['wh']", "['bh']", "['w2']") if n in msg]
  assert not others, msg  # the weights that are layers are not named
  # The fix the message suggests, pasted as it is, silences it.
  suggestion = re.search(r"blocks=(\{.*?\})", msg).group(1)
  _init_silently(loss_fn, params, batch, blocks=eval(suggestion))  # pylint: disable=eval-used


def test_fused_kernels_warn_only_when_not_one_layer():
  """Flax's OptimizedLSTMCell concatenates its gate kernels into one matmul:
  one Kronecker layer per concatenation (tests/test_fused_kernels.py), so no
  warning; a joined leaf also read on its own is no layer, and is named."""
  model = nn.RNN(nn.OptimizedLSTMCell(D))
  x = tt.normal(1, tt.B, tt.T, tt.D_IN)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, b: tt.xent(model.apply({"params": p}, b["x"])[:, -1, :tt.D_OUT], b)
  _init_silently(loss_fn, params, {"x": x, "y": tt.randint(2, (tt.B,), tt.D_OUT)})
  params = {"wa": tt.normal(1, tt.D_IN, tt.D_OUT), "wb": tt.normal(2, tt.D_IN, tt.D_OUT)}

  def also_alone(p, b):
    fused = b["x"] @ jnp.concatenate([p["wa"], p["wb"]], axis=1)
    return tt.xent(fused[:, :tt.D_OUT] + b["x"] @ p["wa"], b)

  with pytest.warns(UserWarning, match="no Kronecker block for 2 weight") as record:
    _init(also_alone, params, tt.class_batch())
  assert "['wa']: joined (concatenate / stack) into a fused weight" in str(record[0].message)
  assert "['wb']: joined (concatenate / stack) into a fused weight" in str(record[0].message)


@pytest.mark.parametrize("choice", ["rms", "none"])
def test_explicit_choice_silences_only_its_paths(choice: str):
  loss_fn, params, batch = _tied_case()
  _init_silently(loss_fn, params, batch, blocks={"embed": choice})
  params = {"embed": params["embed"], "w2": tt.normal(8, D, D)}
  batch = {**batch, "flag": jnp.asarray(True)}

  def both(p, b):  # two offenders: a tied table, and w2 read inside lax.cond
    e = p["embed"][b["tok"]]
    h = jax.lax.cond(b["flag"], lambda x: jnp.tanh(x @ p["w2"]), lambda x: x @ p["w2"], e)
    return tt.xent(h @ p["embed"].T, b)

  traced = trace_loss(both, params, batch)
  msg = report.fallback_warning(tag(traced), None)
  assert msg is not None and "['embed']" in msg and "['w2']" in msg
  msg = report.fallback_warning(tag(traced, blocks={"w2": choice}), {"w2": choice})
  assert msg is not None and "['embed']" in msg and "['w2']" not in msg
  blocks = {"embed": choice, "w2": choice}
  assert report.fallback_warning(tag(traced, blocks=blocks), blocks) is None


def _l2(loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  return lambda p, b: loss_fn(p, b) + 1e-3 * sum(jnp.sum(x * x) for x in jax.tree.leaves(p))


ORDINARY: dict[str, Callable[[], tuple[Callable[..., jax.Array], Any, Any]]] = {
    "linen_mlp": forms.linen_case,
    "plain_mlp_with_weight_decay": lambda: (
        _l2(tt.dict_mlp_loss), tt.dict_mlp_params(), tt.class_batch()),
    "rnn": lambda: (ws.rnn_loss, ws.rnn_params(), ws.rnn_batch()),
    "scanned_stack": lambda: (ws.stack_loss, ws.stack_params(), ws.stack_batch()),
    **{f"nnx_{family}": (lambda family=family: fw.nnx_case(family)[:3])
       for family in ("conv", "embedding", "batchnorm", "attention")},
}


@pytest.mark.parametrize("case", sorted(ORDINARY))
def test_ordinary_models_do_not_warn(case: str):
  loss_fn, params, batch = ORDINARY[case]()
  _init_silently(loss_fn, params, batch)


def test_vectors_and_unread_matrices_are_not_reported():
  """A vector in the fallback (a scalar-per-class temperature) or a matrix no
  product reads is not what a user expects as a Kronecker layer."""
  params = {**tt.dict_mlp_params(), "t": jnp.ones((2, tt.D_OUT)), "v": jnp.ones(tt.D_OUT)}

  def loss_fn(p, b):
    logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return tt.xent(logits * jnp.sum(p["t"], 0) / p["v"], b)

  batch = tt.class_batch()
  kinds = {l.name: l.kind for l in kfl.find_layers(loss_fn, params, batch)}
  assert kinds["['t']"] == kinds["['v']"] == "rms"
  assert report.fallback_warning(tag(trace_loss(loss_fn, params, batch)), None) is None
  _init_silently(loss_fn, params, batch)
