"""Test-session setup.

On CPU, jax's LAPACK kernels (eigh, Cholesky) run on scipy's OpenBLAS, whose
worker threads compete with XLA's thread pool; on 2 cores that made K-FAC's
inverse steps 10-60x slower. One OpenBLAS thread must be chosen before BLAS
loads, hence here, before any test module imports jax.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
