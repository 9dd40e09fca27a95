"""TTM's added layers (`ttm_jax/models/ttm_layers.py`); the generic building blocks: tests/test_layers.py.

Isolation is shown with exact Jacobians on a tiny layer whose output projection is made non-zero: two objects (A=1,
B=2) and background (0) on a 2 x 2 x 3 token grid, local prompts in slots 0 (caption), 1 (A), 2 (B) with padding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.models import layers, ttm_layers

# LLVM -O0: compiles several times faster on CPU; these tests are about values, not speed
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

DIM, HEADS = 12, 2  # head_dim 6: RoPE split 2/2/2
GRID = (2, 2, 3)
N = 12
# per-token object ids, (t, h, w) order: A and B move, B absent from frame 1
TOKEN_IDS = np.array([[1, 1, 0, 2, 2, 0,
                       0, 1, 1, 0, 0, 0]], np.int32)
LP = 4
# slot 0 caption (3 real tokens), slot 1 A (2 real), slot 2 B (4 real); -1 padding
LOCAL_IDS = np.array([[0, 0, 0, -1, 1, 1, -1, -1, 2, 2, 2, 2]], np.int32)
A, B, BG = (TOKEN_IDS[0] == 1), (TOKEN_IDS[0] == 2), (TOKEN_IDS[0] == 0)


def _randomize_out(params, seed):
    """Makes the zero-initialised `attn/to_out` non-zero, so the layer's mixing is visible."""
    p = jax.tree.map(lambda x: x, nn.unbox(params))
    rng = np.random.default_rng(seed)
    for name in ("kernel", "bias"):
        p["attn"]["to_out"][name] = jnp.asarray(rng.standard_normal(p["attn"]["to_out"][name].shape), jnp.float32)
    return p


def _influence(fn, arg: jax.Array) -> np.ndarray:
    """`[Nq, Nk]` max over channels of |d fn(arg)_i / d arg_j|, from the exact (jitted) Jacobian."""
    jac = _jit(jax.jacrev(fn))(arg)  # [1, Nq, D, 1, Nk, Dk]
    return np.asarray(jnp.max(jnp.abs(jac[0, :, :, 0]), axis=(1, 3)))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, N, DIM)), jnp.float32)
    local = jnp.asarray(rng.standard_normal((1, LOCAL_IDS.shape[1], DIM)), jnp.float32)
    rope = layers.rope_3d(DIM // HEADS, GRID)
    return x, local, rope


@pytest.fixture(scope="module")
def self_layer(inputs):
    x, _, rope = inputs
    masked = ttm_layers.MaskedSelfAttention(DIM, HEADS, masked=True)
    twin = ttm_layers.MaskedSelfAttention(DIM, HEADS, masked=False)
    params = _jit(lambda x, rope: masked.init(jax.random.key(1), x, rope, jnp.asarray(TOKEN_IDS)))(x, rope)["params"]
    return masked, twin, _randomize_out(params, 2)


@pytest.fixture(scope="module")
def cross_layer(inputs):
    x, local, _ = inputs
    masked = ttm_layers.MaskedCrossAttention(DIM, HEADS, masked=True)
    twin = ttm_layers.MaskedCrossAttention(DIM, HEADS, masked=False)
    params = _jit(lambda x, local: masked.init(jax.random.key(3), x, local, jnp.asarray(TOKEN_IDS),
                                                  jnp.asarray(LOCAL_IDS)))(x, local)["params"]
    return masked, twin, _randomize_out(params, 4)


def test_masked_self_attention_isolates_objects(inputs, self_layer):
    x, _, rope = inputs
    masked, twin, params = self_layer
    ids = jnp.asarray(TOKEN_IDS)
    jac_m = _influence(lambda x: masked.apply({"params": params}, x, rope, ids), x)
    jac_u = _influence(lambda x: twin.apply({"params": params}, x, rope, ids), x)
    same = TOKEN_IDS[0][:, None] == TOKEN_IDS[0][None, :]
    # exactly zero across objects (A <- B, A <- background, background <- A, ...), non-zero within one
    assert np.all(jac_m[~same] == 0.0)
    assert np.all(jac_m[same] > 1e-4)
    # the unmasked twin (same weights) mixes every pair: the zeros above come from the mask
    assert np.all(jac_u > 1e-4)
    for obj in (A, B, BG):
        assert np.all(jac_m[np.ix_(obj, ~obj)] == 0.0)


def test_masked_cross_attention_isolates_prompts(inputs, cross_layer):
    x, local, _ = inputs
    masked, twin, params = cross_layer
    ids, lids = jnp.asarray(TOKEN_IDS), jnp.asarray(LOCAL_IDS)
    fn_m = lambda local: masked.apply({"params": params}, x, local, ids, lids)
    fn_u = lambda local: twin.apply({"params": params}, x, local, ids, lids)
    jac_m = _influence(fn_m, local)  # [N, S*Lp]
    jac_u = _influence(fn_u, local)
    allowed = (TOKEN_IDS[0][:, None] == LOCAL_IDS[0][None, :]) & (LOCAL_IDS[0][None, :] >= 0)
    assert np.all(jac_m[~allowed] == 0.0)
    assert np.all(jac_m[allowed] > 1e-4)
    real = LOCAL_IDS[0] >= 0
    assert np.all(jac_u[:, real] > 1e-4)  # the twin reads every real prompt token ...
    assert np.all(jac_u[:, ~real] == 0.0)  # ... and never padding

    # A finite change of B's prompt embeddings leaves A's and background tokens bit-identical, moves B's.
    slot_b = LOCAL_IDS[0] == 2
    bumped = local.at[:, slot_b].add(jax.random.normal(jax.random.key(5), (1, int(slot_b.sum()), DIM)))
    before, after = np.asarray(fn_m(local)), np.asarray(fn_m(bumped))
    np.testing.assert_array_equal(after[0, A | BG], before[0, A | BG])
    assert np.abs(after[0, B] - before[0, B]).min() > 0 or np.abs(after[0, B] - before[0, B]).max() > 1e-3


def test_cross_query_without_prompt_reads_caption(inputs, cross_layer):
    """Object 3 has tokens but no prompt (and object 1's tokens all padding): such queries attend slot 0 only."""
    x, local, _ = inputs
    masked, _, params = cross_layer
    ids = jnp.asarray(np.where(TOKEN_IDS == 2, 3, TOKEN_IDS))  # B's tokens now belong to a prompt-less object 3
    lids = jnp.asarray(np.where(LOCAL_IDS == 1, -1, LOCAL_IDS))  # A's prompt is all padding
    jac = _influence(lambda local: masked.apply({"params": params}, x, local, ids, lids), local)
    caption = np.asarray(lids[0] == 0)
    orphans = np.asarray(ids[0] == 3) | A
    assert np.all(jac[np.ix_(orphans, caption)] > 1e-4)
    assert np.all(jac[np.ix_(orphans, ~caption)] == 0.0)
    assert np.all(np.isfinite(jac))


def test_single_object_equals_unmasked_twin(inputs, self_layer, cross_layer):
    """All tokens one object and its local prompt equal to the caption: masked == unmasked for both layers."""
    x, local, rope = inputs
    ones = jnp.ones((1, N), jnp.int32)
    m_self, u_self, p_self = self_layer
    np.testing.assert_allclose(m_self.apply({"params": p_self}, x, rope, ones),
                               u_self.apply({"params": p_self}, x, rope, ones), atol=1e-6, rtol=0)
    m_cross, u_cross, p_cross = cross_layer
    caption = local[:, :LP]
    caption_mask = np.array([1, 1, 1, 0], bool)
    local2 = jnp.concatenate([caption, caption], axis=1)  # slot 0 = caption, slot 1 = the object's prompt = caption
    lids = jnp.asarray(np.concatenate([np.where(caption_mask, 0, -1), np.where(caption_mask, 1, -1)])[None])
    out_m = m_cross.apply({"params": p_cross}, x, local2, ones, lids)
    out_u = u_cross.apply({"params": p_cross}, x, local2, ones, lids)
    np.testing.assert_allclose(out_m, out_u, atol=1e-6, rtol=0)
    # and the layer does something: it differs from its input
    assert np.abs(np.asarray(out_m - x)).max() > 1e-2


def test_fresh_added_layers_are_identity(inputs):
    x, local, rope = inputs
    ids, lids = jnp.asarray(TOKEN_IDS), jnp.asarray(LOCAL_IDS)
    s = ttm_layers.MaskedSelfAttention(DIM, HEADS)
    c = ttm_layers.MaskedCrossAttention(DIM, HEADS)
    ps = s.init(jax.random.key(0), x, rope, ids)
    pc = c.init(jax.random.key(0), x, local, ids, lids)
    np.testing.assert_array_equal(s.apply(ps, x, rope, ids), x)
    np.testing.assert_array_equal(c.apply(pc, x, local, ids, lids), x)


def test_masked_layers_require_ids(inputs):
    x, local, rope = inputs
    with pytest.raises(ValueError, match="token_ids"):
        ttm_layers.MaskedSelfAttention(DIM, HEADS).init(jax.random.key(0), x, rope, None)
    with pytest.raises(ValueError, match="local_ids"):
        ttm_layers.MaskedCrossAttention(DIM, HEADS).init(jax.random.key(0), x, local, jnp.asarray(TOKEN_IDS), None)
