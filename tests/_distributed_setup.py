"""The model, data, optimizer and reference run of the data-parallel tests.

Shared by ``distributed_worker.py`` and ``multihost_worker.py`` (the
processes with several devices) and imported by ``test_distributed.py`` and
``test_multihost.py`` (in a 1-device process) for the model, the data and the
single-device reference run, so it must not need several devices at import
time. Every mode trains the same tiny MLP (6 -> 8 -> 3, softmax
cross-entropy) for ``NUM_STEPS`` steps on the same global batches of
``GLOBAL_BATCH`` examples; :func:`run_modes` runs the modes of a worker.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kfac_jax_lite as kfl


NUM_DEVICES = 8
AXIS = "batch"
GLOBAL_BATCH = 16
NUM_STEPS = 3
D_IN, D_HIDDEN, D_OUT = 6, 8, 3
LEARNING_RATE = 0.1
DAMPING = 1e-2
EMA_DECAY = 0.95
MC_SEED = 3

Arrays = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]

def init_params(seed: int = 0) -> dict[str, dict[str, jax.Array]]:
  """Initial MLP parameters (``x @ kernel + bias`` layers)."""
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  return {
      "l0": {"kernel": jax.random.normal(k0, (D_IN, D_HIDDEN)) / np.sqrt(D_IN),
             "bias": 0.1 * jax.random.normal(k2, (D_HIDDEN,))},
      "l1": {"kernel": jax.random.normal(k1, (D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN),
             "bias": jnp.zeros((D_OUT,))},
  }


def apply_mlp(params: Any, x: jax.Array) -> jax.Array:
  """The MLP's outputs (logits)."""
  h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
  return h @ params["l1"]["kernel"] + params["l1"]["bias"]


def loss_fn(params: Any, batch: Any) -> jax.Array:
  """Mean softmax cross-entropy of the MLP over the (local) batch."""
  return kfl.losses.softmax_cross_entropy(apply_mlp(params, batch["x"]), batch["y"])


def regression_loss_fn(params: Any, batch: Any) -> jax.Array:
  """Squared error to one-hot targets (Gaussian model: continuous MC samples)."""
  targets = jax.nn.one_hot(batch["y"], D_OUT)
  return kfl.losses.squared_error(apply_mlp(params, batch["x"]), targets)


def make_batches() -> list[Batch]:
  """``NUM_STEPS`` fixed global batches of ``GLOBAL_BATCH`` examples."""
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(GLOBAL_BATCH, D_IN)).astype(np.float32),
           "y": rng.integers(0, D_OUT, GLOBAL_BATCH).astype(np.int32)}
          for _ in range(NUM_STEPS)]


def local_batch(batch: Batch, n: int = NUM_DEVICES) -> Batch:
  """The first of ``n`` equal shards of a global batch (for shapes only)."""
  return jax.tree.map(lambda a: a[:a.shape[0] // n], batch)


def make_optimizer(sample_batch: Any, axis_name: str | None = None,
                   **parallel: Any) -> optax.GradientTransformationExtraArgs:
  """The K-FAC optimizer every mode uses (exact Fisher: no sampling noise; the
  whole batch, no noise scaling: ``kfac``'s default statistics half and noise
  factor depend on how the batch is split).

  ``parallel`` are :class:`kfl.ParallelOptions` fields besides ``axis_name``.
  """
  return kfl.kfac(loss_fn, sample_batch, LEARNING_RATE, damping=DAMPING, ema_decay=EMA_DECAY,
                  stats_every=1, inverse_every=1, estimator=kfl.EstimatorOptions("exact"),
                  noise_scaling=None,
                  parallel=kfl.ParallelOptions(axis_name=axis_name, **parallel))


def snapshot(params: Any, opt_state: Any, prefix: str = "") -> Arrays:
  """Final parameters, factors and inverses as ``"{kind}|{name}"`` arrays."""
  kstate: kfl.KfacState = opt_state[0]
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[f"{prefix}params|{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  for kind, tree in (("factors", kstate.factors), ("inverses", kstate.inverses)):
    for name, fac in tree.items():
      for which, leaf in fac.items():
        out[f"{prefix}{kind}|{name}|{which}"] = np.asarray(leaf)
  return out


def sgd_step(tx: optax.GradientTransformationExtraArgs,
              grads_fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
  """``(params, state, batch) -> (params, state)`` with the given gradients."""

  def step(params: Any, state: Any, batch: Any) -> tuple[Any, Any]:
    grads = grads_fn(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def run_reference() -> Arrays:
  """The single-device run on the full global batches (the oracle run)."""
  batches = make_batches()
  tx = make_optimizer(batches[0])
  params = init_params()
  state = tx.init(params)
  step = jax.jit(sgd_step(tx, jax.grad(loss_fn)))
  for batch in batches:
    params, state = step(params, state, batch)
  return snapshot(params, state)


def replicate(tree: Any) -> Any:
  """Stacks ``NUM_DEVICES`` copies of every leaf, placed one per device.

  jax 0.10.2's ``pmap`` returns arrays with this sharding; giving the first
  call the same one keeps the second call from compiling again.
  """
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.tree.map(
      lambda a: jax.device_put(np.broadcast_to(np.asarray(a), (NUM_DEVICES, *np.shape(a))),
                               NamedSharding(mesh, P(AXIS))), tree)


def split_batch(batch: Batch) -> Batch:
  return jax.tree.map(lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:]), batch)


VOCAB, TOKENS, EMBED = 5, 2, 4


MAX_FACTOR_DIM = TOKENS * EMBED  # The dense layer's A (with its bias row) is larger.


def token_loss_fn(params: Any, batch: Any) -> jax.Array:
  """Embedding -> RMS norm with a scale -> tanh, flattened -> dense.

  Its blocks have a diagonal input factor (the embedding's ``A``) and a
  diagonal Fisher (``"F"``, the norm's scale), which stay whole when the
  inverses are sharded, beside Kronecker matrices, which are sharded: the
  embedding's ``G`` and, with ``max_factor_dim=MAX_FACTOR_DIM``, the dense
  layer's doubly-factored ``K``, ``Psi``, ``G`` and its bias block ``B``.
  """
  h = params["table"][batch["ids"]]
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * params["gamma"]
  logits = jnp.tanh(h).reshape(h.shape[0], -1) @ params["w"] + params["b"]
  return kfl.losses.softmax_cross_entropy(logits, batch["y"])


def _short_traceback(exc: BaseException) -> str:
  """The traceback frames in kfac_jax_lite / the workers, plus the error."""
  frames = [f for f in traceback.extract_tb(exc.__traceback__)
            if "kfac_jax_lite" in f.filename or f.filename.endswith(("_worker.py", "_setup.py"))]
  return "".join(traceback.format_list(frames)) + f"{type(exc).__name__}: {exc}"


def run_modes(runners: dict[str, Callable[[], tuple[Arrays, dict[str, Any]]]],
              modes: list[str]) -> tuple[Arrays, dict[str, Any]]:
  """Runs each mode, catching its error, with wall and CPU seconds.

  Args:
    runners: mode -> runner returning ``(arrays, info)``.
    modes: the modes to run, in order.

  Returns:
    ``"{mode}|{key}"`` arrays, and per mode ``{"ok", "error", "traceback",
    "seconds", "cpu_seconds", **info}``.
  """
  arrays: Arrays = {}
  meta: dict[str, Any] = {}
  for mode in modes:
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
      result, info = runners[mode]()
      arrays.update({f"{mode}|{k}": v for k, v in result.items()})
      meta[mode] = {"ok": True, "error": None, "traceback": None, **info}
    except Exception as exc:  # pylint: disable=broad-except
      meta[mode] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": _short_traceback(exc)}
    meta[mode]["seconds"] = round(time.perf_counter() - start, 2)
    meta[mode]["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
  return arrays, meta
