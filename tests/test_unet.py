"""The AnimateDiff U-Net (`ttm_jax/backbones/animatediff/model.py`) against diffusers' `UNetMotionModel` (the oracle),
its rulebook (`ttm_jax/backbones/animatediff/weights.py`), and its TTM layers.

What is pinned: forward parity in fp32 on a tiny random model whose every parameter is perturbed (zero- and
one-initialised ones included); a bit-identical round trip back to the torch state dict (frame-embedding buffers
included) that diffusers loads strictly; the SD 1.5 `unet/` + `MotionAdapter` two-folder load; errors naming the
key; logical axis names; a stage model with TTM layers grafted onto the converted backbone computes the backbone at
step 0; the U-Net's id layout per level, and isolation of the masked layers (an object's tokens and prompt never
reach another object's outputs), across frames or per frame.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from safetensors.torch import load_file

from ttm_jax.backbones.animatediff import model as unet
from ttm_jax.backbones.animatediff import weights as convert
from ttm_jax.models import masks, ttm_layers
from ttm_jax.weights import rulebook as rb

# LLVM -O0: compiles several times faster on CPU; these tests are about values, not speed
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TORCH_CONFIG = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=1,
                    norm_num_groups=8, cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=2,
                    motion_max_seq_length=8, in_channels=4, out_channels=4)
B, T, H, W, C, L = 2, 4, 16, 16, 4, 5


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values on top of every parameter: zero biases, unit norm scales and zero projections all move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.1))


def save_sd15_folders(root, *, seed: int) -> UNetMotionModel:
    """SD 1.5's layout in small, saved as a user has it: `root/unet` (UNet2DConditionModel, head count in
    `attention_head_dim`) and `root/adapter` (a V3-like MotionAdapter, no motion mid block), random values on every
    parameter (torch seeded with `seed`); returns the `UNetMotionModel` diffusers makes of them."""
    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                  norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2, sample_size=16)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8, use_motion_mid_block=False)
    _perturb(unet2d, 1)
    _perturb(adapter, 2)
    unet2d.save_pretrained(os.path.join(root, "unet"), safe_serialization=True)
    adapter.save_pretrained(os.path.join(root, "adapter"), safe_serialization=True)
    return UNetMotionModel.from_unet2d(unet2d, adapter)


@pytest.fixture(scope="module")
def torch_unet() -> UNetMotionModel:
    torch.manual_seed(0)
    model = UNetMotionModel(**TORCH_CONFIG).eval()
    _perturb(model, 0)
    return model


@pytest.fixture(scope="module")
def state_dict(torch_unet) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_unet.state_dict().items()}


@functools.lru_cache
def _boxed_shapes(cfg: unet.UNetConfig, in_channels: int, out_channels: int) -> dict:
    """`eval_shape` of the U-Net's init (boxed params): traced once per model, the slow part of making a template."""
    args, kwargs = unet.init_inputs(cfg, in_channels, abstract=True)
    return jax.eval_shape(unet.UNet(cfg, in_channels, out_channels).init, jax.random.key(0), *args, **kwargs)["params"]


def _template(cfg: unet.UNetConfig, in_channels: int, out_channels: int) -> dict:
    return rb.unflatten(rb.flatten(_boxed_shapes(cfg, in_channels, out_channels)))


@pytest.fixture(scope="module")
def converted(torch_unet, state_dict):
    cfg, cin, cout = convert.config_from_diffusers(dict(torch_unet.config))
    return cfg, cin, cout, convert.torch_to_flax(state_dict, cfg, cin, cout, _template(cfg, cin, cout))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((B, T, H, W, C)).astype(np.float32)
    t = np.array([10.0, 730.0], np.float32)
    ctx = rng.standard_normal((B, L, 16)).astype(np.float32)
    return x, t, ctx


@pytest.fixture(scope="module")
def torch_out(torch_unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():  # diffusers takes [B, C, T, H, W] and the text repeated per frame
        out = torch_unet(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                         torch.from_numpy(np.repeat(ctx, T, axis=0)), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def jax_out(converted, inputs):
    cfg, cin, cout, params = converted
    return np.asarray(_jit(unet.UNet(cfg, cin, cout).apply)({"params": params}, *inputs))


def test_forward_matches_diffusers(torch_out, jax_out):
    assert torch_out.shape == jax_out.shape == (B, T, H, W, C)
    assert np.abs(torch_out).max() > 0.1
    np.testing.assert_allclose(jax_out, torch_out, rtol=0, atol=1e-5)


def test_round_trip_bit_identical(torch_unet, state_dict, converted, tmp_path):
    cfg, cin, cout, params = converted
    back = convert.flax_to_torch(params, cfg, state_dict)
    assert set(back) == set(state_dict)
    for k, v in state_dict.items():
        assert torch.equal(torch.from_numpy(back[k]), torch.from_numpy(v)), k
    # and through a written folder: its config rebuilds the same model, which loads the streamed file strictly
    file = convert.save_diffusers_folder(params, cfg, cin, cout, str(tmp_path / "unet"))
    rebuilt = UNetMotionModel.from_config(UNetMotionModel.load_config(str(tmp_path / "unet")))
    rebuilt.load_state_dict(load_file(file), strict=True)
    assert set(rebuilt.state_dict()) == set(state_dict)
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, torch.from_numpy(state_dict[k])), k
    cfg2, cin2, cout2, params2 = convert.load_diffusers_folders(str(tmp_path / "unet"))
    assert (cfg2, cin2, cout2) == (cfg, cin, cout)
    assert all(np.array_equal(a, rb.flatten(params)[k]) for k, a in rb.flatten(params2).items())


def test_sd15_unet_plus_motion_adapter_folders(tmp_path):
    # the real-world source: SD 1.5's unet/ (UNet2DConditionModel, head count in `attention_head_dim`) + a
    # MotionAdapter folder; their keys together are UNetMotionModel.from_unet2d's
    merged = save_sd15_folders(tmp_path, seed=1)
    sd = {k: v.numpy() for k, v in merged.state_dict().items()}
    cfg, cin, cout, params = convert.load_diffusers_folders(str(tmp_path / "unet"), str(tmp_path / "adapter"))
    assert (cfg.use_motion_mid_block, cfg.heads, cfg.motion_max_seq_length) == (False, (2, 2), 8)
    want = convert.torch_to_flax(sd, cfg, cin, cout, params)  # the loaded params serve as the template
    got, ref = rb.flatten(params), rb.flatten(want)
    assert set(got) == set(ref)
    for k in ref:
        assert np.array_equal(got[k], ref[k]), k
    back = convert.flax_to_torch(params, cfg, sd)
    assert all(np.array_equal(back[k], v) for k, v in sd.items())


def test_full_size_layout_matches_diffusers():
    # SD 1.5 + AnimateDiff V3 at full size (4 levels, 2 layers, no motion mid block), on shapes only: the parameter
    # count equals diffusers' and the rulebook maps every tensor of the real state dict both ways
    with torch.device("meta"):
        model = UNetMotionModel(cross_attention_dim=768, use_motion_mid_block=False, motion_max_seq_length=32)
    cfg, cin, cout = convert.config_from_diffusers(dict(model.config))
    assert cfg.num_encoder_transformers == 6  # where TTM's layers go: the 6 spatial transformers of the encoder
    flat = rb.flatten(_template(cfg, cin, cout))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == sum(p.numel() for p in model.parameters())
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 1_276_658_564
    book = convert.rulebook(cfg)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(convert.PE_SUFFIX)}
    book.plan(flat, params, "torch -> flax")
    assert {m.torch_key for m in book.plan(flat, None, "flax -> torch")} == set(params)


def test_errors_name_the_key(state_dict, converted):
    cfg, cin, cout, _ = converted
    sd = dict(state_dict)
    del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    sd["up_blocks.1.resnets.1.conv1.weight"] = sd["up_blocks.1.resnets.1.conv1.weight"][:, :-1]
    sd["down_blocks.0.motion_modules.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(rb.ConversionError) as e:
        convert.torch_to_flax(sd, cfg, cin, cout, _template(cfg, cin, cout))
    for key in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.1.resnets.1.conv1.weight", "down_blocks.0.motion_modules.0.extra.weight"):
        assert repr(key) in str(e.value)
    sd = dict(state_dict)
    key = "mid_block.motion_modules.0.transformer_blocks.0.pos_embed.pe"
    sd[key] = np.zeros((1, 32, 64), np.float32)
    with pytest.raises(rb.ConversionError, match="motion_max_seq_length=8"):
        convert.torch_to_flax(sd, cfg, cin, cout, _template(cfg, cin, cout))
    with pytest.raises(ValueError, match="addition_embed_type"):
        convert.config_from_diffusers({**TORCH_CONFIG, "addition_embed_type": "text_time"})


def test_logical_axis_names(converted):
    cfg, cin, cout, _ = converted
    boxed = _boxed_shapes(unet.UNetConfig(**{**cfg.__dict__, "ttm_layers": 1}), 3 * cin, cout)  # the stage model
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 100
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert len(leaf.names) == len(leaf.value.shape), name
        named = [n for n in leaf.names if n is not None]
        assert named and len(set(named)) == len(named), (name, leaf.names)


def test_input_errors(converted, inputs):
    cfg, cin, cout, params = converted
    x, t, ctx = inputs
    model = unet.UNet(cfg, cin, cout)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.apply({"params": params}, x[:, :, :15, :15], t, ctx)
    with pytest.raises(ValueError, match="motion_max_seq_length=8"):
        model.apply({"params": params}, np.concatenate([x, x, x], axis=1), t, ctx)
    with pytest.raises(ValueError, match="cross_attention_dim=16"):
        model.apply({"params": params}, x, t, ctx[..., :8])


# ---------------------------------------------------------------------------------------------------------------------
# TTM layers


SF = 2  # pixel -> latent space factor of the synthetic object masks (time factor 1)
LOCAL_IDS = np.array([0, 0, 1, 1, 2, 2, -1], np.int32)  # caption, object 1, object 2, padding


def _object_masks(b: int, t: int, h: int, w: int) -> np.ndarray:
    """bool [b, t, h*SF, w*SF, 2]: object 1 the left half, object 2 the top right quadrant, background the rest."""
    m = np.zeros((b, t, h * SF, w * SF, 2), bool)
    m[:, :, :, : w * SF // 2, 0] = True
    m[:, :, : h * SF // 2, w * SF // 2:, 1] = True
    return m


def _expected_ids(level: int, b: int, t: int, h: int, w: int) -> np.ndarray:
    """int32 [b, t, h_l, w_l] of `_object_masks` at `level` (h_l = h / 2^level)."""
    hl, wl = h >> level, w >> level
    ids = np.zeros((b, t, hl, wl), np.int32)
    ids[..., : wl // 2] = 1
    ids[..., : hl // 2, wl // 2:] = 2
    return ids


def _randomised(tree: Any, seed: int) -> dict:
    """Random values of `tree`'s shapes (norm scales near 1, the rest ~ 1/sqrt(fan-in)): output projections too."""
    rng = np.random.RandomState(seed)
    out = {}
    for k, v in rb.flatten(tree).items():
        shape = tuple(np.shape(v)) if not hasattr(v, "shape") else tuple(v.shape)
        if k.endswith("scale"):
            out[k] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 10
            out[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return rb.unflatten(out)


def _apply_capturing(model: unet.UNet, params: dict, *args: Any, **kwargs: Any) -> tuple[np.ndarray, list, list]:
    """`model.apply` (jitted) and, for every TTM layer call in order, its (kind, module path) and its arguments."""
    names: list[tuple[str, tuple[str, ...]]] = []

    def run(params, args, kwargs):
        captured = []

        def interceptor(next_fun, a, kw, context):
            if isinstance(context.module, ttm_layers.MaskedSelfAttention | ttm_layers.MaskedCrossAttention):
                names.append((type(context.module).__name__, context.module.path))
                captured.append(a)
            return next_fun(*a, **kw)

        with nn.intercept_methods(interceptor):
            out = model.apply({"params": params}, *args, **kwargs)
        return out, captured

    out, calls = _jit(run)(params, args, kwargs)
    return np.asarray(out), names, calls


def _fresh_stage_params(stage: unet.UNetConfig, in_channels: int, out_channels: int) -> dict:
    """A stage U-Net's params as `graft_backbone` receives them: shapes from the U-Net's init (`eval_shape`), the TTM
    layers' values from a real init of the U-Net's `TransformerBlock` with `ttm=True` (the code that builds them in
    the U-Net; a whole-U-Net init compiles for a minute on CPU), the rest placeholders the graft replaces."""
    shapes = rb.flatten(_boxed_shapes(stage, in_channels, out_channels))
    dim, heads = stage.block_out_channels[0], stage.heads[0]
    block = unet.TransformerBlock(dim, heads, ttm=True, cfg=stage)
    ttm_in = unet.TTMInputs(frames=1, local_context=jnp.zeros((1, 2, stage.cross_attention_dim)),
                            self_ids=jnp.zeros((1, 4), jnp.int32), cross_ids=jnp.zeros((1, 4), jnp.int32),
                            local_ids=jnp.zeros((1, 2), jnp.int32))
    init = _jit(block.init)(jax.random.key(3), jnp.zeros((1, 4, dim)), jnp.zeros((1, 2, stage.cross_attention_dim)),
                            ttm_in)
    block_ttm = {k: v for k, v in rb.flatten(init["params"]).items() if k.split("/")[0] in unet.TTM_MODULES}
    assert block_ttm and all(np.abs(v).max() == 0 for k, v in block_ttm.items() if "to_out" in k)
    fresh = {}
    for k, s in shapes.items():
        tail = k.split("/transformer_blocks_0/")[-1]
        if any(m in k for m in unet.TTM_MODULES):
            assert block_ttm[tail].shape == s.shape, k
            fresh[k] = np.asarray(block_ttm[tail])
        else:
            fresh[k] = np.full(s.shape, np.nan, s.dtype)  # must all be replaced
    return rb.unflatten(fresh)


@pytest.fixture(scope="module")
def stage_run(converted, inputs):
    """The stage-2 model of the parity config (3x the input channels: noisy latent + first frame + trajectory; TTM
    layers in the encoder's spatial transformer, masked self-attention per frame), grafted onto the converted
    backbone and run on the parity inputs: (fresh, params, output, names, calls)."""
    cfg, cin, cout, backbone = converted
    stage = unet.UNetConfig(**{**cfg.__dict__, "ttm_layers": 1, "ttm_self_across_frames": False})
    fresh = _fresh_stage_params(stage, 3 * cin, cout)
    params = unet.graft_backbone(fresh, backbone)
    x, t, ctx = inputs
    rng = np.random.RandomState(1)
    extra = rng.standard_normal((B, T, H, W, 2 * cin)).astype(np.float32)
    token_ids, cross_ids = unet.object_ids(stage, jnp.asarray(_object_masks(B, T, H, W)), time_factor=1,
                                           space_factor=SF)
    out = _apply_capturing(unet.UNet(stage, 3 * cin, cout), params, np.concatenate([x, extra], axis=-1), t, ctx,
                           local_context=rng.standard_normal((B, LOCAL_IDS.size, 16)).astype(np.float32),
                           token_ids=token_ids, cross_token_ids=cross_ids, local_ids=np.tile(LOCAL_IDS, (B, 1)))
    return (stage, fresh, params, *out)


def test_stage_model_equals_backbone_at_step_0(converted, stage_run, jax_out, torch_out):
    backbone = converted[3]
    stage, fresh, params, got, names, _ = stage_run
    assert not any(np.isnan(v).any() for v in rb.flatten(params).values())
    assert [n for _, n in names] == [("down_blocks_0_attentions_0", "transformer_blocks_0", m)
                                     for m in unet.TTM_MODULES]
    np.testing.assert_allclose(got, jax_out, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, torch_out, rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="conv_out/kernel"):
        unet.graft_backbone(fresh, {k: v for k, v in backbone.items() if k != "conv_out"})


# Two TTM levels (both down blocks carry a spatial transformer), masked self-attention across frames (the default).
TTM_B, TTM_T, TTM_H, TTM_W = 1, 3, 8, 8
TTM_CFG = unet.UNetConfig(block_out_channels=(16, 32), down_block_types=(unet.CROSS_DOWN, unet.CROSS_DOWN),
                          up_block_types=(unet.PLAIN_UP, unet.CROSS_UP), layers_per_block=1, norm_num_groups=8,
                          cross_attention_dim=16, num_attention_heads=2, motion_num_attention_heads=2,
                          motion_max_seq_length=8, ttm_layers=2)


@pytest.fixture(scope="module")
def ttm_run():
    """(params, output, names, calls) of the two-level TTM U-Net with random parameters."""
    params = _randomised(_boxed_shapes(TTM_CFG, C, C), 0)
    rng = np.random.RandomState(2)
    token_ids, cross_ids = unet.object_ids(TTM_CFG, jnp.asarray(_object_masks(TTM_B, TTM_T, TTM_H, TTM_W)),
                                           time_factor=1, space_factor=SF)
    x = rng.standard_normal((TTM_B, TTM_T, TTM_H, TTM_W, C)).astype(np.float32)
    ctx = rng.standard_normal((TTM_B, 4, 16)).astype(np.float32)
    local = rng.standard_normal((TTM_B, LOCAL_IDS.size, 16)).astype(np.float32)
    out = _apply_capturing(unet.UNet(TTM_CFG, C, C), params, x, jnp.array([500.0]), ctx, local_context=local,
                           token_ids=token_ids, cross_token_ids=cross_ids, local_ids=LOCAL_IDS[None])
    return (params, *out)


def _calls(names: list, calls: list, kind: str) -> list:
    return [(path, args) for (k, path), args in zip(names, calls, strict=True) if k == kind]


@pytest.mark.parametrize("across_frames", [True, False])
def test_masked_self_attention_ids_and_isolation(across_frames, ttm_run, stage_run):
    if across_frames:  # two levels, (B, T, H, W) = (1, 3, 8, 8)
        _, _, names, calls = ttm_run
        b, t, h, w = TTM_B, TTM_T, TTM_H, TTM_W
    else:  # the stage model: one level, per frame, (2, 4, 16, 16)
        *_, names, calls = stage_run
        b, t, h, w = B, T, H, W
    selfs = _calls(names, calls, "MaskedSelfAttention")
    assert [p[0] for p, _ in selfs] == [f"down_blocks_{i}_attentions_0" for i in range(len(selfs))]
    assert len(selfs) == (2 if across_frames else 1)
    for level, (_, (x, _, ids)) in enumerate(selfs):
        want = _expected_ids(level, b, t, h, w)  # [b, t, hl, wl]
        x, ids = np.asarray(x), np.asarray(ids)
        hw = want.shape[2] * want.shape[3]
        shape = (b, t * hw) if across_frames else (b * t, hw)  # one sequence per video / per frame
        assert x.shape[:2] == ids.shape == shape
        np.testing.assert_array_equal(ids, want.reshape(shape))
        layer = ttm_layers.MaskedSelfAttention(x.shape[-1], 2)
        variables = {"params": _randomised(_boxed_shapes_of(layer, x, None, ids), 10 + level)}
        apply = _jit(layer.apply)
        base = np.asarray(apply(variables, x, None, ids))
        # change object 1's tokens in frame 0 only (with noise: a constant shift would be normed away)
        frame = np.broadcast_to(np.arange(t)[None, :, None], (b, t, hw)).reshape(shape)
        hit = (ids == 1) & (frame == 0)
        noise = np.random.RandomState(level).standard_normal(x.shape).astype(np.float32)
        moved = np.asarray(apply(variables, np.where(hit[..., None], x + noise, x), None, ids))
        changed = np.abs(moved - base).max(axis=-1) > 1e-4
        assert changed[hit].all()
        assert not changed[ids != 1].any()  # no other object, in any frame, sees it
        own_later = (ids == 1) & (frame > 0)
        # across frames object 1 sees itself in every frame; per frame only in its own
        assert changed[own_later].all() if across_frames else not changed[own_later].any()


def _boxed_shapes_of(layer: nn.Module, *args: Any) -> dict:
    return jax.eval_shape(layer.init, jax.random.key(0), *args)["params"]


def test_masked_cross_attention_isolation(ttm_run):
    _, _, names, calls = ttm_run
    crosses = _calls(names, calls, "MaskedCrossAttention")
    assert len(crosses) == 2
    for level, (_, (x, local, cross_ids, local_ids)) in enumerate(crosses):
        x, local, cross_ids, local_ids = (np.asarray(a) for a in (x, local, cross_ids, local_ids))
        want = _expected_ids(level, TTM_B, TTM_T, TTM_H, TTM_W)
        np.testing.assert_array_equal(cross_ids, want.reshape(TTM_B * TTM_T, -1))  # per frame; boxes = masks here
        np.testing.assert_array_equal(local_ids, np.tile(LOCAL_IDS, (TTM_B * TTM_T, 1)))
        layer = ttm_layers.MaskedCrossAttention(x.shape[-1], 2)
        variables = {"params": _randomised(_boxed_shapes_of(layer, x, local, cross_ids, local_ids), 20 + level)}
        apply = _jit(layer.apply)
        base = np.asarray(apply(variables, x, local, cross_ids, local_ids))
        # object 2's prompt changes: only object 2's tokens move
        noise = np.random.RandomState(level).standard_normal(local.shape).astype(np.float32)
        moved = np.asarray(apply(variables, x, np.where((local_ids == 2)[..., None], local + noise, local),
                                 cross_ids, local_ids))
        changed = np.abs(moved - base).max(axis=-1) > 1e-4
        assert changed[cross_ids == 2].all() and not changed[cross_ids != 2].any()


def test_ttm_inputs_are_checked(ttm_run):
    params = ttm_run[0]
    (x, t, ctx), kwargs = unet.init_inputs(TTM_CFG, C, grid=(TTM_T, TTM_H, TTM_W), text_len=4, local_len=7)
    assert kwargs["token_ids"].shape == (1, TTM_T * (64 + 16))
    model = unet.UNet(TTM_CFG, C, C)
    bad = dict(kwargs, token_ids=kwargs["token_ids"][:, :-1])
    with pytest.raises(ValueError, match=r"token_ids must be int32 \[B, 240\].*TTM levels \(0, 1\)"):
        model.apply({"params": params}, x, t, ctx, **bad)
    with pytest.raises(ValueError, match="local_context"):
        model.apply({"params": params}, x, t, ctx)
    object_masks = jnp.asarray(_object_masks(TTM_B, TTM_T, TTM_H, TTM_W))
    ids, _ = unet.object_ids(TTM_CFG, object_masks, time_factor=1, space_factor=SF)
    assert ids.shape == (1, 240)
    np.testing.assert_array_equal(ids[:, 192:], _expected_ids(1, TTM_B, TTM_T, TTM_H, TTM_W).reshape(1, -1))
    np.testing.assert_array_equal(ids[:, :192], masks.token_ids_from_masks(
        object_masks, time_factor=1, space_factor=SF, patch_size=(1, 1, 1)))
