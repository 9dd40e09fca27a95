"""ttm_jax.convert."""
