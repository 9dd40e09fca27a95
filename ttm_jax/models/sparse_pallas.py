"""Object-sparse masked self-attention as accelerator kernels: TPU splash attention with an on-device block table,
and a GPU Pallas kernel that visits only each query block's key chunks.

Both take the tokens already sorted by object id (`sparse_attention.masked_self_attention` sorts, unsorts and
handles rows with a negative id), so every object is one contiguous run and the keys a block of queries may attend
are one contiguous range of key blocks:

  splash_sorted(qs, ks, vs, ids, scale=, interpret=)
      TPU. Splash's kernels walk a grid of (query block, key block) and skip a grid step whose `block_mask` entry is
      0, without fetching its keys (`data_next` repeats the last fetched block). Splash builds that table from a
      static numpy mask; here it is built on device, per example, from the sorted ids (`block_table`): block (i, j)
      is visited iff query block i and key block j share an object id, and inside a visited block the segment ids
      (`SegmentIds(q=ids, kv=ids)`) mask the pairs of different objects. No `[N, N]` mask exists at any point.
      Values and gradients are splash's own kernels (forward, dq, dkv), each with its table.
  gpu_forward(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, block, block_kv, interpret) / gpu_backward(...)
      GPU (Pallas lowered with Triton: `compiler_params`, as jax's own GPU attention; the JAX default would be
      Mosaic GPU). One program per (example, head, query block) runs flash attention's online
      softmax over only its `chunks` key chunks from `start` (`ObjectSort.kv_start` / `kv_chunks`), a loop with a
      data-dependent trip count. `gpu_backward`: a dq kernel over the same key chunks, and a dk / dv kernel per key
      block over the query blocks that may attend it (`query_ranges`), both recomputing the probabilities from the
      saved log-sum-exp; so both passes skip the other objects' keys.

Triton wants power-of-two tiles: `gpu_tiles` checks the blocks (16 to 128) and the head size is zero-padded to a
power of two >= 16 (`pad_head`: exact, the logits do not change and the padded columns are dropped). Matmuls take the
inputs' dtype (bf16 on tensor cores) with float32 accumulation; softmax statistics and accumulators are float32.

Tested in interpret mode on CPU against the dense reference, values and gradients, and lowered for CUDA and TPU on
CPU (tests/test_sparse_attention.py); run on a device by `bench/accelerator.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PAD_ID = int(jnp.iinfo(jnp.int32).max)  # id of the padded tokens, sorted after every real id (here and in ObjectSort)


def id_runs(sorted_ids: jax.Array, lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ascending ids `[B, L]`: the positions `[start, end)` of the tokens with an id in `[lo, hi]`
    (`lo`, `hi` `[B, M]`): one contiguous run, as the ids are sorted."""
    start = jax.vmap(lambda s, x: jnp.searchsorted(s, x, side="left"))(sorted_ids, lo)
    end = jax.vmap(lambda s, x: jnp.searchsorted(s, x, side="right"))(sorted_ids, hi)
    return start.astype(jnp.int32), end.astype(jnp.int32)

# Splash's tiles are multiples of 128 lanes; 512 is a good TPU tile, a shorter sequence takes one tile of its length.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def splash_block(n: int, block: int | None = None) -> int:
    """Splash's block size for N sorted tokens: `block` (default 512) capped at N and at 512, rounded up to 128."""
    block = SPLASH_MAX_BLOCK if block is None else min(int(block), SPLASH_MAX_BLOCK)
    return -(-min(block, n) // SPLASH_LANES) * SPLASH_LANES


def block_table(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Sorted ids `[B, L]` (L a multiple of `block`) -> (first, last) int32 `[B, L / block]`: the key blocks
    `first..last` (inclusive) hold every key that query block i may attend.

    Block i holds ids `ids[i*block] .. ids[i*block + block - 1]` (sorted, so its smallest and largest); the keys of
    those ids are one contiguous sorted run. The relation is symmetric: key block j is in query block i's range
    iff the two blocks share an id, iff query block j's range holds key block i (a run of sorted ids that holds
    values below and above some id also holds every token of that id)."""
    b_sz, length = ids.shape
    nb = length // block
    blocks = ids.reshape(b_sz, nb, block)
    start, end = id_runs(ids, blocks[:, :, 0], blocks[:, :, -1])
    return start // block, (end - 1) // block


def _visits(first: jax.Array, last: jax.Array) -> jax.Array:
    """bool `[..., nb, nb]` from `block_table`'s `[..., nb]`: key block j lies in query block i's range."""
    j = jnp.arange(first.shape[-1], dtype=jnp.int32)
    return (j >= first[..., :, None]) & (j <= last[..., :, None])


def visited_blocks(ids: jax.Array, block: int) -> jax.Array:
    """bool `[B, nb, nb]`: the (query block, key block) grid steps `splash_sorted` computes; the rest are skipped."""
    return _visits(*block_table(ids, block))


def _mask_infos(ids: jax.Array, block: int):
    """The splash `MaskInfo`s (forward / dq, and dkv) of one example's sorted ids `[L]`, built on device.

    block_mask 2 ("full": no partial-mask block; the segment ids still mask) on visited steps, 0 elsewhere;
    data_next: the key block to fetch (forward, dq: along the key axis) or the query block (dkv: along the query
    axis), clamped to the visited range so a skipped step fetches nothing new. One table for every head (leading
    dimension 1, which splash broadcasts)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib

    first, last = (x[0] for x in block_table(ids[None], block))
    nb = first.shape[0]
    idx = jnp.arange(nb, dtype=jnp.int32)
    visit = _visits(first, last)  # [query block i, key block j]
    # scalar memory is small on TPU: int8 / int16 where the values fit, as splash's own tables (the kernels upcast)
    index_dtype = jnp.int8 if nb <= 127 else jnp.int16 if nb <= 32767 else jnp.int32
    block_mask = jnp.where(visit, 2, 0).astype(jnp.int8)[None]
    kv_next = jnp.clip(idx[None, :], first[:, None], last[:, None]).astype(index_dtype)[None]
    # dkv walks query blocks i for a key block j: by symmetry they are first[j]..last[j]
    q_next = jnp.clip(idx[:, None], first[None, :], last[None, :]).astype(index_dtype)[None]

    def info(data_next):
        return mask_info_lib.MaskInfo(data_next=data_next, mask_next=None, block_mask=block_mask,
                                      partial_mask_blocks=None, q_sequence=None, is_dynamic_mask=True)

    return info(kv_next), info(kv_next), info(q_next)


def splash_sorted(qs: jax.Array, ks: jax.Array, vs: jax.Array, ids: jax.Array, *, scale: float,
                  block: int | None = None, interpret: bool = False) -> jax.Array:
    """Masked self-attention over sorted tokens with splash, skipping the blocks of other objects.

    qs, ks, vs `[B, H, N, D]` in sorted order; ids int32 `[B, N]` sorted ascending (negative ids attend each other:
    the caller replaces those rows); block: the tile, made a multiple of 128 up to 512 (`splash_block`). Returns
    `[B, H, N, D]` in qs' dtype.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    b_sz, h, n, d = qs.shape
    block = splash_block(n, block)
    length = -(-n // block) * block
    pad = ((0, 0), (0, 0), (0, length - n), (0, 0))
    qp = jnp.pad(qs * jnp.asarray(scale, qs.dtype), pad)  # splash applies no softmax scale of its own
    kp, vp = jnp.pad(ks, pad), jnp.pad(vs, pad)
    idp = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, length - n)), constant_values=PAD_ID)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def one(args):
        q, k, v, seg = args
        fwd, dq, dkv = _mask_infos(seg, block)
        kernel = kernel_lib.SplashAttentionKernel(
            fwd, dq, dkv, block_sizes=sizes, is_mqa=False, save_residuals=False,
            mask_value=kernel_lib.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None, residual_checkpoint_name=None,
            mask_function=None, interpret=interpret)
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    out = jax.lax.map(one, (qp, kp, vp, idp))  # per example: each has its own table
    return out[:, :, :n].astype(qs.dtype)


# ---- GPU: Pallas kernels (Triton) over each query block's key chunks ------------------------------------------------


GPU_MIN_TILE, GPU_MAX_TILE = 16, 128  # Triton tiles: powers of two; a dot needs >= 16 on each side


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def gpu_tiles(block: int, block_kv: int) -> None:
    """Refuse blocks the Triton kernels cannot tile: powers of two in [16, 128] (`sort_objects(..., impl="gpu")`
    picks 64)."""
    for name, v in (("block", block), ("block_kv", block_kv)):
        if v & (v - 1) or not GPU_MIN_TILE <= v <= GPU_MAX_TILE:
            raise ValueError(f"sparse attention impl='gpu': {name}={v} must be a power of two in [{GPU_MIN_TILE}, "
                             f"{GPU_MAX_TILE}] (Triton tiles); sort the ids with "
                             f"sparse_attention.sort_objects(ids, impl='gpu')")


def pad_head(x: jax.Array) -> jax.Array:
    """`[..., D]` zero-padded to a power of two >= 16 (Triton's tile and dot sizes); exact for attention."""
    d = x.shape[-1]
    target = max(GPU_MIN_TILE, 1 << (d - 1).bit_length())
    return x if target == d else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, target - d)])


def _triton_params(d: int):
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _gpu_forward_kernel(start_ref, chunks_ref, q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, lse_ref, *,
                        scale: float, block_kv: int):
    from jax.experimental import pallas as pl

    b, i = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]  # [block, D], the inputs' dtype (bf16: tensor cores), float32 accumulation
    iq = qid_ref[...]  # [block]
    s0 = start_ref[b, i]
    blk, d = q.shape

    def chunk(j, carry):  # online softmax over one key chunk
        m, total, acc = carry
        pos = s0 + j * block_kv
        k = k_ref[pl.ds(pos, block_kv), :]
        v = v_ref[pl.ds(pos, block_kv), :]
        ik = kid_ref[pl.ds(pos, block_kv)]
        s = _dot(q, k.T) * scale
        allowed = (iq[:, None] == ik[None, :]) & (iq[:, None] >= 0)
        s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + _dot(p.astype(v.dtype), v)

    init = (jnp.full((blk,), -jnp.inf, jnp.float32), jnp.zeros((blk,), jnp.float32),
            jnp.zeros((blk, d), jnp.float32))
    m, total, acc = jax.lax.fori_loop(0, chunks_ref[b, i], chunk, init)
    some = total > 0  # False: no allowed key (negative id or padding row); lse inf keeps the backward at 0
    o_ref[...] = (acc / jnp.where(some, total, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)), jnp.inf)


def gpu_forward(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, block, block_kv, interpret):
    """(out float32 `[B, H, Lq, D]`, lse `[B, H, Lq]`) over sorted queries `[B, H, nq*block, D]` and keys / values
    `[B, H, N + block_kv, D]` (the `ObjectSort` layout), visiting only `chunks[b, i]` key chunks from `start[b, i]`."""
    from jax.experimental import pallas as pl

    b_sz, h, lq, d = qs.shape
    lk = ks.shape[2]
    nq = lq // block
    whole = lambda shape: pl.BlockSpec(shape, lambda b, hh, i: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_gpu_forward_kernel, scale=scale, block_kv=block_kv)
    return pl.pallas_call(
        kernel,
        grid=(b_sz, h, nq),
        in_specs=[
            whole((b_sz, nq)), whole((b_sz, nq)),
            pl.BlockSpec((None, None, block, d), lambda b, hh, i: (b, hh, i, 0)),
            pl.BlockSpec((None, None, lk, d), lambda b, hh, i: (b, hh, 0, 0)),
            pl.BlockSpec((None, None, lk, d), lambda b, hh, i: (b, hh, 0, 0)),
            pl.BlockSpec((None, block), lambda b, hh, i: (b, i)),
            pl.BlockSpec((None, lk), lambda b, hh, i: (b, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, block, d), lambda b, hh, i: (b, hh, i, 0)),
                   pl.BlockSpec((None, None, block), lambda b, hh, i: (b, hh, i))],
        out_shape=[jax.ShapeDtypeStruct((b_sz, h, lq, d), jnp.float32),
                   jax.ShapeDtypeStruct((b_sz, h, lq), jnp.float32)],
        compiler_params=_triton_params(d),
        interpret=interpret,
        name="ttm_object_sparse_fwd",
    )(start, chunks, qs, ks, vs, q_ids, kv_ids)


def _gpu_dq_kernel(start_ref, chunks_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qid_ref, kid_ref,
                   dq_ref, *, scale: float, block_kv: int):
    from jax.experimental import pallas as pl

    b, i = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta, iq = lse_ref[...], delta_ref[...], qid_ref[...]
    s0 = start_ref[b, i]

    def chunk(j, dq):
        pos = s0 + j * block_kv
        k = k_ref[pl.ds(pos, block_kv), :]
        v = v_ref[pl.ds(pos, block_kv), :]
        ik = kid_ref[pl.ds(pos, block_kv)]
        allowed = (iq[:, None] == ik[None, :]) & (iq[:, None] >= 0)
        p = jnp.where(allowed, jnp.exp(_dot(q, k.T) * scale - lse[:, None]), 0.0)
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k) * scale

    dq_ref[...] = jax.lax.fori_loop(0, chunks_ref[b, i], chunk, jnp.zeros(q.shape, jnp.float32))


def _gpu_dkv_kernel(qstart_ref, qchunks_ref, k_ref, v_ref, kid_ref, q_ref, do_ref, lse_ref, delta_ref, qid_ref,
                    dk_ref, dv_ref, *, scale: float, block: int):
    from jax.experimental import pallas as pl

    b, j = pl.program_id(0), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [block_kv, D]
    ik = kid_ref[...]
    q0 = qstart_ref[b, j]

    def q_block(i, carry):
        dk, dv = carry
        pos = (q0 + i) * block
        q = q_ref[pl.ds(pos, block), :]
        do = do_ref[pl.ds(pos, block), :]
        lse, delta = lse_ref[pl.ds(pos, block)], delta_ref[pl.ds(pos, block)]
        iq = qid_ref[pl.ds(pos, block)]
        allowed = (iq[:, None] == ik[None, :]) & (iq[:, None] >= 0)
        p = jnp.where(allowed, jnp.exp(_dot(q, k.T) * scale - lse[:, None]), 0.0)  # [block, block_kv]
        ds = p * (_dot(do, v.T) - delta[:, None])
        return dk + _dot(ds.T.astype(q.dtype), q) * scale, dv + _dot(p.T.astype(do.dtype), do)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, qchunks_ref[b, j], q_block, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk, dv


def query_ranges(kv_ids: jax.Array, n: int, block: int, block_kv: int) -> tuple[jax.Array, jax.Array]:
    """For each aligned key block j of the sorted keys (`kv_ids` `[B, N + block_kv]`, padded with int32 max):
    (first query block, number of query blocks) int32 `[B, ceil(N / block_kv)]` whose queries may attend it; the
    queries sit at the same sorted positions as the keys, in blocks of `block`. 0 blocks: no real key in it."""
    b_sz = kv_ids.shape[0]
    nkv = -(-n // block_kv)
    ids = kv_ids[:, :n]
    blocks = jnp.pad(ids, ((0, 0), (0, nkv * block_kv - n)), constant_values=PAD_ID).reshape(b_sz, nkv, block_kv)
    real = (blocks >= 0) & (blocks != PAD_ID)  # negative ids are never attended, padding is not a key
    lo = jnp.min(jnp.where(real, blocks, PAD_ID), axis=2)
    hi = jnp.max(jnp.where(real, blocks, -1), axis=2)
    start, end = id_runs(ids, lo, hi)
    empty = hi < 0
    first = jnp.where(empty, 0, start // block)
    count = jnp.where(empty, 0, -(-end // block) - start // block)
    return first.astype(jnp.int32), count.astype(jnp.int32)


def gpu_backward(qs, ks, vs, q_ids, kv_ids, start, chunks, out, lse, g, scale, block, block_kv, interpret):
    """(dq, dk, dv) float32 of `gpu_forward` given the cotangent `g`: a dq kernel over each query block's key chunks
    and a dk / dv kernel over each key block's query blocks (`query_ranges`), probabilities recomputed from the
    saved log-sum-exp (flash attention's backward). Only the pairs the forward computed are visited."""
    from jax.experimental import pallas as pl

    b_sz, h, lq, d = qs.shape
    lk = ks.shape[2]
    n = lk - block_kv
    nq, nkv = lq // block, -(-n // block_kv)
    delta = jnp.sum(g.astype(jnp.float32) * out, axis=-1)  # rowsum(dO * O)
    g = g.astype(qs.dtype)
    qstart, qchunks = query_ranges(kv_ids, n, block, block_kv)
    whole = lambda shape: pl.BlockSpec(shape, lambda b, hh, i: (0,) * len(shape))  # noqa: E731
    rows = lambda length: pl.BlockSpec((None, None, length, d), lambda b, hh, i: (b, hh, 0, 0))  # noqa: E731
    vec = lambda length: pl.BlockSpec((None, None, length), lambda b, hh, i: (b, hh, 0))  # noqa: E731
    q_blk = pl.BlockSpec((None, None, block, d), lambda b, hh, i: (b, hh, i, 0))
    q_vec = pl.BlockSpec((None, None, block), lambda b, hh, i: (b, hh, i))
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, scale=scale, block_kv=block_kv),
        grid=(b_sz, h, nq),
        in_specs=[whole((b_sz, nq)), whole((b_sz, nq)), q_blk, q_blk, q_vec, q_vec, rows(lk), rows(lk),
                  pl.BlockSpec((None, block), lambda b, hh, i: (b, i)),
                  pl.BlockSpec((None, lk), lambda b, hh, i: (b, 0))],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(qs.shape, jnp.float32),
        compiler_params=_triton_params(d),
        interpret=interpret,
        name="ttm_object_sparse_dq",
    )(start, chunks, qs, g, lse, delta, ks, vs, q_ids, kv_ids)
    kv_blk = pl.BlockSpec((None, None, block_kv, d), lambda b, hh, j: (b, hh, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, scale=scale, block=block),
        grid=(b_sz, h, nkv),
        in_specs=[whole((b_sz, nkv)), whole((b_sz, nkv)), kv_blk, kv_blk,
                  pl.BlockSpec((None, block_kv), lambda b, hh, j: (b, j)), rows(lq), rows(lq), vec(lq), vec(lq),
                  pl.BlockSpec((None, lq), lambda b, hh, j: (b, 0))],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct((b_sz, h, nkv * block_kv, d), jnp.float32)] * 2,
        compiler_params=_triton_params(d),
        interpret=interpret,
        name="ttm_object_sparse_dkv",
    )(qstart, qchunks, ks, vs, kv_ids, qs, g, lse, delta, q_ids)
    pad = ((0, 0), (0, 0), (0, lk - nkv * block_kv), (0, 0))  # padding keys: never attended, gradient 0
    return dq, jnp.pad(dk, pad), jnp.pad(dv, pad)
