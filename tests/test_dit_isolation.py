"""Masked self-attention isolates objects inside the REAL DiT (`ttm_jax/backbones/wan/model.py`, stage 2, one TTM
block).

`test_dit.py` and the end-to-end tests pass with the masked self-attention made unmasked; this pins the mask at model
level. A tiny stage-2 DiT gets random values in the added layers' zero-initialised output projections and zero output
projections in the blocks' own (unmasked) self-attention, so that the only path between tokens is the masked
self-attention (cross-attention, feed-forward and norms act per token). Observed:

- unrolled blocks: the output of the first masked self-attention layer (Flax `capture_intermediates`; `nn.scan`
  does not carry intermediates out);
- scanned blocks (`scan_layers=True`, as the configs run): the model's output, patchified back to its tokens.

Perturbing object A's latent cells leaves object B's (and the background's) outputs bit-identical while A's change;
when A and B share an id, the same perturbation does change B's outputs (the layer really mixes tokens).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ttm_jax.backbones.wan import model as dit
from ttm_jax.models import masks, ttm_layers

O0 = {"xla_backend_optimization_level": 0}
C = 4  # latent channels; the stage-2 input has 3C
PATCH = (1, 2, 2)
T, H, W = 2, 6, 8  # latent grid; tokens 2 x 3 x 4 = 24
GRID = (T, H // PATCH[1], W // PATCH[2])
TEXT_DIM, LC, S, LP = 16, 3, 3, 2
CFG = dit.DiTConfig(dim=24, num_layers=2, num_heads=2, ffn_dim=32, text_dim=TEXT_DIM, freq_dim=16, ttm_layers=1,
                    patch_size=PATCH)
A, B = 1, 2

# per-token object ids on the (t, h, w) token grid: A and B move between the two latent frames; the rest background
TOKEN_GRID = np.zeros(GRID, np.int32)
TOKEN_GRID[0, 0, 0:2] = A
TOKEN_GRID[1, 1, 1:3] = A
TOKEN_GRID[0, 2, 2:4] = B
TOKEN_GRID[1, 1:3, 3] = B


def _latent_cells(token_mask: np.ndarray) -> np.ndarray:
    """bool token grid `[T', H'/ph, W'/pw]` -> the latent cells `[T', H', W']` those tokens cover."""
    return token_mask.repeat(PATCH[0], 0).repeat(PATCH[1], 1).repeat(PATCH[2], 2)


def _to_tokens(video: jax.Array) -> jax.Array:
    """`[B, T', H', W', C]` -> `[B, N, pt*ph*pw*C]`, tokens in (t, h, w) order (the inverse of the DiT's unpatchify)."""
    b, (pt, ph, pw) = video.shape[0], PATCH
    v = video.reshape(b, GRID[0], pt, GRID[1], ph, GRID[2], pw, video.shape[-1])
    return v.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, int(np.prod(GRID)), -1)


def _randomize(params, seed):
    """Every block's own self-attention output projection zeroed; every other all-zero leaf (the TTM layers'
    zero-initialised `to_out`, `proj_out`, biases) random."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for key, v in flat.items():
        if "attn1" in key and "to_out" in key:
            flat[key] = jnp.zeros_like(v)
        elif not np.any(np.asarray(v)):
            flat[key] = jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def run(request):
    """`(x, token_ids) -> [1, N, features]` per token: the first masked self-attention layer's output (unrolled) or
    the model's output (scanned); jitted once per layout."""
    scanned = request.param == "scanned"
    cfg = dataclasses.replace(CFG, scan_layers=scanned)
    model = dit.DiT(cfg, 3 * C, C)
    rng = np.random.default_rng(0)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    timestep, context = jnp.array([420.0]), normal(1, LC, TEXT_DIM)
    local_mask = np.zeros((1, S, LP), bool)
    local_mask[0, :, 0] = True
    kwargs = dict(local_context=normal(1, S * LP, TEXT_DIM), local_ids=masks.local_prompt_ids(jnp.asarray(local_mask)))
    args, init_kw = dit.init_inputs(cfg, 3 * C)
    boxed = jax.jit(model.init).lower(jax.random.key(0), *args, **init_kw).compile(compiler_options=O0)(
        jax.random.key(0), *args, **init_kw)
    params = _randomize(jax.tree.map(np.asarray, nn.unbox(boxed)["params"]), seed=1)

    def observe(params, x, token_ids):
        out, state = model.apply({"params": params}, x, timestep, context, token_ids=token_ids,
                                 cross_token_ids=token_ids, **kwargs, mutable=["intermediates"],
                                 capture_intermediates=lambda m, _: isinstance(m, ttm_layers.MaskedSelfAttention))
        if scanned:
            return _to_tokens(out)
        (first,) = state["intermediates"]["blocks_0"]["masked_self_attn"]["__call__"]
        return first  # [B, N, dim]

    x0 = normal(1, T, H, W, 3 * C)
    ids0 = jnp.asarray(TOKEN_GRID.reshape(1, -1))
    compiled = jax.jit(observe).lower(params, x0, ids0).compile(compiler_options=O0)
    return lambda x, ids: np.asarray(compiled(params, x, ids)), x0


def _perturbed(x, token_mask, seed=5):
    cells = jnp.asarray(_latent_cells(token_mask))[None, ..., None]
    noise = jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape), x.dtype)
    return x + 2.0 * cells * noise


def test_observed_per_token(run):
    fn, x0 = run
    out = fn(x0, jnp.asarray(TOKEN_GRID.reshape(1, -1)))
    assert out.shape[:2] == (1, int(np.prod(GRID)))
    assert np.isfinite(out).all()


def test_perturbing_object_a_leaves_object_b_bit_identical(run):
    fn, x0 = run
    ids = TOKEN_GRID.reshape(-1)
    token_ids = jnp.asarray(ids[None])
    base = fn(x0, token_ids)
    moved = fn(_perturbed(x0, TOKEN_GRID == A), token_ids)
    np.testing.assert_array_equal(moved[0, ids == B], base[0, ids == B])
    np.testing.assert_array_equal(moved[0, ids == 0], base[0, ids == 0])
    assert np.abs(moved[0, ids == A] - base[0, ids == A]).min(axis=-1).max() > 1e-3  # A's own tokens did change


def test_sharing_an_id_lets_the_perturbation_through(run):
    """Sanity: with A's and B's tokens under one id, the layer mixes them, so B's outputs move."""
    fn, x0 = run
    ids = TOKEN_GRID.reshape(-1)
    shared = jnp.asarray(np.where(ids == B, A, ids)[None])
    base = fn(x0, shared)
    moved = fn(_perturbed(x0, TOKEN_GRID == A), shared)
    assert np.abs(moved[0, ids == B] - base[0, ids == B]).max() > 1e-3
    np.testing.assert_array_equal(moved[0, ids == 0], base[0, ids == 0])  # the background still apart
