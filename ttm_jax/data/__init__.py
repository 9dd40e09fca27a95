"""ttm_jax.data."""
