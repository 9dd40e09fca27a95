"""Stage 2 of TTM: motion-to-video (first frame + trajectory + caption + local prompts -> video).

Variants: `configs/stage2.py` (tiny), `configs/stage2.py:mid`, `configs/stage2.py:wan1.3b` (the DiT); U-Net
(`config.model.backbone="unet"`): `configs/stage2.py:tiny_unet`, `configs/stage2.py:animatediff` (SD 1.5 +
AnimateDiff V3, 512x512, 16 frames; set `autoencoder.path`, `text_encoder.path` and `train.init_from` from
`python -m ttm_jax.convert --from=diffusers-unet:UNET,motion_adapter:ADAPTER --to=orbax:DIR --stage=2`).
"""

import ml_collections

from ttm_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The stage-2 config of the variant in `arg` (`config_lib.build`)."""
    return config_lib.build(stage=2, arg=arg)
