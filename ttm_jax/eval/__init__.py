"""ttm_jax.eval."""
