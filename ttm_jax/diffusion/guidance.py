"""Classifier-free guidance in the InstructPix2Pix two-scale form (Brooks et al. 2023, eq. 3), as TTM uses it.

All visual conditions (first-frame latent, first-frame mask latent or trajectory latent) form one "image" condition
`I`; the text (caption or motion prompt, and the local prompts) is the other, `T`:

    e = e(0, 0) + s_img (e(I, 0) - e(0, 0)) + s_txt (e(I, T) - e(I, 0))

With `s_img = s_txt = 1` this is the conditional prediction `e(I, T)`. The three predictions come from ONE forward pass
over a batch three times as large (`guided`), which keeps the accelerator busy with one large matmul stream instead of
three small ones; `guided_three_calls` is the same arithmetic with three passes, kept as the reference for tests and
`bench/sample.py`.

The conditions are any pytree whose leaves carry the batch on axis 0; the caller builds the three variants (the
"null" image and text are what training's condition dropout feeds, see `ttm_jax.assembly.inputs`), and
`apply_fn(x, t, cond)` maps them to a prediction. Nothing here knows about the DiT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# (x [B, ...], t [B], cond pytree with batch-leading leaves) -> prediction [B, ...]
ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


class GuidanceConds(NamedTuple):
    """The three condition variants, each a pytree of batch-leading arrays with identical structure and shapes."""

    none: Any  # null image, null text: e(0, 0)
    image: Any  # image, null text: e(I, 0)
    full: Any  # image and text: e(I, T)


def rescale(guided: jax.Array, cond: jax.Array, phi: float | jax.Array) -> jax.Array:
    """CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16): the
    guided prediction scaled to the conditional prediction's per-example std, blended with weight `phi` (0: off,
    exactly); float32."""
    axes = tuple(range(1, guided.ndim))
    g, c = guided.astype(jnp.float32), cond.astype(jnp.float32)
    std_c = jnp.std(c, axis=axes, keepdims=True)
    std_g = jnp.std(g, axis=axes, keepdims=True)
    return phi * (g * (std_c / jnp.maximum(std_g, 1e-12))) + (1.0 - phi) * g


def combine(e_none: jax.Array, e_image: jax.Array, e_full: jax.Array, image_scale: float | jax.Array,
            text_scale: float | jax.Array, guidance_rescale: float | jax.Array = 0.0) -> jax.Array:
    """`e(0,0) + s_img (e(I,0) - e(0,0)) + s_txt (e(I,T) - e(I,0))`, computed in float32, returned in e_full's dtype;
    `guidance_rescale > 0` then rescales it towards `e(I,T)`'s std (`rescale`; the zero-terminal-SNR paper's fix for
    over-exposure at high guidance)."""
    f32 = lambda a: a.astype(jnp.float32)
    e0, ei, ef = f32(e_none), f32(e_image), f32(e_full)
    out = e0 + image_scale * (ei - e0) + text_scale * (ef - ei)
    if not (isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0):
        out = rescale(out, ef, guidance_rescale)
    return out.astype(e_full.dtype)


def _check_same_structure(conds: GuidanceConds) -> None:
    shapes = [jax.tree_util.tree_map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), c) for c in conds]
    for name, s in zip(("image", "full"), shapes[1:], strict=True):
        if s != shapes[0]:
            raise ValueError(
                f"guidance: conds.{name} has leaves {s}, conds.none has {shapes[0]}; the three condition variants must "
                f"have the same structure, shapes and dtypes (build the null conditions with zeros_like / the empty "
                f"prompt's embeddings)")


def guided(apply_fn: ApplyFn, x: jax.Array, t: jax.Array, conds: GuidanceConds, image_scale: float | jax.Array,
           text_scale: float | jax.Array, guidance_rescale: float | jax.Array = 0.0) -> jax.Array:
    """The guided prediction from one forward pass over `[3B, ...]`.

    Args:
      apply_fn: `(x [3B, ...], t [3B], cond) -> [3B, ...]`.
      x: `[B, ...]` noisy latents; t: `[B]` times (whatever units `apply_fn` takes).
      conds: the three condition variants, each with batch `B`.
    Returns:
      `[B, ...]`, the combination of the three predictions (see the module docstring).
    """
    _check_same_structure(conds)
    b = x.shape[0]
    cat = lambda *leaves: jnp.concatenate(leaves, axis=0)
    cond3 = jax.tree_util.tree_map(cat, conds.none, conds.image, conds.full)
    out = apply_fn(cat(x, x, x), cat(t, t, t), cond3)
    if out.shape[0] != 3 * b:
        raise ValueError(f"guidance.guided: apply_fn returned batch {out.shape[0]}, expected 3 x {b}")
    return combine(out[:b], out[b:2 * b], out[2 * b:], image_scale, text_scale, guidance_rescale)


def guided_three_calls(apply_fn: ApplyFn, x: jax.Array, t: jax.Array, conds: GuidanceConds,
                       image_scale: float | jax.Array, text_scale: float | jax.Array,
                       guidance_rescale: float | jax.Array = 0.0) -> jax.Array:
    """`guided` with three separate forward passes of batch `B` (reference and benchmark baseline)."""
    _check_same_structure(conds)
    e0 = apply_fn(x, t, conds.none)
    ei = apply_fn(x, t, conds.image)
    ef = apply_fn(x, t, conds.full)
    return combine(e0, ei, ef, image_scale, text_scale, guidance_rescale)
