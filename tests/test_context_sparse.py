"""The object-sparse masked self-attention under context parallelism (issue 32), on 8 simulated CPU devices.

`ulysses_attention` / `ring_attention` with q_ids a `sparse_attention.ObjectSort` (`config.model.attention_sparse`):
Ulysses runs the single-device block loop on each head group's whole sequence; the ring sorts each shard's tokens
by id and passes the sorted key blocks round with their ids, a query block visiting only the keys of its id range.
Pinned: values and gradients w.r.t. q, k, v equal the dense single-device reference (`layers.fused_attention`) for
context = 2, 4, 8 (ids with -1: rows with no key, the mean of v); the ring never reads a key block whose ids lie
outside a query block's range (NaN values there stay out); `key_runs`' ranges; the DiT with attention_sparse on a
context mesh equals the dense one-device DiT; `validate` accepts attention_sparse with mesh.context > 1.

Largest differences observed (float32, CPU): op level (contexts 2, 4, 8, both impls), values <= 6.0e-7 and
gradients <= 1.4e-6 (values and gradients O(1)); the DiT (context 2, ulysses and ring) forward 1.4e-6 (max |value|
6.7) and parameter gradients 1.5e-5 (max |grad| 154), ~2e-7 and 1e-7 relative. `pytest -s` prints each case.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from test_context_train import _forward_and_grads, perturbed_case

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import context_parallel as cp
from ttm_jax.models import layers, sparse_attention
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib

B, L, H, D = 2, 64, 8, 8
SCALE = D**-0.5
TOL = 1e-5
AUTO = jax.sharding.AxisType.Auto
_O0 = {"xla_backend_optimization_level": 0}


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("context",), axis_types=(AUTO,))


def _largest(got, want) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


def _value_and_grads(fn, q, k, v, w):
    out = jax.jit(fn, compiler_options=_O0)(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)),
                    compiler_options=_O0)(q, k, v)
    return out, grads


@pytest.fixture(scope="module")
def case():
    """q, k, v, cotangent weights [B, L, H, D]; ids in {-1, 0, 1, 2, 3} in random order (-1: no key anywhere)."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32) for _ in range(4))
    ids = jnp.asarray(rng.integers(-1, 4, (B, L)), jnp.int32)
    assert (ids == -1).any()
    ref = _value_and_grads(functools.partial(layers.fused_attention, scale=SCALE, q_ids=ids), q, k, v, w)
    return q, k, v, w, ids, ref


@pytest.mark.parametrize("context", [2, 4, 8])
@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_sparse_equals_single_device_reference(case, impl, context):
    """Values and gradients with the sequence over context = 2, 4, 8 equal the dense reference; the program
    exchanges (all-to-all / ppermute) and runs the block loop (Ulysses on the DiT's sort; the ring sorts per shard)."""
    q, k, v, w, ids, (want_out, want_grads) = case
    sort = sparse_attention.sort_objects(ids, 16)
    fn = functools.partial(cp.CONTEXT_IMPLS[impl], mesh=_mesh(context), scale=SCALE, q_ids=sort)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v))
    assert ("all_to_all" if impl == "ulysses" else "ppermute") in jaxpr
    assert "while" in jaxpr and bool(re.search(r"\bsort\[", jaxpr)) == (impl == "ring")  # only the ring sorts inside
    out, grads = _value_and_grads(fn, q, k, v, w)
    d_out, d_grads = _largest(out, want_out), _largest(grads, want_grads)
    print(f"sparse {impl} context={context}: max |value diff| {d_out:.1e}, max |grad diff| {d_grads:.1e}")
    assert d_out < TOL and d_grads < TOL
    assert out.sharding.spec[1] == "context"


def test_ring_skips_key_blocks_outside_the_id_range():
    """context = 4, 16 tokens per shard; the last shard holds only object 3, whose values are NaN. The dense ring
    multiplies every key block (0 * NaN = NaN in every row); the sparse ring never visits that block from the other
    shards (their ids 0..2 do not meet 3): their rows are finite and equal the reference, the last shard's NaN."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, L, 4, D)), jnp.float32) for _ in range(3))
    ids = np.concatenate([rng.integers(0, 3, 48), np.full(16, 3)]).astype(np.int32)[None]
    v_nan = v.at[:, 48:].set(jnp.nan)
    sort = sparse_attention.sort_objects(jnp.asarray(ids), 16)
    got = jax.jit(functools.partial(cp.ring_attention, mesh=_mesh(4), scale=SCALE, q_ids=sort))(q, k, v_nan)
    want = layers.fused_attention(q, k, v, scale=SCALE, q_ids=jnp.asarray(ids))
    assert bool(jnp.all(jnp.isfinite(got[:, :48]))) and bool(jnp.all(jnp.isnan(got[:, 48:])))
    assert _largest(got[:, :48], want[:, :48]) < TOL
    dense = jax.jit(functools.partial(cp.ring_attention, mesh=_mesh(4), scale=SCALE, q_ids=jnp.asarray(ids)))
    assert bool(jnp.all(jnp.isnan(dense(q, k, v_nan))))  # the dense ring does read it


def test_key_runs_are_the_ids_ranges_and_empty_when_they_do_not_meet():
    """Sorted query blocks of 4 ([0 0 1 1], [2 2 2 2], [-1 -1 -1 -1]) against another shard's sorted keys
    [0 1 1 3 3 3 3 3] (chunks of 2): block 0 needs keys 0..2 (2 chunks), block 1 none (no key of id 2), block 2 none
    (no real query)."""
    q_ids = jnp.asarray([[0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1, -1]], jnp.int32)
    kv_ids = jnp.pad(jnp.asarray([[0, 1, 1, 3, 3, 3, 3, 3]], jnp.int32), ((0, 0), (0, 2)),
                     constant_values=np.iinfo(np.int32).max)
    start, chunks = sparse_attention.key_runs(kv_ids, q_ids, 4, 2, 8)
    assert start.tolist() == [[0, 0, 0]] and chunks.tolist() == [[2, 0, 0]]
    start, chunks = sparse_attention.key_runs(kv_ids, q_ids.at[0, 7].set(3), 4, 2, 8)  # block 1 now [2, 3]: keys 3..7
    assert start.tolist() == [[0, 3, 0]] and chunks.tolist() == [[2, 3, 0]]


def test_sparse_is_self_attention_only(case):
    q, k, v, _, ids, _ = case
    sort = sparse_attention.sort_objects(ids, 16)
    for impl in cp.IMPLS:
        with pytest.raises(ValueError, match=r"object-sparse .*kv_ids differs"):
            jax.eval_shape(functools.partial(cp.CONTEXT_IMPLS[impl], mesh=_mesh(2), q_ids=sort, kv_ids=ids), q, k, v)


# ---- the DiT ----------------------------------------------------------------------------------------------------


def _cfg(*, context: int = 1, impl: str = "ulysses", sparse: bool = False):
    c = fx.tiny_config(2, **{"model.num_heads": 4, "model.num_layers": 1, "model.context_impl": impl,
                             "model.attention_sparse": sparse})
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    c.mesh.context = context
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def dit_case():
    """Perturbed tiny stage-2 params (TTM outputs too), B = 2 inputs with object ids in random order, and the
    one-device dense forward and parameter gradients."""
    c = _cfg()
    model = dit.DiT(c.model, config_lib.in_channels(c), c.autoencoder.latent_channels)
    params, args, kwargs, w = perturbed_case(c)
    fn = _forward_and_grads(model, args, kwargs, w)
    return params, args, kwargs, w, jax.jit(fn, compiler_options=_O0)(params)


@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_dit_sparse_with_context_equals_dense_one_device(dit_case, impl):
    """The tiny DiT with attention_sparse=True on a context = 2 mesh (fsdp 4): forward and parameter gradients equal
    the dense one-device DiT's; the masked self-attention really runs the sparse path under the context shard_map."""
    params, args, kwargs, w, (want_out, want_grads) = dit_case
    c = _cfg(context=2, impl=impl, sparse=True)
    model = dit.DiT(c.model, config_lib.in_channels(c), c.autoencoder.latent_channels)
    fn = _forward_and_grads(model, args, kwargs, w)
    with jax.set_mesh(mesh_lib.make_mesh(c.mesh)), nn.logical_axis_rules(sharding_lib.rules_from_config(c.mesh)):
        jaxpr = str(jax.make_jaxpr(fn)(params))
        out, grads = jax.jit(fn, compiler_options=_O0)(params)
    assert "shard_map" in jaxpr and re.search(r"\bsort\[", jaxpr) and "while" in jaxpr
    d_out, d_grads = _largest(out, want_out), _largest(grads, want_grads)
    s_out, s_grads = (max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(t)) for t in (want_out, want_grads))
    print(f"DiT sparse {impl} context=2: max |forward diff| {d_out:.1e} (max |value| {s_out:.1f}), "
          f"max |param grad diff| {d_grads:.1e} (max |grad| {s_grads:.1f})")
    assert s_out > 0.1 and s_grads > 0.1
    assert d_out < 1e-6 * s_out and d_grads < 1e-6 * s_grads


def test_validate_accepts_sparse_with_context():
    """attention_sparse with mesh.context > 1 is no longer refused; Ulysses' head split is still checked."""
    _cfg(context=2, impl="ring", sparse=True)
    c = fx.tiny_config(2, **{"model.attention_sparse": True})  # 2 heads: Ulysses cannot split them 4 ways
    c.mesh.context = 4
    with pytest.raises(config_lib.ConfigError, match=r"config.mesh.context: 4 does not divide the 2 heads"):
        config_lib.validate(c)
