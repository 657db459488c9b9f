"""The batch-size scaling study's models, optimizers and noise-scale probe.

Two models of the suite, each with its data on the device once and a batch
made inside the compiled step from an index array (so one compilation per
batch size, whatever the step count, and no host-to-device copy per step):

- ``ae``: the digits deep autoencoder 64-256-128-32-128-256-64 of
  ``examples/digits.py`` (Bernoulli cross-entropy summed over pixels),
  trained on the 1438 training images of ``digits_data.load_split``, each
  batch drawn without replacement (fresh permutation per epoch); evaluated on
  all 1438 training images, as in the suite.
- ``lm``: the suite's character transformer (``suite_text.py``: standard
  library sources, first 90% trains, last 10% held out), at the suite's
  smoke-test size (width 32, context 32, 2 blocks of 4 heads), batches of
  windows at uniformly random positions; evaluated on 256 non-overlapping
  held-out windows. An example is one window of 32 next-byte predictions.

Optimizers: ``optax.adamw(lr, weight_decay=1e-4)`` and ``kfl.kfac(loss_fn,
sample_batch, **{hyper: value})`` (every other argument the library's
default), each wrapped in ``optax.inject_hyperparams`` so the tuned value is
optimizer state and one compiled step serves a whole grid.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite_text  # pylint: disable=wrong-import-position
from suite_tasks import common, digits_data  # pylint: disable=wrong-import-position
import transformer_tokens  # pylint: disable=wrong-import-position

import kfac_jax_lite as kfl  # pylint: disable=wrong-import-position

Batch = dict[str, jax.Array]
ADAMW_WEIGHT_DECAY = 1e-4
LM_WIDTH, LM_CONTEXT = 32, 32


@dataclasses.dataclass(frozen=True)
class ScalingTask:
  """One model of the study.

  Attributes:
    name: short name (``"ae"`` or ``"lm"``).
    title: what it is, for the table and the plot.
    params: initial parameters (every run starts here).
    loss_fn: ``(params, batch) -> scalar`` mean loss over the batch.
    data: the training data on the device (what ``make_batch`` indexes).
    make_batch: ``(data, indices) -> batch``, traceable (used inside jit).
    draw: ``(rng, batch_size, count) -> int32 [count, batch_size]`` indices.
    evaluate: ``params -> float``, the loss on the fixed evaluation set.
  """
  name: str
  title: str
  params: Any
  loss_fn: Callable[[Any, Batch], jax.Array]
  data: Any
  make_batch: Callable[[Any, jax.Array], Batch]
  draw: Callable[[np.random.Generator, int, int], np.ndarray]
  evaluate: Callable[[Any], float]


def _epoch_indices(size: int) -> Callable[[np.random.Generator, int, int], np.ndarray]:
  """Batches without replacement: consecutive slices of per-epoch permutations
  (an epoch's incomplete last batch is dropped)."""
  def draw(rng: np.random.Generator, batch_size: int, count: int) -> np.ndarray:
    if not 0 < batch_size <= size:
      raise ValueError(f"batch_size must be in [1, {size}], got {batch_size}.")
    per_epoch = size // batch_size
    epochs = -(-count // per_epoch)
    rows = [rng.permutation(size)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
            for _ in range(epochs)]
    return np.concatenate(rows)[:count].astype(np.int32)
  return draw


def autoencoder_task() -> ScalingTask:
  """The digits deep autoencoder, evaluated on its training images."""
  model, loss_fn = digits_data.make_problem("autoencoder")
  train, _ = digits_data.load_split()
  data = jax.device_put(train["x"])
  eval_loss = jax.jit(loss_fn)
  code = (*model.encoder, model.code, *reversed(model.encoder))
  return ScalingTask(
      "ae", f"autoencoder 64-{'-'.join(map(str, code))}-64 (digits, loss on the "
      f"{len(train['x'])} training images)",
      digits_data.init_params(model), loss_fn, data,
      lambda x, idx: {"x": x[idx]}, _epoch_indices(len(train["x"])),
      lambda params: float(eval_loss(params, {"x": data})))


def lm_task() -> ScalingTask:
  """The character transformer LM (width 32, context 32), held-out loss."""
  text, names = suite_text.load_text()
  ids, vocab = suite_text.encode(text)
  split = int(suite_text.TRAIN_FRACTION * len(ids))
  model = transformer_tokens.Transformer(vocab=vocab, max_len=LM_CONTEXT, width=LM_WIDTH,
                                         depth=2, num_heads=4)
  loss_fn = transformer_tokens.make_loss(model)
  held_out = suite_text.eval_windows(ids[split:], LM_CONTEXT)
  eval_loss = jax.jit(loss_fn)
  train = jax.device_put(ids[:split])
  offsets = jnp.arange(LM_CONTEXT + 1)

  def make_batch(tokens: jax.Array, starts: jax.Array) -> Batch:
    seqs = tokens[starts[:, None] + offsets]
    return {"x": seqs[:, :-1], "y": seqs[:, 1:]}

  def draw(rng: np.random.Generator, batch_size: int, count: int) -> np.ndarray:
    return rng.integers(0, split - LM_CONTEXT - 1, size=(count, batch_size), dtype=np.int32)

  title = (f"char transformer d{LM_WIDTH} x2 blocks, ctx {LM_CONTEXT}, vocab {vocab} "
           f"(stdlib {names[0]}..{names[-1]}, {len(text) // 1000} KB; held-out loss)")
  return ScalingTask("lm", title, transformer_tokens.init_params(model), loss_fn, train,
                     make_batch, draw, lambda params: float(eval_loss(params, held_out)))


def make_optimizer(family: str, hyper: str, task: ScalingTask, sample_batch: Batch,
                   value: float) -> optax.GradientTransformationExtraArgs:
  """``family`` (``"adamw"`` or ``"kfac"``) with hyperparameter ``hyper`` injected.

  Args:
    family: ``"adamw"`` or ``"kfac"``.
    hyper: the keyword tuned, e.g. ``"learning_rate"`` or (K-FAC) ``"kl_clip"``;
      every other argument keeps its default (AdamW: weight decay 1e-4).
    task: the model (K-FAC traces its loss).
    sample_batch: a batch for K-FAC's tracing.
    value: the hyperparameter's value.

  Returns:
    The optimizer; every ``value`` gives the same state structure (the value
    is a state leaf), so one compiled step serves the grid.
  """
  if family == "adamw":
    factory = lambda **kw: optax.adamw(**{"learning_rate": 1e-3,
                                          "weight_decay": ADAMW_WEIGHT_DECAY, **kw})
  elif family == "kfac":
    factory = lambda **kw: kfl.kfac(task.loss_fn, sample_batch, **kw)
  else:
    raise ValueError(f"family must be 'adamw' or 'kfac', got {family!r}.")
  return optax.with_extra_args_support(
      optax.inject_hyperparams(lambda v: factory(**{hyper: v}))(v=value))


def make_step(task: ScalingTask, tx: optax.GradientTransformationExtraArgs
              ) -> Callable[..., Any]:
  """A jitted ``(params, opt_state, data, indices) -> (params, opt_state)``."""
  def step(params: Any, opt_state: Any, data: Any, idx: jax.Array) -> tuple[Any, Any]:
    batch = task.make_batch(data, idx)
    grads = jax.grad(task.loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(step)


def noise_scale(task: ScalingTask, params: Any, batch_size: int, count: int,
                seed: int = 1) -> dict[str, float]:
  """``kfl.diagnostics`` averaged over ``count`` batches of ``batch_size``.

  McCandlish et al. (2018, App. A) average the unbiased ``tr Σ`` and
  ``||G||²`` over batches before dividing; gradient diversity (Yin et al.
  2018) is averaged as a ratio.

  Returns:
    ``{"b_simple", "trace_sigma", "grad_sq_norm", "diversity", "batch_size",
    "batches", "uncovered"}``.
  """
  diag = jax.jit(lambda p, idx: kfl.diagnostics(task.loss_fn, p, task.make_batch(task.data, idx)))
  rng = np.random.default_rng(seed)
  outs = [diag(params, jnp.asarray(idx)) for idx in task.draw(rng, batch_size, count)]
  trace = float(np.mean([float(o.trace_sigma) for o in outs]))
  grad_sq = float(np.mean([float(o.grad_sq_norm) for o in outs]))
  return {"b_simple": trace / grad_sq, "trace_sigma": trace, "grad_sq_norm": grad_sq,
          "diversity": float(np.mean([float(o.diversity) for o in outs])),
          "batch_size": batch_size, "batches": count,
          "uncovered": list(outs[0].uncovered)}


def compile_step(task: ScalingTask, family: str, hyper: str, batch_size: int,
                 value: float, fast_compile: bool = False
                 ) -> tuple[Any, Callable[[float], tuple[Any, Any]], float]:
  """The compiled step of ``family`` at ``batch_size`` and a fresh-state factory.

  ``fast_compile``: XLA's cheap optimization level (``common.FAST_COMPILE``, for
  smoke runs whose few steps do not repay full optimization).

  Returns:
    ``(compiled step, value -> (params, opt_state), compile seconds)``.
  """
  idx = jnp.asarray(task.draw(np.random.default_rng(0), batch_size, 1)[0])
  sample = task.make_batch(task.data, idx)
  factory = lambda v: make_optimizer(family, hyper, task, sample, v)
  fresh = lambda v: (task.params, factory(v).init(task.params))
  compiled, seconds = common.compile_step(make_step(task, factory(value)),
                                          *fresh(value), task.data, idx,
                                          compiler_options=common.FAST_COMPILE
                                          if fast_compile else None)
  return compiled, fresh, seconds
