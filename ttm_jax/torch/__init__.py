"""PyTorch side of ttm-jax (an optional extra: needs torch and diffusers, imported only here).

`TTMWanTransformer3DModel`: diffusers' `WanTransformer3DModel` with TTM's masked layers, loading the folders that
`ttm_jax.convert.export` writes (`from_pretrained`) and writing them (`save_pretrained`).
"""

from ttm_jax.backbones.wan.torch_model import (
    TTM_CONFIG_FILE,
    TTM_WEIGHTS_FILE,
    MaskedAttentionLayer,
    TTMWanTransformer3DModel,
    is_ttm_key,
)

__all__ = ["TTM_CONFIG_FILE", "TTM_WEIGHTS_FILE", "MaskedAttentionLayer", "TTMWanTransformer3DModel", "is_ttm_key"]
