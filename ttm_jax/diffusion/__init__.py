"""ttm_jax.diffusion."""
