"""Stage 2 of TTM: motion-to-video (first frame + trajectory + caption + local prompts -> video).

Variants: `configs/stage2.py` (tiny), `configs/stage2.py:mid`, `configs/stage2.py:wan1.3b`.
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-2 config of the variant in `arg` (`config_lib.build`)."""
    return config_lib.build(stage=2, arg=arg)
