"""Backbone families, one folder each, registered whole.

`wan/`: the Wan 2.1 DiT (`backbone="dit"`), its causal video VAE, their diffusers weight rules, the TTM export and the
PyTorch model. `animatediff/`: the AnimateDiff U-Net (`backbone="unet"`) with its motion adapter, the SD 1.5 VAE, the
CLIP text tower's weights, the export.

`FAMILIES` is the one list of them: `config.model.backbone` -> the family's folder. Everything outside a folder that
serves every family reads it through `role_modules(role)`: `ttm_jax/config/families.py` each family's `config.py`
(`check(config)`, its fields' checks; `grid_step(config)`, its latent grid's granularity), `assembly/registry.py` each
family's `entry.py` (`BACKBONE`, registered under its name in `BACKBONES`). A new family is its folder and one row
here.

A family's files are named by role, the same in every family, and each role sits at one layer
(`tests/test_import_layers.py`, `BACKBONE_ROLES`): `config.py` (the family's config section and its checks, the config
layer), `model.py`/`vae.py` (Flax modules, the models layer), `weights.py`/`vae_weights.py`/`text_weights.py`/
`export.py` (weight rules, the weights layer), `entry.py` (the registry entry, the assembly layer), `torch_model.py`
(PyTorch, on top). Nothing here imports a family's file at import time, and the families' `__init__`s import nothing:
a package's `__init__` runs whenever any of its files is imported, so an import there would make importing the model
run the assembly layer. `role_modules` imports the files of one role when a module calls it, which it does at its top
(the import test reads each call as imports of those files, at their layer).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# `config.model.backbone` -> the family's folder under ttm_jax/backbones/
FAMILIES: dict[str, str] = {
    "dit": "wan",
    "unet": "animatediff",
}


def role_modules(role: str) -> dict[str, ModuleType]:
    """{backbone name: `ttm_jax.backbones.<family>.<role>`} for every family of `FAMILIES`, in its order, imported
    (`role`: a file role, e.g. "config" or "entry"). Call it at a module's top only."""
    return {name: importlib.import_module(f"{__name__}.{folder}.{role}") for name, folder in FAMILIES.items()}
