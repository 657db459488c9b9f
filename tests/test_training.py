"""Training on scikit-learn's digits: K-FAC beats Adam per step; the main job runs.

The comparison trains half-width versions of the two digits models (the MLP
classifier and the deep autoencoder of ``examples/digits_data.py``) for the
same number of steps on the same batches from the same initialization, and
scores them with a loss computed here with ``optax`` (not with the library's
loss functions). Adam gets the best of a small grid of learning rates; K-FAC
one fixed setting (damping 1e-2 and ``kl_clip`` 1e-3 won a grid over damping
{1e-3, 1e-2, 1e-1} x ``kl_clip`` {1e-3, 1e-2, 1e-1} x rate {0.1, 0.3, 1} on
two batch orders). Over three batch orders, after 80 steps of 128: MLP,
K-FAC 0.0015-0.0044 against Adam's best 0.019-0.037; autoencoder (loss floor
13.66, the entropy of the grey levels), K-FAC 16.6-17.1 against 18.4-18.8.

Adam's learning rates are ``vmap``-ed in one program; K-FAC is not: a
``vmap`` over K-FAC runs batched ``eigh`` kernels, which deadlocked jaxlib's
CPU LAPACK thread pool on a 2-core machine in our runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest

import kfac_jax_lite as kfl

matplotlib.use("Agg")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")
sys.path.insert(0, EXAMPLES)
import digits_data  # pylint: disable=wrong-import-position

STEPS = 80
BATCH = 128
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
pytestmark = pytest.mark.slow  # long runs: started first (tests/conftest.py)

KFAC_SETTINGS = dict(learning_rate=0.1, damping=1e-2, kl_clip=1e-3, momentum=0.9, stats_every=1,
                     inverse_every=10)

Batch = dict[str, jax.Array]


@pytest.fixture(scope="module")
def numpy_train_set() -> digits_data.Batch:
  train, _ = digits_data.load_split()
  return train


@pytest.fixture(scope="module")
def train_set(numpy_train_set: digits_data.Batch) -> Batch:
  return {k: jnp.asarray(v) for k, v in numpy_train_set.items()}


@pytest.fixture(scope="module")
def stacked_batches(numpy_train_set: digits_data.Batch) -> Batch:
  """``STEPS`` minibatches of ``BATCH`` stacked on a leading axis (for scan)."""
  it = digits_data.batches(numpy_train_set, BATCH, seed=1)
  batches = [next(it) for _ in range(STEPS)]
  return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


def _fit(loss_fn: digits_data.LossFn, tx: optax.GradientTransformationExtraArgs,
         params: Any, batches: Batch) -> Any:
  """Runs one optimizer over the stacked batches with ``lax.scan``."""
  def body(carry: tuple[Any, Any], batch: Batch) -> tuple[tuple[Any, Any], None]:
    p, state = carry
    grads = jax.grad(loss_fn)(p, batch)
    updates, state = tx.update(grads, state, p, batch=batch)
    return (optax.apply_updates(p, updates), state), None
  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), batches)
  return params


def _reference_loss(problem: str, logits: jax.Array, data: Batch) -> jax.Array:
  """Training loss computed with optax (independent of kfac_jax_lite.losses)."""
  if problem == "mlp":
    return optax.softmax_cross_entropy_with_integer_labels(logits, data["y"]).mean()
  return optax.sigmoid_binary_cross_entropy(logits, data["x"]).sum(-1).mean()


def _train_both(problem: str, batches: Batch, train_set: Batch
                ) -> tuple[float, np.ndarray, float]:
  """(initial loss, Adam losses per learning rate, K-FAC loss) after STEPS."""
  model, loss_fn = digits_data.make_problem(problem, small=True)
  params = digits_data.init_params(model, seed=0)
  sample = jax.tree.map(lambda x: x[0], batches)
  score: Callable[[Any], jax.Array] = jax.jit(
      lambda p: _reference_loss(problem, model.apply({"params": p}, train_set["x"]),
                                train_set))

  def adam_fit(lr: jax.Array) -> Any:
    return _fit(loss_fn, optax.with_extra_args_support(optax.adam(lr)), params, batches)

  adam_params = jax.jit(jax.vmap(adam_fit))(jnp.asarray(ADAM_LRS, jnp.float32))
  adam = np.asarray(jax.jit(jax.vmap(score))(adam_params))
  kfac_tx = kfl.kfac(loss_fn, sample, **KFAC_SETTINGS)
  kfac_params = jax.jit(lambda p: _fit(loss_fn, kfac_tx, p, batches))(params)
  return float(score(params)), adam, float(score(kfac_params))


@pytest.mark.parametrize("problem", ["mlp", "autoencoder"])
def test_kfac_beats_tuned_adam_at_equal_steps(problem: str, stacked_batches: Batch,
                                              train_set: Batch) -> None:
  initial, adam, kfac = _train_both(problem, stacked_batches, train_set)
  summary = (f"{problem}: initial {initial:.4f}, K-FAC {kfac:.4f}, Adam "
             + ", ".join(f"lr {lr:g}: {l:.4f}" for lr, l in zip(ADAM_LRS, adam)))
  assert np.isfinite(kfac), summary
  assert kfac < 0.5 * initial, summary
  assert kfac < np.nanmin(adam), summary


def test_main_job_quick_smoke(tmp_path: Any, capsys: Any) -> None:
  import digits  # pylint: disable=import-outside-toplevel  # examples/digits.py
  out = tmp_path / "digits.png"
  results = digits.main(["--quick", "--out", str(out)])
  assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  for problem in ("mlp", "autoencoder"):
    assert problem in printed
    for run in results[problem].values():
      assert run.steps[0] == 0 and run.steps[-1] > 0
      assert len(run.steps) == len(run.loss) == len(run.seconds)
      assert np.all(np.isfinite(run.loss))
      assert np.all(np.diff(run.seconds) >= 0)
      assert run.loss[-1] < run.loss[0]
  assert "loss K-FAC" in printed and "time Adam" in printed
