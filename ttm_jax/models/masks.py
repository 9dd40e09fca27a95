"""Object ids for TTM's masked attention: the one canonical mask format (DESIGN.md).

Every video token carries an int32 object id (background 0, objects 1..K); every local-prompt token carries the id
of its object slot, prompt padding carries -1. Query i may attend key j iff `q_ids[i] == kv_ids[j] and
kv_ids[j] >= 0`. `allowed` / `bias` spell this out densely (the reference semantics, for tests and small CPU
shapes); the accelerated attention paths consume the ids directly, so no dense `[L, L]` matrix exists at real sizes.

All functions are pure `jnp` with static shapes, so they jit and vmap.

Token geometry (`token_ids_from_masks`, `token_ids_from_boxes`): a video `[T, H, W]` goes through the causal VAE
(latent frame 0 covers pixel frame 0; latent frame i > 0 covers pixel frames `1+(i-1)*tf .. i*tf`; `sf x sf` pixels
per latent pixel) and then the DiT patchify (`pt x ph x pw` latent cells per token, tokens ordered `(t, h, w)`
row-major, as diffusers' Wan). A token therefore covers a fixed set of pixel-frames; its id is the id that covers the
most of them (plurality, "area majority"), background 0 competing like any object. Pixel-frames are counted equally, so
in a token whose time patch spans latent frame 0 (one pixel frame) and latent frame 1 (tf frames), frame 0 weighs
1/(1+tf). Ties go to the lower id, so background wins a tie, and an object smaller than half a token loses the token
to background.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

BACKGROUND = 0
PADDING = -1


def _check_geometry(shape: Sequence[int], time_factor: int, space_factor: int, patch_size: Sequence[int],
                    fn: str) -> tuple[int, int, int]:
    """Validates `[B, T, H, W, K]` against the VAE factors and patch; returns tokens per axis (Tt, Ht, Wt)."""
    if len(shape) != 5:
        raise ValueError(f"masks.{fn}: object_masks must be bool [B, T, H, W, K], got shape {tuple(shape)}")
    _, t, h, w, _ = shape
    pt, ph, pw = (int(p) for p in patch_size)
    tf, sf = int(time_factor), int(space_factor)
    if tf < 1 or sf < 1 or min(pt, ph, pw) < 1:
        raise ValueError(f"masks.{fn}: time_factor={tf}, space_factor={sf}, patch_size={tuple(patch_size)} "
                         f"must all be positive (config.autoencoder / config.model.patch_size)")
    if (t - 1) % tf:
        raise ValueError(f"masks.{fn}: object_masks has T={t} frames; the causal VAE needs 1 + a multiple of "
                         f"time_factor={tf} (config.data.num_frames)")
    lt = 1 + (t - 1) // tf
    if lt % pt:
        raise ValueError(f"masks.{fn}: {lt} latent frames are not divisible by the time patch {pt} "
                         f"(config.model.patch_size)")
    if h % (sf * ph) or w % (sf * pw):
        raise ValueError(f"masks.{fn}: object_masks has H x W = {h} x {w}; both must be multiples of "
                         f"space_factor x patch = {sf * ph} x {sf * pw} (config.data.height / width)")
    return lt // pt, h // (sf * ph), w // (sf * pw)


def _pool_pixel_ids(pixel_ids: jax.Array, num_ids: int, *, time_factor: int, space_factor: int,
                    patch_size: Sequence[int]) -> jax.Array:
    """Per-pixel ids (int) `[B, T, H, W]` in `[0, num_ids)` -> per-token plurality id int32 `[B, N]`."""
    b, t, h, w = pixel_ids.shape
    tf, sf = int(time_factor), int(space_factor)
    pt, ph, pw = (int(p) for p in patch_size)
    classes = jnp.arange(num_ids, dtype=pixel_ids.dtype)
    sh, sw = sf * ph, sf * pw

    def space_counts(frames: jax.Array) -> jax.Array:
        # frames [B, F, H, W] -> counts [B, F, Ht, Wt, num_ids]; the one-hot compare fuses into the reduction.
        f = frames.shape[1]
        onehot = frames.reshape(b, f, h // sh, sh, w // sw, sw)[..., None] == classes
        return jnp.sum(onehot, axis=(3, 5), dtype=jnp.int32)

    counts = space_counts(pixel_ids[:, :1])  # latent frame 0 = pixel frame 0
    if t > 1:
        rest = space_counts(pixel_ids[:, 1:])  # [B, T-1, Ht, Wt, C]
        rest = rest.reshape(b, (t - 1) // tf, tf, *rest.shape[2:]).sum(axis=2)
        counts = jnp.concatenate([counts, rest], axis=1)  # [B, T', Ht, Wt, C]
    lt = counts.shape[1]
    counts = counts.reshape(b, lt // pt, pt, *counts.shape[2:]).sum(axis=2)
    # argmax returns the first maximum: ties go to the lower id (background first).
    return jnp.argmax(counts, axis=-1).astype(jnp.int32).reshape(b, -1)


def _pixel_dtype(k: int) -> jnp.dtype:
    # per-pixel ids are the one full-resolution intermediate: int8 keeps it at a byte a pixel (81x480x832 frames)
    return jnp.int8 if k < 127 else jnp.int32


def pixel_ids_from_masks(object_masks: jax.Array) -> jax.Array:
    """bool `[B, T, H, W, K]` -> int `[B, T, H, W]`: the lowest-numbered object covering a pixel, else 0."""
    k = object_masks.shape[-1]
    dt = _pixel_dtype(k)
    if k == 0:
        return jnp.zeros(object_masks.shape[:-1], dt)
    m = object_masks.astype(bool)
    # Paint the highest id first so lower ids end on top: one elementwise loop fusion, no int32 argmax buffer.
    ids = jnp.full(m.shape[:-1], BACKGROUND, dt)
    for i in range(k - 1, -1, -1):
        ids = jnp.where(m[..., i], jnp.asarray(i + 1, dt), ids)
    return ids


def token_ids_from_masks(object_masks: jax.Array, *, time_factor: int, space_factor: int,
                         patch_size: Sequence[int]) -> jax.Array:
    """Per-token object ids for masked self-attention, from per-pixel object masks.

    Args:
      object_masks: bool `[B, T, H, W, K]`, object k+1 at pixel resolution (K may be 0: all background).
      time_factor, space_factor: the autoencoder's compression (`config.autoencoder`).
      patch_size: the DiT patch `(pt, ph, pw)` in latent cells (`config.model.patch_size`).

    Returns:
      int32 `[B, N]`, `N = T'/pt * H/(sf*ph) * W/(sf*pw)` with `T' = 1 + (T-1)/tf`, tokens ordered `(t, h, w)`;
      each the plurality id over the pixel-frames the token covers (module docstring). Where objects overlap, a
      pixel belongs to the lowest-numbered one.
    """
    _check_geometry(object_masks.shape, time_factor, space_factor, patch_size, "token_ids_from_masks")
    pixel_ids = pixel_ids_from_masks(object_masks)
    return _pool_pixel_ids(pixel_ids, object_masks.shape[-1] + 1, time_factor=time_factor,
                           space_factor=space_factor, patch_size=patch_size)


def _filled(present: jax.Array, axis: int) -> jax.Array:
    """bool along `axis` -> bool True on [first True, last True] (the span a bounding box fills)."""
    fwd = jax.lax.cummax(present.astype(jnp.int8), axis=axis)
    bwd = jax.lax.cummax(present.astype(jnp.int8), axis=axis, reverse=True)
    return (fwd > 0) & (bwd > 0)


def pixel_ids_from_boxes(object_masks: jax.Array) -> jax.Array:
    """bool `[B, T, H, W, K]` -> int `[B, T, H, W]`: per frame, the id of the smallest object box covering a pixel.

    An object's box in frame t is the tight bounding box of its mask in that frame (no box where it is absent).
    Where boxes overlap, the smallest box (in pixels) wins, then the lower id: a small object in front of a large
    one keeps its tokens instead of disappearing inside the large box.
    """
    b, t, h, w, k = object_masks.shape
    dt = _pixel_dtype(k)
    if k == 0:
        return jnp.zeros((b, t, h, w), dt)
    m = object_masks.astype(bool)
    rows = _filled(jnp.any(m, axis=3), axis=2)  # [B, T, H, K]
    cols = _filled(jnp.any(m, axis=2), axis=2)  # [B, T, W, K]
    area = jnp.sum(rows, axis=2, dtype=jnp.int32) * jnp.sum(cols, axis=2, dtype=jnp.int32)  # [B, T, K]
    # Rank objects by (area, id) per frame; the covering object of lowest rank wins the pixel.
    order = area * k + jnp.arange(k, dtype=jnp.int32)  # [B, T, K], distinct per frame
    # Running minimum of the rank over the boxes covering each pixel: elementwise, fused, no [B, T, H, W, K] buffer.
    ids = jnp.full((b, t, h, w), BACKGROUND, dt)
    best = jnp.full((b, t, h, w), jnp.iinfo(jnp.int32).max, jnp.int32)
    for i in range(k):
        rank = order[:, :, None, None, i]
        take = rows[:, :, :, None, i] & cols[:, :, None, :, i] & (rank < best)
        ids = jnp.where(take, jnp.asarray(i + 1, dt), ids)
        best = jnp.where(take, rank, best)
    return ids


def token_ids_from_boxes(object_masks: jax.Array, *, time_factor: int, space_factor: int,
                         patch_size: Sequence[int]) -> jax.Array:
    """Per-token object ids for masked cross-attention, from the objects' per-frame bounding boxes (the paper's rule).

    Each pixel takes the id of the smallest box covering it in its frame (`pixel_ids_from_boxes`), then each token
    takes the plurality id over its pixel-frames, exactly as `token_ids_from_masks`.

    Args/returns: as `token_ids_from_masks`; int32 `[B, N]`.
    """
    _check_geometry(object_masks.shape, time_factor, space_factor, patch_size, "token_ids_from_boxes")
    pixel_ids = pixel_ids_from_boxes(object_masks)
    return _pool_pixel_ids(pixel_ids, object_masks.shape[-1] + 1, time_factor=time_factor,
                           space_factor=space_factor, patch_size=patch_size)


def local_prompt_ids(token_mask: jax.Array) -> jax.Array:
    """bool `[B, S, Lp]` (slot s = object s, slot 0 the caption) -> int32 `[B, S*Lp]`: s for real tokens, -1 padding."""
    if token_mask.ndim != 3:
        raise ValueError(f"masks.local_prompt_ids: token_mask must be bool [B, S, Lp], got shape {token_mask.shape}")
    b, s, lp = token_mask.shape
    slot = jnp.arange(s, dtype=jnp.int32)[None, :, None]
    return jnp.where(token_mask.astype(bool), slot, PADDING).reshape(b, s * lp)


def sanitize_query_ids(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """int32 `[B, Lq]`, `[B, Lk]` -> `[B, Lq]`: queries whose id has no key (or is negative) become 0 (background).

    Slot 0 (the caption / background prompt, or background tokens) always has a key in TTM, so afterwards every
    query row has at least one allowed key. Runs in O((Lq + Lk) log Lk) per example: a sorted search, never a dense
    `[Lq, Lk]` comparison.
    """
    q_ids = q_ids.astype(jnp.int32)
    kv_ids = kv_ids.astype(jnp.int32)

    def one(q: jax.Array, kv: jax.Array) -> jax.Array:
        srt = jnp.sort(kv)
        pos = jnp.clip(jnp.searchsorted(srt, q), 0, srt.shape[0] - 1)
        has_key = (srt[pos] == q) & (q >= 0)
        return jnp.where(has_key, q, BACKGROUND)

    if kv_ids.shape[-1] == 0:
        return jnp.zeros_like(q_ids)
    return jax.vmap(one)(q_ids, kv_ids)


def allowed(q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """int32 `[B, Lq]`, `[B, Lk]` -> bool `[B, Lq, Lk]`: `q == kv and kv >= 0` (dense; reference and small shapes)."""
    q = q_ids[:, :, None]
    kv = kv_ids[:, None, :]
    return (q == kv) & (kv >= 0)


def bias(q_ids: jax.Array, kv_ids: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Additive attention bias `[B, 1, Lq, Lk]` of `dtype`: 0 where allowed, a large finite negative elsewhere.

    The negative is `-0.7 * finfo(dtype).max` (as `jax.nn.dot_product_attention`), finite so that a fully masked row
    (a bug, see `sanitize_query_ids`) gives a uniform average instead of NaN.
    """
    neg = -0.7 * float(jnp.finfo(dtype).max)
    return jnp.where(allowed(q_ids, kv_ids), 0.0, neg).astype(dtype)[:, None]
