"""Wan 2.1 (`config.model.backbone = "dit"`): `model` the DiT, `vae` the causal video VAE, `weights` / `vae_weights`
their diffusers rules (and the converted Orbax checkpoint), `torch_model` the PyTorch stage model
(`ttm_jax.torch`). Imports nothing (`ttm_jax/backbones/__init__.py`)."""
