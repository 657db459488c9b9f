"""One thread for the BLAS library behind jax's CPU LAPACK kernels.

On CPU, ``jnp.linalg.eigh`` and Cholesky are LAPACK calls that jaxlib takes
from ``scipy.linalg.cython_lapack``, i.e. from the BLAS library scipy links
(in scipy's wheels its own bundled OpenBLAS, a different copy from numpy's).
That library starts one worker thread per core; called from inside XLA's own
thread pool (several factors inverted concurrently), its threads and XLA's
fight for the cores, and on few cores K-FAC's inverse steps became 10-60x
slower (BUILD.md, "CPU inverses and BLAS threads"). The damped inverses are
small and many, so XLA's concurrency is the parallelism worth keeping.

:func:`limit_lapack_threads` sets that one library, found by the address of
the LAPACK routine scipy's wrappers call, to one thread, once per process,
when the default backend is CPU. numpy's BLAS, GPU/TPU backends and any
library set explicitly through its environment variable are left alone. The
limit is global: scipy's own ``scipy.linalg`` calls in the same process also
run on one thread afterwards.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import jax
import threadpoolctl

# Internal switch: benchmarks/blas_threads.py sets it to False to measure the
# behaviour without the limit.
ENABLED = True

# A user's explicit choice of thread count wins over the limit.
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
# The symbol scipy's ``ssyevd`` wrapper resolves, per build: scipy's bundled
# OpenBLAS prefixes its symbols with ``scipy_``; a system LAPACK does not.
_LAPACK_SYMBOLS = ("scipy_ssyevd_", "ssyevd_", "ssyevd")


class _DlInfo(ctypes.Structure):
  """``Dl_info`` of ``dladdr(3)``."""
  _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
              ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def lapack_library_path() -> str | None:
  """The file of the shared library that provides jax's CPU LAPACK routines.

  ``scipy.linalg.cython_lapack`` (where jaxlib gets its LAPACK function
  pointers) calls ``ssyevd`` from a library it links; ``dlsym`` on its handle
  finds that routine in its dependencies and ``dladdr`` names the file.

  Returns:
    The real path of the library, or ``None`` where it cannot be found (no
    ``dladdr``, as on Windows, or a symbol naming not in ``_LAPACK_SYMBOLS``).
  """
  from scipy.linalg import cython_lapack  # pylint: disable=import-outside-toplevel
  try:
    wrappers = ctypes.CDLL(cython_lapack.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    dladdr = ctypes.CDLL(None).dladdr
  except (OSError, AttributeError):
    return None
  dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
  for name in _LAPACK_SYMBOLS:
    routine = getattr(wrappers, name, None)
    info = _DlInfo()
    if routine is not None and dladdr(ctypes.cast(routine, ctypes.c_void_p),
                                      ctypes.byref(info)) and info.dli_fname:
      return os.path.realpath(info.dli_fname.decode())
  return None


def limit_lapack_threads() -> None:
  """Limits the BLAS library of jax's CPU LAPACK kernels to one thread.

  Called when a damped inverse is traced; does nothing after the first call,
  when ``ENABLED`` is false, when the default backend is not CPU, or when one of
  ``_THREAD_VARIABLES`` is set (the user chose the thread count).
  """
  if ENABLED:
    _limit_once()


@functools.cache
def _limit_once() -> None:
  """The body of :func:`limit_lapack_threads`, run once per process."""
  if jax.default_backend() != "cpu" or any(v in os.environ for v in _THREAD_VARIABLES):
    return
  path = lapack_library_path()
  if path is None:
    return
  with warnings.catch_warnings():  # e.g. two OpenMP runtimes loaded: not ours to report
    warnings.simplefilter("ignore")
    controller = threadpoolctl.ThreadpoolController()
  controller.select(filepath=path).limit(limits=1)
