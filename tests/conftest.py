"""Session settings of the test suite: cheaper XLA compilation on CPU.

Most of the suite's time is XLA compiling small programs that then run a few
steps. Before any backend starts (XLA reads ``XLA_FLAGS`` once, when the
first backend is created), this adds to ``XLA_FLAGS``:

* ``--xla_cpu_use_fusion_emitters=false`` (jaxlib < 0.11, which knows it):
  fusions are emitted by XLA's elemental emitter instead of the MLIR fusion
  emitters, which halved the compile time of a transformer's K-FAC step
  (12 -> 6 CPU s);
* ``--xla_backend_optimization_level=0`` and
  ``--xla_llvm_disable_expensive_passes=true``: LLVM code generation without
  its optimization passes (the examples' ``--quick`` settings).

Both change how XLA generates machine code for the same HLO, not what is
computed: every oracle and tolerance of the tests stays as written. The
subprocesses the tests start inherit the variable. A flag already in
``XLA_FLAGS`` (set by the user) is left as it is.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest

_FAST_COMPILE_FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_llvm_disable_expensive_passes": "true",
}
# XLA aborts on a flag it does not know; jaxlib 0.11 removed this one (its
# MLIR fusion emitters are the only ones left there).
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
  _FAST_COMPILE_FLAGS["--xla_cpu_use_fusion_emitters"] = "false"


def _with_fast_compile(flags: str) -> str:
  """``flags`` with each of ``_FAST_COMPILE_FLAGS`` appended unless already set.

  Args:
    flags: the current ``XLA_FLAGS`` value (space-separated ``--name=value``).

  Returns:
    The new value.
  """
  present = {f.split("=", 1)[0] for f in flags.split()}
  extra = [f"{name}={value}" for name, value in _FAST_COMPILE_FLAGS.items()
           if name not in present]
  return " ".join([flags.strip(), *extra]).strip()


os.environ["XLA_FLAGS"] = _with_fast_compile(os.environ.get("XLA_FLAGS", ""))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Moves the tests marked ``slow`` to the front, keeping the order otherwise.

  Under ``--dist loadgroup`` (pyproject's addopts) the xdist groups start
  first, then the other tests in this order: a long end-to-end run started
  last would keep one worker busy after the other has finished.

  Args:
    items: the collected tests, reordered in place.
  """
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
