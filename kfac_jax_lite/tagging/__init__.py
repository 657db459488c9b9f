"""Trace a loss to a jaxpr and find the layers K-FAC preconditions."""

from kfac_jax_lite.tagging.layers import Layer, LayerList, TaggedLoss, find_layers, tag
from kfac_jax_lite.tagging.trace import TracedLoss, trace_loss

__all__ = ["Layer", "LayerList", "TaggedLoss", "TracedLoss", "find_layers", "tag", "trace_loss"]
