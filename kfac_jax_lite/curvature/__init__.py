"""Curvature blocks, estimators and damping: arrays in, arrays out."""
