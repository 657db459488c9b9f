"""kfac_jax_lite: K-FAC as a pure optax transform, with automatic layer tagging.

References:
  Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature". Ba, Grosse & Martens (2017), "Distributed
  Second-Order Optimization using Kronecker-Factored Approximations".
"""

from kfac_jax_lite import losses
from kfac_jax_lite import tagging
from kfac_jax_lite.accumulate import AccumulateState, accumulate
from kfac_jax_lite.alias import kfac
from kfac_jax_lite.curvature_api import estimate_curvature
from kfac_jax_lite.curvature.diagnostics import Diagnostics, diagnostics
from kfac_jax_lite.registration import register_dense
from kfac_jax_lite.tagging.layers import find_layers
from kfac_jax_lite.curvature.kl_clip import kl_scale
from kfac_jax_lite.placement import sharded_state_specs
from kfac_jax_lite.transform import KfacState, scale_by_kfac

__version__ = "0.1.0"

__all__ = [
    "AccumulateState", "Diagnostics", "KfacState", "accumulate", "diagnostics",
    "estimate_curvature",
    "find_layers", "kfac", "kl_scale", "losses", "register_dense", "scale_by_kfac",
    "sharded_state_specs", "tagging",
]
