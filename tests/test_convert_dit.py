"""DiT conversion: diffusers `WanTransformer3DModel` (the oracle) <-> `ttm_jax.backbones.wan.model.DiT` through the
rulebook (`ttm_jax.backbones.wan.weights`), both layouts, forward parity at ordinary and at awkward sizes, and the
`python -m ttm_jax.convert` CLI into an Orbax params checkpoint for a stage-2 model."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import WanTransformer3DModel
from flax import traverse_util
from safetensors import safe_open
from safetensors.torch import load_file

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as convert
from ttm_jax.convert import __main__ as convert_cli
from ttm_jax.weights import rulebook as rb

TORCH_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=24, freq_dim=16, ffn_dim=48, num_layers=3, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
LATENT = (2, 3, 4, 6, 4)  # [B, T', H', W', C]: 3 * 2 * 3 = 18 tokens, non-square


@pytest.fixture(scope="module")
def torch_dit() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**TORCH_CONFIG).eval()
    with torch.no_grad():  # diffusers zero-/one-initialises some params; random values catch misplaced tensors
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "scale_shift_table" in name:
                p.copy_(p + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folder(torch_dit, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("wan_dit") / "transformer")
    torch_dit.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    x = rng.standard_normal(LATENT).astype(np.float32)
    t = np.array([10.0, 730.0], np.float32)
    ctx = rng.standard_normal((2, 5, 24)).astype(np.float32)
    return x, t, ctx


@pytest.fixture(scope="module")
def torch_out(torch_dit, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        out = torch_dit(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                        torch.from_numpy(ctx), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_matches_diffusers(folder, inputs, torch_out, scan_layers):
    cfg, cin, cout, params = convert.load_diffusers_folder(folder, scan_layers=scan_layers)
    assert (cin, cout, cfg.dim, cfg.num_layers, cfg.ttm_layers) == (4, 4, 32, 3, 0)
    x, t, ctx = inputs
    got = np.asarray(jax.jit(dit_lib.DiT(cfg, cin, cout).apply)({"params": params}, x, t, ctx))
    assert np.abs(torch_out).max() > 0.1
    np.testing.assert_allclose(got, torch_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_bit_identical(torch_dit, folder, tmp_path, scan_layers):
    sd = {k: v.numpy() for k, v in torch_dit.state_dict().items()}
    cfg, cin, cout = convert.read_config(folder, scan_layers=scan_layers)
    params = convert.torch_to_flax(sd, cfg, cin, cout)
    back = convert.flax_to_torch(params, cfg, sd)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    # and through files: the streamed safetensors loads in diffusers, tensor for tensor
    out = str(tmp_path / "back")
    file = convert.save_diffusers_folder(params, cfg, cin, cout, out)
    with safe_open(file, framework="np") as f:
        assert set(f.keys()) == set(sd)
    # (from_pretrained needs `accelerate` for this class; build from the written config.json and load strictly)
    reloaded = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(out))
    reloaded.load_state_dict(load_file(file), strict=True)
    reloaded = reloaded.state_dict()
    for k, v in sd.items():
        assert reloaded[k].numpy().tobytes() == v.tobytes(), k


def test_errors_name_the_key(torch_dit, folder):
    sd = {k: v.numpy() for k, v in torch_dit.state_dict().items()}
    del sd["blocks.2.attn2.norm_k.weight"]
    sd["blocks.1.ffn.net.2.weight"] = sd["blocks.1.ffn.net.2.weight"][:, :-1]
    cfg, cin, cout = convert.read_config(folder)
    with pytest.raises(rb.ConversionError) as e:
        convert.torch_to_flax(sd, cfg, cin, cout)
    assert "'blocks.2.attn2.norm_k.weight'" in str(e.value) and "'blocks.1.ffn.net.2.weight'" in str(e.value)
    with pytest.raises(ValueError, match="ttm_layers=0"):
        convert.flax_to_torch({}, dit_lib.DiTConfig(**{**cfg.__dict__, "ttm_layers": 1}))


# ~19 s; the suite keeps its siblings: test_dit.py::test_stage2_zero_init_equals_backbone (the grafted stage model
# computes the backbone's function) and test_convert_cli.py::test_stage2_graft_and_bf16 (the CLI's graft: channels,
# zero new inputs, copied weights, TTM layers)
@pytest.mark.slow
def test_cli_writes_stage2_init_checkpoint(tmp_path):
    # the T2V backbone of `configs/stage2.py:tiny`'s shapes, converted into that stage-2 model (3x the input
    # channels, TTM layers): new channels and TTM layers start at zero, so it computes the backbone's function
    config = config_lib.build(2, "tiny")
    m, c = config.model, config.autoencoder.latent_channels
    torch.manual_seed(1)
    backbone = WanTransformer3DModel(patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads,
                                     attention_head_dim=m.dim // m.num_heads, in_channels=c, out_channels=c,
                                     text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim,
                                     num_layers=m.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     eps=m.eps, rope_max_seq_len=m.rope_max_seq_len).eval()
    src = str(tmp_path / "transformer")
    backbone.save_pretrained(src, safe_serialization=True)
    out = str(tmp_path / "init")
    stage2 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "stage2.py")
    convert_cli.convert([f"--from=diffusers:{src}", f"--to=orbax:{out}", "--stage=2", f"--config={stage2}:tiny"])
    with open(os.path.join(out, "ttm_convert.json")) as f:
        meta = json.load(f)
    cin = config_lib.in_channels(config)
    assert meta["model"]["ttm_layers"] == m.ttm_layers > 0 and meta["in_channels"] == cin == 3 * c
    model = dit_lib.DiT(config.model, cin, c)
    with ocp.StandardCheckpointer() as ckptr:  # as train/loop.py restores config.train.init_from
        params = ckptr.restore(meta["params"], convert.template(dit_lib.DiTConfig.from_config(m), cin, c))
    rng = np.random.RandomState(2)
    x = rng.standard_normal((1, 2, 4, 6, cin)).astype(np.float32)
    t, ctx = np.array([500.0], np.float32), rng.standard_normal((1, 5, m.text_dim)).astype(np.float32)
    with torch.no_grad():
        want = backbone(torch.from_numpy(x[..., :c].transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                        torch.from_numpy(ctx), return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
    pt, ph, pw = m.patch_size
    ids = jnp.zeros((1, (2 // pt) * (4 // ph) * (6 // pw)), jnp.int32)
    got = jax.jit(model.apply)({"params": params}, x, t, ctx, local_context=jnp.ones((1, 4, m.text_dim)),
                               token_ids=ids, cross_token_ids=ids, local_ids=jnp.zeros((1, 4), jnp.int32))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_real_wan21_1_3b_layout_maps_every_key():
    # Wan2.1-T2V-1.3B's transformer config on torch's meta device: shapes only, no memory
    config = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.device("meta"):
        real = WanTransformer3DModel(**config)
    cfg, cin, cout = convert.config_from_diffusers(dict(real.config))
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim) == (1536, 30, 12, 8960)
    specs = {k: (tuple(v.shape), np.float32) for k, v in real.state_dict().items()}
    moves = convert.rulebook(True).plan(rb.flatten(convert.template(cfg, cin, cout)), specs, "torch -> flax")
    assert {m.torch_key for m in moves} == set(specs)


# ------------------------------------------------------------------------------------ forward parity, awkward sizes
# (formerly tests/test_dit_parity.py, which mapped the state dict with a private table; now the real rulebook)
# One tiny config with deliberately awkward sizes: 3 heads of head_dim 18 (the RoPE split is 6/6/6 and heads are not a
# power of two), a non-square 3 x 6 x 10 latent, text_dim != dim, in != out channels; every parameter randomised (norm
# scales and biases too); the state dict goes through `weights.dit.torch_to_flax`, which must use every torch key and
# fill every JAX leaf.

ODD_HEADS, ODD_HEAD_DIM, ODD_LAYERS, ODD_FFN, ODD_TEXT_DIM, ODD_FREQ_DIM = 3, 18, 3, 40, 20, 16
ODD_DIM = ODD_HEADS * ODD_HEAD_DIM
ODD_IN, ODD_OUT = 5, 7
ODD_B, ODD_T, ODD_H, ODD_W, ODD_LC = 2, 3, 6, 10, 7


def _odd_torch_model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=ODD_HEADS, attention_head_dim=ODD_HEAD_DIM,
                                  in_channels=ODD_IN, out_channels=ODD_OUT, text_dim=ODD_TEXT_DIM,
                                  freq_dim=ODD_FREQ_DIM, ffn_dim=ODD_FFN, num_layers=ODD_LAYERS, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    with torch.no_grad():
        for p in model.parameters():  # norms start at exactly 1 / 0; move everything off its init
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _odd_config(scan_layers: bool) -> dit_lib.DiTConfig:
    return dit_lib.DiTConfig(dim=ODD_DIM, num_layers=ODD_LAYERS, num_heads=ODD_HEADS, ffn_dim=ODD_FFN,
                             text_dim=ODD_TEXT_DIM, freq_dim=ODD_FREQ_DIM, ttm_layers=0, patch_size=(1, 2, 2),
                             scan_layers=scan_layers)


@pytest.fixture(scope="module")
def odd_reference():
    model = _odd_torch_model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ODD_B, ODD_T, ODD_H, ODD_W, ODD_IN)).astype(np.float32)
    timestep = np.array([17.0, 803.5], np.float32)
    context = rng.standard_normal((ODD_B, ODD_LC, ODD_TEXT_DIM)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep),
                    torch.from_numpy(context), return_dict=False)[0]
    expected = out.permute(0, 2, 3, 4, 1).numpy()
    return model.state_dict(), (x, timestep, context), expected


@pytest.mark.parametrize("scan_layers", [False, True])
def test_forward_matches_diffusers_awkward_sizes(odd_reference, scan_layers):
    state_dict, (x, timestep, context), expected = odd_reference
    cfg = _odd_config(scan_layers)
    params = convert.torch_to_flax(state_dict, cfg, ODD_IN, ODD_OUT)
    model = dit_lib.DiT(cfg, ODD_IN, ODD_OUT)
    # The mapped tree must be exactly the model's tree: no leaf left unfilled, none extra, same shapes.
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, timestep, context))["params"]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
    assert got == want
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(context))
    assert out.shape == expected.shape == (ODD_B, ODD_T, ODD_H, ODD_W, ODD_OUT)
    assert np.abs(expected).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
