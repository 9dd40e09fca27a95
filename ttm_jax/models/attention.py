"""Attention ops by name, all with TTM's id masks: query i may attend key j iff `q_ids[i] == kv_ids[j] >= 0`.

`dot_product_attention(q, k, v, q_ids=..., kv_ids=..., impl=...)` picks an implementation from `IMPLS`
(`config.model.attention`):

  xla     the reference: `jax.nn.dot_product_attention` with the dense boolean mask `[B, 1, Lq, Lk]` from
          `masks.allowed`. Any backend; memory O(Lq * Lk), so for tests and small shapes.
  splash  TPU Pallas splash attention; the ids go in as `SegmentIds(q=q_ids, kv=kv_ids)`, no dense mask. Lq and Lk
          are padded to the 128-lane tiles; padded keys, and keys with negative ids (prompt padding), get an id no
          query carries, padded query rows are sliced away.
  gpu     GPU Pallas (Triton) flash attention `mha` with segment ids, for masked self-attention (the same ids array
          for q and kv). Cross-attention (different ids) goes through cuDNN/XLA with a boolean mask, see `_gpu`.

Masked self-attention over object-sorted tokens (`config.model.attention_sparse`): pass a
`sparse_attention.ObjectSort` (built once per forward pass by `sparse_attention.sort_objects(ids)`) as `q_ids`
(and `kv_ids`, or None); only the blocks of one object are computed, exact against `xla`: under `xla` by an XLA
block loop (`ttm_jax/models/sparse_attention.py`), under `splash` by splash with a block table built on device, under
`gpu` by a Pallas kernel that visits only each query block's key chunks (`ttm_jax/models/sparse_pallas.py`).

Without ids (unmasked) every impl is `jax.nn.dot_product_attention` (cuDNN where it applies under "gpu").
Under a mesh (`jax.set_mesh`) the Pallas kernels run per (batch, heads) shard in `shard_map`. Pallas kernels take
`interpret=True` to run on CPU. Every implementation is tested against `xla` (tests/test_attention.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ttm_jax.models import masks, sparse_attention

AttentionFn = Callable[..., jax.Array]


def _check(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array | None,
           kv_ids: jax.Array | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be [B, L, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: q [B, Lq, H, D] and k, v [B, Lk, H, D] disagree: "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q_ids is None:
        return
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if q_ids.shape != (b, lq):
        raise ValueError(f"attention: q_ids must be int32 [B, Lq] = {(b, lq)}, got {q_ids.shape}")
    if kv_ids.shape != (b, lk):
        raise ValueError(f"attention: kv_ids must be int32 [B, Lk] = {(b, lk)}, got {kv_ids.shape}")


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, kv_ids: jax.Array, *, scale: float,
         interpret: bool = False) -> jax.Array:
    """Reference: dense boolean mask `[B, 1, Lq, Lk]` into `jax.nn.dot_product_attention`."""
    del interpret
    mask = masks.allowed(q_ids, kv_ids)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


# An id no real token carries (real ids are >= -1): padded keys and keys with negative ids get it, so no real query
# ever matches them; padded queries get it too, so their (discarded) rows are never empty.
_NEVER = int(jnp.iinfo(jnp.int32).min)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_seq(x: jax.Array, length: int, axis: int, value: float | int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


# ---- per-device kernels under a mesh --------------------------------------------------------------------------------

# Pallas kernels (Mosaic on TPU, Triton on GPU) cannot be partitioned automatically by XLA, so under a mesh they run
# per shard inside `shard_map`: batch and heads are independent, the sequence stays whole. The mesh axes come from
# the Flax logical axis rules in scope (`batch`, `heads`; runtime/sharding.py), else these defaults (config.mesh axes).
_DEFAULT_AXES = {"batch": ("data", "fsdp"), "heads": ("tensor",)}


def _mesh_axes(logical: str, mesh: jax.sharding.AbstractMesh, dim: int) -> tuple[str, ...] | None:
    """Mesh axes for a logical dimension of size `dim`: the rule's axes present in `mesh`, trimmed to divide `dim`."""
    axes = None
    for name, target in nn.get_logical_axis_rules():
        if name == logical:
            axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
            break
    if axes is None:
        axes = _DEFAULT_AXES[logical]
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]  # keep the longest prefix that divides, as runtime/sharding.py does
    return axes or None


def _per_shard(kernel: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array,
               *ids: jax.Array) -> jax.Array:
    """`kernel(q, k, v, *ids)` per shard of the mesh in scope (`jax.set_mesh`); a plain call without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, *ids)
    batch = _mesh_axes("batch", mesh, q.shape[0])
    heads = _mesh_axes("heads", mesh, q.shape[2])
    x_spec = P(batch, None, heads, None)
    ids_spec = P(batch, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(x_spec, x_spec, x_spec) + (ids_spec,) * len(ids),
                         out_specs=x_spec, check_vma=False)(q, k, v, *ids)


# ---- splash (TPU) --------------------------------------------------------------------------------------------------

# Splash tiles must be multiples of 128 lanes (splash_attention_kernel.py: `bkv_compute % NUM_LANES`, and the segment
# id tiling in `_apply_mask_and_soft_cap` needs block_q and block_kv % 128 == 0). 512 is a good TPU tile; shorter
# sequences use one block of their own (padded) length.
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def _splash_block(length: int) -> int:
    return min(SPLASH_MAX_BLOCK, _round_up(length, SPLASH_LANES))


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, lq: int, lk: int, block_q: int, block_kv: int, interpret: bool):
    """A splash MHA kernel with a full static mask (all masking comes from segment ids), built once per shape."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block_sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    mask = splash.MultiHeadMask([splash.FullMask((lq, lk)) for _ in range(num_heads)])
    # The kernel holds its mask metadata as arrays; build them as concrete values even when first called inside a
    # trace, or the cached kernel would carry that trace's tracers into the next one.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(mask=mask, block_sizes=block_sizes, interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, kv_ids: jax.Array, *, scale: float,
            interpret: bool = False) -> jax.Array:
    """TPU splash attention with `SegmentIds(q=q_ids, kv=kv_ids)`: no dense mask, any Lq / Lk; per shard."""
    return _per_shard(functools.partial(_splash_local, scale=scale, interpret=interpret), q, k, v, q_ids, kv_ids)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, kv_ids: jax.Array, *, scale: float,
                  interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    lq, h = q.shape[1], q.shape[2]
    lk = k.shape[1]
    bq, bkv = _splash_block(lq), _splash_block(lk)
    lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bkv)
    # Splash applies no softmax scale of its own; scaling q is exact for the logits and for the gradients.
    qs = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, Lq, D]
    qs = _pad_seq(qs, lq_pad, axis=2)
    kt = _pad_seq(k.transpose(0, 2, 1, 3), lk_pad, axis=2)
    vt = _pad_seq(v.transpose(0, 2, 1, 3), lk_pad, axis=2)
    # Keys: negative ids (prompt padding) and padded keys -> _NEVER; padded queries -> _NEVER (they see padded keys).
    seg_q = _pad_seq(q_ids, lq_pad, axis=1, value=_NEVER)
    seg_kv = _pad_seq(jnp.where(kv_ids >= 0, kv_ids, _NEVER), lk_pad, axis=1, value=_NEVER)
    kernel = _splash_kernel(h, lq_pad, lk_pad, bq, bkv, bool(interpret))
    out = jax.vmap(lambda q_, k_, v_, sq, skv: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(q=sq, kv=skv)))(
        qs, kt, vt, seg_q, seg_kv)
    return out[:, :, :lq].transpose(0, 2, 1, 3).astype(q.dtype)


# ---- gpu (Pallas Triton) -------------------------------------------------------------------------------------------

# jax.experimental.pallas.ops.gpu.attention.mha: forward tiles block_q = block_k = min(128, L), backward tiles 32
# (BlockSizes.get_default); L must be a multiple of each, and Triton wants power-of-two tiles. Padding L to a
# multiple of 128 (or to the next power of two >= 32 below that) satisfies all of them.
GPU_BLOCK = 128
GPU_MIN_BLOCK = 32


def _gpu_length(length: int) -> int:
    if length >= GPU_BLOCK:
        return _round_up(length, GPU_BLOCK)
    return max(GPU_MIN_BLOCK, 1 << (length - 1).bit_length())


def _cudnn_or_xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """Boolean-mask attention through cuDNN where it supports the call (GPU, fp16/bf16, its head dims), else XLA."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) \
            and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0:
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except (NotImplementedError, RuntimeError):  # cuDNN missing or this shape unsupported: trace-time checks
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _gpu(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, kv_ids: jax.Array, *, scale: float,
         interpret: bool = False) -> jax.Array:
    """GPU: Pallas flash attention with segment ids for masked self-attention; cuDNN/XLA for cross-attention.

    `mha` takes ONE segment-id array that serves as both the query and the key ids (`segment_ids[b, i] ==
    segment_ids[b, j]`), so it expresses exactly masked self-attention (Lq == Lk, q_ids == kv_ids). TTM's masked
    cross-attention has different ids and lengths on the two sides (video tokens vs. S*Lp prompt tokens, Lk ~ 10^2),
    so it goes through `jax.nn.dot_product_attention` with the boolean mask: the mask is only `[Lq, Lk]` with small Lk,
    and cuDNN's fused kernel takes it where the dtype/shape allow.
    """
    lq, lk = q.shape[1], k.shape[1]
    self_attention = lq == lk and (q_ids is kv_ids or _same_ids(q_ids, kv_ids))
    if not self_attention:
        if lq == lk:
            warnings.warn(f"attention impl='gpu': q_ids and kv_ids are different arrays with Lq == Lk == {lq}, so "
                          "this runs with a dense [Lq, Lk] mask; for masked self-attention pass the same array (or "
                          "kv_ids=None) to use the Pallas kernel", stacklevel=3)
        return _cudnn_or_xla(q, k, v, masks.allowed(q_ids, kv_ids)[:, None], scale)
    return _per_shard(functools.partial(_gpu_local, scale=scale, interpret=interpret), q, k, v, q_ids)


def _gpu_local(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array, *, scale: float,
               interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    lq = q.shape[1]
    length = _gpu_length(lq)
    # Padded tokens get _NEVER on both sides: they attend each other only, and are sliced away.
    seg = _pad_seq(jnp.where(q_ids >= 0, q_ids, _NEVER), length, axis=1, value=_NEVER)
    qp, kp, vp = (_pad_seq(x, length, axis=1) for x in (q, k, v))
    block = min(GPU_BLOCK, length)
    block_sizes = gpu_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=GPU_MIN_BLOCK, block_kv_dkv=GPU_MIN_BLOCK,
        block_q_dq=GPU_MIN_BLOCK, block_kv_dq=GPU_MIN_BLOCK)
    out = gpu_attention.mha(qp, kp, vp, seg, sm_scale=scale, block_sizes=block_sizes, interpret=interpret)
    return out[:, :lq]


def _same_ids(a: jax.Array, b: jax.Array) -> bool:
    """True when `a` and `b` are the same concrete ids (only decidable outside jit; traced distinct arrays: False)."""
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    return a.shape == b.shape and bool(jnp.array_equal(a, b))


def _sparse(q: jax.Array, k: jax.Array, v: jax.Array, sort: sparse_attention.ObjectSort,
            kv_ids: jax.Array | sparse_attention.ObjectSort | None, scale: float | None, impl: str,
            interpret: bool) -> jax.Array:
    """Object-sparse masked self-attention (sparse_attention.py: the XLA block loop under impl "xla", splash with
    an on-device block table under "splash", the Pallas kernels (forward, dq, dk/dv) under "gpu"), per (batch,
    heads) shard under a mesh."""
    if kv_ids is not None and kv_ids is not sort:
        raise ValueError("attention: q_ids is a sparse_attention.ObjectSort (object-sparse masked self-attention); "
                         "pass kv_ids=None or the same ObjectSort")
    _check(q, k, v, None, None)
    if q.shape[1] != k.shape[1] or sort.shape != q.shape[:2]:
        raise ValueError(f"attention: object-sparse self-attention needs Lq == Lk and ids [B, L] = {q.shape[:2]}; "
                         f"got q {q.shape}, k {k.shape}, ids {sort.shape}")
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    _check_backend(impl, interpret)
    kernel = functools.partial(sparse_attention.masked_self_attention, scale=scale, impl=impl, interpret=interpret)
    return _per_shard(kernel, q, k, v, sort)


def _check_backend(impl: str, interpret: bool) -> None:
    backend = _BACKEND.get(impl)
    if backend and not interpret and jax.default_backend() != backend:
        raise ValueError(f"attention: impl={impl!r} runs a {backend.upper()} kernel but the JAX backend is "
                         f"{jax.default_backend()!r}; set config.model.attention to 'xla' (any backend), "
                         f"'splash' (TPU) or 'gpu' (GPU) to match the machine")


IMPLS: dict[str, AttentionFn] = {"xla": _xla, "splash": _splash, "gpu": _gpu}
_BACKEND = {"splash": "tpu", "gpu": "gpu"}  # the backend each Pallas kernel compiles for (unless interpret=True)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_ids: jax.Array | None = None,
                          kv_ids: jax.Array | None = None, impl: str = "xla", scale: float | None = None,
                          interpret: bool = False) -> jax.Array:
    """Multi-head attention with optional object-id masking.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]`.
      q_ids: int32 `[B, Lq]` object ids of the queries, or None for unmasked attention, or a
        `sparse_attention.ObjectSort` of the ids for object-sparse masked self-attention (any impl; kv_ids None or
        the same object).
      kv_ids: int32 `[B, Lk]` ids of the keys (-1: padding, never attended); None with `q_ids` given means
        self-attention with `kv_ids = q_ids` (needs Lq == Lk). impl="gpu" recognises masked self-attention by
        identity (`kv_ids is q_ids` or None; under jit two equal arrays are two tracers), so pass the same array.
      impl: a name in `IMPLS` (`config.model.attention`).
      scale: logit scale; None is `1/sqrt(D)`.
      interpret: run the Pallas kernels (splash, gpu) in interpret mode, on CPU (tests).

    Returns:
      `[B, Lq, H, D]` in q's dtype. Every query row needs at least one allowed key (`masks.sanitize_query_ids`).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention: impl={impl!r} is unknown (config.model.attention); choose one of "
                         f"{sorted(IMPLS)}")
    if isinstance(q_ids, sparse_attention.ObjectSort):
        return _sparse(q, k, v, q_ids, kv_ids, scale, impl, interpret)
    if q_ids is not None and kv_ids is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"attention: q_ids given without kv_ids means self-attention, but Lq={q.shape[1]} "
                             f"!= Lk={k.shape[1]}; pass kv_ids")
        kv_ids = q_ids
    if q_ids is None and kv_ids is not None:
        raise ValueError("attention: kv_ids given without q_ids; pass both (or neither for unmasked attention)")
    _check(q, k, v, q_ids, kv_ids)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    if q_ids is None and impl == "splash":
        # Unmasked attention on TPU through the same splash kernel with one segment for everything: XLA's dense
        # path would materialise [B, H, Lq, Lk] logits (~50 GB per example at Wan's 32k tokens and 12 heads).
        q_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_ids = q_ids if q.shape[1] == k.shape[1] else jnp.zeros(k.shape[:2], jnp.int32)
    if q_ids is None:
        # No mask: cuDNN's fused kernel under impl="gpu" where it applies (bf16/fp16), XLA otherwise.
        if impl == "gpu":
            return _cudnn_or_xla(q, k, v, None, scale)
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    _check_backend(impl, interpret)
    same = kv_ids is q_ids  # keep the identity: impl="gpu" recognises self-attention by it
    q_ids = jnp.asarray(q_ids, jnp.int32)
    kv_ids = q_ids if same else jnp.asarray(kv_ids, jnp.int32)
    return IMPLS[impl](q, k, v, q_ids, kv_ids, scale=scale, interpret=interpret)
