"""The DiT's generic building blocks (`ttm_jax/models/layers.py`) against diffusers and torch: 3D RoPE tables, the
timestep embedding, RMSNorm and LayerNorm. TTM's added layers: tests/test_ttm_layers.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from ttm_jax.models import layers


@pytest.mark.parametrize("head_dim,grid", [(18, (3, 3, 5)), (128, (21, 30, 52))])
def test_rope_tables_match_diffusers(head_dim, grid):
    rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)
    f, h, w = grid
    cos_ref, sin_ref = rope(torch.zeros(1, 1, f, 2 * h, 2 * w))
    cos, sin = layers.rope_3d(head_dim, grid, 1024)
    np.testing.assert_array_equal(np.asarray(cos), cos_ref[0, :, 0].numpy())
    np.testing.assert_array_equal(np.asarray(sin), sin_ref[0, :, 0].numpy())


def test_rope_is_relative_and_norm_preserving():
    """<R(p) q, R(p') k> depends only on p - p' (per axis), and rotation keeps norms."""
    hd, grid = 18, (4, 4, 4)
    cos, sin = layers.rope_3d(hd, grid)
    key = jax.random.split(jax.random.key(0))
    q = jnp.broadcast_to(jax.random.normal(key[0], (hd,)), (1, 64, 1, hd))
    k = jnp.broadcast_to(jax.random.normal(key[1], (hd,)), (1, 64, 1, hd))
    rq, rk = layers.apply_rope(q, cos, sin)[0, :, 0], layers.apply_rope(k, cos, sin)[0, :, 0]
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q[0, :, 0], axis=-1), rtol=1e-5)
    idx = lambda t, h, w: (t * 4 + h) * 4 + w
    d1 = jnp.dot(rq[idx(2, 1, 3)], rk[idx(1, 0, 1)])
    d2 = jnp.dot(rq[idx(3, 3, 2)], rk[idx(2, 2, 0)])  # same offset (1, 1, 2)
    d3 = jnp.dot(rq[idx(3, 3, 3)], rk[idx(2, 2, 0)])  # another offset
    np.testing.assert_allclose(d1, d2, rtol=1e-5)
    assert abs(float(d1 - d3)) > 1e-3


def test_rope_grid_beyond_max_seq_len_names_the_field():
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        layers.rope_3d(18, (3, 70, 5), max_seq_len=64)


def test_timestep_embedding_matches_diffusers():
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 32, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
    np.testing.assert_allclose(np.asarray(layers.timestep_embedding(jnp.asarray(t), 32)), ref, atol=2e-6, rtol=0)


def test_norms_match_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32) * 3 + 1
    rms = layers.RMSNorm(1e-6)
    p = rms.init(jax.random.key(0), x)
    scale = np.random.default_rng(1).standard_normal(24).astype(np.float32)
    ref = torch.nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        want = ref(torch.from_numpy(x)).numpy()
    got = rms.apply({"params": {"scale": jnp.asarray(scale)}}, x)
    assert nn.unbox(p)["params"]["scale"].shape == (24,)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    ln = layers.LayerNorm(1e-6, affine=True)
    bias = np.random.default_rng(2).standard_normal(24).astype(np.float32)
    got = ln.apply({"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}, x)
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (24,), torch.from_numpy(scale),
                                          torch.from_numpy(bias), 1e-6).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
