"""The Fisher decides what is a layer: terms off the path to the predictions.

K-FAC approximates the Fisher of the registered predictive distribution; a
use of a parameter that does not reach that distribution's logits (weight
decay written into the loss, a norm penalty on one weight) adds to the
gradient but nothing to the Fisher. For every model of the framework tests
and representative models of the tagging tests, adding an L2 term
over all parameters, or a norm penalty on one weight, must leave the
``find_layers`` table unchanged and the factor estimates (``"mc"`` with a
fixed key, and ``"exact"``) equal bit for bit, while the gradient changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_lite as kfl
from kfac_jax_lite.tagging import relevance
import _framework_cases as fw
import _eqx_haiku_cases as eh
import _tagging_cases as tt
import _model_forms as forms
import test_weight_sharing as ws

Case = tuple[Callable[[Any, Any], jax.Array], Any, Any]


def _eqx_mlp(vmapped: bool) -> Case:
  loss = forms.eqx_vmapped_loss if vmapped else forms.eqx_batched_loss
  return loss, forms.eqx_mlp(), tt.class_batch()


def _nested_wrappers() -> Case:
  """Layers in ``checkpoint`` inside a ``jit``, a ``custom_vjp`` activation,
  the loss marker inside the same ``jit``."""
  layer = jax.checkpoint(forms.dense_layer)

  @jax.jit
  def loss_fn(p, b):
    h = forms.my_tanh(layer(p["w1"], p["b1"], b["x"]))
    return tt.xent(layer(p["w2"], p["b2"], h), b)

  return loss_fn, tt.dict_mlp_params(), tt.class_batch()


def _framework(name: str, family: str, bias: bool = True) -> Case:
  if name in ("equinox", "haiku"):
    module = pytest.importorskip(name)
    case = (eh.eqx_case if name == "equinox" else eh.haiku_case)(module, family, bias)
  else:
    case = {"linen": fw.linen_case, "nnx": fw.nnx_case, "plain": fw.plain_case}[name](family)
  return case[:3]


# Models of every framework (linen, nnx, Equinox, Haiku, plain JAX) and every
# family (dense, conv, embedding, scale-and-shift, RNN, scanned stack,
# attention), taken from the tagging and framework tests.
CASES: dict[str, Callable[[], Case]] = {
    "linen_mlp": forms.linen_case,
    "nnx_mlp": forms.nnx_case,
    "plain_mlp": lambda: (tt.dict_mlp_loss, tt.dict_mlp_params(), tt.class_batch()),
    "eqx_style_vmapped": functools.partial(_eqx_mlp, True),
    "nested_wrappers": _nested_wrappers,
    "plain_rnn": lambda: (ws.rnn_loss, ws.rnn_params(), ws.rnn_batch()),
    "plain_scanned_stack": lambda: (ws.stack_loss, ws.stack_params(), ws.stack_batch()),
    # Every model of the framework tests (tests/_framework_cases.py, tests/_eqx_haiku_cases.py).
    **{f"{name}_{family}": functools.partial(_framework, name, family)
       for name, families in (
           ("linen", ("batchnorm", "attention")),
           ("nnx", ("conv", "embedding", "layernorm", "batchnorm", "attention")),
           ("plain", ("conv", "embedding", "layernorm", "batchnorm")))
       for family in families},
    **{f"{name}_{family}{'' if bias else '_nobias'}": functools.partial(
        _framework, name, family, bias)
       for name in ("equinox", "haiku")
       for family, bias in (("dense", True), ("dense", False), ("conv", True),
                            ("conv", False), ("embedding", True), ("layernorm", True),
                            ("batchnorm", True), ("attention", True), ("attention", False))
       # Equinox's BatchNorm case closes over an eqx.nn.State that may be
       # used once; this test calls its loss several times.
       if (name, family) != ("equinox", "batchnorm")},
}


def with_l2(loss_fn: Callable[[Any, Any], jax.Array], wd: float = 1e-2):
  """``loss + 0.5 wd Σ ||p||²`` over every parameter leaf (weight decay in the loss)."""
  def loss(params, batch):
    return loss_fn(params, batch) + 0.5 * wd * sum(
        jnp.sum(p * p) for p in jax.tree.leaves(params))
  return loss


def with_norm(loss_fn: Callable[[Any, Any], jax.Array], params: Any):
  """``loss + 1e-3 ||W||`` for the first parameter leaf with ``ndim >= 2``."""
  leaves = jax.tree.leaves(params)
  index = next(i for i, p in enumerate(leaves) if p.ndim >= 2)

  def loss(p, batch):
    return loss_fn(p, batch) + 1e-3 * jnp.linalg.norm(jax.tree.leaves(p)[index])
  return loss


def _estimates(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any) -> Any:
  return {est: kfl.estimate_curvature(loss_fn, params, batch, key=jax.random.key(3),
                                      estimator=est) for est in ("mc", "exact")}


def _estimates_and_grads(losses: tuple[Callable[[Any, Any], jax.Array], ...], params: Any,
                         batch: Any) -> list[tuple[Any, Any]]:
  """``(factor estimates, gradient)`` of each loss, in one compiled program.

  One program costs a third of the compile time of one per loss and a fraction
  of an op-by-op run's many small compilations. Factors equal bit for bit are
  what a loss whose penalty is off the Fisher's path must give (XLA may then
  compute them once); a penalty that reached the factors changes their values.
  """
  @jax.jit
  def run(params: Any, batch: Any) -> list[tuple[Any, Any]]:
    return [(_estimates(loss, params, batch), jax.grad(loss)(params, batch))
            for loss in losses]
  return run(params, batch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_penalties_leave_layers_and_factors_unchanged(case: str):
  loss_fn, params, batch = CASES[case]()
  table = str(kfl.find_layers(loss_fn, params, batch))
  assert " kron" in table or "diagonal_fisher" in table, table
  penalized = (with_l2(loss_fn), with_norm(loss_fn, params))
  (factors, grad), *others = _estimates_and_grads((loss_fn, *penalized), params, batch)
  for loss, (got, got_grad) in zip(penalized, others):
    assert str(kfl.find_layers(loss, params, batch)) == table
    assert jax.tree.structure(got) == jax.tree.structure(factors)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(factors)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), got_grad, grad)
    assert any(jax.tree.leaves(changed))


def test_penalty_inside_the_markers_jit_and_a_second_marker_are_sliced():
  """The slice runs through nested calls: a penalty computed inside the same
  ``jit`` as the loss marker is off the path; and the predictions of every
  marker are on it (the slice, not ``tag``, which accepts one marker)."""
  loss_fn, params, batch = _nested_wrappers()
  penalized = jax.jit(lambda p, b: jax.jit(with_l2(loss_fn))(p, b))
  assert str(kfl.find_layers(penalized, params, batch)) == str(
      kfl.find_layers(loss_fn, params, batch))

  params = dict(params, w3=tt.normal(7, tt.D_H, 2), aux=tt.normal(8, tt.D_H))

  def two_heads(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    second = kfl.losses.squared_error(h @ p["w3"], jnp.zeros((tt.B, 2)))
    return tt.xent(h @ p["w2"], b) + second + jnp.sum(p["aux"] ** 2)

  closed = jax.make_jaxpr(two_heads)(params, batch)
  live = relevance.relevant_vars(closed.jaxpr)[()]
  var = dict(zip(sorted(params), closed.jaxpr.invars))  # dict leaves flatten sorted
  assert {k for k, v in var.items() if v in live} == {"w1", "b1", "w2", "w3"}
