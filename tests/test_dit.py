"""The TTM DiT (`ttm_jax/backbones/wan/model.py`) and its stage inputs (`conditioning.py`) on tiny configs.

What is pinned: a stage-2 model grafted onto a backbone computes exactly the backbone (zero-init added layers and
zero new input channels); finite forward and gradient on awkward object layouts built by `masks.py`; the wan1.3b
parameter count (diffusers' 1,418,996,800) by `eval_shape`; scan == unrolled, remat == no remat; bf16 compute close
to fp32; logical axis names on every parameter; clear errors for missing ids.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib

# LLVM -O0: compiles several times faster on CPU; these tests are about values, not speed
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import conditioning, masks

# LLVM -O0: compiles several times faster on CPU; these tests are about values, not speed
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

C = 4  # latent channels
TF, SF = 4, 4  # pixel -> latent compression of the synthetic object masks
PATCH = (1, 2, 2)
B, T, H, W = 2, 3, 8, 12  # latent; tokens 3 x 4 x 6 = 72
NT = T * (H // 2) * (W // 2)
TEXT_DIM, LC, S, LP = 16, 5, 4, 3  # caption length, local prompt slots (caption + 3 objects), tokens per slot

CFG = dit.DiTConfig(dim=24, num_layers=2, num_heads=2, ffn_dim=32, text_dim=TEXT_DIM, freq_dim=16, ttm_layers=1,
                    patch_size=PATCH, scan_layers=True)


def _object_masks() -> np.ndarray:
    """bool [B, 9, 32, 48, 3] pixel masks: obj 1 leaves after frame 4, obj 2 is 2x2 pixels (below one token),
    obj 3 is big and present throughout. Example 1 has no objects at all."""
    m = np.zeros((B, 1 + (T - 1) * TF, H * SF, W * SF, 3), bool)
    m[0, :5, 0:16, 0:16, 0] = True
    m[0, :, 20:22, 30:32, 1] = True
    m[0, :, 16:32, 24:48, 2] = True
    return m


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    geo = dict(time_factor=TF, space_factor=SF, patch_size=PATCH)
    token_ids, cross_ids = _jit(lambda m: (masks.token_ids_from_masks(m, **geo),
                                              masks.token_ids_from_boxes(m, **geo)))(_object_masks())
    # example 0: caption (3 tokens), obj 1 (2 tokens), obj 2 (1 token), obj 3 padded to nothing; example 1: caption
    prompt_mask = np.zeros((B, S, LP), bool)
    prompt_mask[0, 0, :3] = prompt_mask[0, 1, :2] = prompt_mask[0, 2, :1] = True
    prompt_mask[1, 0, :2] = True
    return dict(
        noisy=normal(B, T, H, W, C),
        first_frame=normal(B, 1, H, W, C),
        trajectory=normal(B, T, H, W, C),
        timestep=jnp.array([3.0, 750.0]),
        context=normal(B, LC, TEXT_DIM),
        local_context=normal(B, S * LP, TEXT_DIM),
        token_ids=token_ids, cross_token_ids=cross_ids, local_ids=masks.local_prompt_ids(jnp.asarray(prompt_mask)))


def _randomize(params, words, seed, scale=1.0):
    """Random normal values for every leaf whose path contains all `words`."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape compile

    def one(path, v):
        name = jax.tree_util.keystr(path)
        return jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype) if all(w in name for w in words) else v

    return jax.tree_util.tree_map_with_path(one, params)


def _ids(batch):
    return {k: batch[k] for k in ("local_context", "token_ids", "cross_token_ids", "local_ids")}


def _x(batch, stage=2):
    return conditioning.stage_input(stage, batch["noisy"], batch["first_frame"], batch["trajectory"])


def _init(model, batch, x, **kw):
    init = _jit(lambda x, kw: model.init(jax.random.key(1), x, batch["timestep"], batch["context"], **kw))
    return nn.unbox(init(x, kw))["params"]


def _apply(model):
    """jitted `(params, x, batch, **ids) -> output`."""
    fn = _jit(lambda params, x, t, ctx, kw: model.apply({"params": params}, x, t, ctx, **kw))
    return lambda params, x, batch, **kw: fn(params, x, batch["timestep"], batch["context"], kw)


def test_layout_of_the_objects(batch):
    """The ids really contain the awkward cases the finiteness test is about."""
    ids = np.asarray(batch["token_ids"]).reshape(B, T, H // 2, W // 2)
    assert (ids[0, 0] == 1).any() and not (ids[0, 2] == 1).any()  # obj 1 absent from the last latent frame
    assert not (ids[0] == 2).any()  # obj 2 smaller than one token
    assert (ids[0] == 3).any() and (np.asarray(batch["local_ids"])[0] != 3).all()  # obj 3 has no prompt tokens
    assert (ids[1] == 0).all()  # no objects


@pytest.fixture(scope="module")
def stage2(batch):
    """The tiny stage-2 model, its fresh params (one jitted init for the whole module) and a jitted apply."""
    model = dit.DiT(CFG, 3 * C, C)
    return model, _init(model, batch, _x(batch), **_ids(batch)), _apply(model)


def _backbone_params(fresh):
    """A T2V backbone's params (ttm_layers=0, C inputs, scan layout) with the same shapes as `fresh`'s backbone part:
    every leaf random, so that a misplaced block or channel in `graft_backbone` changes the output."""
    flat = traverse_util.flatten_dict(fresh)
    out = {}
    for key, v in flat.items():
        if any(m in key for m in dit.TTM_MODULES) or key[0] == "blocks":
            continue
        if key[0] == "ttm_blocks":
            v = jnp.concatenate([v, flat[("blocks",) + key[1:]]], axis=0)
            key = ("blocks",) + key[1:]
        out[key] = v
    out[("patch_embedding", "kernel")] = out[("patch_embedding", "kernel")][..., :C, :]
    return _randomize(traverse_util.unflatten_dict(out), (), seed=11, scale=0.3)


def test_stage2_zero_init_equals_backbone(batch, stage2):
    """Fresh added layers + zero new channels on a backbone's params == the backbone alone."""
    model, fresh, run = stage2
    backbone = dit.DiT(dataclasses.replace(CFG, ttm_layers=0), C, C)
    back_params = _backbone_params(fresh)
    params = dit.graft_backbone(fresh, back_params, ttm_layers=CFG.ttm_layers, scan_layers=True)
    want = _apply(backbone)(back_params, batch["noisy"], batch)
    x2 = _x(batch)
    got = run(params, x2, batch, **_ids(batch))
    # equal up to float32 reassociation (the patch embedding now sums over 3C channels, C of them live)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
    assert np.abs(np.asarray(want)).max() > 0.1
    # not vacuous: the new channels are zero, and non-zero added output projections do change the output
    assert np.all(np.asarray(params["patch_embedding"]["kernel"][..., C:, :]) == 0)
    moved = run(_randomize(params, ("masked", "to_out"), seed=3), x2, batch, **_ids(batch))
    assert np.abs(np.asarray(moved - got)).max() > 1e-2
    # the unrolled layout grafts the same way (`blocks_i` names in both trees)
    flat = dit.graft_backbone(dit.unscan_layout(fresh, ttm_layers=CFG.ttm_layers),
                              dit.unscan_layout(back_params, ttm_layers=0), ttm_layers=CFG.ttm_layers,
                              scan_layers=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                     dit.scan_layout(flat, ttm_layers=CFG.ttm_layers), params))


def test_graft_names_a_missing_backbone_leaf(stage2):
    _, fresh, _ = stage2
    back = _backbone_params(fresh)
    del back["proj_out"]["bias"]
    with pytest.raises(KeyError, match="proj_out/bias"):
        dit.graft_backbone(fresh, back, ttm_layers=CFG.ttm_layers, scan_layers=True)


@pytest.fixture(scope="module")
def trained(batch, stage2):
    """Params with non-zero added output projections (as after training), and the jitted output on the batch."""
    model, fresh, run = stage2
    params = _randomize(fresh, ("to_out",), seed=7, scale=0.3)
    return params, run(params, _x(batch), batch, **_ids(batch))


def _loss_fn(model, batch):
    def loss(params, x, context, local_context):
        out = model.apply({"params": params}, x, batch["timestep"], context, local_context=local_context,
                          token_ids=batch["token_ids"], cross_token_ids=batch["cross_token_ids"],
                          local_ids=batch["local_ids"])
        return jnp.mean(jnp.square(out)), out
    return loss


def test_forward_and_gradient_are_finite(batch, stage2, trained):
    model = stage2[0]
    params, _ = trained
    (loss, out), grads = _jit(jax.value_and_grad(_loss_fn(model, batch), argnums=(0, 1, 2, 3), has_aux=True))(
        params, _x(batch), batch["context"], batch["local_context"])
    assert out.shape == (B, T, H, W, C)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(out)))
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    g_params, _, _, g_local = grads
    # gradient reaches the added layers, and only real local-prompt tokens get any
    assert np.abs(np.asarray(g_params["ttm_blocks"]["masked_cross_attn"]["attn"]["to_k"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g_params["ttm_blocks"]["masked_self_attn"]["attn"]["to_q"]["kernel"])).max() > 0
    padding = np.asarray(batch["local_ids"]) < 0
    assert np.all(np.asarray(g_local)[padding] == 0) and np.abs(np.asarray(g_local)[~padding]).max() > 0


def test_scan_equals_unrolled(batch, trained):
    params, ref_out = trained
    unrolled = dit.DiT(dataclasses.replace(CFG, scan_layers=False), 3 * C, C)
    flat_params = dit.unscan_layout(params, ttm_layers=CFG.ttm_layers)
    assert sorted(k for k in flat_params if k.startswith("blocks_")) == ["blocks_0", "blocks_1"]
    assert "masked_self_attn" in flat_params["blocks_0"] and "masked_self_attn" not in flat_params["blocks_1"]
    out = _apply(unrolled)(flat_params, _x(batch), batch, **_ids(batch))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    back = dit.scan_layout(flat_params, ttm_layers=CFG.ttm_layers)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_the_same_gradient(batch, stage2, trained, policy):
    params, _ = trained
    args = (_x(batch), batch["context"], batch["local_context"])
    ref = _jit(jax.grad(lambda *a: _loss_fn(stage2[0], batch)(*a)[0]))(params, *args)
    remat = dit.DiT(dataclasses.replace(CFG, remat_policy=policy), 3 * C, C)
    got = _jit(jax.grad(lambda *a: _loss_fn(remat, batch)(*a)[0]))(params, *args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got, ref)


def test_bfloat16_compute_is_close_to_float32(batch, trained):
    params, ref = trained
    bf16 = dit.DiT(dataclasses.replace(CFG, dtype="bfloat16"), 3 * C, C)
    out = _apply(bf16)(params, _x(batch), batch, **_ids(batch))
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


def test_unmasked_baseline_needs_no_ids_and_differs(batch, trained):
    params, out_m = trained
    unmasked = dit.DiT(dataclasses.replace(CFG, ttm_masked=False), 3 * C, C)
    out_u = _apply(unmasked)(params, _x(batch), batch, local_context=batch["local_context"],
                             local_ids=batch["local_ids"])
    assert np.all(np.isfinite(np.asarray(out_u)))
    assert np.abs(np.asarray(out_u - out_m)).max() > 1e-4


def test_missing_ids_raise_naming_the_argument(batch):
    model = dit.DiT(CFG, 3 * C, C)
    x = _x(batch)
    ids = _ids(batch)
    for name in ("token_ids", "cross_token_ids", "local_ids"):
        kw = dict(ids, **{name: None})
        with pytest.raises(ValueError, match=name):
            jax.eval_shape(model.init, jax.random.key(0), x, batch["timestep"], batch["context"], **kw)
    with pytest.raises(ValueError, match="local_context"):
        jax.eval_shape(model.init, jax.random.key(0), x, batch["timestep"], batch["context"])
    with pytest.raises(ValueError, match="in_channels"):
        jax.eval_shape(model.init, jax.random.key(0), batch["noisy"], batch["timestep"], batch["context"], **ids)


def test_logical_axis_names_on_every_param(batch):
    model = dit.DiT(CFG, 3 * C, C)
    variables = jax.eval_shape(model.init, jax.random.key(0), _x(batch), batch["timestep"], batch["context"],
                               **_ids(batch))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(variables)["params"])
    shapes = traverse_util.flatten_dict(nn.unbox(variables)["params"])
    assert specs.keys() == shapes.keys()
    for key, spec in specs.items():
        assert len(spec) == len(shapes[key].shape), key
        named = [a for a in spec if a is not None]
        assert len(named) == len(set(named)) and named, key  # some name, none twice
        if key[0] in ("blocks", "ttm_blocks"):
            assert spec[0] == "layers", key
    assert specs[("ttm_blocks", "attn1", "to_q", "kernel")] == P("layers", "embed", "heads")
    assert specs[("blocks", "ffn", "proj_in", "kernel")] == P("layers", "embed", "mlp")
    assert specs[("patch_embedding", "kernel")] == P(None, None, None, "in_channels", "embed")


def test_wan13b_param_count_matches_diffusers():
    """Wan2.1-T2V-1.3B shapes (configs/stage2.py:wan1.3b, no TTM layers, 16 -> 16 channels): 1,418,996,800."""
    cfg = config_lib.build(2, "wan1.3b").model
    cfg.ttm_layers = 0
    model = dit.DiT(cfg, 16, 16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, 2, 2, 16)), jnp.zeros((1,)),
                            jnp.zeros((1, 1, cfg.text_dim)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))) == 1_418_996_800


def test_stage_inputs(batch):
    noisy, ff, traj = batch["noisy"], batch["first_frame"], batch["trajectory"]
    s0 = traj[:, :1] * 2.0
    x1 = np.asarray(conditioning.stage_input(1, noisy, ff, s0))
    x2 = np.asarray(conditioning.stage_input(2, noisy, ff, traj))
    for x in (x1, x2):
        assert x.shape == (B, T, H, W, 3 * C)
        np.testing.assert_array_equal(x[..., :C], noisy)
        np.testing.assert_array_equal(x[:, :1, ..., C:2 * C], ff)
        assert np.all(x[:, 1:, ..., C:2 * C] == 0)
    np.testing.assert_array_equal(x1[:, :1, ..., 2 * C:], s0)
    assert np.all(x1[:, 1:, ..., 2 * C:] == 0)
    np.testing.assert_array_equal(x2[..., 2 * C:], traj)
    # a whole-clip latent as first_frame_latent: only its frame 0 is used
    np.testing.assert_array_equal(conditioning.stage_input(2, noisy, traj, traj)[:, :1, ..., C:2 * C], traj[:, :1])
    with pytest.raises(ValueError, match="stage 2 needs the whole trajectory"):
        conditioning.stage_input(2, noisy, ff, s0)
    with pytest.raises(ValueError, match="cond_latent"):
        conditioning.stage_input(1, noisy, ff, s0[..., :2])


def test_stage_inputs_with_the_first_frame_in_every_frame(batch):
    """`frames="all"` (stage 1's default): E(x0) and E(s0) fill every latent frame; the trajectory of stage 2 and the
    noisy latent are as before; a whole-clip latent still gives its frame 0 only."""
    noisy, ff, traj = batch["noisy"], batch["first_frame"], batch["trajectory"]
    s0 = traj[:, :1] * 2.0
    x1 = np.asarray(conditioning.stage_input(1, noisy, ff, s0, frames="all"))
    x2 = np.asarray(conditioning.stage_input(2, noisy, traj, traj, frames="all"))
    x0 = np.asarray(conditioning.stage_input(0, noisy, ff, None, frames="all"))
    for f in range(T):
        np.testing.assert_array_equal(x1[:, f, ..., :C], noisy[:, f])
        np.testing.assert_array_equal(x1[:, f, ..., C:2 * C], ff[:, 0])
        np.testing.assert_array_equal(x1[:, f, ..., 2 * C:], s0[:, 0])
        np.testing.assert_array_equal(x2[:, f, ..., C:2 * C], traj[:, 0])
        np.testing.assert_array_equal(x0[:, f, ..., C:], ff[:, 0])
    np.testing.assert_array_equal(x2[..., 2 * C:], traj)
    with pytest.raises(ValueError, match="frames='last'.*condition_frames"):
        conditioning.stage_input(1, noisy, ff, s0, frames="last")


def test_indexed_condition_frames_add_the_frames_place(batch):
    """`frames="indexed"`: the `all` input plus one last channel, `t' / (T' - 1)` in every cell of frame t', for every
    stage; `config.in_channels` counts it, and the model built from the config takes that input."""
    noisy, ff, traj = batch["noisy"], batch["first_frame"], batch["trajectory"]
    s0 = traj[:, :1] * 2.0
    for stage, cond, width in ((1, s0, 3 * C), (2, traj, 3 * C), (0, None, 2 * C)):
        x_all = np.asarray(conditioning.stage_input(stage, noisy, ff, cond, frames="all"))
        x_idx = np.asarray(conditioning.stage_input(stage, noisy, ff, cond, frames="indexed"))
        assert x_idx.shape == x_all.shape[:-1] + (width + 1,)
        np.testing.assert_array_equal(x_idx[..., :width], x_all)
        for f in range(T):
            assert np.all(x_idx[:, f, ..., width] == f / (T - 1))
    # with the image dropped (guidance's unconditional branch: zero conditions) the frame's place stays
    zero = np.asarray(conditioning.stage_input(1, noisy, jnp.zeros_like(ff), jnp.zeros_like(s0), frames="indexed"))
    np.testing.assert_array_equal(zero[:, -1, ..., -1], 1.0)
    assert conditioning.CONDITION_FRAMES == config_lib.CONDITION_FRAMES
    c = config_lib.build(1, "tiny")
    plain = config_lib.in_channels(c)
    c.model.condition_frames = "indexed"
    assert config_lib.in_channels(c) == plain + 1
    c.model.condition_frames = "last"
    with pytest.raises(config_lib.ConfigError, match="model.condition_frames.*indexed"):
        config_lib.validate(c)


def test_condition_frames_reach_the_model_from_the_config():
    """The stage-1 default is `all`, stages 2 and 0 keep `first`; a config saved before the field existed reads as
    `first` (its checkpoints were trained that way: `config.upgrade`, applied wherever a saved config is read)."""
    assert [config_lib.build(s, "tiny").model.condition_frames for s in (1, 2, 0)] == ["all", "first", "first"]
    c = config_lib.build(1, "tiny")
    del c.model["condition_frames"]
    assert inputs_lib.condition_frames(config_lib.upgrade(c)) == "first"


def test_expand_input_channels_keeps_old_and_zeroes_new():
    kernel = jnp.arange(1 * 2 * 2 * 3 * 5, dtype=jnp.float32).reshape(1, 2, 2, 3, 5) + 1
    out = dit.expand_input_channels({"patch_embedding": {"kernel": kernel, "bias": jnp.ones(5)}}, 9)
    k = np.asarray(out["patch_embedding"]["kernel"])
    assert k.shape == (1, 2, 2, 9, 5)
    np.testing.assert_array_equal(k[..., :3, :], kernel)
    assert np.all(k[..., 3:, :] == 0)
    with pytest.raises(ValueError, match="in_channels"):
        dit.expand_input_channels({"patch_embedding": {"kernel": kernel}}, 2)
