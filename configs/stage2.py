"""Stage 2 of TTM: motion-to-video (first frame + trajectory + caption + local prompts -> video).

Variants: `configs/stage2.py` (tiny), `configs/stage2.py:mid`, `configs/stage2.py:wan1.3b`.
"""

from ttm_jax import config as config_lib


def get_config(arg=None):
    return config_lib.build(stage=2, arg=arg)
