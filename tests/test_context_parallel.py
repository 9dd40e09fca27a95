"""Context parallelism (ttm_jax/models/context_parallel.py) on 8 simulated CPU devices: Ulysses and ring attention
with the sequence sharded over a `context` mesh axis, against the single-device reference `layers.fused_attention`,
values and gradients; the head / length checks; the config fields `mesh.context` and `model.context_impl`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttm_jax import config as config_lib
from ttm_jax.models import context_parallel as cp
from ttm_jax.models import layers, masks

B, L, H, D = 2, 128, 8, 16
SCALE = D**-0.5
# Largest differences observed (float32, CPU, contexts 2/4/8, plain and masked): values <= 1.2e-7 (ulysses: the same
# arithmetic per head group) and <= 9.6e-7 (ring: online softmax); gradients <= 2.4e-7 (ulysses) and <= 8.4e-7 (ring).
# Values and gradients are O(1) here. `pytest -s` prints each case's differences.
TOL = 1e-5
AUTO = jax.sharding.AxisType.Auto


def _mesh(shape: dict[str, int]) -> jax.sharding.Mesh:
    n = int(np.prod(list(shape.values())))
    devices = np.asarray(jax.devices()[:n]).reshape(tuple(shape.values()))
    return jax.sharding.Mesh(devices, tuple(shape), axis_types=(AUTO,) * len(shape))


@pytest.fixture(scope="module")
def case():
    """q, k, v [B, L, H, D]; self-attention ids in {-1, 0, 1, 2} (-1 queries have no key: fully masked rows); the
    cotangent weights of the scalar loss."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32) for _ in range(4))
    ids = jnp.asarray(rng.integers(-1, 3, (B, L)), jnp.int32)
    assert (ids == -1).any()
    return q, k, v, w, ids


def _value_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradients of sum(fn * w) w.r.t. q, k, v, jitted."""
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def _largest(got, want) -> float:
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))


@pytest.fixture(scope="module")
def reference(case):
    q, k, v, w, ids = case
    return {kind: _value_and_grads(functools.partial(layers.fused_attention, scale=SCALE, q_ids=kind_ids), q, k, v, w)
            for kind, kind_ids in (("plain", None), ("masked", ids))}


@pytest.mark.parametrize("context", [2, 4, 8])
@pytest.mark.parametrize("kind", ["plain", "masked"])
@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_equals_single_device_reference(case, reference, impl, kind, context):
    """Values and gradients w.r.t. q, k, v with the sequence over `context` = 2, 4, 8 equal the reference's; the
    program really exchanges (all-to-all for Ulysses, ppermute for the ring)."""
    q, k, v, w, ids = case
    mesh = _mesh({"context": context})
    fn = functools.partial(cp.CONTEXT_IMPLS[impl], mesh=mesh, scale=SCALE, q_ids=ids if kind == "masked" else None)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v))
    assert ("all_to_all" if impl == "ulysses" else "ppermute") in jaxpr
    out, grads = _value_and_grads(fn, q, k, v, w)
    want_out, want_grads = reference[kind]
    diff_out, diff_grads = _largest(out, want_out), _largest(grads, want_grads)
    print(f"{impl} {kind} context={context}: max |value diff| {diff_out:.2e}, max |grad diff| {diff_grads:.2e}")
    assert diff_out < TOL and diff_grads < TOL
    assert out.sharding.spec[1] == "context"


@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_distinct_ids_and_other_mesh_axes(impl):
    """q_ids != kv_ids (queries of an id no key has, keys with padding -1) on a (data, context, tensor) = (2, 2, 2)
    mesh: batch over data, heads over tensor, sequence over context; values and gradients equal the reference."""
    rng = np.random.default_rng(1)
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, 64, H, D)), jnp.float32) for _ in range(4))
    kv_ids = jnp.asarray(rng.integers(-1, 3, (B, 64)), jnp.int32)
    q_ids = jnp.asarray(rng.integers(0, 4, (B, 64)), jnp.int32)  # id 3: no key, fully masked rows
    assert (q_ids == 3).any()
    mesh = _mesh({"data": 2, "context": 2, "tensor": 2})
    fn = functools.partial(cp.CONTEXT_IMPLS[impl], mesh=mesh, scale=SCALE, q_ids=q_ids, kv_ids=kv_ids)
    ref = functools.partial(layers.fused_attention, scale=SCALE, q_ids=q_ids, kv_ids=kv_ids)
    got, want = _value_and_grads(fn, q, k, v, w), _value_and_grads(ref, q, k, v, w)
    assert _largest(got, want) < TOL
    assert got[0].sharding.spec[:3] == ("data", "context", "tensor")


def test_sharded_cross_attention():
    """Masked cross-attention to local prompts: queries over context = 4, keys and ids replicated; the gradients of
    the replicated keys and values are summed over the shards (equal the reference)."""
    rng = np.random.default_rng(2)
    q, w = (jnp.asarray(rng.standard_normal((B, 64, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, 24, H, D)), jnp.float32) for _ in range(2))
    token_mask = rng.random((B, 3, 8)) < 0.6
    token_mask[:, :, 0] = True
    kv_ids = masks.local_prompt_ids(jnp.asarray(token_mask))
    q_ids = masks.sanitize_query_ids(jnp.asarray(rng.integers(0, 4, (B, 64)), jnp.int32), kv_ids)
    fn = functools.partial(cp.sharded_cross_attention, mesh=_mesh({"context": 4}), scale=SCALE, q_ids=q_ids,
                           kv_ids=kv_ids)
    ref = functools.partial(layers.fused_attention, scale=SCALE, q_ids=q_ids, kv_ids=kv_ids)
    assert _largest(_value_and_grads(fn, q, k, v, w), _value_and_grads(ref, q, k, v, w)) < TOL


def test_without_a_context_axis_it_is_the_single_device_op(case, reference):
    """No mesh in scope (or no `context` axis): the plain op, no shard_map."""
    q, k, v, w, ids = case
    for impl in cp.IMPLS:
        fn = functools.partial(cp.CONTEXT_IMPLS[impl], scale=SCALE, q_ids=ids)
        assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
        assert _largest(jax.jit(fn)(q, k, v), reference["masked"][0]) < TOL


def test_heads_and_length_checks_raise_before_compute():
    """Ulysses with heads (per tensor shard) not divisible by context, and any length not divisible by it, raise a
    ValueError naming both numbers and the fix, at trace time (abstract inputs: nothing is computed)."""
    x = jax.ShapeDtypeStruct((B, 64, 6, D), jnp.float32)
    with pytest.raises(ValueError, match=r"6 heads .* mesh axis 'context' of size 4.*context_impl='ring'"):
        jax.eval_shape(functools.partial(cp.ulysses_attention, mesh=_mesh({"context": 4})), x, x, x)
    # 4 heads over tensor = 2 leave 2 per shard, which context = 4 cannot split
    y = jax.ShapeDtypeStruct((B, 64, 4, D), jnp.float32)
    with pytest.raises(ValueError, match=r"2 heads \(per tensor shard\) .* size 4"):
        jax.eval_shape(functools.partial(cp.ulysses_attention, mesh=_mesh({"context": 4, "tensor": 2})), y, y, y)
    assert jax.eval_shape(functools.partial(cp.ring_attention, mesh=_mesh({"context": 4})), x, x, x).shape == x.shape
    z = jax.ShapeDtypeStruct((B, 60, H, D), jnp.float32)
    for impl in cp.IMPLS:
        with pytest.raises(ValueError, match=r"Lq=60 tokens do not split over mesh axis 'context' of size 8"):
            jax.eval_shape(functools.partial(cp.CONTEXT_IMPLS[impl], mesh=_mesh({"context": 8})), z, z, z)


def test_config_fields_and_checks():
    """`mesh.context` (default 1) and `model.context_impl` (default ulysses) are checked by `validate`: the impl by
    name, the context as a positive int, Ulysses' head split (the rest: tests/test_context_train.py)."""
    c = config_lib.build(2, "tiny")
    assert c.mesh.context == 1 and c.model.context_impl == "ulysses"
    config_lib.validate(c)

    def error(**changes):
        d = config_lib.build(2, "tiny")
        for field, value in changes.items():
            section, key = field.split(".")
            d[section][key] = value
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(d)
        return str(e.value)

    assert error(**{"model.context_impl": "stripes"}).startswith("config.model.context_impl: 'stripes'")
    assert error(**{"mesh.context": 0}).startswith("config.mesh.context: 0 must be an int >= 1")
    # tiny has 2 heads: Ulysses cannot split them 4 ways, the ring can
    assert "does not divide the 2 heads" in error(**{"mesh.context": 4})
    ring = config_lib.build(2, "tiny")
    ring.mesh.context, ring.model.context_impl = 4, "ring"
    config_lib.validate(ring)
