"""The single-stage TI2V baseline (the paper's Table 3): first frame + caption (+ the local prompts, through stage 2's
added layers left unmasked) -> video, with no trajectory and no stage 1.

Variants as the stage configs: `configs/ti2v.py` (tiny), `configs/ti2v.py:mid`, `configs/ti2v.py:wan1.3b`, `runlocal`.
Sampling: `configs/sample.py` with `sample.stage2_workdir` set to a TI2V workdir and no stage-1 workdir.
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_lib.build(stage=0, arg=arg)
