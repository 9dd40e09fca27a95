"""ttm-jax: Through-The-Mask (arXiv 2501.03059) image-to-video generation in JAX/Flax."""

__version__ = "0.1.0"
