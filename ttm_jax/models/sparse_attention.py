"""Object-sparse masked self-attention: the work of TTM's masked self-attention is sum_k n_k^2, not N^2.

Query i attends key j iff `ids[i] == ids[j] >= 0` (`masks.allowed`), so tokens of different objects never interact.
Sorting each example's tokens by id (stable) turns every object into one contiguous run; a block of `block` sorted
queries then needs only the keys whose ids lie in its [min id, max id] range, itself one contiguous run
`[kv_start, kv_start + kv_chunks * block)` of the sorted keys. The op loops over the query blocks and, for each, over
only those key chunks (a `while` loop with a data-dependent trip count, online softmax), then unsorts:

  sort_objects(ids, block) -> ObjectSort     once per forward pass (the DiT builds it from token_ids and passes it
                                             to every masked self-attention layer, so the sort, the inverse
                                             permutation and the per-block key ranges are computed once)
  masked_self_attention(q, k, v, sort)       [B, N, H, D] -> [B, N, H, D]; `sort` may also be the raw ids

Exact (not approximate): every allowed (query, key) pair is computed, every other pair is skipped, so values and
gradients equal the dense reference `attention.dot_product_attention(..., impl="xla")` up to float rounding
(tests/test_sparse_attention.py). The gradient is a `custom_vjp` that loops over the same (query block, key chunk)
pairs (flash-attention backward: recompute the probabilities from the saved log-sum-exp), so neither pass holds an
`[N, N]` array. Rows with a negative id (prompt padding; video tokens never carry one) have no allowed key; the
reference's finite large negative logit then gives them uniform weights over every key, i.e. the mean of v, and so
does this op.

Work: a query block straddling two objects pays for both objects' keys, and each range is rounded up to whole
chunks, so the pairs computed are about sum_k (n_k + block) * (n_k + block); `block` trades that against per-chunk
overhead (`default_block`: 256 at N = 4096 on CPU; bench/attention.py). Any backend (plain XLA). On TPU
(`impl="splash"`) the sorted tokens go through splash attention with a block table built on device from the sorted
ids, and on GPU (`impl="gpu"`) through Pallas kernels that read `kv_start` / `kv_chunks`
(`ttm_jax/models/sparse_pallas.py`); both skip the same blocks this loop skips.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from ttm_jax.models import sparse_pallas

_PAD_KEY = sparse_pallas.PAD_ID  # id of the padding keys after the sorted ones: above every real id
DEFAULT_BLOCK = 256  # the largest block default_block picks on CPU (bench/attention.py)
ACCELERATOR_BLOCK = 1024  # on GPU / TPU each loop step is a few small kernel launches: fewer, larger (not measured)
GPU_BLOCK = 64  # the Pallas GPU kernel's query block and key chunk: a 64 x 64 float32 tile of logits per program


def default_block(n: int, backend: str | None = None, impl: str = "xla") -> int:
    """The block size for N tokens: the power of two nearest 4 sqrt(N), in [16, 256] (N=256: 64, 1024: 128, 4096:
    256): fewer, larger blocks amortise the per-chunk loop overhead; smaller ones waste less at object boundaries.
    On GPU / TPU (`backend`, default the JAX backend) 16 sqrt(N) capped at 1024 (the loop is launch-bound there).
    The kernels have tiles of their own: `impl="gpu"` (the Pallas kernel) 64 x 64, whatever N (at most N rounded
    up to 16); `impl="splash"` 512 (`sparse_pallas.splash_block` rounds to its 128-lane tiles)."""
    if impl == "gpu":
        return int(min(GPU_BLOCK, max(16, 1 << (max(n, 1) - 1).bit_length())))
    if impl == "splash":
        return sparse_pallas.SPLASH_MAX_BLOCK
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return int(min(ACCELERATOR_BLOCK, max(16, 1 << round(math.log2(max(n, 1)) / 2 + 4))))
    return int(min(DEFAULT_BLOCK, max(16, 1 << round(math.log2(max(n, 1)) / 2 + 2))))


@flax.struct.dataclass
class ObjectSort:
    """Tokens sorted by object id, computed once per forward pass from the token ids (`sort_objects`).

    ids `[B, N]` (original order), perm `[B, N]` (sorted position -> original index), inv `[B, N]` (original index
    -> sorted position), q_ids `[B, nq * block]` (sorted ids of the query rows, -1 for negative ids and padding),
    kv_ids `[B, N + block_kv]` (sorted ids of the keys, padded with int32 max), kv_start / kv_chunks `[B, nq]` (the
    sorted key range each query block needs: `kv_chunks` chunks of `block_kv` keys from `kv_start`). All int32.
    """

    ids: jax.Array
    perm: jax.Array
    inv: jax.Array
    q_ids: jax.Array
    kv_ids: jax.Array
    kv_start: jax.Array
    kv_chunks: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK)
    block_kv: int = flax.struct.field(pytree_node=False, default=DEFAULT_BLOCK)

    @property
    def shape(self) -> tuple[int, int]:
        """`[B, N]`, the shape of the ids (so that shape checks written for id arrays apply)."""
        return self.ids.shape

    @property
    def num_blocks(self) -> int:
        return self.q_ids.shape[1] // self.block

    def pairs(self) -> jax.Array:
        """int32 `[B]`: the (query block, key chunk) pairs computed per example (each `block x block_kv` logits)."""
        return jnp.sum(self.kv_chunks, axis=1)


def sort_objects(ids: jax.Array, block: int | None = None, block_kv: int | None = None, *,
                 impl: str = "xla") -> ObjectSort:
    """int32 ids `[B, N]` -> `ObjectSort` (stable sort by id, per-query-block key ranges). Jit-friendly, O(N log N).

    `block` / `block_kv` (static): query block and key chunk sizes; None picks `default_block(N, impl=impl)`
    (block_kv: block), `impl` being the attention implementation that will consume the sort.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"sparse_attention.sort_objects: ids must be int32 [B, N], got shape {ids.shape}")
    b_sz, n = ids.shape
    block = default_block(n, impl=impl) if block is None else int(block)
    block_kv = block if block_kv is None else int(block_kv)
    if block <= 0 or block_kv <= 0:
        raise ValueError(f"sparse_attention.sort_objects: block={block}, block_kv={block_kv} must be positive")
    nq = -(-n // block)
    perm = jnp.argsort(ids, axis=1, stable=True).astype(jnp.int32)
    sorted_ids = jnp.take_along_axis(ids, perm, axis=1)
    rows = jnp.arange(b_sz)[:, None]
    inv = jnp.zeros_like(perm).at[rows, perm].set(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b_sz, n)))
    q_ids = jnp.pad(jnp.where(sorted_ids >= 0, sorted_ids, -1), ((0, 0), (0, nq * block - n)), constant_values=-1)
    kv_ids = jnp.pad(sorted_ids, ((0, 0), (0, block_kv)), constant_values=_PAD_KEY)
    start, chunks = key_runs(kv_ids, q_ids, block, block_kv, n)
    return ObjectSort(ids=ids, perm=perm, inv=inv, q_ids=q_ids, kv_ids=kv_ids, kv_start=start, kv_chunks=chunks,
                      block=block, block_kv=block_kv)


IMPLS = ("xla", "splash", "gpu")


def masked_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, sort: ObjectSort | jax.Array, *,
                          scale: float | None = None, block: int | None = None, impl: str = "xla",
                          interpret: bool = False) -> jax.Array:
    """Masked self-attention (`ids[i] == ids[j] >= 0`) over the object-sorted tokens; equal to the dense reference.

    q, k, v `[B, N, H, D]`; sort: an `ObjectSort` of the ids (shared by the layers of a forward pass) or the ids
    int32 `[B, N]` (sorted here, with `block`). scale: logit scale, None is `1/sqrt(D)`. impl: the block loop of
    this file ("xla", any backend), splash with an on-device block table ("splash", TPU) or the Pallas forward
    kernels ("gpu", GPU: forward, dq and dk / dv); `interpret` runs the Pallas ones on CPU
    (`ttm_jax/models/sparse_pallas.py`). Returns `[B, N, H, D]` in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_attention: impl={impl!r} is unknown; choose one of {IMPLS}")
    if not isinstance(sort, ObjectSort):
        sort = sort_objects(sort, block, impl=impl)
    b_sz, n, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"sparse_attention: q, k, v must all be [B, N, H, D] (self-attention); got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if sort.ids.shape != (b_sz, n):
        raise ValueError(f"sparse_attention: ids must be int32 [B, N] = {(b_sz, n)}, got {sort.ids.shape}")
    scale = float(d) ** -0.5 if scale is None else float(scale)
    blk, bkv = sort.block, sort.block_kv

    def to_sorted(x: jax.Array, length: int) -> jax.Array:
        return sorted_heads_major(x, sort, length)

    if impl == "splash":  # splash pads to its own tiles; the sort's key ids are the sorted ids, then padding
        out = sparse_pallas.splash_sorted(to_sorted(q, n), to_sorted(k, n), to_sorted(v, n), sort.kv_ids[:, :n],
                                          scale=scale, block=blk, interpret=interpret)
    else:
        qs = to_sorted(q, sort.q_ids.shape[1])
        ks, vs = to_sorted(k, n + bkv), to_sorted(v, n + bkv)
        if impl == "gpu":  # Triton: power-of-two tiles, head size padded (exact)
            sparse_pallas.gpu_tiles(blk, bkv)
            qs, ks, vs = (sparse_pallas.pad_head(x) for x in (qs, ks, vs))
        out = _block_attention(qs, ks, vs, sort.q_ids, sort.kv_ids, sort.kv_start, sort.kv_chunks, scale, blk, bkv,
                               impl == "gpu", interpret)[..., :d]
    # No allowed key (negative id): the reference's uniform softmax over every key, the mean of v.
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True)
    return unsort(out, sort, mean_v).astype(q.dtype)


def sorted_heads_major(x: jax.Array, sort: ObjectSort, length: int) -> jax.Array:
    """x `[B, N, H, D]` -> `[B, H, length, D]`: the tokens in the sort's order, zero-padded to `length` >= N."""
    n = x.shape[1]
    xs = jnp.take_along_axis(x, sort.perm[:, :, None, None], axis=1)
    xs = jnp.pad(xs, ((0, 0), (0, length - n), (0, 0), (0, 0)))
    return xs.transpose(0, 2, 1, 3)


def unsort(out: jax.Array, sort: ObjectSort, mean_v: jax.Array) -> jax.Array:
    """Sorted output `[B, H, >= N, D]` -> `[B, N, H, D]` in the original token order, rows with a negative id (no
    allowed key) replaced by `mean_v [B, 1, H, D]` (the mean of all the values: the reference's uniform row)."""
    n = sort.ids.shape[1]
    out = out.transpose(0, 2, 1, 3)[:, :n]
    out = jnp.take_along_axis(out, sort.inv[:, :, None, None], axis=1)
    return jnp.where((sort.ids >= 0)[:, :, None, None], out, mean_v)


# ---- the block loop: queries [B, H, nq*blk, D] against keys / values [B, H, N+bkv, D], both sorted -----------------

def _q_block(qs: jax.Array, q_ids: jax.Array, i: jax.Array, nq: int, blk: int):
    bi, qi = i // nq, i % nq
    h, d = qs.shape[1], qs.shape[3]
    q = jax.lax.dynamic_slice(qs, (bi, 0, qi * blk, 0), (1, h, blk, d))[0].astype(jnp.float32)
    iq = jax.lax.dynamic_slice(q_ids, (bi, qi * blk), (1, blk))[0]
    return bi, qi, q, iq


def _kv_chunk(ks: jax.Array, vs: jax.Array, kv_ids: jax.Array, bi: jax.Array, pos: jax.Array, blk: int):
    h, d = ks.shape[1], ks.shape[3]
    k = jax.lax.dynamic_slice(ks, (bi, 0, pos, 0), (1, h, blk, d))[0].astype(jnp.float32)
    v = jax.lax.dynamic_slice(vs, (bi, 0, pos, 0), (1, h, blk, d))[0].astype(jnp.float32)
    ik = jax.lax.dynamic_slice(kv_ids, (bi, pos), (1, blk))[0]
    return k, v, ik


def _allowed(iq: jax.Array, ik: jax.Array) -> jax.Array:
    return (iq[:, None] == ik[None, :]) & (iq[:, None] >= 0)  # [blk, bkv]


def match_varying(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` marked as varying over the manual mesh axes `like` varies over (inside `jax.shard_map`: loop carries
    built from constants must vary as the values they will hold); outside a shard_map `x` itself."""
    missing = tuple(sorted(jax.typeof(like).mat.varying - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def init_stats(qs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The online softmax's empty state for sorted queries `qs [B, H, Lq, D]`: running max `[B, H, Lq]` (-inf),
    running sum `[B, H, Lq]` (0) and unnormalised output `[B, H, Lq, D]` (0), float32, varying as qs."""
    b_sz, h, lq, d = qs.shape
    return (match_varying(jnp.full((b_sz, h, lq), -jnp.inf, jnp.float32), qs),
            match_varying(jnp.zeros((b_sz, h, lq), jnp.float32), qs),
            match_varying(jnp.zeros((b_sz, h, lq, d), jnp.float32), qs))


def accumulate(qs, ks, vs, q_ids, kv_ids, start, chunks, scale: float, blk: int, bkv: int, stats):
    """Adds the keys of one block of sorted keys to the online softmax `stats` (`init_stats`) of the sorted queries.

    qs `[B, H, nq*blk, D]`, q_ids `[B, nq*blk]`; ks / vs `[B, H, Lk + bkv, D]`, kv_ids `[B, Lk + bkv]` (sorted,
    padded by `bkv`); start / chunks `[B, nq]` (`key_runs`): query block i visits only `chunks[i]` chunks of `bkv`
    keys from `start[i]`. The ring of `context_parallel` calls it once per key block it is passed."""
    b_sz, h, lq, d = qs.shape
    nq = lq // blk

    def q_block(i, carry):
        m_all, total_all, acc_all = carry
        bi, qi, q, iq = _q_block(qs, q_ids, i, nq, blk)
        s0 = start[bi, qi]
        at = (bi, 0, qi * blk)

        def chunk(j, c):  # online softmax: running max m, running sum `total`, unnormalised output acc
            m, total, acc = c
            k, v, ik = _kv_chunk(ks, vs, kv_ids, bi, s0 + j * bkv, bkv)
            s = jnp.einsum("hqd,hkd->hqk", q, k) * scale
            s = jnp.where(_allowed(iq, ik)[None], s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[..., None])
            return (m_new, total * alpha + jnp.sum(p, axis=-1),
                    acc * alpha[..., None] + jnp.einsum("hqk,hkd->hqd", p, v))

        init = (jax.lax.dynamic_slice(m_all, at, (1, h, blk))[0], jax.lax.dynamic_slice(total_all, at, (1, h, blk))[0],
                jax.lax.dynamic_slice(acc_all, (*at, 0), (1, h, blk, d))[0])
        m, total, acc = jax.lax.fori_loop(0, chunks[bi, qi], chunk, init)
        return (jax.lax.dynamic_update_slice(m_all, m[None], at),
                jax.lax.dynamic_update_slice(total_all, total[None], at),
                jax.lax.dynamic_update_slice(acc_all, acc[None], (*at, 0)))

    return jax.lax.fori_loop(0, b_sz * nq, q_block, stats)


def finish(stats) -> tuple[jax.Array, jax.Array]:
    """(out `[B, H, Lq, D]`, log-sum-exp `[B, H, Lq]`) float32 of the online softmax `stats`. A row with no allowed
    key (negative id or padding) has out 0 and lse inf, which keeps its backward at 0."""
    m, total, acc = stats
    some = total > 0
    out = acc / jnp.where(some, total, 1.0)[..., None]
    return out, jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)), jnp.inf)


def key_runs(kv_ids: jax.Array, q_ids: jax.Array, blk: int, bkv: int, n_keys: int) -> tuple[jax.Array, jax.Array]:
    """(start, chunks) int32 `[B, nq]`: the run of sorted keys `kv_ids[:, :n_keys]` each query block of the sorted
    `q_ids [B, nq*blk]` needs (keys whose id lies in the block's [min, max] real id), as whole chunks of `bkv`; 0
    chunks when the ranges do not meet (or the block has no real query), so that key block is skipped."""
    b_sz = q_ids.shape[0]
    blocks = q_ids.reshape(b_sz, -1, blk)
    lo = jnp.min(jnp.where(blocks >= 0, blocks, _PAD_KEY), axis=2)  # smallest real id of the block
    hi = jnp.max(blocks, axis=2)  # largest id; -1: no real query in the block
    start, end = sparse_pallas.id_runs(kv_ids[:, :n_keys], lo, hi)
    empty = (hi < 0) | (end <= start)
    chunks = jnp.where(empty, 0, -(-(end - start) // bkv)).astype(jnp.int32)
    return jnp.where(empty, 0, start).astype(jnp.int32), chunks


def _forward(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv):
    return finish(accumulate(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, init_stats(qs)))


def _forward_any(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, pallas, interpret):
    """(out, lse) of the block loop, or of the GPU Pallas kernel (`pallas`): the same pairs, the same residuals."""
    if pallas:
        return sparse_pallas.gpu_forward(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, interpret)
    return _forward(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _block_attention(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, pallas, interpret):
    return _forward_any(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, pallas, interpret)[0]


def _block_attention_fwd(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, pallas, interpret):
    out, lse = _forward_any(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, pallas, interpret)
    return out, (qs, ks, vs, q_ids, kv_ids, start, chunks, out, lse)


def _block_attention_bwd(scale, blk, bkv, pallas, interpret, res, g):
    qs, ks, vs, q_ids, kv_ids, start, chunks, out, lse = res
    if pallas:  # the GPU kernels: dq over each query block's key chunks, dk / dv over each key block's query blocks
        dq, dk, dv = sparse_pallas.gpu_backward(qs, ks, vs, q_ids, kv_ids, start, chunks, out, lse, g, scale, blk,
                                                bkv, interpret)
        return dq.astype(qs.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype), None, None, None, None
    g = g.astype(jnp.float32)
    delta = jnp.sum(g * out, axis=-1)  # [B, H, Lq]: rowsum(dO * O), the softmax backward's correction
    zeros = lambda x: match_varying(jnp.zeros(x.shape, jnp.float32), x)
    dq, dk, dv = accumulate_grads(qs, ks, vs, q_ids, kv_ids, start, chunks, g, lse, delta, scale, blk, bkv,
                                  (zeros(qs), zeros(ks), zeros(vs)))
    return dq.astype(qs.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype), None, None, None, None


def accumulate_grads(qs, ks, vs, q_ids, kv_ids, start, chunks, g, lse, delta, scale: float, blk: int, bkv: int,
                     grads):
    """Adds one block of sorted keys' part of the attention gradient to `grads = (dq, dk, dv)` (float32, shaped as
    qs, ks, vs): the (query block, key chunk) pairs of `accumulate`, probabilities recomputed from the log-sum-exp
    `lse [B, H, Lq]`; g `[B, H, Lq, D]` float32 (the output's cotangent), delta `[B, H, Lq]` = rowsum(g * out)."""
    b_sz, h, lq, d = qs.shape
    nq = lq // blk

    def q_block(i, carry):
        dq, dk, dv = carry
        bi, qi, q, iq = _q_block(qs, q_ids, i, nq, blk)
        do = jax.lax.dynamic_slice(g, (bi, 0, qi * blk, 0), (1, h, blk, d))[0]
        row_lse = jax.lax.dynamic_slice(lse, (bi, 0, qi * blk), (1, h, blk))[0]
        row_delta = jax.lax.dynamic_slice(delta, (bi, 0, qi * blk), (1, h, blk))[0]
        s0 = start[bi, qi]

        def chunk(j, c):
            dq_b, dk, dv = c
            pos = s0 + j * bkv
            k, v, ik = _kv_chunk(ks, vs, kv_ids, bi, pos, bkv)
            s = jnp.einsum("hqd,hkd->hqk", q, k) * scale
            p = jnp.where(_allowed(iq, ik)[None], jnp.exp(s - row_lse[..., None]), 0.0)
            dp = jnp.einsum("hqd,hkd->hqk", do, v)
            ds = p * (dp - row_delta[..., None])
            dq_b = dq_b + jnp.einsum("hqk,hkd->hqd", ds, k) * scale
            at = (bi, 0, pos, 0)
            dk_c = jax.lax.dynamic_slice(dk, at, (1, h, bkv, d)) + (jnp.einsum("hqk,hqd->hkd", ds, q) * scale)[None]
            dv_c = jax.lax.dynamic_slice(dv, at, (1, h, bkv, d)) + jnp.einsum("hqk,hqd->hkd", p, do)[None]
            return dq_b, jax.lax.dynamic_update_slice(dk, dk_c, at), jax.lax.dynamic_update_slice(dv, dv_c, at)

        dq_b = jax.lax.dynamic_slice(dq, (bi, 0, qi * blk, 0), (1, h, blk, d))[0]
        dq_b, dk, dv = jax.lax.fori_loop(0, chunks[bi, qi], chunk, (dq_b, dk, dv))
        dq = jax.lax.dynamic_update_slice(dq, dq_b[None], (bi, 0, qi * blk, 0))
        return dq, dk, dv

    return jax.lax.fori_loop(0, b_sz * nq, q_block, grads)


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)
