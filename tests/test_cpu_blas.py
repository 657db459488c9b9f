"""The BLAS library behind jax's CPU LAPACK kernels runs on one thread.

Each check runs a fresh Python process (the test process has loaded BLAS
already, with whatever environment the session had). The libraries are told
apart without the library's own lookup: numpy's BLAS is what threadpoolctl
sees after importing numpy alone; scipy's (which jaxlib's LAPACK kernels call)
is what importing ``scipy.linalg.cython_lapack`` adds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One xdist worker runs the whole module: the child processes start once.
pytestmark = pytest.mark.xdist_group("cpu_blas")

_CHILD = r"""
import json, os, sys
import numpy as np
import threadpoolctl

def blas_threads():
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}

numpy_libs = set(blas_threads())
import scipy.linalg.cython_lapack  # what jaxlib's CPU LAPACK kernels call
scipy_libs = set(blas_threads()) - numpy_libs
if sys.argv[1] == "raise":  # every BLAS on 3 threads, whatever the core count
  threadpoolctl.threadpool_limits(3, user_api="blas")
before = blas_threads()

import jax
from kfac_jax_lite.curvature import kronecker

rng = np.random.default_rng(0)
x = rng.standard_normal((40, 24)).astype(np.float32)
m = x.T @ x / 40
inverse = jax.jit(kronecker.damped_inverse, static_argnums=2)(m, 0.1, "eigh")
error = float(np.abs(np.asarray(inverse) @ (m + 0.1 * np.eye(24)) - np.eye(24)).max())
print(json.dumps(dict(numpy_libs=sorted(numpy_libs), scipy_libs=sorted(scipy_libs),
                      before=before, after=blas_threads(), error=error)))
"""


def _start_child(mode: str, **env: str) -> subprocess.Popen:
  """Starts ``_CHILD`` with no BLAS thread variable set except ``env``."""
  child_env = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                            "BLIS_NUM_THREADS", "OMP_NUM_THREADS")}
  child_env.update(env, JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([_ROOT, child_env.get("PYTHONPATH", "")]))
  return subprocess.Popen([sys.executable, "-c", _CHILD, mode], env=child_env, cwd=_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def children() -> dict[str, dict]:
  """Both children's reports, run concurrently (each mostly imports jax)."""
  procs = {"default": _start_child("raise"),
           "explicit": _start_child("keep", OPENBLAS_NUM_THREADS="2")}
  results = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    results[name] = json.loads(out.strip().splitlines()[-1])
  if not results["default"]["scipy_libs"]:
    pytest.skip("scipy and numpy share one BLAS library here: no separate pool to check")
  return results


def test_first_cpu_inverse_limits_only_the_lapack_blas(children):
  result = children["default"]
  assert result["error"] < 1e-4
  for lib in result["scipy_libs"]:
    assert result["before"][lib] == 3
    assert result["after"][lib] == 1, lib
  for lib in result["numpy_libs"]:
    assert result["after"][lib] == 3, f"numpy's BLAS changed: {lib}"


def test_explicit_thread_variable_is_respected(children):
  result = children["explicit"]
  for lib in result["scipy_libs"]:
    assert result["after"][lib] == result["before"][lib], lib
