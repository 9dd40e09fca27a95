"""ttm_jax.models."""
