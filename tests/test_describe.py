"""`--mode=describe`: parameter counts by `jax.eval_shape` (nothing allocated), FLOPs per step, and the memory per
device planned for a mesh without its devices (`describe.memory_plan`)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from ttm_jax import config as config_lib
from ttm_jax import describe
from ttm_jax.assembly import registry
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# diffusers' WanTransformer3DModel at the Wan2.1-T2V-1.3B shapes: sum(p.numel() for p in model.parameters()),
# measured with diffusers 0.42.1 (the DiT parity test checks our layout against diffusers itself).
WAN13B_BACKBONE = 1_418_996_800


def test_wan13b_counts_without_allocating():
    lines = []
    out = describe.describe(config_lib.build(2, "wan1.3b"), flops=False, print_fn=lines.append)
    assert out["backbone"] == WAN13B_BACKBONE
    text = "\n".join(lines)
    params = int(re.search(r"^params: (\d+)$", text, re.M).group(1))
    trainable = int(re.search(r"^trainable: (\d+)$", text, re.M).group(1))
    assert params == out["params"] and trainable == out["trainable"]
    # trainable = backbone + the two extra condition inputs of the patch embedding + the added TTM layers
    cfg = config_lib.build(2, "wan1.3b")
    dim, pt, ph, pw = 1536, *cfg.model.patch_size
    extra_inputs = 2 * 16 * pt * ph * pw * dim
    added = trainable - WAN13B_BACKBONE - extra_inputs
    assert added > 0 and added % cfg.model.ttm_layers == 0  # the same added layers in each of the first K blocks
    # frozen parts are counted in params, not in trainable
    assert params == trainable + out["text_encoder"] + out["autoencoder"]
    assert out["text_encoder"] > 5_000_000_000  # umT5-XXL encoder


def test_flops_scale_with_batch():
    c = config_lib.build(2, "tiny")
    f1 = describe.train_step_flops(c)
    c.train.batch_size *= 2
    f2 = describe.train_step_flops(c)
    assert f1 > 0
    assert f2 == pytest.approx(2 * f1, rel=1e-3)


def test_describe_cli_stage1():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ttm_jax.main", "--config=configs/stage1.py", "--mode=describe"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^params: \d+$", r.stdout, re.M)
    assert re.search(r"^flops per train step .*: [0-9.e+]+$", r.stdout, re.M)
    assert "added TTM layers (1 blocks)" in r.stdout  # the tiny stage 1's: local prompts at the objects' starts


def _tiny_on(fsdp: int, context: int = 1):
    c = config_lib.build(2, "tiny")
    c.mesh.shape.update(data=1, fsdp=fsdp, tensor=1)
    c.mesh.context = context
    return config_lib.validate(c)


def test_memory_plan_params_equal_the_real_shards_on_4_devices():
    """The planned parameter bytes per device (shardings on an AbstractMesh, no devices) equal the bytes each of 4
    simulated devices holds when the tiny stage-2 backbone is initialised with the real sharding (fsdp=4), and are
    below the unsharded size (sharding really happened); gradients and AdamW's two moments follow the parameters."""
    c = _tiny_on(4)
    plan = describe.memory_plan(c)
    assert plan.devices == 4 and plan.mesh == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:4])
    model = registry.build_backbone(c)
    args, kwargs = registry.init_inputs(c)
    params, _ = sharding_lib.init_sharded(lambda r: model.init(r, *args, **kwargs)["params"], jax.random.key(0),
                                          mesh=mesh, rules=sharding_lib.rules_from_config(c.mesh))
    held = {d: 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    whole = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert set(held.values()) == {plan.row("parameters")}
    assert plan.row("parameters") < whole / 2
    assert plan.row("gradients") == plan.row("parameters")
    assert plan.row("optimizer state") == 2 * plan.row("parameters")
    assert plan.row("EMA") == 0


def test_memory_plan_context_divides_activations_and_ema_counts():
    one, two = (describe.memory_plan(_tiny_on(4, context)) for context in (1, 2))
    assert two.devices == 8 and two.tokens_per_device * 2 == one.tokens_per_device
    assert two.row("activations") * 2 == one.row("activations") > 0
    # the rules shard parameters over fsdp x context: fsdp 4 x context 2 holds what fsdp 8 holds, less than fsdp 4
    assert two.row("parameters") == describe.memory_plan(_tiny_on(8)).row("parameters") < one.row("parameters")
    c = _tiny_on(4)
    c.optim.ema_decay = 0.999
    assert describe.memory_plan(c).row("EMA") == one.row("parameters")
    # tokens per device: ceil(batch / (data x fsdp)) x N / context; the tiny stage 2: 9 frames of 32x32 pixels ->
    # a per-frame latent 9 x 16 x 16, in 2x2 patches 9 x 8 x 8 = 576 tokens; batch 4 over fsdp 4
    assert one.batch_per_device == 1 and one.tokens_per_device == describe.video_tokens(c) == 576


def test_describe_prints_the_memory_table_for_a_mesh_without_its_devices():
    """wan14b at 720x1280x81 on 64 devices (fsdp 16 x context 4; more than this host has): the markdown table with
    every row, the activations labelled an estimate."""
    c = config_lib.build(2, "wan14b")
    c.mesh.shape.update(data=1, fsdp=16, tensor=1)
    c.mesh.context = 4
    c.model.remat_policy, c.model.dtype = "full", "bfloat16"
    lines = []
    out = describe.describe(config_lib.validate(c), flops=False, print_fn=lines.append, devices=64)
    text = "\n".join(lines)
    assert "Memory per device, 64 devices (mesh data 1 x fsdp 16 x context 4 x tensor 1); 81x720x1280" in text
    assert "75,600 video tokens per example, 37,800 per device" in text  # 2 examples per fsdp shard, / 4
    for row in ("| parameters (float32) |", "| gradients (float32) |", "| optimizer state (AdamW mu, nu) |",
                "| activations (estimate) |", "| **total** |"):
        assert row in text
    assert "ESTIMATE" in text and out["memory_per_device"] > 0
