"""Attention ops by name, all with TTM's id masks: query i may attend key j iff `q_ids[i] == kv_ids[j] >= 0`.

`dot_product_attention(q, k, v, q_ids=..., kv_ids=..., impl=...)` picks an implementation from `IMPLS`:

  xla     the reference: `jax.nn.dot_product_attention` with the dense boolean mask from `masks.allowed`
  splash  TPU Pallas splash attention, ids as `SegmentIds` (no dense mask)
  gpu     GPU Pallas (Triton) flash attention with segment ids for masked self-attention

Every implementation is tested against `xla` (tests/test_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ttm_jax.models import masks

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


IMPLS: dict[str, AttentionFn] = {"xla": _xla}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_ids: jax.Array | None = None,
                          kv_ids: jax.Array | None = None, impl: str = "xla", scale: float | None = None,
                          interpret: bool = False) -> jax.Array:
    """Multi-head attention with optional object-id masking.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]`.
      q_ids: int32 `[B, Lq]` object ids of the queries, or None for unmasked attention.
      kv_ids: int32 `[B, Lk]` ids of the keys (-1: padding, never attended); None with `q_ids` given means
        self-attention with `kv_ids = q_ids` (needs Lq == Lk).
      impl: a name in `IMPLS` (`config.model.attention`).
      scale: logit scale; None is `1/sqrt(D)`.
      interpret: run the Pallas kernels (splash, gpu) in interpret mode, on CPU (tests).

    Returns:
      `[B, Lq, H, D]` in q's dtype. Every query row needs at least one allowed key (`masks.sanitize_query_ids`).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention: impl={impl!r} is unknown (config.model.attention); choose one of "
                         f"{sorted(IMPLS)}")
    if q_ids is not None and kv_ids is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"attention: q_ids given without kv_ids means self-attention, but Lq={q.shape[1]} "
                             f"!= Lk={k.shape[1]}; pass kv_ids")
        kv_ids = q_ids
    if q_ids is None and kv_ids is not None:
        raise ValueError("attention: kv_ids given without q_ids; pass both (or neither for unmasked attention)")
    _check(q, k, v, q_ids, kv_ids)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else float(scale)
    if q_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    q_ids = jnp.asarray(q_ids, jnp.int32)
    kv_ids = jnp.asarray(kv_ids, jnp.int32)
    return IMPLS[impl](q, k, v, q_ids, kv_ids, scale=scale, interpret=interpret)
