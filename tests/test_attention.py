"""Attention ops (ttm_jax/models/attention.py): the xla reference against numpy, the Pallas kernels against xla.

The splash (TPU) and gpu (Triton) kernels run in Pallas interpret mode on CPU: the same kernel bodies, block
specs and padding as on the accelerators, so block-size constraints and the padding logic are exercised here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax.models import attention, masks

B, H, D = 2, 2, 32
TOL = 1e-5


def _numpy_attention(q, k, v, q_ids, kv_ids, scale):
    """softmax(q k^T * scale + bias) v in float64, the bias from the id rule written out: same id, key id >= 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if q_ids is not None:
        q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
        ok = (q_ids[:, :, None] == kv_ids[:, None, :]) & (kv_ids[:, None, :] >= 0)
        logits = logits + np.where(ok, 0.0, -1e30)[:, None]
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(seed, lq, lk, d=D):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, n, H, d)), jnp.float32) for n in (lq, lk, lk))


def _ids(seed, shape, high):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


@pytest.fixture(scope="module")
def self_case():
    """Masked self-attention, L=200 (not a multiple of 128), 4 objects; ids shared by queries and keys."""
    q, k, v = _qkv(0, 200, 200)
    ids = _ids(10, (B, 200), 4)
    return q, k, v, ids


@pytest.fixture(scope="module")
def cross_case():
    """Masked cross-attention: Lq=150 video tokens, Lk=48 prompt tokens (3 slots of 16) with -1 padding."""
    q, k, v = _qkv(1, 150, 48)
    token_mask = np.random.default_rng(11).random((B, 3, 16)) < 0.6
    token_mask[:, :, 0] = True  # every slot has a key
    kv_ids = masks.local_prompt_ids(jnp.asarray(token_mask))
    q_ids = _ids(12, (B, 150), 3)
    assert (kv_ids == -1).any()
    return q, k, v, q_ids, kv_ids


@pytest.fixture(scope="module")
def self_ref(self_case):
    q, k, v, ids = self_case
    return attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl="xla")


@pytest.fixture(scope="module")
def cross_ref(cross_case):
    q, k, v, q_ids, kv_ids = cross_case
    return attention.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl="xla")


def test_xla_self_matches_numpy(self_case, self_ref):
    q, k, v, ids = self_case
    want = _numpy_attention(q, k, v, ids, ids, D**-0.5)
    np.testing.assert_allclose(self_ref, want, atol=TOL, rtol=0)


def test_xla_cross_matches_numpy_with_custom_scale(cross_case, cross_ref):
    q, k, v, q_ids, kv_ids = cross_case
    np.testing.assert_allclose(cross_ref, _numpy_attention(q, k, v, q_ids, kv_ids, D**-0.5), atol=TOL, rtol=0)
    got = attention.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, scale=0.3)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, q_ids, kv_ids, 0.3), atol=TOL, rtol=0)


def test_masked_keys_do_not_leak(cross_case, cross_ref):
    """Changing the keys/values a query may not see (other objects, -1 padding) leaves its output unchanged."""
    q, k, v, q_ids, kv_ids = cross_case
    hidden = (kv_ids != 1)[:, :, None, None]  # everything but object 1's prompt
    noise = _qkv(5, 1, 48)[1:]
    k2, v2 = jnp.where(hidden, noise[0] * 10, k), jnp.where(hidden, noise[1] * 10, v)
    got = attention.dot_product_attention(q, k2, v2, q_ids=q_ids, kv_ids=kv_ids)
    rows = np.asarray(q_ids == 1)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(cross_ref)[rows], atol=TOL, rtol=0)
    assert np.abs(np.asarray(got)[~rows] - np.asarray(cross_ref)[~rows]).max() > 1e-2


@pytest.mark.parametrize("impl", ["xla", "splash", "gpu"])
def test_unmasked_is_plain_attention(impl):
    q, k, v = _qkv(2, 24, 40)
    got = attention.dot_product_attention(q, k, v, impl=impl, interpret=True)
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, None, None, D**-0.5), atol=TOL, rtol=0)


def test_splash_runs_unmasked_attention_in_its_kernel():
    """On TPU unmasked attention (the backbone's) must not fall back to XLA's dense [B, H, Lq, Lk] logits."""
    q, k, v = _qkv(1, 24, 24)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
        q, k, v, impl="splash", interpret=True))(q, k, v))
    assert "pallas_call" in jaxpr


def test_splash_self_matches_reference(self_case, self_ref):
    q, k, v, ids = self_case
    got = attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl="splash", interpret=True)
    err = float(jnp.abs(got - self_ref).max())
    print(f"splash self-attention L=200: max abs diff vs xla {err:.2e}")
    assert got.shape == self_ref.shape and err < TOL


def test_splash_cross_with_padding_matches_reference(cross_case, cross_ref):
    q, k, v, q_ids, kv_ids = cross_case
    got = attention.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl="splash", interpret=True)
    err = float(jnp.abs(got - cross_ref).max())
    print(f"splash cross-attention Lq=150 Lk=48 (-1 padding): max abs diff vs xla {err:.2e}")
    assert err < TOL


def test_gpu_self_matches_reference(self_case, self_ref):
    q, k, v, ids = self_case
    got = attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl="gpu", interpret=True)
    err = float(jnp.abs(got - self_ref).max())
    print(f"gpu mha self-attention L=200: max abs diff vs xla {err:.2e}")
    assert err < TOL


def test_gpu_cross_falls_back_to_reference(cross_case, cross_ref):
    q, k, v, q_ids, kv_ids = cross_case
    got = attention.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl="gpu", interpret=True)
    np.testing.assert_allclose(got, cross_ref, atol=TOL, rtol=0)


@functools.partial(jax.jit, static_argnums=0)
def _grads(impl, q, k, v, ids, w):
    def loss(q, k, v):
        # one ids object on both sides: under jit that is how impl="gpu" knows it is self-attention
        out = attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl=impl, interpret=True)
        return jnp.sum(w * out)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.fixture(scope="module")
def grad_case():
    """L=100: pads to 128 for the gpu kernel (its backward uses 32-row tiles) and for splash."""
    q, k, v = _qkv(3, 100, 100)
    ids = _ids(13, (B, 100), 3)
    w = jnp.asarray(np.random.default_rng(14).standard_normal(q.shape), jnp.float32)
    return q, k, v, ids, w, _grads("xla", q, k, v, ids, w)


@pytest.mark.parametrize("impl", ["gpu", "splash"])
def test_kernel_gradients_match_reference(impl, grad_case):
    q, k, v, ids, w, want = grad_case
    got = _grads(impl, q, k, v, ids, w)
    errs = [float(jnp.abs(a - b).max()) for a, b in zip(got, want, strict=True)]
    print(f"{impl} d(q, k, v) max abs diff vs xla: " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-5 * max(1.0, max(float(jnp.abs(g).max()) for g in want))


def test_splash_cross_gradients_with_padding_match_reference(cross_case):
    q, k, v, q_ids, kv_ids = cross_case
    w = jnp.asarray(np.random.default_rng(15).standard_normal(q.shape), jnp.float32)

    def grads(impl):
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl=impl, interpret=True)
            return jnp.sum(w * out)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want, got = grads("xla"), grads("splash")
    errs = [float(jnp.abs(a - b).max()) for a, b in zip(got, want, strict=True)]
    print("splash cross d(q, k, v) max abs diff vs xla: " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 1e-5 * max(1.0, max(float(jnp.abs(g).max()) for g in want))
    padded = np.asarray(kv_ids < 0)
    assert not np.asarray(got[1])[padded].any() and not np.asarray(got[2])[padded].any()  # padding gets no gradient


def test_gpu_uses_kernel_for_self_attention_under_jit(self_case):
    """Under jit the gpu path recognises self-attention by identity (q_ids is kv_ids, or kv_ids=None): that call
    lowers to the Pallas kernel; distinct id arrays take the dense-mask fallback (no pallas_call)."""
    q, k, v, ids = self_case

    def same(q, k, v, ids):
        return attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl="gpu", interpret=True)

    def implicit(q, k, v, ids):
        return attention.dot_product_attention(q, k, v, q_ids=ids, impl="gpu", interpret=True)

    def distinct(q, k, v, ids, kv_ids):
        return attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=kv_ids, impl="gpu", interpret=True)

    assert "pallas_call" in str(jax.make_jaxpr(same)(q, k, v, ids))
    assert "pallas_call" in str(jax.make_jaxpr(implicit)(q, k, v, ids))
    with pytest.warns(UserWarning, match="pass the same array"):
        assert "pallas_call" not in str(jax.make_jaxpr(distinct)(q, k, v, ids, ids))


@pytest.mark.parametrize("impl", ["splash", "gpu"])
def test_kernels_per_shard_under_a_mesh(impl):
    """Under `jax.set_mesh`, the Pallas kernels run per (batch, head) shard in shard_map and still match xla."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 64, 2, D)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(rng.integers(0, 3, (4, 64)), jnp.int32)

    def f(q, k, v, ids):
        return attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl=impl, interpret=True)

    want = attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, ids))
        got = jax.jit(f)(q, k, v, ids)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_splash_kernel_cache_survives_separate_traces():
    """The splash kernel is cached per shape; built first inside one jit, it must not leak tracers into the next."""
    attention._splash_kernel.cache_clear()
    q, k, v = _qkv(7, 40, 40)
    ids = _ids(8, (B, 40), 2)

    def f(q, k, v, ids):
        return attention.dot_product_attention(q, k, v, q_ids=ids, impl="splash", interpret=True)

    first = jax.jit(f)(q, k, v, ids)
    second = jax.jit(lambda *a: f(*a) + 0.0)(q, k, v, ids)  # a new trace reusing the cached kernel
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, attention.dot_product_attention(q, k, v, q_ids=ids), atol=TOL, rtol=0)


def test_kernel_on_wrong_backend_names_the_config_field():
    q, k, v = _qkv(4, 8, 8)
    ids = jnp.zeros((B, 8), jnp.int32)
    for impl in ("splash", "gpu"):
        with pytest.raises(ValueError, match="config.model.attention"):
            attention.dot_product_attention(q, k, v, q_ids=ids, impl=impl)


def test_errors_name_the_fix():
    q, k, v = _qkv(4, 8, 8)
    ids = jnp.zeros((B, 8), jnp.int32)
    with pytest.raises(ValueError, match="config.model.attention"):
        attention.dot_product_attention(q, k, v, q_ids=ids, impl="flash")
    with pytest.raises(ValueError, match=r"q_ids must be int32 \[B, Lq\]"):
        attention.dot_product_attention(q, k, v, q_ids=ids[:, :5], kv_ids=ids)
    with pytest.raises(ValueError, match="pass kv_ids"):
        attention.dot_product_attention(q, k[:, :4], v[:, :4], q_ids=ids)
    with pytest.raises(ValueError, match="pass both"):
        attention.dot_product_attention(q, k, v, kv_ids=ids)
