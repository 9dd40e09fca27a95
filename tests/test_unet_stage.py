"""The AnimateDiff U-Net as a TTM stage backbone (`config.model.backbone = "unet"`): registered, configured, trained
through the real loop, sampled by the two-stage pipeline, described, and converted by the command line.

What is pinned: the U-Net variants validate and their checks name the field; a small U-Net stage 2 (TTM layers,
masked self-attention across frames, `ddim_v`) trains through `loop.train` and its loss falls; describe counts the
paper-shape model (SD 1.5 + AnimateDiff V3) exactly as diffusers' `UNetMotionModel` (1,276,658,564 backbone
parameters) without allocating it; CLIP's padding positions reach the U-Net as CLIP returns them (the `clip` entry's
`zero_padding=False`) while T5's are zeroed; `python -m ttm_jax.convert` takes SD 1.5's `unet/` + a `MotionAdapter`
folder to Orbax and back to a folder diffusers loads, bit for bit, and with `--stage=2` makes the stage's init
checkpoint (new input channels zero, TTM layers with zero output) whose export and re-import are bit-identical too.
Slow: the two-stage pipeline with U-Net stages, and describe's FLOPs at the paper's shapes.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNetMotionModel
from safetensors.torch import load_file

from ttm_jax import cli, describe
from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import modules as modules_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.convert import __main__ as convert_main
from ttm_jax.convert import export
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.train import loop
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import ttm_export

# diffusers' UNetMotionModel with SD 1.5's U-Net and AnimateDiff V3's motion modules (no motion mid block):
# sum(p.numel() for p in model.parameters()), diffusers 0.42.1 (tests/test_unet.py checks the layout key by key)
SD15_V3_PARAMS = 1_276_658_564
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unet_config(stage: int, **overrides) -> config_lib.ml_collections.ConfigDict:
    """tiny_unet, shrunk: 2 levels of 32 / 64 channels on a 3 x 8 x 8 latent (space_to_depth 4x4x4: 192 channels;
    the variant's own latent is per frame, 9 x 16 x 16 x 12), text width 16; the TTM spatial transformer's masked
    self-attention spans the 3 frames (192 tokens)."""
    c = config_lib.build(stage, "tiny_unet")
    c.model.unet.update(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
                        ttm_self_across_frames=True, motion_max_seq_length=8)
    c.text_encoder.update(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, max_length=8, local_max_length=4)
    c.data.update(max_objects=2)
    c.autoencoder.update(time_factor=4, space_factor=4, latent_channels=192, scaling_factor=1.0, shift_factor=0.0)
    c.train.update(batch_size=2, total_steps=2, checkpoint_every_steps=100, log_every_steps=1, sample_every_steps=0,
                   tensorboard=False)
    c.optim.update(learning_rate=1e-3, warmup_steps=2)
    c.mesh.distributed = "skip"
    c.mesh.shape.fsdp = 1
    c.train.compiler_options = {"xla_backend_optimization_level": 0}  # compile fast; values, not speed
    for k, v in overrides.items():
        section, key = k.split(".", 1)
        c[section][key] = v
    return config_lib.validate(c)


def _iterator(config, **_):
    """The same batch of real synthetic SA-V videos (trajectories, masks, tokens) every step, checkpointable
    (test_pipeline_e2e's iterator: the loss of a learning model falls)."""
    from test_pipeline_e2e import _batches

    return _batches(config)


# ------------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("stage", [1, 2])
def test_unet_variants_validate_and_build_the_unet(stage):
    for variant in ("tiny_unet", "animatediff"):
        c = config_lib.validate(config_lib.build(stage, variant))
        assert c.model.backbone == "unet" and c.objective.name == "ddim_v" and "dim" not in c.model
        cfg = registry.model_config(c)
        assert cfg.ttm_layers == (0 if stage == 1 else c.model.ttm_layers)
        assert cfg.cross_attention_dim == c.text_encoder.d_model
    c = config_lib.build(stage, "animatediff")
    assert (c.data.num_frames, c.data.height, c.data.width) == (16, 512, 512)
    assert (c.autoencoder.name, c.text_encoder.name, c.text_encoder.tokenizer) == ("sd", "clip", "clip")
    assert c.objective.rescale_zero_terminal_snr and c.objective.timestep_spacing == "trailing"
    assert c.model.unet.pretrained_unet == c.model.unet.pretrained_motion_adapter == ""
    # DiT variants carry no U-Net section
    assert "unet" not in config_lib.build(stage, "tiny").model


@pytest.mark.parametrize("field,value,needle", [
    ("model.unet.cross_attention_dim", 24, r"config\.model\.unet\.cross_attention_dim: 24 but text_encoder\.d_model"),
    ("model.unet.norm_num_groups", 24, r"config\.model\.unet\.norm_num_groups: 24 does not divide"),
    ("model.unet.num_attention_heads", 5, r"config\.model\.unet\.num_attention_heads: 5 heads"),
    ("model.ttm_layers", 2, r"config\.model\.ttm_layers: 2 must be in \[0, 1\]"),
    ("model.unet.motion_max_seq_length", 2, r"config\.model\.unet\.motion_max_seq_length: 2 but the clip has 9"),
    ("data.height", 34, r"config\.data\.height: 34 must be a multiple of .* = 4"),
    ("model.unet.down_block_types", ("CrossAttnDownBlockMotion",), r"config\.model\.unet\.down_block_types"),
])
def test_unet_checks_name_the_field(field, value, needle):
    c = config_lib.build(2, "tiny_unet")
    section, key = field.split(".", 1)
    if "." in key:
        c[section][key.split(".")[0]][key.split(".")[1]] = value
    else:
        c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=needle):
        config_lib.validate(c)


def test_runlocal_of_the_paper_shapes_keeps_the_unet_grid():
    c = config_lib.validate(config_lib.build(2, "animatediff,runlocal"))
    # three halvings of 8-pixel latent cells: 64 pixels is the smallest side
    assert (c.data.num_frames, c.data.height, c.data.width) == (2, 64, 64)


# ----------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained2(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("unet_s2"))
    c = unet_config(2, **{"train.total_steps": 10})
    return wd, loop.train(c, wd, make_iterator=_iterator, devices=jax.devices()[:1])


def test_unet_stage2_trains_through_the_loop(trained2):
    wd, res = trained2
    losses = [m["loss"] for _, m in res.history]
    assert res.final_step == 10 and len(losses) == 10 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    params = res.state.params
    # the U-Net's tree, with TTM's layers in the first encoder spatial transformer, trained away from their zero init
    out = np.asarray(nn.unbox(params)["down_blocks_0_attentions_0"]["transformer_blocks_0"]["masked_self_attn"]
                     ["attn"]["to_out"]["kernel"])
    assert np.abs(out).max() > 0
    saved = checkpoint_lib.load_config(wd)
    assert saved.model.backbone == "unet" and tuple(saved.model.unet.block_out_channels) == (32, 64)


def test_resume_refuses_a_changed_unet_shape(trained2):
    wd, _ = trained2
    changed = unet_config(2, **{"train.total_steps": 10})
    changed.model.unet.block_out_channels = (32, 32)
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.unet\.block_out_channels: checkpoint"):
        loop.check_resumable(checkpoint_lib.load_config(wd), changed, wd)


@pytest.mark.slow
def test_two_stage_pipeline_samples_with_unet_stages(trained2, tmp_path):
    """Stage 1 trained two steps; both stages sample (DDIM, 2 steps, guided) and decode through the pipeline."""
    from test_pipeline_e2e import run_config

    from ttm_jax.data import video_io
    from ttm_jax.inference import requests as requests_lib
    from ttm_jax.inference import run

    wd2, _ = trained2
    wd1 = str(tmp_path / "s1")
    loop.train(unet_config(1), wd1, make_iterator=_iterator, devices=jax.devices()[:1])
    pipe = run.build_pipeline(run_config(wd1, wd2, num_steps=2, batch_size=1))
    assert isinstance(pipe.s1.stage.modules.model, unet_lib.UNet)
    assert isinstance(pipe.s2.stage.modules.model, unet_lib.UNet)
    batch = _iterator(unet_config(2)).batch
    from PIL import Image

    Image.fromarray(batch["video"][0, 0]).save(tmp_path / "frame.png")
    masks = []
    for k in range(int(batch["num_objects"][0])):
        Image.fromarray(batch["object_masks"][0, 0, ..., k].astype(np.uint8) * 255).save(tmp_path / f"m{k}.png")
        masks.append(str(tmp_path / f"m{k}.png"))
    req = requests_lib.Request(image=str(tmp_path / "frame.png"), caption="a red square moves", masks=masks, seed=1,
                               name="unet")
    out = pipe.generate([req], str(tmp_path / "out"))[0]
    assert out["status"] == "done", out
    video = video_io.read_frames(out["video"])
    c = unet_config(2)
    assert video.shape == (c.data.num_frames, c.data.height, c.data.width, 3)


# ----------------------------------------------------------------------------------------------------------- describe


def test_describe_paper_shapes_match_diffusers_without_allocating():
    lines = []
    c = config_lib.build(2, "animatediff")
    out = describe.describe(c, flops=False, print_fn=lines.append)
    text = "\n".join(lines)
    assert out["backbone"] == SD15_V3_PARAMS
    assert out["added_inputs"] == 2 * 4 * 3 * 3 * 320  # conv_in's two condition latents (4 channels each)
    assert out["added_ttm"] > 0 and "added TTM layers (6 spatial transformers)" in text
    assert out["trainable"] == SD15_V3_PARAMS + out["added_inputs"] + out["added_ttm"]
    assert out["params"] == out["trainable"] + out["frozen"]
    assert 120_000_000 < out["text_encoder"] < 125_000_000  # CLIP ViT-L/14's text tower (123M)
    assert 83_000_000 < out["autoencoder"] < 84_000_000  # SD 1.5's VAE (83.7M)
    assert f"trainable: {out['trainable']}" in text and "unet/down_blocks_0/attentions (TTM layers)" in text
    # stage 1: no added layers
    one = describe.describe(config_lib.build(1, "animatediff"), flops=False, print_fn=lambda _: None)
    assert one["backbone"] == SD15_V3_PARAMS and one["added_ttm"] == 0


@pytest.mark.slow  # 10 s (compiles the tiny U-Net's train step for its FLOPs); the paper-shape counts stay in the suite
def test_describe_tiny_unet_counts_and_flops():
    c = config_lib.build(2, "tiny_unet")
    out = describe.describe(c, print_fn=lambda _: None)
    model = registry.build_backbone(c)
    args, kw = registry.init_inputs(c)
    params = jax.eval_shape(model.init, jax.random.key(0), *args, **kw)["params"]
    assert out["trainable"] == sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
    assert out["flops"] > 0
    c.train.batch_size *= 2
    assert describe.train_step_flops(c) == pytest.approx(2 * out["flops"], rel=1e-3)


@pytest.mark.slow
def test_describe_paper_shapes_flops():
    c = config_lib.build(2, "animatediff")
    c.train.batch_size = 1
    f = describe.train_step_flops(c)
    assert f > 1e12


# -------------------------------------------------------------------------------------------------------- CLIP padding


def test_encode_text_keeps_padding_for_clip_and_zeroes_it_for_t5():
    assert registry.TEXT_ENCODERS.get("clip").zero_padding is False
    assert registry.TEXT_ENCODERS.get("t5").zero_padding and registry.TEXT_ENCODERS.get("umt5").zero_padding
    c = config_lib.build(2, "tiny")
    mods = modules_lib.build_modules(c)
    assert mods.text_zero_padding
    ids, mask = mods.tokenizer.encode(["a red ball"], int(c.text_encoder.max_length))
    params = mods.text_encoder.init(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))["params"]
    raw = np.asarray(mods.text_encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    zeroed = np.asarray(inputs_lib.encode_text(mods, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert not mask.all() and np.abs(raw[~mask]).max() > 0
    np.testing.assert_array_equal(zeroed[~mask], 0)
    np.testing.assert_array_equal(zeroed[mask], raw[mask])
    # the same encoder under the `clip` entry's flag: the padding positions pass as the encoder returns them
    kept = np.asarray(inputs_lib.encode_text(modules_lib.Modules(mods.model, mods.text_encoder, mods.autoencoder,
                                                                 mods.tokenizer, text_zero_padding=False),
                                             params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(kept, raw)


# ------------------------------------------------------------------------------------------------------------ convert


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    """SD 1.5's layout in small: a `unet/` folder (UNet2DConditionModel) and a V3-like MotionAdapter folder (no
    motion mid block), random values on every parameter; and the `UNetMotionModel` diffusers makes of them."""
    from test_unet import save_sd15_folders

    root = tmp_path_factory.mktemp("sd")
    merged = save_sd15_folders(root, seed=0)
    return root, {k: v.clone() for k, v in merged.state_dict().items()}


def _convert(*args: str) -> None:
    convert_main.convert(list(args))


def test_convert_cli_round_trip_is_bit_identical(sd_folders, tmp_path):
    root, want = sd_folders
    src = f"diffusers-unet:{root / 'unet'},motion_adapter:{root / 'adapter'}"
    _convert(f"--from={src}", f"--to=orbax:{tmp_path / 'orbax'}")
    meta = json.loads((tmp_path / "orbax" / "ttm_convert.json").read_text())
    assert meta["backbone"] == "unet" and meta["in_channels"] == 4 and meta["model"]["ttm_layers"] == 0
    _convert(f"--from=orbax:{tmp_path / 'orbax'}", f"--to=torch:{tmp_path / 'torch'}")
    # the folder diffusers loads: every tensor (frame-embedding buffers included) bit-identical to the source's
    got = load_file(str(tmp_path / "torch" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    model = UNetMotionModel.from_pretrained(str(tmp_path / "torch"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert not (tmp_path / "torch" / ttm_export.TTM_WEIGHTS_FILE).exists()
    # and back: the plain UNetMotionModel folder reads as the same Orbax params
    _convert(f"--from=torch:{tmp_path / 'torch'}", f"--to=orbax:{tmp_path / 'again'}")
    cfg, cin, cout = export.converted_dims(str(tmp_path / "again" / "params"))
    a = export.load_orbax_params(str(tmp_path / "orbax" / "params"), cfg, cin, cout)
    b = export.load_orbax_params(str(tmp_path / "again" / "params"), cfg, cin, cout)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # ~40 s; the backbone round trip stays in the suite
def test_convert_cli_stage2_init_and_its_export(sd_folders, tmp_path):
    root, want = sd_folders
    src = f"diffusers-unet:{root / 'unet'},motion_adapter:{root / 'adapter'}"
    _convert(f"--from={src}", f"--to=orbax:{tmp_path / 's2'}", "--stage=2")
    path = str(tmp_path / "s2" / "params")
    cfg, cin, cout = export.converted_dims(path)
    assert (cin, cout, cfg.ttm_layers) == (12, 4, 1)  # 3 x 4 latent channels; every encoder spatial transformer
    params = rb.flatten(export.load_orbax_params(path, cfg, cin, cout))
    conv_in = np.asarray(params["conv_in/kernel"])
    assert np.all(conv_in[:, :, 4:] == 0)  # the conditions' channels start at zero
    ttm_out = [k for k in params if "masked_" in k and k.endswith("to_out/kernel")]
    assert len(ttm_out) == 2 and all(np.all(np.asarray(params[k]) == 0) for k in ttm_out)
    # export: the backbone loads in diffusers with the stage's 12 input channels; TTM's layers beside it
    out = tmp_path / "s2_torch"
    _convert(f"--from=orbax:{tmp_path / 's2'}", f"--to=torch:{out}")
    model = UNetMotionModel.from_pretrained(str(out))
    sd = model.state_dict()
    assert sd["conv_in.weight"].shape == (32, 12, 3, 3)
    assert torch.equal(sd["conv_in.weight"][:, :4], want["conv_in.weight"])
    for k, v in want.items():
        if k != "conv_in.weight":
            assert torch.equal(sd[k], v), k
    ttm = load_file(str(out / ttm_export.TTM_WEIGHTS_FILE))
    assert "down_blocks.0.attentions.0.transformer_blocks.0.masked_self_attn.attn.to_out.0.weight" in ttm
    meta = json.loads((out / ttm_export.TTM_CONFIG_FILE).read_text())
    assert meta["backbone"] == "unet" and meta["ttm_layers"] == 1 and meta["in_channels"] == 12
    # torch -> orbax: the same stage params, bit for bit
    _convert(f"--from=torch:{out}", f"--to=orbax:{tmp_path / 'back'}")
    back = dit_convert.read_converted_meta(str(tmp_path / "back" / "params"))
    assert back["backbone"] == "unet"
    again = rb.flatten(export.load_orbax_params(str(tmp_path / "back" / "params"), cfg, cin, cout))
    assert set(again) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(v), err_msg=k)


def test_convert_cli_names_bad_specs(sd_folders, tmp_path):
    root, _ = sd_folders
    with pytest.raises(cli.BadInput, match="PATH,motion_adapter:PATH"):
        _convert(f"--from=diffusers-unet:{root / 'unet'},adapter:{root / 'adapter'}", f"--to=orbax:{tmp_path}/x")
    with pytest.raises(cli.BadInput, match=r"config\.model\.backbone='dit'"):
        _convert(f"--from=diffusers-unet:{root / 'unet'},motion_adapter:{root / 'adapter'}",
                 f"--to=orbax:{tmp_path}/y", "--stage=2", f"--config={os.path.join(ROOT, 'configs', 'stage2.py')}:tiny")
