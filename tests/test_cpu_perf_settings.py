"""The CPU performance settings (issue 16): what the DiT runs on the CPU backend, pinned by behaviour, never by time.

- `layers.Attention` with impl "xla" runs `layers.fused_attention` on CPU (heads-major GEMMs, backward recomputing the
  probabilities from the saved log-sum-exp), exact against `attention.dot_product_attention` in value and gradient,
  masked and unmasked; the object-sparse path (`ObjectSort`) keeps its own op;
- the recomputation in the backward pass is tied to the incoming gradient: the compiled gradient keeps no
  `[B, H, Lq, Lk]` buffer per layer alive at once (XLA's memory analysis of a 4-layer stack against one layer);
- scanned DiT blocks are unrolled on CPU by default (no while loop in the compiled program, params still stacked),
  `model.scan_unroll` overrides it;
- the config's defaults: `scan_unroll = 0` (per backend), `remat_policy = "none"`;
- `layers.gradient_barrier` is the identity in value and gradient, and with it at each DiT sub-layer a further block
  adds a constant amount to the compiled backward (without it XLA re-evaluates the residual stream's running gradient
  sum inside every consumer, and each further block costs more: issue 28).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import attention, layers, masks, sparse_attention

# LLVM -O0: compiles faster; the optimised HLO these tests read (its adds, its while loops) is the same at any LLVM
# level (measured: the texts differ in source-location metadata only)
_O0 = {"xla_backend_optimization_level": 0}


def _qkv(b=2, lq=48, lk=40, h=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


@pytest.mark.parametrize("masked", ["none", "sanitized", "empty_rows"])
def test_fused_attention_matches_reference_value_and_grad(masked):
    q, k, v = _qkv()
    ids = {}
    if masked != "none":
        r = np.random.default_rng(1)
        kv_ids = jnp.asarray(r.integers(-1, 3, (2, 40)), jnp.int32)
        q_ids = jnp.asarray(r.integers(0, 5, (2, 48)), jnp.int32)  # ids 3, 4: no key (the reference averages all)
        if masked == "sanitized":
            q_ids = masks.sanitize_query_ids(q_ids, kv_ids)
        ids = dict(q_ids=q_ids, kv_ids=kv_ids)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, scale=0.3, **ids) * w)

    got = jax.value_and_grad(loss(layers.fused_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss(attention.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_fused_attention_self_ids_without_kv_ids():
    q, k, v = _qkv(lq=32, lk=32)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 3, (2, 32)), jnp.int32)
    got = layers.fused_attention(q, k, v, scale=0.5, q_ids=ids)
    want = attention.dot_product_attention(q, k, v, scale=0.5, q_ids=ids, kv_ids=ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_uses_fused_attention_except_object_sparse():
    assert jax.default_backend() == "cpu"
    assert layers.use_fused_attention("xla", None)
    ids = jnp.zeros((1, 16), jnp.int32)
    assert layers.use_fused_attention("xla", ids)
    assert not layers.use_fused_attention("xla", sparse_attention.sort_objects(ids))
    assert not layers.use_fused_attention("splash", None)
    assert not layers.use_fused_attention("gpu", ids)


def _stack_grad_temp(num_layers: int) -> int:
    """Temp bytes XLA plans for d/dq of `num_layers` chained fused attentions on [1, 256, 1, 8]."""
    q, k, v = _qkv(b=1, lq=256, lk=256, h=1, d=8)

    def f(q):
        x = q
        for _ in range(num_layers):
            x = layers.fused_attention(x, k, v, scale=0.3)
        return jnp.sum(x)

    return jax.jit(jax.grad(f)).lower(q).compile().memory_analysis().temp_size_in_bytes


def test_backward_recomputation_keeps_one_probability_matrix_at_a_time():
    lq_lk = 256 * 256 * 4  # one [1, 1, 256, 256] f32 buffer
    one, four = _stack_grad_temp(1), _stack_grad_temp(4)
    # saved residuals are O(L); were every layer's recomputed probabilities live at once, 4 layers would need at
    # least 3 more [Lq, Lk] buffers than one layer
    assert four - one < 2 * lq_lk, (one, four)


def _dit_hlo(scan_unroll: int) -> str:
    c = config_lib.build(1, "tiny")
    c.model.num_layers = 3
    c.model.ttm_layers = 0  # the scanned blocks alone (the tiny stage 1's added layers need local prompts)
    c.model.scan_unroll = scan_unroll
    cfg = dit.DiTConfig.from_config(c.model)
    model = dit.DiT(cfg, 6, 2)
    (x, t, ctx), _ = dit.init_inputs(cfg, 6, grid=(1, 2, 2), text_len=2)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, ctx)["params"])
    assert params["blocks"]["ffn"]["proj_in"]["kernel"].shape[0] == 3  # stacked layout either way
    return jax.jit(model.apply).lower({"params": params}, x, t, ctx).compile(compiler_options=_O0).as_text()


def test_scanned_blocks_unrolled_on_cpu_by_default():
    assert dit.unroll_for(dit.DiTConfig.from_config(config_lib.build(1, "tiny").model), 5) == 5
    assert " while(" not in _dit_hlo(0)
    assert " while(" in _dit_hlo(1)


def test_config_defaults():
    m = config_lib.build(2, "mid").model
    assert m.scan_unroll == 0 and m.remat_policy == "none" and m.scan_layers
    c = config_lib.build(2, "mid")
    c.model.scan_unroll = -1
    with pytest.raises(config_lib.ConfigError, match="model.scan_unroll"):
        config_lib.validate(c)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_barrier_is_the_identity_in_value_and_gradient(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 7)), dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 7)), dtype)

    def f(barrier):
        return lambda x: jnp.sum(jnp.sin(barrier(x) * x) * w)

    got = jax.jit(jax.value_and_grad(f(layers.gradient_barrier)))(x)
    want = jax.jit(jax.value_and_grad(f(lambda x: x)))(x)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    assert got[1].dtype == dtype


def _dit_grad_adds(num_layers: int) -> int:
    """Elementwise adds in the compiled gradient of a tiny DiT of `num_layers` blocks (abstract params: no init)."""
    c = config_lib.build(1, "tiny")
    c.model.num_layers = num_layers
    c.model.ttm_layers = 0
    cfg = dit.DiTConfig.from_config(c.model)
    model = dit.DiT(cfg, 6, 2)
    (x, t, ctx), _ = dit.init_inputs(cfg, 6, grid=(1, 2, 2), text_len=2)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, ctx)["params"])
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, ctx) ** 2)))
    return len(re.findall(r" add\(", grad.lower(params).compile(compiler_options=_O0).as_text()))


def test_residual_gradient_is_written_once_per_sublayer(monkeypatch):
    with_barrier = [_dit_grad_adds(n) for n in (2, 3)]
    monkeypatch.setattr(layers, "gradient_barrier", lambda x: x)
    without = [_dit_grad_adds(n) for n in (2, 3)]
    # a third block costs the same work as the second with the barrier (322 / 548 / 783 adds at 1 / 2 / 3 blocks when
    # written); without it each block re-evaluates the running sum of every later one, so a further block costs
    # about half as much again (355 / 665 / 1,014), and more with depth
    per_block, per_block_without = with_barrier[1] - with_barrier[0], without[1] - without[0]
    assert per_block_without > 1.3 * per_block and without[1] > with_barrier[1], (without, with_barrier)
