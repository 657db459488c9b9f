"""kfac_jax_lite: K-FAC as a pure optax transform, with automatic layer tagging.

References:
  Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature". Ba, Grosse & Martens (2017), "Distributed
  Second-Order Optimization using Kronecker-Factored Approximations".
"""

from kfac_jax_lite import losses
from kfac_jax_lite.accumulate import AccumulateState, accumulate
from kfac_jax_lite.alias import kfac
from kfac_jax_lite.diagnostics import Diagnostics, diagnostics
from kfac_jax_lite.graft import GraftState, graft
from kfac_jax_lite.inspection import LayerList, estimate_curvature, find_layers
from kfac_jax_lite.noise_scaling import NoiseScaledState, noise_scaled
from kfac_jax_lite.options import (AdaptiveOptions, EstimatorOptions, InverseOptions,
                                   LayerOptions, ParallelOptions)
from kfac_jax_lite.placement import sharded_state_specs
from kfac_jax_lite.registration import register_dense
from kfac_jax_lite.tagging.layers import Layer
from kfac_jax_lite.transform import KfacState, scale_by_kfac

__version__ = "0.1.0"

__all__ = [
    "AccumulateState", "AdaptiveOptions", "Diagnostics", "EstimatorOptions", "GraftState", "InverseOptions",
    "KfacState", "Layer", "LayerList", "LayerOptions", "NoiseScaledState", "ParallelOptions",
    "accumulate", "diagnostics", "estimate_curvature", "find_layers", "graft", "kfac", "losses",
    "noise_scaled",
    "register_dense", "scale_by_kfac", "sharded_state_specs",
]
