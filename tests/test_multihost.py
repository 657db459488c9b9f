"""K-FAC across 2 processes (2 CPU devices each) equals the 1-process run.

Two ``multihost_worker.py`` processes join one jax system of 4 CPU devices
with ``jax.distributed.initialize`` (coordinator on a free port of
127.0.0.1; cross-process collectives through gloo, jax's CPU default), the
same setup as one process per host on a cluster. Each builds only its half of
every global batch; parameters and K-FAC state are replicated. Meanwhile this
process trains the same model on the same global batches on one device (the
reference). Checks: the processes hold bitwise-identical parameters, factors
and inverses, and these equal the reference up to float tolerance.

If the distributed system itself cannot start here (every worker failed to
join it: see ``_could_not_connect``), the tests are skipped with the
workers' message; any other failure fails them (a worker that dies makes
its peer abort, which is a failure, not a skip).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest

import multihost_worker as mw

WORKER_PATH = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 120  # hang guard for both workers; they take ~20-35 s on 2 busy cores
RTOL = 1e-4
ATOL = 1e-5  # times the largest entry of the array

# One xdist worker runs the whole module: the two worker processes start once.
pytestmark = pytest.mark.xdist_group("multihost")


dw = mw.dw
MODES = list(mw.DEFAULT_MODES)
CPU = jax.devices("cpu")[0]
L0 = "['l0']['kernel']"


@dataclasses.dataclass
class Results:
  """The reference run (this process) and each worker's output."""
  reference: dict[str, np.ndarray]
  arrays: list[dict[str, np.ndarray]]  # one per process
  meta: list[dict[str, Any]]
  initial_l1_kernel: np.ndarray

  def mode(self, mode: str) -> list[dict[str, np.ndarray]]:
    """Each process's arrays of ``mode`` (keys without the mode prefix)."""
    for meta in self.meta:
      info = meta[mode]
      if not info["ok"]:
        pytest.fail(f"mode {mode!r} raised in process {meta['topology']['process_index']}: "
                    f"{info['error']}\n{info['traceback']}", pytrace=False)
    prefix = mode + "|"
    return [{k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            for arrays in self.arrays]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
  """Kills whichever process still runs, and reaps them all."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def _stderr(out: pathlib.Path) -> str:
  return "\n".join(f"--- process {i} ---\n"
                   + (out / f"stderr{i}.txt").read_text(encoding="utf-8")[-3000:]
                   for i in range(mw.NUM_PROCESSES))


def _could_not_connect(out: pathlib.Path, process: int, code: int) -> bool:
  """Whether a worker failed while joining the distributed system.

  The worker exits with ``ENV_ERROR_EXIT`` when ``initialize`` or the first
  collective raises; when the coordinator cannot be reached in
  ``INIT_TIMEOUT_S``, jax aborts the process (SIGABRT) instead.
  """
  if code == mw.ENV_ERROR_EXIT:
    return True
  err = (out / f"stderr{process}.txt").read_text(encoding="utf-8")
  return code < 0 and "CoordinationService/RegisterTask" in err


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
  """Starts both workers, runs the reference meanwhile, loads everything."""
  out = tmp_path_factory.mktemp("multihost")
  flags = os.environ.get("XLA_FLAGS", "")
  # Optimization level 0 takes a third off the workers' compile time (which
  # is most of their time); both processes compile alike, and the reference
  # comparison has a tolerance.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count="
                      f"{mw.LOCAL_DEVICES} --xla_backend_optimization_level=0".strip()}
  port = _free_port()
  start = time.perf_counter()
  procs = []
  for i in range(mw.NUM_PROCESSES):
    # stderr to a file, not a pipe: a full pipe would block one worker and
    # leave the other waiting in a collective.
    with open(out / f"stderr{i}.txt", "w", encoding="utf-8") as err:
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER_PATH), str(out), str(port), str(i)], env=env,
          stdout=subprocess.DEVNULL, stderr=err))
  timed_out = False
  try:
    with jax.default_device(CPU):  # same backend as the workers
      reference = dw.run_reference()
      initial_l1_kernel = np.asarray(dw.init_params()["l1"]["kernel"])
    for proc in procs:
      proc.wait(timeout=max(1., start + TIMEOUT_S - time.perf_counter()))
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    _stop(procs)
  if timed_out:
    pytest.fail(f"multihost workers still running after {TIMEOUT_S} s (killed):\n"
                f"{_stderr(out)}")
  codes = [p.returncode for p in procs]
  if all(_could_not_connect(out, i, code) for i, code in enumerate(codes)):
    lines = [line for line in _stderr(out).splitlines()
             if line.startswith("ENVIRONMENT:") or "RegisterTask" in line]
    pytest.skip(f"2-process CPU jax unavailable here: {lines}")
  if any(codes):
    pytest.fail(f"multihost workers exited with {codes}:\n{_stderr(out)}")
  arrays, meta = [], []
  for i in range(mw.NUM_PROCESSES):
    with np.load(out / f"process{i}.npz") as data:
      arrays.append(dict(data))
    meta.append(json.loads((out / f"process{i}.json").read_text(encoding="utf-8")))
  return Results(reference, arrays, meta, initial_l1_kernel)


def test_two_processes_form_one_four_device_system(results: Results):
  for i, meta in enumerate(results.meta):
    assert meta["topology"] == {
        "process_index": i, "process_count": mw.NUM_PROCESSES,
        "device_count": mw.NUM_DEVICES, "local_device_count": mw.LOCAL_DEVICES,
        "allgathered_process_ids": list(range(mw.NUM_PROCESSES)),
        # each process feeds one contiguous half of every global batch
        "local_rows": list(range(i * dw.GLOBAL_BATCH // mw.NUM_PROCESSES,
                                 (i + 1) * dw.GLOBAL_BATCH // mw.NUM_PROCESSES))}


@pytest.mark.parametrize("mode", MODES)
def test_global_batches_assembled_from_process_halves(results: Results, mode: str):
  # process_allgather of the global arrays gives back the full batches: each
  # process contributed its own rows, in place.
  for got in results.mode(mode):
    for i, batch in enumerate(dw.make_batches()):
      for k, v in batch.items():
        np.testing.assert_array_equal(got[f"batch{i}|{k}"], v, err_msg=f"batch{i}|{k}")


@pytest.mark.parametrize("mode", MODES)
def test_processes_hold_identical_state(results: Results, mode: str):
  first, *others = results.mode(mode)
  for other in others:
    assert sorted(other) == sorted(first)
    for key in sorted(first):
      np.testing.assert_array_equal(other[key], first[key], err_msg=key)
  for meta in results.meta:  # and within a process, both devices' replicas
    info = meta[mode]
    assert info["replicated"] and info["replicas_equal"]
    assert info["traces"] == [1, 0, 0]  # output shardings fed back as they came


@pytest.mark.parametrize("mode", MODES)
def test_matches_single_process(results: Results, mode: str):
  got = {k: v for k, v in results.mode(mode)[0].items() if not k.startswith("batch")}
  assert sorted(got) == sorted(results.reference)
  for key in sorted(results.reference):
    ref = results.reference[key]
    np.testing.assert_allclose(got[key], ref, rtol=RTOL, atol=ATOL * np.max(np.abs(ref)),
                               err_msg=key)


@pytest.mark.parametrize("mode", MODES)
def test_first_layer_input_factor_is_brute_force_ema(results: Results, mode: str):
  # Independent of the library: A of the first layer depends on the data only,
  # an EMA of [x, 1]^T [x, 1] / N over the global batches.
  expected = None
  for batch in dw.make_batches():
    a = np.concatenate([batch["x"], np.ones((len(batch["x"]), 1), np.float32)], 1)
    est = a.astype(np.float64).T @ a / len(a)
    expected = est if expected is None else (
        dw.EMA_DECAY * expected + (1 - dw.EMA_DECAY) * est)
  for got in results.mode(mode):
    np.testing.assert_allclose(got[f"factors|{L0}|A"], expected, rtol=1e-5, atol=1e-6)
  # Training moved the parameters (so equal parameters mean something).
  moved = results.mode(mode)[0]["params|['l1']['kernel']"] - results.initial_l1_kernel
  assert np.max(np.abs(moved)) > 1e-3
