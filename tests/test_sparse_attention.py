"""Object-sparse masked self-attention (ttm_jax/models/sparse_attention.py) against the dense reference.

Values and gradients (q, k, v; and the DiT's parameters) equal `attention.dot_product_attention(impl="xla")` for:
random ids, ids with empty objects (ids that never occur, gaps, large ids), a single object, all background,
objects present in some frames only, padding ids -1 (no allowed key: the reference's uniform weights, the mean of
v), a block size that divides nothing. The (query block, key chunk) pairs computed are pinned for a known layout
(the work is skipped, not masked), and the DiT sorts once per forward pass however many TTM layers it has.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from ttm_jax import config as config_lib
from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import attention, masks, sparse_attention, sparse_pallas

B, T, HH, WW, H, D = 2, 3, 8, 8, 2, 16  # token grid 3 x 8 x 8 = 192 tokens
N = T * HH * WW
BLOCK, BLOCK_KV = 32, 48  # BLOCK_KV does not divide N: the last chunks run into the padding
TOL = 2e-5


def _grid_ids(fill) -> np.ndarray:
    """`[B, N]` ids from a per-example `[T, HH, WW]` grid built by `fill(grid, example)`."""
    out = np.zeros((B, T, HH, WW), np.int32)
    for e in range(B):
        fill(out[e], e)
    return out.reshape(B, N)


def _frames_only(g, e):
    g[0:2, :4, :4] = 1  # object 1 in frames 0 and 1 only
    g[2, 4:, 4:] = 2  # object 2 in frame 2 only
    g[1:, :2, 6:] = 3 + e  # a third object in the last two frames, a different id per example


def _padding(g, e):
    rng = np.random.default_rng(20 + e)
    g[...] = rng.integers(0, 3, g.shape)
    g[rng.random(g.shape) < 0.15] = -1  # prompt padding: never a key, and a query with no allowed key


def _empty_objects(g, e):
    rng = np.random.default_rng(30 + e)
    g[...] = rng.choice([0, 3, 7, 1000 + e], g.shape, p=[0.5, 0.2, 0.2, 0.1])  # 1, 2, 4..6, ... never occur


CASES = {
    "random": _grid_ids(lambda g, e: g.__setitem__(..., np.random.default_rng(e).integers(0, 5, g.shape))),
    "empty_objects": _grid_ids(_empty_objects),
    "single_object": np.ones((B, N), np.int32),
    "all_background": np.zeros((B, N), np.int32),
    "frames_only": _grid_ids(_frames_only),
    "padding": _grid_ids(_padding),
    "one_token_objects": _grid_ids(lambda g, e: g.reshape(-1).__setitem__(slice(None, None, 7 + e), 9)),
}


@pytest.fixture(scope="module")
def qkvw():
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((B, N, H, D)), jnp.float32) for _ in range(4))


def _loss(fn):
    return lambda q, k, v, w, ids: jnp.sum(fn(q, k, v, ids) * w)


def _dense(q, k, v, ids):
    return attention.dot_product_attention(q, k, v, q_ids=ids, kv_ids=ids, impl="xla")


def _sparse(q, k, v, ids):
    sort = sparse_attention.sort_objects(ids, BLOCK, BLOCK_KV)
    return attention.dot_product_attention(q, k, v, q_ids=sort, kv_ids=sort, impl="xla")


@pytest.fixture(scope="module")
def fns():
    """(dense, sparse) jitted once each: value and grad w.r.t. q, k, v."""
    vg = lambda f: jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1, 2)))  # noqa: E731
    return vg(_dense), vg(_sparse), jax.jit(_dense), jax.jit(_sparse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_gradients_equal_dense(case, qkvw, fns):
    q, k, v, w = qkvw
    ids = jnp.asarray(CASES[case])
    dense_vg, sparse_vg, dense, sparse = fns
    np.testing.assert_allclose(sparse(q, k, v, ids), dense(q, k, v, ids), atol=TOL, rtol=0)
    (want_loss, want), (got_loss, got) = dense_vg(q, k, v, w, ids), sparse_vg(q, k, v, w, ids)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, g, r in zip("qkv", got, want, strict=True):
        assert np.abs(np.asarray(r)).max() > 0 or name != "v"
        np.testing.assert_allclose(g, r, atol=TOL, rtol=0, err_msg=f"d{name} ({case})")


def test_padding_rows_get_the_mean_of_v(qkvw, fns):
    """The reference's behaviour for a row with no allowed key, pinned: uniform weights over every key."""
    q, k, v, _ = qkvw
    ids = jnp.asarray(CASES["padding"])
    out = np.asarray(fns[3](q, k, v, ids))
    rows = np.asarray(ids) < 0
    want = np.broadcast_to(np.asarray(v).mean(axis=1, keepdims=True), out.shape)[rows]
    np.testing.assert_allclose(out[rows], want, atol=1e-5)


def test_default_block_and_ids_as_array(qkvw):
    """`masked_self_attention` sorts raw ids itself (default block); bfloat16 in gives bfloat16 out, close."""
    q, k, v, _ = qkvw
    ids = jnp.asarray(CASES["frames_only"])
    got = jax.jit(sparse_attention.masked_self_attention)(q, k, v, ids)
    np.testing.assert_allclose(got, _dense(q, k, v, ids), atol=TOL, rtol=0)
    bf = jax.jit(sparse_attention.masked_self_attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), ids)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), _dense(q, k, v, ids), atol=5e-2, rtol=0)


# ---- the accelerator kernels (ttm_jax/models/sparse_pallas.py), in interpret mode ----------------------------------

PALLAS_CASES = ("empty_objects", "single_object", "all_background", "frames_only", "padding")


GPU_BLOCKS = (32, 16)  # Triton tiles are powers of two: 16-token key chunks, unaligned to the query blocks


def _pallas(impl):
    def f(q, k, v, ids):  # splash rounds BLOCK up to its 128-lane tile: 192 tokens are 2 blocks
        sort = sparse_attention.sort_objects(ids, *(GPU_BLOCKS if impl == "gpu" else (BLOCK, BLOCK_KV)))
        return attention.dot_product_attention(q, k, v, q_ids=sort, impl=impl, interpret=True)
    return f


@pytest.fixture(scope="module")
def pallas_fns():
    vg = lambda f: jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1, 2)))  # noqa: E731
    return {impl: (vg(_pallas(impl)), jax.jit(_pallas(impl))) for impl in ("gpu", "splash")}


@pytest.mark.parametrize("impl", ["gpu", "splash"])
def test_pallas_kernels_equal_dense(impl, qkvw, fns, pallas_fns):
    """Values and gradients of the GPU kernel (its forward in Pallas) and of splash with the on-device block table
    equal the dense reference, on empty objects, one object, all background, objects in some frames, padding."""
    q, k, v, w = qkvw
    dense_vg, dense = fns[0], fns[2]
    got_vg, got_fn = pallas_fns[impl]
    for case in PALLAS_CASES:
        ids = jnp.asarray(CASES[case])
        np.testing.assert_allclose(got_fn(q, k, v, ids), dense(q, k, v, ids), atol=TOL, rtol=0, err_msg=case)
        (want_loss, want), (got_loss, got) = dense_vg(q, k, v, w, ids), got_vg(q, k, v, w, ids)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for name, g, r in zip("qkv", got, want, strict=True):
            np.testing.assert_allclose(g, r, atol=TOL, rtol=0, err_msg=f"d{name} ({impl}, {case})")


# xla: slow (4 s); its skipping stays pinned in the suite by test_sort_and_work_skipped's pair counts
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "gpu", "splash"])
def test_skipped_blocks_are_never_read(impl):
    """Three objects of 128 tokens (shuffled), 128-token blocks: each query block needs its own object's block only.
    Object 2's queries, keys and values are NaN: were any of its blocks read for another object's tokens, their
    values or gradients would be NaN (0 x NaN), as in the dense reference. Objects 0 and 1 stay finite and exact,
    values and gradients (the backward skips the same blocks); splash visits 3 of 9 blocks."""
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.repeat(np.array([0, 1, 2], np.int32), 128))[None]
    q, k, v, w = (rng.standard_normal((1, 384, 2, D)).astype(np.float32) for _ in range(4))
    keep = ids[0] != 2
    w[:, ~keep] = 0  # the loss reads objects 0 and 1 only
    dense = jax.jit(jax.value_and_grad(_loss(_dense), argnums=(0, 1, 2)))
    want = np.asarray(_dense(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(ids)))
    _, want_g = dense(q, k, v, w, jnp.asarray(ids))
    q, k, v = (np.where((ids == 2)[..., None, None], np.nan, x) for x in (q, k, v))  # new arrays: the reference
    # may still be reading the old ones (a CPU jit call can alias numpy inputs and runs asynchronously)
    sort = sparse_attention.sort_objects(jnp.asarray(ids), 128)
    fn = lambda q, k, v, _ids: attention.dot_product_attention(q, k, v, q_ids=sort, impl=impl,  # noqa: E731
                                                              interpret=True)
    got = np.asarray(jax.jit(fn)(q, k, v, None))
    assert np.isnan(got[0, ~keep]).all()
    np.testing.assert_allclose(got[0, keep], want[0, keep], atol=TOL, rtol=0)
    _, got_g = jax.jit(jax.value_and_grad(_loss(fn), argnums=(0, 1, 2)))(q, k, v, w, None)
    for name, g, r in zip("qkv", got_g, want_g, strict=True):
        np.testing.assert_allclose(np.asarray(g)[0, keep], np.asarray(r)[0, keep], atol=TOL, rtol=0, err_msg=name)
    visited = sparse_pallas.visited_blocks(jnp.sort(jnp.asarray(ids), axis=1), 128)
    np.testing.assert_array_equal(visited[0], np.eye(3, dtype=bool))


def _sorted_equals_dense(sort, impl, q, k, v, w, ids):
    """The kernel `impl` on `sort` (interpret mode): values and gradients equal the dense reference on `ids`."""
    fn = lambda q, k, v, _: attention.dot_product_attention(q, k, v, q_ids=sort, impl=impl,  # noqa: E731
                                                            interpret=True)
    (_, got), (_, want) = (jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1, 2)))(q, k, v, w, ids)
                           for f in (fn, _dense))
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, ids), _dense(q, k, v, ids), atol=TOL, rtol=0)
    for name, g, r in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=TOL, rtol=0, err_msg=f"d{name} ({impl})")


def test_gpu_head_size_padded_and_tiles_checked():
    """Head size 40 (SD 1.5's) is zero-padded to 64 for Triton: values and gradients still equal the dense path; a
    key chunk of 48 tokens is refused, naming the fix."""
    rng = np.random.default_rng(5)
    q, k, v, w = (jnp.asarray(rng.standard_normal((1, 96, 2, 40)), jnp.float32) for _ in range(4))
    ids = jnp.asarray(rng.integers(0, 3, (1, 96)), jnp.int32)
    _sorted_equals_dense(sparse_attention.sort_objects(ids, impl="gpu"), "gpu", q, k, v, w, ids)
    with pytest.raises(ValueError, match="block_kv=48 must be a power of two.*impl='gpu'"):
        sparse_attention.masked_self_attention(q, k, v, sparse_attention.sort_objects(ids, 32, 48), impl="gpu",
                                               interpret=True)


@pytest.mark.parametrize("impl,platform,head", [("gpu", "cuda", 64), ("gpu", "cuda", 40), ("splash", "tpu", 128)])
def test_kernels_lower_for_their_device(impl, platform, head):
    """On this CPU, the jitted value and gradient lower for the device (bf16, the model's default blocks): Triton
    for the GPU kernels (JAX's default would be Mosaic GPU, which refuses them), Mosaic TPU for splash."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 4, (1, 1000)), jnp.int32)
    x = jnp.zeros((1, 1000, 2, head), jnp.bfloat16)

    def f(q, k, v):
        sort = sparse_attention.sort_objects(ids, impl=impl)
        return jnp.sum(sparse_attention.masked_self_attention(q, k, v, sort, impl=impl).astype(jnp.float32))

    for fn, calls in ((f, 1), (jax.grad(f, argnums=(0, 1, 2)), 3)):
        text = jax.jit(fn).trace(x, x, x).lower(lowering_platforms=(platform,)).as_text()
        name = "xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
        assert text.count(name) >= calls, (platform, text.count(name))


def test_splash_tables_skip_off_diagonal_and_match_upstream():
    """Objects of 200, 184 and 128 tokens in 128-token blocks: the table visits off-diagonal steps and skips others;
    values and gradients equal the dense path, and the tables agree with splash's own `process_dynamic_mask` (and its
    dkv version) built from the dense [N, N] mask: the same visited steps, the same blocks fetched there."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as upstream

    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2]], np.int32), [200, 184, 128], axis=1))
    visited = np.asarray(sparse_pallas.visited_blocks(ids, 128))[0]
    np.testing.assert_array_equal(visited, [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    dense_mask = np.asarray(ids[0, :, None] == ids[0, None, :])[None]
    ours = sparse_pallas._mask_infos(ids[0], 128)
    for got, fn in ((ours[0], upstream.process_dynamic_mask), (ours[2], upstream.process_dynamic_mask_dkv)):
        want = fn(jnp.asarray(dense_mask), (128, 128))[0]
        seen = np.asarray(want.block_mask) > 0
        np.testing.assert_array_equal(np.asarray(got.block_mask) > 0, seen)
        np.testing.assert_array_equal(np.asarray(got.data_next)[seen], np.asarray(want.data_next)[seen])
    rng = np.random.default_rng(8)
    perm = rng.permutation(512)
    shuffled = ids[:, perm]
    q, k, v, w = (jnp.asarray(rng.standard_normal((1, 512, 2, D)), jnp.float32) for _ in range(4))
    _sorted_equals_dense(sparse_attention.sort_objects(shuffled, 128), "splash", q, k, v, w, shuffled)


def test_splash_block_table_straddling():
    """A block that holds two objects visits both objects' blocks, and the table is symmetric (the dkv pass walks
    it by columns): ids 0 x 200, 1 x 184 in 128-token blocks -> block 1 holds both."""
    ids = jnp.asarray(np.repeat(np.array([[0, 1]], np.int32), [200, 184], axis=1))
    visited = np.asarray(sparse_pallas.visited_blocks(ids, 128))[0]
    np.testing.assert_array_equal(visited, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    assert [sparse_pallas.splash_block(n, b) for n, b in ((192, 32), (4096, 256), (32760, 1024), (100, None))] == \
        [128, 256, 512, 128]


def test_sort_and_work_skipped():
    """Sorted ids ascend, inv inverts perm, and only same-object pairs run: three objects of 64 tokens with
    32-token blocks are 6 query blocks x 2 key chunks = 12 pairs (dense: 6 x 6 = 36)."""
    ids = np.repeat(np.array([2, 0, 5], np.int32), 64)
    ids = np.stack([ids, np.random.default_rng(1).permutation(ids)])
    sort = sparse_attention.sort_objects(jnp.asarray(ids), 32)
    perm, inv = np.asarray(sort.perm), np.asarray(sort.inv)
    for e in range(2):
        assert np.all(np.diff(ids[e][perm[e]]) >= 0)
        np.testing.assert_array_equal(inv[e][perm[e]], np.arange(ids.shape[1]))
    np.testing.assert_array_equal(sort.pairs(), [12, 12])
    straddle = sparse_attention.sort_objects(jnp.asarray(np.repeat(np.array([[0, 1]], np.int32), [48, 48], axis=1)),
                                             32)
    np.testing.assert_array_equal(straddle.kv_chunks, [[2, 3, 2]])  # the middle block holds both objects
    assert [sparse_attention.default_block(n, "cpu") for n in (256, 1024, 4096)] == [64, 128, 256]
    assert sparse_attention.default_block(32760, "gpu") == 1024  # the XLA loop on an accelerator: launch-bound
    # the kernels' own tiles: the Pallas GPU kernel 64 (at most N rounded up), splash 512 (rounded to 128 lanes)
    assert [sparse_attention.default_block(n, impl="gpu") for n in (20, 32760)] == [32, 64]
    assert sparse_attention.default_block(32760, impl="splash") == 512


def test_under_a_mesh_per_shard():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 64, 2, D)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(rng.integers(0, 3, (4, 64)), jnp.int32)
    f = lambda q, k, v, ids: _sparse(q, k, v, ids)  # noqa: E731
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, ids))
        got = jax.jit(f)(q, k, v, ids)
    np.testing.assert_allclose(got, _dense(q, k, v, ids), atol=TOL, rtol=0)


def test_kv_ids_must_be_the_same_sort(qkvw):
    q, k, v, _ = qkvw
    sort = sparse_attention.sort_objects(jnp.asarray(CASES["random"]))
    with pytest.raises(ValueError, match="same ObjectSort"):
        attention.dot_product_attention(q, k, v, q_ids=sort, kv_ids=sort.ids)


def test_config_field_checked():
    cfg = config_lib.build(2, "tiny")
    assert cfg.model.attention_sparse is False
    # ConfigDict keeps a field's type; a config read back from JSON need not, so the check is by value
    cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), "attention_sparse": "yes"})
    with pytest.raises(config_lib.ConfigError, match="model.attention_sparse"):
        config_lib.validate(cfg)


# ---- the DiT: sparse == dense, and one sort per forward pass ---------------------------------------------------------

C = 4
PATCH = (1, 2, 2)
LT, LH, LW = 3, 8, 8  # latent grid -> 3 x 4 x 4 = 48 tokens
TEXT_DIM, LC, S, LP = 16, 3, 3, 2
CFG = dit.DiTConfig(dim=24, num_layers=3, num_heads=2, ffn_dim=32, text_dim=TEXT_DIM, freq_dim=16, ttm_layers=2,
                    patch_size=PATCH)


def _randomize(params, seed):
    """Every all-zero leaf (the TTM layers' zero-initialised `to_out`, biases) random, so the added layers act."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for key, v in flat.items():
        if not np.any(np.asarray(v)):
            flat[key] = jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def dit_case():
    """Params of a 3-block DiT with 2 TTM blocks (unrolled layout; `dit.scan_layout` for the scanned one) and
    inputs: two examples, ids with background, two objects and padding."""
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    cfg = dataclasses.replace(CFG, scan_layers=False)
    args, init_kw = dit.init_inputs(cfg, 3 * C)
    boxed = jax.jit(dit.DiT(cfg, 3 * C, C).init).lower(jax.random.key(0), *args, **init_kw).compile(
        compiler_options=O0)(jax.random.key(0), *args, **init_kw)
    params = _randomize(jax.tree.map(np.asarray, nn.unbox(boxed)["params"]), 1)
    x, timestep, context = normal(2, LT, LH, LW, 3 * C), jnp.array([300.0, 700.0]), normal(2, LC, TEXT_DIM)
    local_mask = np.zeros((2, S, LP), bool)
    local_mask[:, :, 0] = True
    ids = rng.integers(-1, 3, (2, LT * (LH // 2) * (LW // 2))).astype(np.int32)
    ids[1, :20] = 0
    kw = dict(local_context=normal(2, S * LP, TEXT_DIM), local_ids=masks.local_prompt_ids(jnp.asarray(local_mask)),
              token_ids=jnp.asarray(ids), cross_token_ids=jnp.asarray(np.maximum(ids, 0)))
    return params, (x, timestep, context), kw


O0 = {"xla_backend_optimization_level": 0}


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])  # unrolled: slow (~15 s)
def test_dit_sparse_equals_dense(scan, dit_case):
    params, args, kw = dit_case
    if scan:
        params = dit.scan_layout(params, ttm_layers=CFG.ttm_layers)
    outs, grads = {}, {}
    for sparse in (False, True):
        model = dit.DiT(dataclasses.replace(CFG, scan_layers=scan, attention_sparse=sparse), 3 * C, C)

        def loss(p, *a, model=model):
            out = model.apply({"params": p}, *a, **kw)
            return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

        f = jax.jit(jax.value_and_grad(loss, has_aux=True))  # the parameters' gradients through the sparse op too
        (_, out), g = f.lower(params, *args).compile(compiler_options=O0)(params, *args)
        outs[sparse], grads[sparse] = np.asarray(out), jax.tree.map(np.asarray, g)
    assert np.abs(outs[False]).max() > 0
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-4, rtol=1e-5)
    flat_dense = jax.tree_util.tree_leaves_with_path(grads[False])
    assert max(np.abs(g).max() for _, g in flat_dense) > 0
    for (path, gd), gs in zip(flat_dense, jax.tree.leaves(grads[True]), strict=True):
        np.testing.assert_allclose(gs, gd, atol=2e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_dit_sorts_once_per_forward(dit_case):
    """One sort of the token ids per forward pass, shared by both masked self-attention layers: the sparse model has
    exactly one more `sort` than the dense one (the cross-attention's sanitize_query_ids sorts in both)."""
    params, args, kw = dit_case

    def sorts(sparse):
        model = dit.DiT(dataclasses.replace(CFG, scan_layers=False, attention_sparse=sparse), 3 * C, C)
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, *args, **kw))(params)).count(" sort[")

    assert sorts(True) == sorts(False) + 1
