"""Trace a loss to a jaxpr and find the layers K-FAC preconditions."""

from kfac_jax_lite.tagging.layers import Layer, TaggedLoss, tag
from kfac_jax_lite.tagging.trace import TracedLoss, trace_loss

__all__ = ["Layer", "TaggedLoss", "TracedLoss", "tag", "trace_loss"]
