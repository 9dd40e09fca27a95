"""Stage 1 of TTM: image-to-motion (first frame + motion prompt -> mask trajectory).

Variants: `configs/stage1.py` (tiny), `configs/stage1.py:mid`, `configs/stage1.py:wan1.3b`.
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-1 config of the variant in `arg` (`config_lib.build`)."""
    return config_lib.build(stage=1, arg=arg)
