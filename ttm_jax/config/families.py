"""The backbone families' config-level parts, by `config.model.backbone`: each family's `config.py`
(`ttm_jax/backbones/<family>/config.py`, listed by `ttm_jax.backbones.FAMILIES`) with, under fixed names,
`check(config)` (its own fields' checks, raising `ConfigError`) and `grid_step(config)` (the latent cells its grid
must be a multiple of). `checks.py` and `geometry.py` ask here, so adding a family changes nothing in this package.
"""

from __future__ import annotations

from types import ModuleType

import ml_collections

from ttm_jax import backbones

FAMILY_CONFIGS: dict[str, ModuleType] = backbones.role_modules("config")


def family_config(config: ml_collections.ConfigDict) -> ModuleType | None:
    """The `config.py` of the configured backbone's family; None for a backbone registered outside a family (e.g. a
    test's toy backbone), whose fields no family checks."""
    return FAMILY_CONFIGS.get(config.model.backbone)
