"""The phases of one K-FAC update, as module-level pure functions.

``scale_by_kfac``'s ``update`` is these calls in order:

1. :mod:`~kfac_jax_lite.step.estimate`: a Fisher estimate of every layer's
   factors from the batch, folded into their moving averages;
2. :mod:`~kfac_jax_lite.step.refresh`: the damped inverses that are due,
   with staggering and device placement behind one call
   (:mod:`~kfac_jax_lite.step.scales`: with EK-FAC, its layers' eigenbases
   and scales instead, refreshed and re-estimated within phase 1);
3. :mod:`~kfac_jax_lite.step.precondition`: every parameter's update from
   its block (Kronecker, diagonal Fisher, full, or the fallback);
4. :mod:`~kfac_jax_lite.step.step_size`: the KL-clipped step-size scale.

:mod:`~kfac_jax_lite.step.layers` traces the loss once per signature and
hands every phase the same static layer records; :mod:`~kfac_jax_lite.step.checks`
validates the arguments.
"""
