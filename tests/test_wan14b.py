"""The `wan14b` variant (Wan2.1-T2V-14B shapes): its abstract parameter count (`describe`, by `jax.eval_shape`) equals
diffusers' `WanTransformer3DModel` built on the meta device with the 14B config (no memory allocated), plus TTM's
added input channels and added layers counted by hand; conversion accepts the variant as it accepts wan1.3b."""

import inspect
import os

import pytest

from ttm_jax import config as config_lib
from ttm_jax import describe
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.convert import __main__ as convert_cli

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (diffusers' own defaults for the class are these numbers)
WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)


def _diffusers_count(**config) -> int:
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**config)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    return sum(p.numel() for p in model.parameters())


def test_wan14b_config_is_the_14b_shape():
    c = config_lib.validate(config_lib.build(2, "wan14b"))
    m = c.model
    assert (m.dim, m.num_layers, m.num_heads, m.ffn_dim, m.text_dim, m.freq_dim, tuple(m.patch_size)) == \
        (5120, 40, 40, 13824, 4096, 256, (1, 2, 2))
    assert m.dim == WAN14B["num_attention_heads"] * WAN14B["attention_head_dim"]
    assert c.autoencoder.name == "wan" and c.autoencoder.latent_channels == 16
    assert c.autoencoder.to_dict() == config_lib.build(2, "wan1.3b").autoencoder.to_dict()  # the same Wan VAE
    assert (c.data.num_frames, c.data.height, c.data.width) == (81, 720, 1280)
    assert config_lib.latent_shape(c)[:3] == (21, 90, 160)
    # diffusers' class defaults are the 14B config itself
    defaults = {k: v.default for k, v in inspect.signature(diffusers.WanTransformer3DModel.__init__).parameters.items()}
    assert all(tuple(defaults[k]) == v if isinstance(v, tuple) else defaults[k] == v for k, v in WAN14B.items())


def test_wan14b_count_equals_diffusers_on_the_meta_device():
    c = config_lib.build(2, "wan14b")
    out = describe.describe(c, flops=False, print_fn=lambda *_: None)
    want = _diffusers_count(**WAN14B)
    assert want > 14_000_000_000
    assert out["backbone"] == want
    d, (pt, ph, pw), k = 5120, tuple(c.model.patch_size), int(c.model.ttm_layers)
    # the stage-2 patch embedding reads 3 x 16 channels (noisy latent, first frame, trajectory): 32 more inputs
    assert out["added_inputs"] == 2 * 16 * pt * ph * pw * d
    # each of the K first blocks: masked self- and masked cross-attention, each an affine LayerNorm (2D) and an
    # attention (to_q/k/v/out kernels 4 D^2 and biases 4D, q/k RMS norms 2D)
    assert out["added_ttm"] == k * 2 * (2 * d + 4 * d * d + 4 * d + 2 * d)
    assert out["trainable"] == want + out["added_inputs"] + out["added_ttm"]


def test_convert_accepts_wan14b():
    """The conversion CLI's `--config configs/stage2.py:wan14b` loads and validates, and every field it compares with
    the checkpoint's config.json (`_dit`) equals what a Wan2.1-T2V-14B folder's config gives (the diffusers model's
    own config, built on the meta device)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.validate(convert_cli._load_config(os.path.join(root, "configs/stage2.py") + ":wan14b"))
    with torch.device("meta"):
        folder_config = dict(diffusers.WanTransformer3DModel(**WAN14B).config)
    backbone_cfg, cin, cout = dit_convert.config_from_diffusers(folder_config)
    stage_cfg = dit_lib.DiTConfig.from_config(config.model)
    for f in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim", "patch_size", "eps"):
        assert getattr(stage_cfg, f) == getattr(backbone_cfg, f), f
    assert (cin, cout) == (16, 16) and config_lib.in_channels(config) == 48
    # and back: the export's config.json of the backbone is the 14B one
    exported = dit_convert.diffusers_config(backbone_cfg, cin, cout)
    assert {k: exported[k] for k in WAN14B} == {**WAN14B, "patch_size": [1, 2, 2]}
