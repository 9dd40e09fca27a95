"""The single-stage TI2V baseline (stage 0, `configs/ti2v.py`) trains, checkpoints, samples with one workdir and no
stage 1, and exports to PyTorch like the stages do."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
import train_fixtures as fx
from PIL import Image

from ttm_jax import config as config_lib
from ttm_jax.assembly import trained
from ttm_jax.convert import __main__ as convert_cli
from ttm_jax.data import synthetic, video_io
from ttm_jax.inference import run
from ttm_jax.torch import TTMWanTransformer3DModel
from ttm_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ti2v_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    c = fx.tiny_config(0, **{"model.ttm_layers": 1, "train.total_steps": 2, "train.checkpoint_every_steps": 2})
    res = loop.train(c, str(root / "run"), modules=fx.make_modules(c, real_model=True),
                     make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    return root, c, res


def test_ti2v_trains_without_a_trajectory_input(ti2v_run):
    root, c, res = ti2v_run
    assert res.final_step == 2 and all(np.isfinite(m["loss"]) for _, m in res.history)
    kernel = res.state.params["patch_embedding"]["kernel"]
    assert kernel.shape[3] == 2 * c.autoencoder.latent_channels  # noisy latent + first frame, no trajectory
    assert "masked_self_attn" in res.state.params["ttm_blocks"]  # stage 2's added layers, unmasked


def _sample_config(**fields):
    spec = importlib.util.spec_from_file_location("sample_config", os.path.join(REPO, "configs", "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.sample.update(fields)
    return config


def test_ti2v_samples_with_one_workdir(ti2v_run):
    root, c, _ = ti2v_run
    d = c.data
    video = next(v for v in (synthetic.make_video(3, i, height=d.height, width=d.width, frames=d.num_frames)
                             for i in range(50)) if len(v.scene.objects) == 2)
    inputs = root / "inputs"
    inputs.mkdir()
    Image.fromarray(video.frames[0]).save(inputs / "frame.png")
    masks = []
    for k, obj in enumerate(video.scene.objects):
        path = inputs / f"{obj.colour}_{obj.shape}.png"
        Image.fromarray(video.masks[0, ..., k].astype(np.uint8) * 255).save(path)
        masks.append(str(path))
    config = _sample_config(stage2_workdir=str(root / "run"), image=str(inputs / "frame.png"), masks=",".join(masks),
                            caption=video.caption_entry["caption"], num_steps=2, name="ti2v")
    run.validate(config)  # no stage1_workdir needed
    records = run.sample(config, str(root / "out"))
    assert [r["status"] for r in records] == ["done"]
    rec = json.load(open(root / "out" / "ti2v.json"))
    assert rec["stage1"] is None and rec["stage2"]["workdir"] == str(root / "run")
    assert video_io.read_frames(rec["video"]).shape == (d.num_frames, d.height, d.width, 3)
    # input | video: no trajectory panel
    assert video_io.read_frames(rec["side_by_side"]).shape == (d.num_frames, d.height, 2 * d.width, 3)
    # a stage-2 model in stage 2's place still needs stage 1
    with pytest.raises(ValueError, match="stage-0 model|TI2V"):
        trained.load_stage(str(root / "run"), 2)


def test_ti2v_exports_to_pytorch(ti2v_run, tmp_path):
    root, c, res = ti2v_run
    out = tmp_path / "torch"
    convert_cli.convert([f"--from=workdir:{root / 'run'}", f"--to=torch:{out}"])
    model = TTMWanTransformer3DModel.from_pretrained(str(out))
    assert model.config.in_channels == config_lib.in_channels(c) == 2 * c.autoencoder.latent_channels
    assert model.ttm_config["ttm_masked"] is False and model.ttm_config["stage"] == 0
    assert isinstance(model, torch.nn.Module)
