"""ttm_jax.train."""
