"""Stage 1 of TTM: image-to-motion (first frame + motion prompt -> mask trajectory).

Variants: `configs/stage1.py` (tiny), `configs/stage1.py:mid`, `configs/stage1.py:wan1.3b` (the DiT); U-Net
(`config.model.backbone="unet"`): `configs/stage1.py:tiny_unet`, `configs/stage1.py:animatediff` (SD 1.5 +
AnimateDiff V3, 512x512, 16 frames; set `autoencoder.path`, `text_encoder.path` and `train.init_from` from
`python -m ttm_jax.convert --from=diffusers-unet:UNET,motion_adapter:ADAPTER --to=orbax:DIR --stage=1`).
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-1 config of the variant in `arg` (`config_lib.build`)."""
    return config_lib.build(stage=1, arg=arg)
