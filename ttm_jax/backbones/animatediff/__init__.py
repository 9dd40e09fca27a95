"""AnimateDiff / SD 1.5 (`config.model.backbone = "unet"`): `model` the U-Net with its motion modules, `vae` the SD
VAE, `weights` the `UNetMotionModel` / motion-adapter rules, `vae_weights` the SD VAE's, `text_weights` the CLIP text
tower's. Imports nothing (`ttm_jax/backbones/__init__.py`)."""
