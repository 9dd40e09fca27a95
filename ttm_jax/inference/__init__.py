"""ttm_jax.inference."""
