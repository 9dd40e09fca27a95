"""`--mode=describe`: parameter counts by `jax.eval_shape` (nothing allocated) and FLOPs per step."""

import os
import re
import subprocess
import sys

import pytest

from ttm_jax import config as config_lib
from ttm_jax import describe

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
