"""Forward parity of `ttm_jax.models.dit.DiT` (TTM layers off) with diffusers' `WanTransformer3DModel` (torch, fp32).

The torch model is built from one tiny config with deliberately awkward sizes (3 heads of head_dim 18, so the RoPE
split is 6/6/6 and heads are not a power of two; a non-square 3 x 6 x 10 latent; text_dim != dim; in != out
channels), every parameter randomised (norm scales and biases too), and its state_dict mapped to our tree by the
small rulebook below, which must use every torch key and fill every JAX leaf.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from flax import traverse_util

from ttm_jax.models import dit

HEADS, HEAD_DIM, LAYERS, FFN, TEXT_DIM, FREQ_DIM = 3, 18, 3, 40, 20, 16
DIM = HEADS * HEAD_DIM
IN_CH, OUT_CH = 5, 7
B, T, H, W, LC = 2, 3, 6, 10, 7


def _torch_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=IN_CH, out_channels=OUT_CH, text_dim=TEXT_DIM, freq_dim=FREQ_DIM,
                                  ffn_dim=FFN, num_layers=LAYERS, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1 / 0; move everything off its init
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# (torch name regex, JAX path template, transform). Groups in the regex fill the template.
_RULES = [
    (r"patch_embedding\.weight", "patch_embedding/kernel", lambda w: w.transpose(2, 3, 4, 1, 0)),
    (r"patch_embedding\.bias", "patch_embedding/bias", None),
    (r"condition_embedder\.(time_embedder|text_embedder)\.linear_([12])\.weight",
     "condition_embedder/{0}/linear_{1}/kernel", np.transpose),
    (r"condition_embedder\.(time_embedder|text_embedder)\.linear_([12])\.bias",
     "condition_embedder/{0}/linear_{1}/bias", None),
    (r"condition_embedder\.time_proj\.weight", "condition_embedder/time_proj/kernel", np.transpose),
    (r"condition_embedder\.time_proj\.bias", "condition_embedder/time_proj/bias", None),
    (r"blocks\.(\d+)\.scale_shift_table", "blocks_{0}/scale_shift_table", None),
    (r"blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v)\.weight", "blocks_{0}/{1}/{2}/kernel", np.transpose),
    (r"blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v)\.bias", "blocks_{0}/{1}/{2}/bias", None),
    (r"blocks\.(\d+)\.(attn[12])\.to_out\.0\.weight", "blocks_{0}/{1}/to_out/kernel", np.transpose),
    (r"blocks\.(\d+)\.(attn[12])\.to_out\.0\.bias", "blocks_{0}/{1}/to_out/bias", None),
    (r"blocks\.(\d+)\.(attn[12])\.(norm_q|norm_k)\.weight", "blocks_{0}/{1}/{2}/scale", None),
    (r"blocks\.(\d+)\.norm2\.weight", "blocks_{0}/norm2/scale", None),
    (r"blocks\.(\d+)\.norm2\.bias", "blocks_{0}/norm2/bias", None),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.weight", "blocks_{0}/ffn/proj_in/kernel", np.transpose),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.bias", "blocks_{0}/ffn/proj_in/bias", None),
    (r"blocks\.(\d+)\.ffn\.net\.2\.weight", "blocks_{0}/ffn/proj_out/kernel", np.transpose),
    (r"blocks\.(\d+)\.ffn\.net\.2\.bias", "blocks_{0}/ffn/proj_out/bias", None),
    (r"scale_shift_table", "scale_shift_table", None),
    (r"proj_out\.weight", "proj_out/kernel", np.transpose),
    (r"proj_out\.bias", "proj_out/bias", None),
]


def _convert(state_dict: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().numpy()
        for pattern, template, fn in _RULES:
            m = re.fullmatch(pattern, name)
            if m:
                out[tuple(template.format(*m.groups()).split("/"))] = fn(value) if fn else value
                break
        else:
            raise AssertionError(f"torch key {name} matched no rule")
    return traverse_util.unflatten_dict(out)


def _model_config(scan_layers: bool) -> dit.DiTConfig:
    return dit.DiTConfig(dim=DIM, num_layers=LAYERS, num_heads=HEADS, ffn_dim=FFN, text_dim=TEXT_DIM,
                         freq_dim=FREQ_DIM, ttm_layers=0, patch_size=(1, 2, 2), scan_layers=scan_layers)


@pytest.fixture(scope="module")
def reference():
    model = _torch_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, H, W, IN_CH)).astype(np.float32)
    timestep = np.array([17.0, 803.5], np.float32)
    context = rng.standard_normal((B, LC, TEXT_DIM)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep),
                    torch.from_numpy(context), return_dict=False)[0]
    expected = out.permute(0, 2, 3, 4, 1).numpy()
    params = _convert(model.state_dict())
    return params, (x, timestep, context), expected


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_matches_diffusers(reference, scan_layers):
    params, (x, timestep, context), expected = reference
    cfg = _model_config(scan_layers)
    model = dit.DiT(cfg, IN_CH, OUT_CH)
    if scan_layers:
        params = dit.scan_layout(params, ttm_layers=0)
    # The mapped tree must be exactly the model's tree: no leaf left unfilled, none extra, same shapes.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, timestep, context))["params"]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
    assert got == want
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(context))
    assert out.shape == expected.shape == (B, T, H, W, OUT_CH)
    assert np.abs(expected).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
