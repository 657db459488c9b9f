"""Data-parallel K-FAC on 8 fake CPU devices equals the 1-device run.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax
is imported, so the multi-device runs happen in one subprocess
(``distributed_worker.py``) that writes its results to a temporary folder;
this process needs a single device. It computes the single-device reference
(same initialization, same global batches, ``estimator="exact"`` so no
sampling differs) while the worker runs.

Modes (see ``distributed_worker.py`` for each one's code):

* ``pmap``: per-device batch 2, gradients ``pmean``-ed by the user, factor
  statistics averaged by K-FAC through ``axis_name``.
* ``shard_map``: top-level ``jax.shard_map`` with ``check_vma=False`` (the
  ``pmap`` pattern) and with ``check_vma=True`` (the default; gradient of the
  ``pmean``-ed loss).
* ``gspmd``: ``jax.jit`` on a batch sharded with ``NamedSharding``, no
  ``axis_name``, on an Auto mesh and on the default (Explicit) mesh (used
  under ``jax.set_mesh``).
* ``pmap_mc``: the Monte-Carlo estimator draws different targets per device.
* ``*_spread``: ``distribute_inverses=True``; ``*_sharded``:
  ``inverse_placement="sharded"`` (each device keeps row slices of the
  inverses; ``pmap_tokens`` adds diagonal blocks, which stay whole).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _distributed_setup as setup
import kfac_jax_lite as kfl

WORKER_PATH = pathlib.Path(__file__).with_name("distributed_worker.py")
WORKER_TIMEOUT_S = 600
RTOL = 1e-4
ATOL = 1e-5  # times the largest entry of the array

# One xdist worker runs the whole module: the 8-device worker process starts once.
pytestmark = pytest.mark.xdist_group("distributed")


CPU = jax.devices("cpu")[0]
L0, L1 = "['l0']['kernel']", "['l1']['kernel']"


@dataclasses.dataclass
class Results:
  """The reference run (this process) and the worker's output."""
  reference: dict[str, np.ndarray]
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]

  def mode(self, mode: str) -> dict[str, np.ndarray]:
    """The arrays of ``mode`` (keys without the mode prefix); fails if it raised."""
    info = self.meta[mode]
    if not info["ok"]:
      pytest.fail(f"mode {mode!r} raised {info['error']}\n{info['traceback']}",
                  pytrace=False)
    prefix = mode + "|"
    return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
  """Starts the 8-device worker, runs the reference meanwhile, loads both."""
  out = tmp_path_factory.mktemp("distributed")
  flags = os.environ.get("XLA_FLAGS", "")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count="
                      f"{setup.NUM_DEVICES}".strip()}
  proc = subprocess.Popen([sys.executable, str(WORKER_PATH), str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    with jax.default_device(CPU):  # same backend as the worker's fake devices
      reference = setup.run_reference()
    _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
  except BaseException:
    proc.kill()
    proc.communicate()
    raise
  if proc.returncode != 0:
    pytest.fail(f"distributed_worker.py exited with {proc.returncode}:\n{stderr[-5000:]}")
  with np.load(out / "results.npz") as data:
    arrays = dict(data)
  meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
  return Results(reference, arrays, meta)


def _assert_matches_reference(got: dict[str, np.ndarray],
                              reference: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(reference)
  for key in sorted(reference):
    # Absolute tolerance relative to the array's scale: small entries of an
    # inverse carry the rounding of its large ones.
    np.testing.assert_allclose(got[key], reference[key], rtol=RTOL,
                               atol=ATOL * np.max(np.abs(reference[key])), err_msg=key)


def test_reference_first_layer_input_factor_is_brute_force_ema(results: Results):
  # A of the first layer depends on the data only: an EMA of [x, 1]^T [x, 1] / N.
  expected = None
  for batch in setup.make_batches():
    a = np.concatenate([batch["x"], np.ones((len(batch["x"]), 1), np.float32)], 1)
    est = a.astype(np.float64).T @ a / len(a)
    expected = est if expected is None else (
        setup.EMA_DECAY * expected + (1 - setup.EMA_DECAY) * est)
  np.testing.assert_allclose(results.reference[f"factors|{L0}|A"], expected,
                             rtol=1e-5, atol=1e-6)
  # Training moved the parameters (so equal parameters below mean something).
  init = setup.init_params()
  assert np.max(np.abs(results.reference[f"params|{L1}"]
                       - np.asarray(init["l1"]["kernel"]))) > 1e-3


@pytest.mark.parametrize("mode", ["pmap", "pmap_spread", "pmap_symmetric"])
def test_pmap_matches_single_device(results: Results, mode: str):
  # pmap_spread: distribute_inverses=True, each device inverts a share.
  # pmap_symmetric: symmetry_aware=True, factors all-reduced as upper triangles.
  got = results.mode(mode)
  for key, stacked in got.items():
    assert stacked.shape[0] == setup.NUM_DEVICES, key
    for d in range(1, setup.NUM_DEVICES):  # every replica holds the same state
      np.testing.assert_array_equal(stacked[d], stacked[0], err_msg=f"{key} device {d}")
  _assert_matches_reference({k: v[0] for k, v in got.items()}, results.reference)


@pytest.mark.parametrize("mode", [
    "shard_map_novma",
    "shard_map_vma",
    "shard_map_spread",
    "shard_map_symmetric",
])
def test_shard_map_matches_single_device(results: Results, mode: str):
  # shard_map_novma: check_vma=False, grads = pmean(grad(local mean loss)).
  # shard_map_vma: check_vma=True, grads = grad(pmean(local mean loss)).
  _assert_matches_reference(results.mode(mode), results.reference)


def _rows(d: int) -> int:
  """Rows of a ``d``-row inverse each device keeps when sharded."""
  return math.ceil(d / setup.NUM_DEVICES)


def _assert_sharded_inverses(got: dict[str, np.ndarray], whole: dict[str, np.ndarray],
                             stacked: bool) -> None:
  """Sharded inverses are row slices of ``whole``'s, the rest equals ``whole``.

  Args:
    got: a sharded-placement run's arrays.
    whole: the reference arrays (full inverses).
    stacked: ``got`` has a leading device axis (``pmap``; the replicas of
      everything but the inverse slices must be equal).
  """
  n = setup.NUM_DEVICES
  assert sorted(got) == sorted(whole)
  for key, ref in whole.items():
    value = got[key]
    if key.startswith("inverses|") and ref.ndim == 2 and not key.endswith("|F"):
      d = ref.shape[0]
      assert value.shape == ((n, _rows(d), d) if stacked else (n * _rows(d), d)), key
      value = value.reshape(n * _rows(d), d)
      np.testing.assert_array_equal(value[d:], 0.0, err_msg=f"{key} padding rows")
      value = value[:d]
    elif stacked:
      assert value.shape == (n, *ref.shape), key
      for dev in range(1, n):
        np.testing.assert_array_equal(value[dev], value[0], err_msg=f"{key} device {dev}")
      value = value[0]
    np.testing.assert_allclose(value, ref, rtol=RTOL, atol=ATOL * np.max(np.abs(ref)),
                               err_msg=key)


def test_sharded_full_block_matches_replicated(results: Results):
  """A ``"full"`` block's inverse (here the norm scale's) is row-sliced like a
  Kronecker matrix and preconditions through the distributed products."""
  got = results.mode("pmap_tokens_full")
  whole = {k[len("replicated|"):]: v[0] for k, v in got.items()
           if k.startswith("replicated|")}
  sharded = {k[len("sharded|"):]: v for k, v in got.items() if k.startswith("sharded|")}
  assert "inverses|['gamma']|full" in whole
  _assert_sharded_inverses(sharded, whole, stacked=True)


@pytest.mark.parametrize("mode", ["pmap_sharded", "shard_map_sharded_vma",
                                  "shard_map_sharded_novma"])
def test_sharded_inverses_match_single_device(results: Results, mode: str):
  # Parameters and factors equal the 1-device run's; each device's inverse
  # state is its ceil(d/8) rows of the 1-device inverses (zero-padded rows).
  _assert_sharded_inverses(results.mode(mode), results.reference,
                           stacked=mode.startswith("pmap"))


@pytest.mark.parametrize("mode", ["shard_map_sharded_vma", "shard_map_sharded_novma"])
def test_sharded_inverse_state_per_device(results: Results, mode: str):
  results.mode(mode)  # fails if the mode raised
  shapes = results.meta[mode]["inverse_shard_shapes"]
  reference = {k[len("inverses|"):]: v.shape for k, v in results.reference.items()
               if k.startswith("inverses|")}
  assert sorted(shapes) == sorted(reference)
  for key, (d, d2) in reference.items():
    assert shapes[key] == [_rows(d), d2], key
  sharded = sum(_rows(d) * d2 for d, d2 in reference.values())
  whole = sum(d * d2 for d, d2 in reference.values())
  # 36 of 203 floats here (ceil(d/8) rows of tiny factors); 1/8 as d grows.
  assert sharded / whole < 0.18


def test_sharded_keeps_diagonal_inverses_whole(results: Results):
  """Embedding (diagonal ``A``) and norm scale (``"F"``): whole on every device.

  The doubly-factored dense layer's ``K``, ``Psi``, ``G`` and bias block ``B``
  are sharded like any Kronecker matrix.
  """
  got = results.mode("pmap_tokens")
  whole = {k[len("replicated|"):]: v[0] for k, v in got.items()
           if k.startswith("replicated|")}
  sharded = {k[len("sharded|"):]: v for k, v in got.items() if k.startswith("sharded|")}
  assert sharded["inverses|['table']|A"].shape == (setup.NUM_DEVICES, setup.VOCAB)
  assert sharded["inverses|['gamma']|F"].shape[1:] == whole["inverses|['gamma']|F"].shape
  assert sharded["inverses|['table']|G"].shape == (
      setup.NUM_DEVICES, _rows(setup.EMBED), setup.EMBED)
  assert {k.split("|")[-1] for k in sharded if k.startswith("inverses|['w']")} == {
      "K", "Psi", "G", "B"}
  _assert_sharded_inverses(sharded, whole, stacked=True)


def test_shard_map_gradient_patterns(results: Results):
  """What jax 0.10.2 returns for the gradient of a replicated parameter."""
  got = results.mode("shard_map_grads")
  params = setup.init_params()
  batch = setup.make_batches()[0]
  with jax.default_device(CPU):
    full = jax.grad(setup.loss_fn)(params, batch)  # the global-mean gradient
    shard0 = jax.grad(setup.loss_fn)(params, setup.local_batch(batch))
  n = setup.NUM_DEVICES
  expected = {
      # check_vma=True: the local gradient is already psum-ed over the axis
      # (n times the global-mean gradient), and pmean of it changes nothing.
      "vma=True|grad_local": (full, n),
      "vma=True|pmean_grad_local": (full, n),
      "vma=True|grad_pmean_loss": (full, 1),  # the right pattern
      # check_vma=False: local gradients, as under pmap.
      "vma=False|grad_local": (shard0, 1),  # out_specs=P() returns device 0's
      "vma=False|pmean_grad_local": (full, 1),  # the right pattern
      "vma=False|grad_pmean_loss": (shard0, 1),  # NOT the global mean
  }
  for pattern, (tree, factor) in expected.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      key = f"{pattern}|{jax.tree_util.keystr(path)}"
      np.testing.assert_allclose(got[key], factor * np.asarray(leaf), rtol=1e-5,
                                 atol=1e-6, err_msg=key)


_GSPMD = [
    "gspmd_auto",
    "gspmd_explicit",
    "gspmd_spread",  # distribute_inverses over the mesh set with jax.set_mesh
]


@pytest.mark.parametrize("mode", _GSPMD)
def test_gspmd_matches_single_device(results: Results, mode: str):
  _assert_matches_reference(results.mode(mode), results.reference)


@pytest.mark.parametrize("mode", _GSPMD)
def test_gspmd_step_compiles_once_and_keeps_shardings(results: Results, mode: str):
  results.mode(mode)  # fails if the mode raised
  meta = results.meta[mode]
  assert meta["traces"] == [1, 0, 0]
  assert meta["compiles"][0] >= 1  # the compile listener does observe compiles
  assert meta["compiles"][1:] == [0, 0]
  first = meta["state_shardings"][0]
  assert all(s == first for s in meta["state_shardings"][1:])
  assert all(meta["factors_replicated"])
  # The inversions are spread over the devices only when asked for.
  assert ("all-to-all" in meta["collectives"]) == (mode == "gspmd_spread")


def test_pmap_mc_devices_draw_different_samples(results: Results):
  """Each device samples with ``fold_in(fold_in(key, count), axis_index)``; the
  factors average them.

  The per-device estimates are averaged inside the step (not observable from
  outside), so every device is given the SAME batch: their estimates then
  differ only by their samples, and are recomputed here with
  ``estimate_curvature`` and the documented keys.
  """
  got = results.mode("pmap_mc")
  params = setup.init_params()
  batch = setup.local_batch(setup.make_batches()[0])
  # scale_by_kfac's state key is key(seed); a statistics step samples with it
  # folded with the step count (0 here: the first update), then with the axis index.
  subkey = jax.random.fold_in(jax.random.key(setup.MC_SEED), 0)

  def estimate(key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    return kfl.estimate_curvature(setup.regression_loss_fn, params, batch,
                                  key=key, estimator="mc")

  with jax.default_device(CPU):
    keys = jax.vmap(lambda i: jax.random.fold_in(subkey, i))(
        jnp.arange(setup.NUM_DEVICES))
    per_device = jax.jit(jax.vmap(estimate))(keys)
    unfolded = jax.jit(estimate)(subkey)  # what every device would draw without fold_in
  for name in (L0, L1):
    g_dev = np.asarray(per_device[name]["G"])
    # The oracle itself: every device's samples differ from every other's.
    for d in range(setup.NUM_DEVICES):
      for e in range(d):
        assert np.max(np.abs(g_dev[d] - g_dev[e])) > 1e-3, (name, d, e)
    g = got[f"factors|{name}|G"]
    for d in range(setup.NUM_DEVICES):
      np.testing.assert_allclose(g[d], g_dev.mean(0), rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} device {d}")
    assert np.max(np.abs(g[0] - np.asarray(unfolded[name]["G"]))) > 1e-4
    np.testing.assert_allclose(got[f"factors|{name}|A"][0],
                               np.asarray(unfolded[name]["A"]), rtol=1e-5, atol=1e-6)


def test_shard_map_without_axis_name_is_a_clear_error():
  """Under shard_map the batch varies over the mesh axis: K-FAC must be told."""
  mesh = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  params = {"w": jnp.ones((3, 2))}
  batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}

  def loss(p, b):
    return kfl.losses.squared_error(b["x"] @ p["w"], b["y"])

  tx = kfl.scale_by_kfac(loss, batch, damping=1e-2)

  def step(p, s, b):
    g = jax.grad(lambda q: jax.lax.pmean(loss(q, b), "batch"))(p)
    return tx.update(g, s, p, batch=b)

  spec = jax.sharding.PartitionSpec
  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec(), spec(), spec("batch")),
                                  out_specs=(spec(), spec())))
  with pytest.raises(ValueError, match="axis_name"):
    sharded(params, tx.init(params), batch)


def _tiny_loss(p: Any, b: Any) -> jax.Array:
  return kfl.losses.squared_error(b["x"] @ p["w"], b["y"])


_TINY_BATCH = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}


@pytest.mark.parametrize("kwargs,match", [
    (dict(inverse_placement="mem-opt", axis_name="batch"), "inverse_placement must be one of"),
    (dict(inverse_placement="sharded"), "needs axis_name.*shard_map"),
])
def test_inverse_placement_errors(kwargs: dict[str, Any], match: str):
  with pytest.raises(ValueError, match=match):
    kfl.ParallelOptions(**kwargs)


def test_sharded_init_outside_the_axis_is_a_clear_error():
  parallel = kfl.ParallelOptions(axis_name="batch", inverse_placement="sharded")
  tx = kfl.scale_by_kfac(_tiny_loss, _TINY_BATCH, damping=1e-2, parallel=parallel)
  with pytest.raises(ValueError, match="init inside the pmap"):
    tx.init({"w": jnp.ones((3, 2))})
