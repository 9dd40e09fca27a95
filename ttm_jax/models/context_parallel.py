"""Context parallelism: attention with the video tokens sharded over a mesh axis (`context`), with TTM's object ids.

A query attends a key iff `q_ids == kv_ids >= 0` (`masks.allowed`); without ids every key. q `[B, Lq, H, D]`,
k / v `[B, Lk, H, D]`, ids int32 `[B, Lq]` / `[B, Lk]`, as `attention.dot_product_attention`. Each op takes the
global arrays and runs per shard in `jax.shard_map`: the sequence over `axis`, the batch over the mesh's `data` /
`fsdp` axes and the heads over `tensor` where present and dividing (as `attention._per_shard`). Outside a mesh, or on
a mesh whose `axis` is absent or of size 1, each is the plain single-device op (`local_attention`, or `attend`).

  ulysses_attention  all-to-all from sequence-sharded to head-sharded `[B, L, H/n, D]`, exact attention over the
                     whole sequence per head group, all-to-all back. The ids travel with their tokens: each shard
                     all-gathers them (int32 `[B, L]`, small). Needs the heads (per `tensor` shard) to divide by n;
                     two all-to-alls of q, k, v and one of the output per call.
  ring_attention     keys, values and their ids passed around the ring of n shards (`lax.ppermute`), each shard
                     keeping its queries; an online softmax (running max and denominator, float32) makes the result
                     full attention. Any head count; n - 1 exchanges of k, v forward; backward recomputes the
                     probabilities from the saved log-sum-exp (flash-attention style) and passes dk, dv around with
                     their keys, so only O(L / n) residuals stay per shard.
  sharded_cross_attention
                     cross-attention to text / local prompts: queries (and q_ids) sharded over `axis`, keys, values
                     and kv_ids replicated (they are short, Lk ~ 10^2); the plain op runs per shard, no exchange.
                     The cotangents of the replicated keys and values are summed over the shards by shard_map.

Fully masked rows (a query with no key of its id anywhere) give what the single-device reference gives
(`jax.nn.dot_product_attention` / `layers.fused_attention`): masked logits are the same large finite negative, so such
a row averages all Lk values uniformly, with zero gradient to q and k; the online softmax reproduces it because every
block of that row has the same maximum. Logits, softmax statistics and accumulators are float32 whatever the dtype.

Object-sparse masked self-attention (`config.model.attention_sparse`: q_ids a `sparse_attention.ObjectSort`, kv_ids
None or the same sort): work sum_k n_k^2 instead of N^2 per shard, exact.
  ulysses            after the all-to-all a device holds the whole sequence of its head group, so the single-device
                     block loop (`sparse_attention.masked_self_attention`) runs there on the DiT's sort of all the
                     tokens (int32 `[B, N]` arrays, replicated over `axis`; sorted once per forward pass).
  ring               each shard sorts its own tokens by id (per call: an argsort of L / n ints); the sorted key
                     blocks travel with their ids, and each query block visits, of every key block that comes by,
                     only the chunks of the run of ids in its [min, max] range (`sparse_attention.key_runs`): none
                     when the ranges do not meet. Backward as the dense ring (dk, dv travel home with their block).
  A negative id (no key anywhere) gives the mean of all the values, as the reference.

Wired: `config.mesh.context` is the mesh's `context` axis (`runtime/mesh.py`; the `length` rule maps to it) and
`layers.Attention(context_impl=...)` runs these under it (`layers.context_attention`), in the DiT and its TTM layers.
Not here yet (issue 32): the Pallas kernels as the per-shard op (dense or sparse: the XLA paths run per shard), the
U-Net.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ttm_jax.models import masks, sparse_attention

IMPLS = ("ulysses", "ring")

# The masked logit of `jax.nn.dot_product_attention` (and `layers.fused_attention`): -0.7 * float32 max. Finite, so a
# fully masked row is uniform instead of NaN, and equal in every block, so the ring's online softmax keeps it uniform.
_MASKED = -0.7 * float(np.finfo(np.float32).max)

# Mesh axes the batch and the heads are split over inside the shard_map, where present and dividing (config.mesh).
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXES = ("tensor",)

# attend(q, k, v, *, scale, q_ids, kv_ids) -> [B, Lq, H, D]: a single-device attention op (layout as above).
AttendFn = Callable[..., jax.Array]


# ---- the exact attention per shard: one block, or a ring of blocks ------------------------------------------------


def _logits(q: jax.Array, k: jax.Array, ids: tuple) -> jax.Array:
    """q `[B, H, Lq, D]` (scaled), k `[B, H, Lk, D]`, ids () or (q_ids, kv_ids) -> float32 `[B, H, Lq, Lk]`."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if ids:
        s = jnp.where(masks.allowed(*ids)[:, None], s, jnp.float32(_MASKED))
    return s


def _varying(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` marked as varying over the manual mesh axes `like` varies over (loop carries built from constants)."""
    missing = tuple(sorted(jax.typeof(like).mat.varying - jax.typeof(x).mat.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _rotate(xs: tuple, axis: str | None, n: int) -> tuple:
    """Each shard's `xs` to the next shard of the ring over `axis` (shard i -> i + 1 mod n)."""
    if n == 1:
        return xs
    perm = [(i, (i + 1) % n) for i in range(n)]
    return tuple(jax.lax.ppermute(x, axis, perm) for x in xs)


def _ring_fwd(q, k, v, ids, axis, n):
    # q [B, H, Lq, D] scaled; k, v [B, H, Lk, D] this shard's block; ids () or (q_ids [B, Lq], kv_ids [B, Lk])
    q_ids = ids[:1]
    b, h, lq = q.shape[:3]
    m = _varying(jnp.full((b, h, lq, 1), -jnp.inf, jnp.float32), q)
    den = _varying(jnp.zeros((b, h, lq, 1), jnp.float32), q)
    acc = _varying(jnp.zeros(q.shape, jnp.float32), q)

    def accumulate(stats, kv):
        m, den, acc = stats
        k, v, kv_ids = kv[0], kv[1], kv[2:]
        s = _logits(q, k, q_ids + kv_ids)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * corr + jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, den, acc

    def step(_, carry):
        stats, kv = carry
        return accumulate(stats, kv), _rotate(kv, axis, n)

    kv = (k, v) + ids[1:]
    stats, kv = jax.lax.fori_loop(0, n - 1, step, ((m, den, acc), kv))
    m, den, acc = accumulate(stats, kv)
    return (acc / den).astype(v.dtype), m + jnp.log(den)  # output, log-sum-exp [B, H, Lq, 1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q: jax.Array, k: jax.Array, v: jax.Array, ids: tuple, axis: str | None, n: int) -> jax.Array:
    return _ring_fwd(q, k, v, ids, axis, n)[0]


def _ring_vjp_fwd(q, k, v, ids, axis, n):
    o, lse = _ring_fwd(q, k, v, ids, axis, n)
    return o, (q, k, v, ids, o, lse)


def _ring_vjp_bwd(axis, n, res, do):
    # the probabilities are recomputed block by block from the saved log-sum-exp; dk, dv travel with their block and
    # are back at their shard after n steps
    q, k, v, ids, o, lse = res
    q_ids = ids[:1]
    lk_total = k.shape[2] * n
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, Lq, 1]
    fully_masked = lse < 0.5 * _MASKED  # lse = mask value + log(Lk) rounds to the mask value: p is 1 / Lk there

    def grads(dq, kv, dkv):
        k, v, kv_ids = kv[0], kv[1], kv[2:]
        s = _logits(q, k, q_ids + kv_ids)
        p = jnp.exp(s - lse)
        if ids:
            p = jnp.where(fully_masked, 1.0 / lk_total, p)
        dv = dkv[1] + jnp.einsum("bhqk,bhqd->bhkd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhqd,bhkd->bhqk", do, v, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if ids:  # no gradient through masked logits (it matters in a fully masked row)
            ds = jnp.where(masks.allowed(*(q_ids + kv_ids))[:, None], ds, 0.0)
        ds = ds.astype(q.dtype)
        dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
        dk = dkv[0] + jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    def step(_, carry):
        dq, kv, dkv = carry
        dq, dkv = grads(dq, kv, dkv)
        return dq, _rotate(kv, axis, n), _rotate(dkv, axis, n)

    dq = _varying(jnp.zeros(q.shape, jnp.float32), q)
    dkv = tuple(_varying(jnp.zeros(x.shape, jnp.float32), x) for x in (k, v))
    dq, kv, dkv = jax.lax.fori_loop(0, n - 1, step, (dq, (k, v) + ids[1:], dkv))
    dq, dkv = grads(dq, kv, dkv)
    dk, dv = _rotate(dkv, axis, n)  # the last block's gradients home
    ids_ct = tuple(np.zeros(i.shape, jax.dtypes.float0) for i in ids)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ids_ct


_ring.defvjp(_ring_vjp_fwd, _ring_vjp_bwd)


# ---- the object-sparse ring: each shard's queries and keys sorted by id, key blocks skipped by id range -------------


def _sparse_ring_fwd(qs, ks, vs, q_ids, kv_ids, scale, blk, bkv, n_keys, axis, n):
    # qs [B, H, nq*blk, D] this shard's queries sorted by id (q_ids [B, nq*blk]); ks, vs [B, H, n_keys + bkv, D] its
    # keys sorted (kv_ids [B, n_keys + bkv], padded with an id above every real one). Each key block that comes by
    # is searched for the run of ids each query block holds (`key_runs`): a query block whose id range does not
    # meet the key block's visits none of it.
    def visit(stats, kv):
        ks, vs, kv_ids = kv
        start, chunks = sparse_attention.key_runs(kv_ids, q_ids, blk, bkv, n_keys)
        return sparse_attention.accumulate(qs, ks, vs, q_ids, kv_ids, start, chunks, scale, blk, bkv, stats)

    def step(_, carry):
        stats, kv = carry
        return visit(stats, kv), _rotate(kv, axis, n)

    stats, kv = jax.lax.fori_loop(0, n - 1, step, (sparse_attention.init_stats(qs), (ks, vs, kv_ids)))
    return sparse_attention.finish(visit(stats, kv))  # out f32 [B, H, nq*blk, D], lse [B, H, nq*blk]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _sparse_ring(qs, ks, vs, q_ids, kv_ids, scale, blk, bkv, n_keys, axis, n):
    return _sparse_ring_fwd(qs, ks, vs, q_ids, kv_ids, scale, blk, bkv, n_keys, axis, n)[0]


def _sparse_ring_vjp_fwd(qs, ks, vs, q_ids, kv_ids, scale, blk, bkv, n_keys, axis, n):
    out, lse = _sparse_ring_fwd(qs, ks, vs, q_ids, kv_ids, scale, blk, bkv, n_keys, axis, n)
    return out, (qs, ks, vs, q_ids, kv_ids, out, lse)


def _sparse_ring_vjp_bwd(scale, blk, bkv, n_keys, axis, n, res, g):
    # the same (query block, key chunk) pairs as the forward; dk, dv travel with their key block, home after n steps
    qs, ks, vs, q_ids, kv_ids, out, lse = res
    g = g.astype(jnp.float32)
    delta = jnp.sum(g * out, axis=-1)

    def visit(dq, kv, dkv):
        ks, vs, kv_ids = kv
        start, chunks = sparse_attention.key_runs(kv_ids, q_ids, blk, bkv, n_keys)
        dq, dk, dv = sparse_attention.accumulate_grads(qs, ks, vs, q_ids, kv_ids, start, chunks, g, lse, delta,
                                                       scale, blk, bkv, (dq, *dkv))
        return dq, (dk, dv)

    def step(_, carry):
        dq, kv, dkv = carry
        dq, dkv = visit(dq, kv, dkv)
        return dq, _rotate(kv, axis, n), _rotate(dkv, axis, n)

    zeros = lambda x: _varying(jnp.zeros(x.shape, jnp.float32), x)
    dq, kv, dkv = jax.lax.fori_loop(0, n - 1, step, (zeros(qs), (ks, vs, kv_ids), (zeros(ks), zeros(vs))))
    dq, dkv = visit(dq, kv, dkv)
    dk, dv = _rotate(dkv, axis, n)
    return dq.astype(qs.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype), None, None


_sparse_ring.defvjp(_sparse_ring_vjp_fwd, _sparse_ring_vjp_bwd)


def _sparse_ring_shard(q, k, v, ids, scale, axis, n):
    """One shard's object-sparse ring attention: q, k, v `[B, l, H, D]` and ids int32 `[B, l]` of this shard's
    tokens (l = L / n) -> `[B, l, H, D]`. The shard sorts its own tokens by id (`sort_objects`, block
    `default_block(l)`); the sorted key blocks go round the ring with their ids."""
    sort = sparse_attention.sort_objects(ids)
    blk, bkv, length = sort.block, sort.block_kv, q.shape[1]
    qs = sparse_attention.sorted_heads_major(q, sort, sort.q_ids.shape[1])
    ks, vs = (sparse_attention.sorted_heads_major(x, sort, length + bkv) for x in (k, v))
    out = _sparse_ring(qs, ks, vs, sort.q_ids, sort.kv_ids, scale, blk, bkv, length, axis, n)
    # a negative id has no key anywhere: the reference's uniform row, the mean of every shard's values
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True)
    mean_v = jax.lax.pmean(mean_v, axis) if n > 1 else mean_v
    return sparse_attention.unsort(out, sort, mean_v).astype(q.dtype)


def _ids(q_ids: jax.Array | None, kv_ids: jax.Array | None, where: str) -> tuple:
    """() or (q_ids, kv_ids) int32; `kv_ids=None` with q_ids: self-attention."""
    if q_ids is None:
        if kv_ids is not None:
            raise ValueError(f"context_parallel.{where}: kv_ids given without q_ids; pass both (or neither for "
                             f"unmasked attention)")
        return ()
    kv_ids = q_ids if kv_ids is None else kv_ids
    return jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)


def _ring_heads_major(q, k, v, ids, scale, axis, n):
    """`_ring` on `[B, L, H, D]` inputs: heads-major inside (plain batched GEMMs), q scaled outside the VJP."""
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    qt = (qt.astype(jnp.float32) * scale).astype(q.dtype)
    return _ring(qt, kt, vt, ids, axis, n).transpose(0, 2, 1, 3)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                    q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None) -> jax.Array:
    """Exact attention on one device with the ring's VJP (a ring of one): `layers.fused_attention`'s semantics.

    q `[B, Lq, H, D]`, k / v `[B, Lk, H, D]`, ids int32 `[B, L]` or None -> `[B, Lq, H, D]`; the backward pass keeps
    only q, k, v, the output and the per-row log-sum-exp. The default per-shard op of `ulysses_attention` and
    `sharded_cross_attention`.
    """
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    return _ring_heads_major(q, k, v, _ids(q_ids, kv_ids, "local_attention"), scale, None, 1)


# ---- mesh plumbing ----------------------------------------------------------------------------------------------


def _axes(mesh, candidates: tuple[str, ...], dim: int, exclude: str) -> tuple[str, ...] | None:
    """The candidates present in `mesh` with size > 1, trimmed to the longest prefix whose product divides `dim`."""
    axes = tuple(a for a in candidates if a != exclude and a in mesh.axis_names and mesh.shape[a] > 1)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes or None


def _resolve_mesh(mesh, axis: str):
    """(mesh, n): `mesh` or the one in scope (`jax.set_mesh`); n = 1 when there is none or it lacks `axis`."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return None, 1
    if axis not in mesh.axis_names:
        return mesh, 1
    return mesh, int(mesh.shape[axis])


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, ids: tuple, where: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"context_parallel.{where}: q must be [B, Lq, H, D] and k, v [B, Lk, H, D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if ids and (ids[0].shape != q.shape[:2] or ids[1].shape != k.shape[:2]):
        raise ValueError(f"context_parallel.{where}: q_ids must be int32 [B, Lq] = {q.shape[:2]} and kv_ids "
                         f"[B, Lk] = {k.shape[:2]}; got {ids[0].shape}, {ids[1].shape}")


def _check_length(length: int, n: int, axis: str, what: str, where: str) -> None:
    if length % n:
        raise ValueError(f"context_parallel.{where}: {what}={length} tokens do not split over mesh axis {axis!r} of "
                         f"size {n}; choose config.mesh.context dividing {length} (or a latent grid whose token "
                         f"count it divides)")


def _specs(mesh, axis: str, q: jax.Array, *, seq_sharded_kv: bool) -> tuple[P, P, P, P]:
    """PartitionSpecs of q, k/v, q_ids, kv_ids: sequence over `axis`, batch and heads over the other axes."""
    batch = _axes(mesh, _BATCH_AXES, q.shape[0], axis)
    heads = _axes(mesh, _HEAD_AXES, q.shape[2], axis)
    kv_seq = axis if seq_sharded_kv else None
    return P(batch, axis, heads, None), P(batch, kv_seq, heads, None), P(batch, axis), P(batch, kv_seq)


def _heads_per_shard(mesh, axis: str, num_heads: int) -> int:
    heads = _axes(mesh, _HEAD_AXES, num_heads, axis)
    return num_heads // (math.prod(mesh.shape[a] for a in heads) if heads else 1)


def _sharded(body, mesh, specs, q, k, v, ids):
    q_spec, kv_spec, q_ids_spec, kv_ids_spec = specs
    in_specs = (q_spec, kv_spec, kv_spec) + ((q_ids_spec, kv_ids_spec) if ids else ())
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=q_spec)(q, k, v, *ids)


def _default_attend(attend: AttendFn | None) -> AttendFn:
    return local_attention if attend is None else attend


# ---- the three ops -----------------------------------------------------------------------------------------------


def _prologue(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None, kv_ids: jax.Array | None,
              scale: float | None, mesh: jax.sharding.Mesh | None, axis: str, name: str) -> tuple:
    """What every sharded op does first: `(ids, scale, mesh, n)` with the shapes checked, the default scale and the
    mesh resolved (n: the size of `axis`, 1 without one)."""
    ids = _ids(q_ids, kv_ids, name)
    _check_shapes(q, k, v, ids, name)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    return (ids, scale, *_resolve_mesh(mesh, axis))


def _object_sort(q_ids, kv_ids, where: str) -> sparse_attention.ObjectSort | None:
    """The `ObjectSort` passed as q_ids (the object-sparse path, `config.model.attention_sparse`), else None."""
    if isinstance(kv_ids, sparse_attention.ObjectSort) and kv_ids is not q_ids:
        raise ValueError(f"context_parallel.{where}: kv_ids is an ObjectSort but q_ids is not the same one; the "
                         f"object-sparse path is self-attention (pass the sort as q_ids, kv_ids=None)")
    if not isinstance(q_ids, sparse_attention.ObjectSort):
        return None
    if kv_ids is not None and kv_ids is not q_ids:
        raise ValueError(f"context_parallel.{where}: q_ids is an ObjectSort (object-sparse self-attention) but "
                         f"kv_ids differs; pass kv_ids=None or the same ObjectSort")
    return q_ids


def _sparse(q, k, v, sort, scale, mesh, axis, impl: str) -> jax.Array:
    """Object-sparse masked self-attention with the sequence over `axis` (`ulysses_attention` / `ring_attention`
    with an `ObjectSort` as q_ids). Ulysses: after the all-to-all each device holds the whole sequence of its head
    group, so the single-device block loop runs there on the DiT's sort of all the tokens (passed in, replicated over
    `axis`). Ring: each shard sorts its own tokens; sorted key blocks go round with their ids and a query block
    visits only the keys of its id range (`_sparse_ring_shard`). Per shard: the XLA block loop (the Pallas kernels
    cannot nest in the shard_map)."""
    name = f"{impl}_attention"
    _, scale, mesh, n = _prologue(q, k, v, sort.ids, None, scale, mesh, axis, name)
    if k.shape != q.shape:
        raise ValueError(f"context_parallel.{name}: the object-sparse path is self-attention: q, k, v must all be "
                         f"[B, N, H, D]; got {q.shape}, {k.shape}")
    if n == 1:
        return sparse_attention.masked_self_attention(q, k, v, sort, scale=scale)
    if impl == "ulysses":
        _check_heads(mesh, axis, q.shape[2], n)
    _check_length(q.shape[1], n, axis, "Lq", name)
    q_spec, kv_spec, q_ids_spec, _ = _specs(mesh, axis, q, seq_sharded_kv=True)
    if impl == "ulysses":
        def body(q, k, v, sort):
            q, k, v = (jax.lax.all_to_all(x, axis, 2, 1, tiled=True) for x in (q, k, v))
            out = sparse_attention.masked_self_attention(q, k, v, sort, scale=scale)
            return jax.lax.all_to_all(out, axis, 1, 2, tiled=True)

        sort_spec = P(q_spec[0], None)  # every leaf [B, *]: batch-sharded, whole over `axis`
        return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, sort_spec),
                             out_specs=q_spec)(q, k, v, sort)

    def ring_body(q, k, v, ids):
        return _sparse_ring_shard(q, k, v, ids, scale, axis, n)

    return jax.shard_map(ring_body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, q_ids_spec),
                         out_specs=q_spec)(q, k, v, sort.ids)


def _check_heads(mesh, axis: str, num_heads: int, n: int) -> None:
    heads = _heads_per_shard(mesh, axis, num_heads)
    if heads % n:
        raise ValueError(f"context_parallel.ulysses_attention: {heads} heads (per tensor shard) do not split over "
                         f"mesh axis {axis!r} of size {n}; choose config.mesh.context dividing {heads}, or "
                         f"config.model.context_impl='ring' (any head count)")


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: jax.sharding.Mesh | None = None,
                      axis: str = "context", q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None,
                      scale: float | None = None, attend: AttendFn | None = None) -> jax.Array:
    """Self-attention with the sequence sharded over `axis`, by all-to-all to head groups (DeepSpeed-Ulysses).

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]` (global arrays; Lq and Lk divisible by the axis size n).
      mesh: a `Mesh` / `AbstractMesh` with `axis`; None: the mesh in scope (`jax.set_mesh`).
      q_ids, kv_ids: int32 `[B, Lq]`, `[B, Lk]` object ids or None (unmasked); `kv_ids=None` with q_ids:
        `kv_ids = q_ids`. q_ids a `sparse_attention.ObjectSort` of all the tokens' ids (kv_ids None or the same):
        the object-sparse path (module docstring; `attend` is not used).
      scale: logit scale; None is `1/sqrt(D)`.
      attend: the single-device op run per head group, `attend(q, k, v, *, scale, q_ids, kv_ids)` on the whole
        sequence (default `local_attention`). It runs inside `shard_map`: a per-device kernel, not one that shards
        itself over a mesh.

    Returns:
      `[B, Lq, H, D]` in v's dtype, sharded as q.

    Raises:
      ValueError before any compute when the heads per `tensor` shard do not divide by n, or n does not divide L.
    """
    sort = _object_sort(q_ids, kv_ids, "ulysses_attention")
    if sort is not None:
        return _sparse(q, k, v, sort, scale, mesh, axis, "ulysses")
    ids, scale, mesh, n = _prologue(q, k, v, q_ids, kv_ids, scale, mesh, axis, "ulysses_attention")
    attend = _default_attend(attend)
    if n == 1:
        return attend(q, k, v, scale=scale, q_ids=ids[0] if ids else None, kv_ids=ids[1] if ids else None)
    _check_heads(mesh, axis, q.shape[2], n)
    _check_length(q.shape[1], n, axis, "Lq", "ulysses_attention")
    _check_length(k.shape[1], n, axis, "Lk", "ulysses_attention")

    def body(q, k, v, *ids):
        # [B, L/n, h, D] -> [B, L, h/n, D]: split the heads, gather the sequence in shard order
        q, k, v = (jax.lax.all_to_all(x, axis, 2, 1, tiled=True) for x in (q, k, v))
        ids = tuple(jax.lax.all_gather(i, axis, axis=1, tiled=True) for i in ids)
        out = attend(q, k, v, scale=scale, q_ids=ids[0] if ids else None, kv_ids=ids[1] if ids else None)
        return jax.lax.all_to_all(out, axis, 1, 2, tiled=True)  # back to [B, L/n, h, D]

    return _sharded(body, mesh, _specs(mesh, axis, q, seq_sharded_kv=True), q, k, v, ids)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: jax.sharding.Mesh | None = None,
                   axis: str = "context", q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None,
                   scale: float | None = None) -> jax.Array:
    """Self-attention with the sequence sharded over `axis`, by passing keys, values and their ids around the ring.

    Arguments and result as `ulysses_attention` (no `attend`: the blocks are this module's online softmax), any head
    count. Each of the n shards keeps its `Lq / n` queries and sees every `Lk / n` key block once. q_ids an
    `ObjectSort` (self-attention): each shard sorts its own tokens and skips key blocks outside its ids' ranges.
    """
    sort = _object_sort(q_ids, kv_ids, "ring_attention")
    if sort is not None:
        return _sparse(q, k, v, sort, scale, mesh, axis, "ring")
    ids, scale, mesh, n = _prologue(q, k, v, q_ids, kv_ids, scale, mesh, axis, "ring_attention")
    if n == 1:
        return _ring_heads_major(q, k, v, ids, scale, None, 1)
    _check_length(q.shape[1], n, axis, "Lq", "ring_attention")
    _check_length(k.shape[1], n, axis, "Lk", "ring_attention")

    def body(q, k, v, *ids):
        return _ring_heads_major(q, k, v, ids, scale, axis, n)

    return _sharded(body, mesh, _specs(mesh, axis, q, seq_sharded_kv=True), q, k, v, ids)


def sharded_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: jax.sharding.Mesh | None = None,
                            axis: str = "context", q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None,
                            scale: float | None = None, attend: AttendFn | None = None) -> jax.Array:
    """Cross-attention with the queries sharded over `axis` and the keys, values and kv_ids replicated: no exchange.

    q `[B, Lq, H, D]` (video tokens, Lq divisible by n), k / v `[B, Lk, H, D]` (text or local prompts), ids as
    `ulysses_attention` (q_ids sharded with their queries). `attend` per shard as in `ulysses_attention`.
    """
    ids, scale, mesh, n = _prologue(q, k, v, q_ids, kv_ids, scale, mesh, axis, "sharded_cross_attention")
    attend = _default_attend(attend)
    if n == 1:
        return attend(q, k, v, scale=scale, q_ids=ids[0] if ids else None, kv_ids=ids[1] if ids else None)
    _check_length(q.shape[1], n, axis, "Lq", "sharded_cross_attention")

    def body(q, k, v, *ids):
        # keys are the same on every shard of `axis`: mark them varying (its transpose sums their cotangents)
        k, v = (_varying(x, q) for x in (k, v))
        ids = (ids[0], _varying(ids[1], ids[0])) if ids else ()
        return attend(q, k, v, scale=scale, q_ids=ids[0] if ids else None, kv_ids=ids[1] if ids else None)

    return _sharded(body, mesh, _specs(mesh, axis, q, seq_sharded_kv=False), q, k, v, ids)


CONTEXT_IMPLS: dict[str, Callable[..., jax.Array]] = {"ulysses": ulysses_attention, "ring": ring_attention}
