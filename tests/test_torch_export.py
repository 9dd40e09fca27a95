"""Export of trained TTM stage models to PyTorch (`ttm_jax/convert/export.py`, `ttm_jax/torch/`) and back.

A stage-2 DiT with non-zero random TTM layers and 3 * latent input channels is saved as a training workdir (the training
`Checkpointer`, TrainState with AdamW moments and EMA), exported with `convert.convert`, run in PyTorch through
`TTMWanTransformer3DModel` against the JAX forward (two objects + background, padded local prompts, an object without
a prompt), imported back bit for bit; a backbone-only export is loaded by diffusers' own `WanTransformer3DModel`.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import export as wan_export
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.convert import __main__ as convert_cli
from ttm_jax.convert import export
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.torch import TTM_CONFIG_FILE, TTM_WEIGHTS_FILE, TTMWanTransformer3DModel, is_ttm_key
from ttm_jax.train import state as state_lib
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io, ttm_export

# odd sizes: head_dim 18 (RoPE split 6/6/6), 3 blocks of which 2 carry TTM layers, latent 5 -> 15 input channels
MODEL = dict(dim=36, num_layers=3, num_heads=2, ffn_dim=40, text_dim=20, freq_dim=16, ttm_layers=2,
             patch_size=(1, 2, 2), rope_max_seq_len=32)
LATENT_CHANNELS = 5
B, T, H, W = 2, 3, 4, 6  # latent grid -> 3 x 2 x 3 = 18 tokens
N = 18
SLOTS, LP = 3, 4  # local prompts: slot 0 caption, slots 1, 2 objects, 4 tokens each (padded)
TOL = 1e-5


def _random_params(cfg: dit_lib.DiTConfig, cin: int, cout: int, seed: int) -> dict:
    """Random values in every leaf of the DiT's tree (shapes from `jax.eval_shape`, no init compile): norm scales
    around 1, other leaves ~ 1/sqrt(fan-in), so zero-initialised TTM outputs, biases and norms all carry values."""
    rng = np.random.default_rng(seed)
    flat = rb.flatten(dit_convert.template(cfg, cin, cout))

    def draw(path: str, s: jax.ShapeDtypeStruct) -> np.ndarray:
        x = rng.standard_normal(s.shape).astype(np.float32)
        if path.endswith("scale"):
            return 1.0 + 0.1 * x
        return x / np.sqrt(s.shape[-2]) if len(s.shape) >= 2 else 0.1 * x

    return rb.unflatten({p: draw(p, s).astype(np.float32) for p, s in flat.items()})


def _backbone_of(params: dict, ttm_layers: int, in_channels: int) -> dict:
    """A stage model's params -> a plain (ttm_layers=0, unscanned) backbone with the first `in_channels` inputs."""
    flat = rb.flatten(jax.tree.map(np.asarray, dit_lib.unscan_layout(params, ttm_layers=ttm_layers)))
    flat = {p: v for p, v in flat.items() if not ttm_export.is_ttm_path(p)}
    flat["patch_embedding/kernel"] = np.ascontiguousarray(flat["patch_embedding/kernel"][..., :in_channels, :])
    return rb.unflatten(flat)


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # token ids: background 0 and objects 1, 2 as blobs on the (3, 2, 3) token grid; cross ids from "boxes" (larger)
    grid = np.zeros((B, 3, 2, 3), np.int32)
    grid[0, :, 0, :2] = 1
    grid[0, 1:, 1, 2] = 2
    grid[1, :2, :, 1:] = 2
    grid[1, 2, 0, 0] = 1
    boxes = grid.copy()
    boxes[0, :, :, 1] = np.where(boxes[0, :, :, 1] == 0, 1, boxes[0, :, :, 1])
    boxes[1, :, 1, 0] = 1
    local_ids = np.full((B, SLOTS, LP), -1, np.int32)
    local_ids[0, 0, :3], local_ids[0, 1, :2], local_ids[0, 2, :1] = 0, 1, 2
    local_ids[1, 0, :4], local_ids[1, 2, :3] = 0, 2  # example 1: object 1 has no prompt -> its tokens read slot 0
    return dict(x=rng.standard_normal((B, T, H, W, 3 * LATENT_CHANNELS)).astype(np.float32),
                timestep=np.array([17.0, 803.0], np.float32),
                context=rng.standard_normal((B, 7, MODEL["text_dim"])).astype(np.float32),
                local_context=rng.standard_normal((B, SLOTS * LP, MODEL["text_dim"])).astype(np.float32),
                token_ids=grid.reshape(B, N), cross_token_ids=boxes.reshape(B, N),
                local_ids=local_ids.reshape(B, SLOTS * LP))


def _torch_forward(model: torch.nn.Module, inp: dict[str, np.ndarray], ttm: bool = True) -> np.ndarray:
    """Same inputs in torch layout; returns channels-last `[B, T', H', W', C]`."""
    x = torch.from_numpy(inp["x"]).permute(0, 4, 1, 2, 3)
    args = [x, torch.from_numpy(inp["timestep"]), torch.from_numpy(inp["context"])]
    if ttm:
        args += [torch.from_numpy(inp["local_context"])] + [torch.from_numpy(inp[k]).long() for k in
                                                             ("token_ids", "cross_token_ids", "local_ids")]
    with torch.no_grad():
        out = model(*args, return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def _diffusers_load(folder: str) -> WanTransformer3DModel:
    """diffusers' `WanTransformer3DModel.from_pretrained`, asserting every tensor was in the folder. diffusers 0.42
    needs `accelerate` for this class's from_pretrained; without it, the same check from the folder's config.json and
    a strict load of its safetensors."""
    if importlib.util.find_spec("accelerate") is not None:
        model, info = WanTransformer3DModel.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        return model.eval()
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    model.load_state_dict(load_file(os.path.join(folder, dit_convert.WEIGHTS_FILE)), strict=True)
    return model.eval()


def _equal_trees(a: dict, b: dict) -> None:
    fa, fb = rb.flatten(a), rb.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> dict:
    """A stage-2 training workdir (EMA + raw params differ) exported with convert.convert; the JAX forward, jitted
    once."""
    root = tmp_path_factory.mktemp("stage2")
    config = config_lib.build(2, "tiny")
    for k, v in MODEL.items():
        config.model[k] = v
    config.autoencoder.latent_channels = LATENT_CHANNELS
    config.optim.ema_decay = 0.5
    config.model.condition_frames = "all"  # not the stage-2 default: the export must read it from the run
    cfg = dit_lib.DiTConfig.from_config(config.model)
    cin = config_lib.in_channels(config)
    ema_params = _random_params(cfg, cin, LATENT_CHANNELS, 0)
    raw_params = jax.tree.map(lambda x: x + 1.0, ema_params)
    state = state_lib.create(raw_params, state_lib.make_optimizer(config.optim, config.train.total_steps), 0.5)
    state = state.replace(ema_params=ema_params, step=np.int32(7))
    ckpt = checkpoint_lib.Checkpointer(str(root / "workdir"), async_save=False)
    ckpt.save(7, state, None, config)
    ckpt.close()

    out = str(root / "torch")
    paths = convert_cli.convert([f"--from=workdir:{root / 'workdir'}", f"--to=torch:{out}"])
    model = dit_lib.DiT(cfg, cin, LATENT_CHANNELS)
    apply = jax.jit(lambda p, i: model.apply({"params": p}, i["x"], i["timestep"], i["context"],
                                             local_context=i["local_context"], token_ids=i["token_ids"],
                                             cross_token_ids=i["cross_token_ids"], local_ids=i["local_ids"]))
    return dict(root=root, workdir=str(root / "workdir"), out=out, paths=paths, cfg=cfg, cin=cin, ema=ema_params,
                raw=raw_params, apply=apply, torch=TTMWanTransformer3DModel.from_pretrained(out))


def test_export_layout(stage2):
    """The folder holds the backbone in diffusers' layout and the TTM layers apart, with the stage's channels."""
    out = stage2["out"]
    assert sorted(os.listdir(out)) == sorted(["config.json", dit_convert.WEIGHTS_FILE, TTM_WEIGHTS_FILE,
                                              TTM_CONFIG_FILE])
    wan = json.load(open(os.path.join(out, "config.json")))
    ttm = json.load(open(os.path.join(out, TTM_CONFIG_FILE)))
    assert wan["_class_name"] == "WanTransformer3DModel" and wan["in_channels"] == 3 * LATENT_CHANNELS
    assert wan["out_channels"] == LATENT_CHANNELS
    assert (ttm["ttm_layers"], ttm["in_channels"], ttm["latent_channels"], ttm["stage"]) == (
        2, 3 * LATENT_CHANNELS, LATENT_CHANNELS, 2)
    # how the first-frame channels fill the frames: the run's model.condition_frames, kept by the torch model
    assert ttm["condition_frames"] == "all" == stage2["torch"].ttm_config["condition_frames"]
    assert ttm["self_condition"] is False and stage2["torch"].ttm_config["self_condition"] is False
    backbone = safetensors_io.SafetensorsReader(os.path.join(out, dit_convert.WEIGHTS_FILE))
    layers = safetensors_io.SafetensorsReader(os.path.join(out, TTM_WEIGHTS_FILE))
    assert not any(is_ttm_key(k) for k in backbone) and all(is_ttm_key(k) for k in layers)
    assert {k.split(".")[1] for k in layers} == {"0", "1"}  # the first ttm_layers blocks only
    # every key and shape of the torch module, nothing else
    state = {k: tuple(v.shape) for k, v in stage2["torch"].state_dict().items()}
    files = {k: tuple(v.shape) for k, v in {**dict(backbone.items()), **dict(layers.items())}.items()}
    assert files == state


def test_stage2_torch_matches_jax(stage2):
    """Masked layers and object ids included: torch forward == JAX forward to 1e-5, for two id layouts that give
    different outputs (so the ids reach both computations)."""
    inp = _inputs()
    y_jax = np.asarray(stage2["apply"](stage2["ema"], inp))
    y_torch = _torch_forward(stage2["torch"], inp)
    assert np.abs(y_jax - y_torch).max() <= TOL
    other = dict(inp, token_ids=np.zeros_like(inp["token_ids"]), cross_token_ids=inp["token_ids"][::-1].copy())
    y_jax2 = np.asarray(stage2["apply"](stage2["ema"], other))
    assert np.abs(y_jax2 - _torch_forward(stage2["torch"], other)).max() <= TOL
    assert np.abs(y_jax2 - y_jax).max() > 1e-3


def test_roundtrip_bit_identical(stage2):
    """Flax -> torch folder -> Flax: every tensor bit-identical, in the scanned layout and unscanned."""
    cfg, cin, cout, params = export.import_folder(stage2["out"], scan_layers=True)
    assert (cfg.ttm_layers, cin, cout) == (2, 3 * LATENT_CHANNELS, LATENT_CHANNELS)
    _equal_trees(params, stage2["ema"])
    _, _, _, unscanned = export.import_folder(stage2["out"], scan_layers=False)
    _equal_trees(unscanned, jax.tree.map(np.asarray, dit_lib.unscan_layout(stage2["ema"], ttm_layers=2)))


def test_torch_save_pretrained_roundtrip(stage2, tmp_path):
    """TTMWanTransformer3DModel.save_pretrained writes the same folder format: importing it gives the same params."""
    stage2["torch"].save_pretrained(str(tmp_path))
    _, _, _, params = export.import_folder(str(tmp_path))
    _equal_trees(params, stage2["ema"])


def test_raw_params_orbax_sources_and_import_cli(stage2):
    """--params=raw exports the raw (non-EMA) params; an Orbax params checkpoint (as `--from=diffusers: --to=orbax:`
    writes, with ttm_convert.json) exports the same; torch -> orbax writes params that restore bit-identically."""
    root = stage2["root"]
    convert_cli.convert([f"--from=workdir:{stage2['workdir']}@7", f"--to=torch:{root / 'raw'}", "--params=raw"])
    _equal_trees(export.import_folder(str(root / "raw"))[3], stage2["raw"])

    back = root / "orbax" / "params"  # --to=orbax:DIR writes DIR/params
    convert_cli.convert([f"--from=torch:{stage2['out']}", f"--to=orbax:{root / 'orbax'}"])
    cfg, cin, cout = stage2["cfg"], stage2["cin"], LATENT_CHANNELS
    _equal_trees(jax.tree.map(np.asarray, export.load_orbax_params(str(back), cfg, cin, cout)), stage2["ema"])
    convert_cli.convert([f"--from=orbax:{back}", f"--to=torch:{root / 'again'}"])
    _equal_trees(export.import_folder(str(root / "again"))[3], stage2["ema"])


def test_stage_export_backbone_loads_in_diffusers(stage2):
    """diffusers' own class loads the backbone of a stage export (no missing/unexpected key), the same tensors."""
    model = _diffusers_load(stage2["out"])
    ours = stage2["torch"].state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_backbone_export_loads_in_diffusers_and_matches(stage2, tmp_path):
    """ttm_layers=0 with the latent's own channels (unscanned layout): WanTransformer3DModel.from_pretrained loads
    every tensor and matches the JAX forward; the TTM class on the same folder computes the same."""
    cfg = dit_lib.DiTConfig(**{**MODEL, "ttm_layers": 0, "scan_layers": False})
    cin = cout = LATENT_CHANNELS
    params = _backbone_of(stage2["ema"], MODEL["ttm_layers"], cin)
    export.export_params(params, cfg, cin, cout, str(tmp_path))
    assert not os.path.exists(tmp_path / TTM_WEIGHTS_FILE)
    model = _diffusers_load(str(tmp_path))
    inp = _inputs(1)
    inp["x"] = inp["x"][..., :cin]
    y_jax = np.asarray(dit_lib.DiT(cfg, cin, cout).apply({"params": params}, inp["x"], inp["timestep"],
                                                         inp["context"]))
    y_diffusers = _torch_forward(model, inp, ttm=False)
    assert np.abs(y_jax - y_diffusers).max() <= TOL
    ours = TTMWanTransformer3DModel.from_pretrained(str(tmp_path))
    assert np.abs(_torch_forward(ours, inp, ttm=False) - y_diffusers).max() <= 1e-6
    _equal_trees(export.import_folder(str(tmp_path), scan_layers=False)[3], params)


def test_bfloat16_export(stage2, tmp_path):
    """--dtype=bfloat16 writes bfloat16 tensors (both files) that load into torch and import as the rounded params."""
    convert_cli.convert([f"--from=workdir:{stage2['workdir']}", f"--to=torch:{tmp_path}", "--dtype=bfloat16"])
    for name in (dit_convert.WEIGHTS_FILE, TTM_WEIGHTS_FILE):
        specs = safetensors_io.SafetensorsReader(str(tmp_path / name)).specs
        assert {str(d) for _, d in specs.values()} == {"bfloat16"}
    model = TTMWanTransformer3DModel.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    _, _, _, params = export.import_folder(str(tmp_path))
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), stage2["ema"])
    _equal_trees(params, rounded)


def test_rulebook_covers_torch_module_exactly(stage2):
    """The one table maps every Flax param to exactly the torch module's keys and shapes; F's backbone table alone
    leaves the TTM layers unmapped, naming them."""
    flat = rb.flatten(stage2["ema"])
    specs = {k: (tuple(v.shape), None) for k, v in stage2["torch"].state_dict().items()}
    wan_export.rulebook(stage2["cfg"]).plan(flat, specs, "flax -> torch")  # raises on any unmapped/missing/mis-shaped
    with pytest.raises(rb.ConversionError, match="masked_self_attn"):
        dit_convert.rulebook(True).plan(flat, None, "flax -> torch")


def test_errors_name_the_fix(stage2, tmp_path):
    with pytest.raises(cli.BadInput, match="workdir:"):
        convert_cli.convert(["--from=checkpoint:/x", "--to=torch:/y"])
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in os.listdir(stage2["out"]):
        (folder / name).write_bytes((open(os.path.join(stage2["out"], name), "rb")).read())
    meta = json.load(open(folder / TTM_CONFIG_FILE))
    (folder / TTM_CONFIG_FILE).write_text(json.dumps({**meta, "in_channels": 7}))
    with pytest.raises(ValueError, match="ttm_config.json: in_channels=7"):
        export.import_folder(str(folder))
    with pytest.raises(ValueError, match="in_channels=7"):
        TTMWanTransformer3DModel.from_pretrained(str(folder))
    (folder / TTM_CONFIG_FILE).write_text(json.dumps(meta))
    os.remove(folder / TTM_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError, match="ttm_layers.safetensors"):
        export.import_folder(str(folder))


def test_unmasked_ti2v_twin_matches(stage2, tmp_path):
    """ttm_masked=False (the TI2V baseline: same layers, only prompt padding masked) exports and matches. Reference:
    the JAX model with every video id 0 and every real prompt token id 0, which is how `ttm_layers.MaskedCrossAttention`
    defines its unmasked twin (and an all-0 self mask is no mask), so the compiled forward is reused."""
    cfg = dit_lib.DiTConfig(**{**MODEL, "ttm_masked": False})
    cin = 3 * LATENT_CHANNELS
    export.export_params(stage2["ema"], cfg, cin, LATENT_CHANNELS, str(tmp_path))
    inp = _inputs(2)
    zeros = np.zeros_like(inp["token_ids"])
    y_jax = np.asarray(stage2["apply"](stage2["ema"], dict(inp, token_ids=zeros, cross_token_ids=zeros,
                                                           local_ids=np.where(inp["local_ids"] >= 0, 0, -1))))
    model = TTMWanTransformer3DModel.from_pretrained(str(tmp_path))
    assert model.ttm_config["ttm_masked"] is False
    x = torch.from_numpy(inp["x"]).permute(0, 4, 1, 2, 3)
    with torch.no_grad():  # no object ids given: the unmasked model needs none
        y = model(x, torch.from_numpy(inp["timestep"]), torch.from_numpy(inp["context"]),
                  torch.from_numpy(inp["local_context"]), local_ids=torch.from_numpy(inp["local_ids"]).long()).sample
    assert np.abs(y.permute(0, 2, 3, 4, 1).numpy() - y_jax).max() <= TOL
    assert np.abs(y.permute(0, 2, 3, 4, 1).numpy() - np.asarray(stage2["apply"](stage2["ema"], inp))).max() > 1e-3


def test_export_of_a_self_conditioned_run_says_so_and_takes_its_channels(tmp_path):
    """`model.self_condition`: the exported folder reads one more latent of input channels (the previous step's
    estimate after the noisy latent), `ttm_config.json` says so, and the torch model keeps it and loads every weight
    of the wider patch embedding."""
    config = config_lib.build(2, "tiny")
    for k, v in MODEL.items():
        config.model[k] = v
    config.autoencoder.latent_channels = LATENT_CHANNELS
    config.model.self_condition = True
    cfg = dit_lib.DiTConfig.from_config(config.model)
    cin = config_lib.in_channels(config)
    assert cin == 4 * LATENT_CHANNELS
    params = _random_params(cfg, cin, LATENT_CHANNELS, 3)
    tx = state_lib.make_optimizer(config.optim, config.train.total_steps)
    state = state_lib.create(params, tx, 0.0).replace(step=np.int32(1))
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "workdir"), async_save=False)
    ckpt.save(1, state, None, config)
    ckpt.close()
    out = str(tmp_path / "torch")
    convert_cli.convert([f"--from=workdir:{tmp_path / 'workdir'}", f"--to=torch:{out}"])
    ttm = json.load(open(os.path.join(out, TTM_CONFIG_FILE)))
    assert ttm["self_condition"] is True and ttm["in_channels"] == cin and ttm["stage"] == 2
    model = TTMWanTransformer3DModel.from_pretrained(out)
    assert model.ttm_config["self_condition"] is True
    kernel = np.asarray(params["patch_embedding"]["kernel"])  # [pt, ph, pw, C, D] -> torch [D, C, pt, ph, pw]
    np.testing.assert_array_equal(model.patch_embedding.weight.detach().numpy(), kernel.transpose(4, 3, 0, 1, 2))
