"""Backbone families, one folder each, registered whole (`assembly/registry.py`'s `BACKBONES`).

`wan/`: the Wan 2.1 DiT (`backbone="dit"`), its causal video VAE, their diffusers weight rules, the TTM export and the
PyTorch model. `animatediff/`: the AnimateDiff U-Net (`backbone="unet"`) with its motion adapter, the SD 1.5 VAE, the
CLIP text tower's weights, the export.

A family's files are named by role, the same in every family, and each role sits at one layer
(`tests/test_import_layers.py`, `BACKBONE_ROLES`): `config.py` (the family's config section and its checks, the config
layer: `ttm_jax/config/checks.py` calls its `check` by `model.backbone`), `model.py`/`vae.py` (Flax modules, the models
layer), `weights.py`/`vae_weights.py`/`text_weights.py`/`export.py` (weight rules, the weights layer), `entry.py` (the
registry entry, the assembly layer), `torch_model.py` (PyTorch, on top). The package `__init__`s import nothing: a
package's `__init__` runs whenever any of its files is imported, so an entry there would make importing the model run
the assembly layer.
"""
